#!/usr/bin/env bash
# The wheels that benchmarks/gpu_check.sh installs on the lent GPU machine, fetched here into .whl/ (git-ignored) for
# the `device` tool to carry: that machine reaches no network, and its python3 (3.12) lacks what `bench train`
# imports through params: pydantic, with its needs that it lacks too (albumentations is imported only where a run
# augments, and no measurement of the kit does). The versions are those the project's .venv runs; typing-extensions
# because pydantic needs a newer one than the image may hold.
# `gpu_wheels.sh --list` prints the list; tests/test_gpu_check.py checks it and, where .whl/ holds it, the total.
set -euo pipefail
cd "$(dirname "$0")/.."

wheels=(
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
)
documented_mib=2.7 # their total once fetched, well under the 64 MiB that one device call carries

if [[ "${1:-}" == --list ]]; then
  printf '%s\n' "${wheels[@]}"
  exit
fi
# One version of each: a second wheel of a package stops the whole install there.
rm -rf .whl
"${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${wheels[@]}"
mib=$(find .whl -type f -name '*.whl' -printf '%s\n' | awk '{s += $1} END {printf "%.1f", s / 1048576}')
echo "$(find .whl -type f -name '*.whl' | wc -l) wheels, $mib MiB in .whl/ (documented: $documented_mib MiB)"
