#!/usr/bin/env bash
# Data-parallel training on this CPU: the default cyclegan in one process, then in two under torchrun (Gloo), on
# the same prepared digits. Prints each run's images/s (training time only, from metrics/cyclegan.train.json)
# and the ratio. Usage: benchmarks/ddp_cpu.sh [STEPS]   (run from the repository root, the venv on PATH)
set -euo pipefail
steps=${1:-200}
repo=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp params.yaml "$work/"
cd "$work"
export MLFLOW_TRACKING_URI="sqlite:///$work/mlflow.db"
transfigure prepare >/dev/null
common=(--fresh --set "cyclegan.steps=$steps" --set cyclegan.sample_every=100000 --set cyclegan.log_every=50)
images_per_second() { python -c "import json; print(json.load(open('metrics/cyclegan.train.json'))['images_per_second'])"; }

transfigure train cyclegan "${common[@]}" >/dev/null
one=$(images_per_second)
torchrun --standalone --nproc_per_node=2 "$(command -v transfigure)" train cyclegan "${common[@]}" >/dev/null 2>&1
two=$(images_per_second)  # of both processes: batch_size x world size per step
python - "$one" "$two" "$steps" <<'PY'
import platform, sys, datetime
one, two, steps = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
print(f"{datetime.date.today()} {platform.processor() or platform.machine()}, {steps} steps of default cyclegan:")
print(f"| 1 process | {one:.1f} images/s |")
print(f"| 2 processes (torchrun, gloo) | {two:.1f} images/s | {two / one:.2f}x |")
PY
cd "$repo"
