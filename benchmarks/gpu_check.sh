#!/usr/bin/env bash
# The GPU check kit (benchmarks/README.md, "GPU check"): training, every recipe and inference on a CUDA device, each
# against its baseline, in one call of the `device` tool; `--dry-run` runs the same steps with small nets on the CPU.
# Figures: $OUT/gpu_check.json and gpu_check.md (default reports/bench/gpu_check); the table is printed last.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
out="${OUT:-reports/bench/gpu_check}"

# The device's python3 lacks pydantic and albumentations and reaches no network: install the carried wheels
# (benchmarks/gpu_wheels.sh) where they are missing; a machine that has them, like the project's .venv, skips this.
has="import importlib.util as u; exit(not (u.find_spec('pydantic') and u.find_spec('albumentations')))"
if ! "$python" -c "$has"; then
  [[ -d .whl ]] || { echo "no .whl/ here: run benchmarks/gpu_wheels.sh, then carry .whl" >&2; exit 2; }
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The repository root instead of an installed project; no update check from albumentations, which has no network.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
exec "$python" benchmarks/gpu_check.py --out "$out" "$@"
