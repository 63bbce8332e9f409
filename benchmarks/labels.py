"""Label maps on the built-in `digits_labels` (ink digit -> its label map, K = 11): three ways to train them.

Same steps, networks and data (pix2pix_labels' defaults): cross-entropy alone (lambda_GAN 0); cross-entropy +
adversarial through the plain softmax (no noise, soft); cross-entropy + adversarial through a straight-through
Gumbel-softmax (the default). Each is trained fresh and evaluated with the real CLI in a scratch folder; prints
mIoU, pixel accuracy and the digit (majority stroke class) accuracy of each.

    python benchmarks/labels.py [--steps 500] [--seed 0]     (from the repository root)
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
from datetime import date
from pathlib import Path

BIN = Path(sys.executable).parent
RUNS = {
    "cross-entropy alone": ["lambda_GAN=0"],
    "+ adversarial, softmax": ["output.relaxation=softmax", "output.hard=false"],
    "+ adversarial, ST Gumbel-softmax": [],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="transfigure-labels-"))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    shutil.copy("params.yaml", work / "params.yaml")
    transfigure = str(BIN / "transfigure")
    seed = ["--set", f"seed={args.seed}"]
    subprocess.run([transfigure, "prepare", *seed], cwd=work, env=env, check=True, capture_output=True)
    rows = []
    for label, extra in RUNS.items():
        overrides = [f"pix2pix_labels.{o}" for o in [f"steps={args.steps}", *extra]]
        sets = [*seed, *(flag for o in overrides for flag in ("--set", o))]
        for command in (["train", "pix2pix_labels", "--fresh"], ["evaluate", "pix2pix_labels"]):
            done = subprocess.run([transfigure, *command, *sets], cwd=work, env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(done.stdout[-2000:] + done.stderr[-2000:])
        rows.append((label, json.loads((work / "metrics/pix2pix_labels.json").read_text())["AtoB"]))
    shutil.rmtree(work)
    print(f"{date.today()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{args.steps} steps, seed {args.seed}")  # fmt: skip
    print("| training | mIoU | pixel accuracy | digit accuracy |")
    print("|---|---|---|---|")
    for label, m in rows:
        print(f"| {label} | {m['miou']:.3f} | {m['pixel_accuracy']:.3f} | {m['majority_class_accuracy']:.3f} |")


if __name__ == "__main__":
    main()
