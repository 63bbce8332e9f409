"""Label maps on the built-in `digits_labels` (ink digit -> its label map, K = 11): four ways to train them.

Same steps, networks and data (pix2pix_labels' defaults): cross-entropy alone (the default, lambda_GAN 0);
cross-entropy + adversarial through the plain softmax (no noise, soft); through a straight-through Gumbel-softmax;
through the soft (not straight-through) Gumbel-softmax. Each is trained fresh and evaluated with the real CLI in a
scratch folder, for each seed; prints a row per run as it finishes (mIoU, pixel accuracy, the digit (majority
stroke class) accuracy and the training's seconds), so an interrupted benchmark keeps the rows it has.

    python benchmarks/labels.py [--steps N] [--seeds 0 1] [--lambda-gan 1] [--only softmax ...]
        (from the repository root; --steps defaults to params.yaml's)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

BIN = Path(sys.executable).parent
# name -> (row label, pix2pix_labels overrides); the adversarial ones add lambda_GAN.
RUNS = {
    "ce": ("cross-entropy alone (`lambda_GAN=0`)", ["lambda_GAN=0"]),
    "softmax": ("+ adversarial through the plain softmax", ["output.relaxation=softmax", "output.hard=false"]),
    "st-gumbel": ("+ adversarial through straight-through Gumbel-softmax", ["output.relaxation=gumbel"]),
    "soft-gumbel": ("+ adversarial through the soft Gumbel-softmax", ["output.relaxation=gumbel", "output.hard=false"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="training steps of every run (default: params.yaml's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--lambda-gan", type=float, default=1.0, help="the adversarial runs' lambda_GAN")
    parser.add_argument("--only", nargs="+", choices=list(RUNS), default=list(RUNS), help="a subset of the runs")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="transfigure-labels-"))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    shutil.copy("params.yaml", work / "params.yaml")
    transfigure = str(BIN / "transfigure")
    _run([transfigure, "prepare"], work, env)
    steps = [f"steps={args.steps}"] if args.steps else []
    print(f"{date.today()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"steps {args.steps or 'of params.yaml'}, adversarial lambda_GAN {args.lambda_gan}")  # fmt: skip
    print("| training | seed | mIoU | pixel accuracy | digit accuracy | seconds |")
    print("|---|---|---|---|---|---|", flush=True)
    for seed in args.seeds:
        for name in args.only:
            label, extra = RUNS[name]
            adversarial = [] if name == "ce" else [f"lambda_GAN={args.lambda_gan}"]
            overrides = [f"pix2pix_labels.{o}" for o in [*steps, *adversarial, *extra]]
            sets = ["--set", f"seed={seed}", *(flag for o in overrides for flag in ("--set", o))]
            started = time.monotonic()
            _run([transfigure, "train", "pix2pix_labels", "--fresh", *sets], work, env)
            seconds = time.monotonic() - started
            _run([transfigure, "evaluate", "pix2pix_labels", *sets], work, env)
            m = json.loads((work / "metrics/pix2pix_labels.json").read_text())["AtoB"]
            print(f"| {label} | {seed} | {m['miou']:.3f} | {m['pixel_accuracy']:.3f} | "
                  f"{m['majority_class_accuracy']:.3f} | {seconds:.0f} |", flush=True)  # fmt: skip
    shutil.rmtree(work)


def _run(command: list[str], work: Path, env: dict) -> None:
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-2000:])


if __name__ == "__main__":
    main()
