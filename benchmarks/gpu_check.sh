#!/usr/bin/env bash
# The GPU check kit (benchmarks/README.md, "GPU check"): training, every recipe and inference on a CUDA device, each
# against its baseline, in one call of the `device` tool; `--dry-run` runs the same steps with small nets on the CPU.
# Figures: $OUT/gpu_check.json and gpu_check.md (default reports/bench/gpu_check); the table is printed last.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
out="${OUT:-reports/bench/gpu_check}"

# The device's python3 lacks pydantic and reaches no network: install the carried wheels (benchmarks/gpu_wheels.sh)
# where it is missing; a machine that has it, like the project's .venv, skips this.
has="import importlib.util as u; exit(not u.find_spec('pydantic'))"
if ! "$python" -c "$has"; then
  [[ -d .whl ]] || { echo "no .whl/ here: run benchmarks/gpu_wheels.sh, then carry .whl" >&2; exit 2; }
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# This checkout instead of an installed project, under the names the installed package maps its folders to.
site="$(mktemp -d)"
mkdir "$site/transfigure" && ln -s "$PWD/models" "$PWD/pipeline" "$site/transfigure/"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$python" benchmarks/gpu_check.py --out "$out" "$@"
