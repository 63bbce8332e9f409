"""cyclegan, cut and fastcut side by side on the built-in `photos` (64x64 crops; B a painterly rendering of A).

Same steps, batch size and network sizes for all three (the default pipeline's: resnet_3blocks ngf 16, a
two-layer PatchGAN with ndf 32); each is trained fresh and evaluated with the real CLI in a scratch folder.
Prints PSNR and SSIM of A->B against the true paintings (and copying A), KID (pixels-16 features), seconds per
step and the training process's peak memory (RSS).

    python benchmarks/photos.py [--steps 400]     (from the repository root)
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

import psutil

BIN = Path(sys.executable).parent
RUNS = {
    "cyclegan": ("cyclegan", []),
    "cut": ("cut", ["cut.variant=cut"]),
    "fastcut": ("cut", ["cut.variant=fastcut"]),
}
SHARED = ["dataset=photos", "batch_size=8", "generator.arch=resnet_3blocks", "generator.ngf=16",
          "discriminator.kind=n_layers", "discriminator.n_layers=2", "discriminator.ndf=32",
          "augment.flip=true", "checkpoint_every=100000", "sample_every=100000", "log_every=50"]  # fmt: skip


def peak_rss(command: list[str], cwd: Path, env: dict) -> tuple[float, int]:
    """Runs `command`; its wall seconds and the peak resident memory it reached (polled every 0.1 s)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    handle, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            peak = max(peak, handle.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{process.stderr.read().decode()[-2000:]}")
    return time.perf_counter() - started, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="transfigure-photos-"))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    shutil.copy("params.yaml", work / "params.yaml")
    subprocess.run([str(BIN / "transfigure"), "prepare"], cwd=work, env=env, check=True, capture_output=True)
    rows = []
    for label, (recipe, extra) in RUNS.items():
        overrides = [f"{recipe}.{o}" for o in [*SHARED, f"steps={args.steps}"]] + extra
        sets = [flag for o in overrides for flag in ("--set", o)]
        _, peak = peak_rss([str(BIN / "transfigure"), "train", recipe, "--fresh", *sets], work, env)
        train = json.loads((work / f"metrics/{recipe}.train.json").read_text())
        evaluated = subprocess.run([str(BIN / "transfigure"), "evaluate", recipe, *sets], cwd=work, env=env,
                                   capture_output=True, text=True)  # fmt: skip
        if evaluated.returncode:
            raise SystemExit(evaluated.stdout + evaluated.stderr)
        metrics = json.loads((work / f"metrics/{recipe}.json").read_text())["AtoB"]
        rows.append((label, metrics, 1 / train["steps_per_second"], peak / 2**20))
    shutil.rmtree(work)
    print(f"{date.today()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.steps} steps")
    print("| recipe | PSNR A->B (copy A) | SSIM | KID | s/step | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for label, m, seconds, mib in rows:
        print(f"| {label} | {m['psnr']:.2f} ({m['psnr_identity']:.2f}) | {m['ssim']:.3f} | {m['kid']:.4f} "
              f"| {seconds:.3f} | {mib:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
