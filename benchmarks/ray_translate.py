"""`translate` on the local engine against `--engine ray` (a local Ray cluster on this machine), on one folder.

The model is the default pipeline's cyclegan generator (resnet_3blocks, ngf 16) with seeded weights, exported
like every translator; the folder holds N smooth 256x256 photos-like images. Each engine runs as the real CLI,
so the Ray figure includes starting the cluster and its actors: the cost a user pays for a folder of that size.

    python benchmarks/ray_translate.py [--images 200] [--size 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from transfigure.models.generators import build_generator
from transfigure.pipeline.export.to_onnx import export_image_generator

METADATA = {
    "recipe": "cyclegan",
    "direction": "AtoB",
    "source_domain": "A",
    "target_domain": "B",
    "training_commit": "benchmark",
    "params_hash": "benchmark",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        model = root / "g.onnx"
        export_image_generator(build_generator("resnet_3blocks", ngf=16), model, METADATA)
        rng = np.random.default_rng(0)
        (root / "in").mkdir()
        for i in range(args.images):
            small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((args.size, args.size), Image.BICUBIC).save(root / f"in/{i:04d}.png")
        rows = []
        for engine in ("local", "ray"):
            started = time.perf_counter()
            command = [str(Path(sys.executable).parent / "transfigure"), "translate", str(root / "in"),
                       str(root / f"out_{engine}"), "--model", str(model), "--engine", engine,
                       "--report", str(root / f"{engine}.json")]  # fmt: skip
            subprocess.run(command, check=True, capture_output=True)
            wall = time.perf_counter() - started
            report = json.loads((root / f"{engine}.json").read_text())
            rows.append((engine, report, wall))
    local_rate = args.images / rows[0][2]
    print(f"{date.today()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{args.images} images {args.size}x{args.size}, resnet_3blocks ngf 16")  # fmt: skip
    print("| engine | actors | wall s | images/s (wall) | ratio |")
    print("|---|---|---|---|---|")
    for engine, report, wall in rows:
        rate = args.images / wall
        print(f"| {engine} | {report.get('actors', '-')} | {wall:.1f} | {rate:.1f} | {rate / local_rate:.2f}x |")


if __name__ == "__main__":
    main()
