"""Tiled translation of a large photograph: how far today's blended tiles and thumbnail-statistics tiles land from
the untiled output, with seconds and peak memory, and a side-by-side crop (docs/BENCHMARKS.md, "Tiling").

    python benchmarks/tiling.py [--model AtoB.onnx] [--size 3000x2000] [--crop docs/tiling-seams.png] [--json]
    python benchmarks/tiling.py --memory      # peak memory of `transfigure translate --tile 512`, 2000^2 vs 12000x8000

Without --model, a random-init resnet_9blocks (the reference's CycleGAN generator, instance norm) is exported.
The photograph is scikit-image's astronaut, enlarged with bicubic resampling. Each configuration runs in its own
process, so its peak resident memory is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

CONFIGS = [("whole", None, None)] + [
    (kind, tile, thumbnail)
    for tile in (256, 512)
    for kind, thumbnail in (("blended", None), ("statistics", 512), ("statistics", 1024), ("statistics", 2048))
]


def photograph(width: int, height: int) -> np.ndarray:
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((width, height), Image.Resampling.BICUBIC))


def one(model: Path, image_path: Path, out: Path, kind: str, tile: int | None, thumbnail: int | None) -> None:
    """Child process: translate one way, save the output as .npy, print seconds and peak RSS as JSON."""
    from transfigure.pipeline.serve.engine import Engine
    from transfigure.pipeline.serve.options import InferenceOptions

    # Untiled: a budget no image here reaches, so the whole image goes through at once (the reference).
    options = InferenceOptions(providers=("cpu",), precision="fp32", tile=tile, thumbnail=thumbnail)
    engine = Engine(model, options if tile else replace(options, memory_budget=2**40))
    image = np.load(image_path)
    if kind == "blended":
        engine._tiles, engine.tiling = None, "blended overlaps (forced by the benchmark)"
    start = time.perf_counter()
    output = engine.translate(image)
    seconds = time.perf_counter() - start
    np.save(out, output)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"seconds": round(seconds, 2), "peak_gib": round(peak, 2), "tiling": engine.tiling}))


def run_config(model: Path, image_path: Path, out: Path, config) -> dict:
    kind, tile, thumbnail = config
    command = [
        sys.executable,
        __file__,
        "--one",
        kind,
        str(tile or 0),
        str(thumbnail or 0),
        str(model),
        str(image_path),
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def export_random_resnet(path: Path) -> Path:
    import torch

    from transfigure.models.generators import build_generator
    from transfigure.pipeline.bench.inference import METADATA
    from transfigure.pipeline.export.to_onnx import export_image_generator

    torch.manual_seed(0)
    export_image_generator(build_generator("resnet_9blocks"), path, dict(METADATA))
    return path


def side_by_side(image, whole, blended, statistics, tile: int, path: Path) -> None:
    """A 2*tile square around a tile corner of the three outputs, labelled, as one PNG."""
    from PIL import ImageDraw

    y, x = tile * 2 - tile // 2, tile * 2 - tile // 2
    crops = [a[y : y + tile, x : x + tile] for a in (image, whole, blended, statistics)]
    labels = ["input", "untiled", f"blended tiles ({tile})", f"thumbnail statistics ({tile})"]
    header = 24
    sheet = Image.new("RGB", (len(crops) * (tile + 4), tile + header), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (crop, label) in enumerate(zip(crops, labels, strict=True)):
        sheet.paste(Image.fromarray(crop), (index * (tile + 4), header))
        draw.text((index * (tile + 4) + 4, 2), label, fill="black", font_size=18)
    sheet = sheet.resize((sheet.width // 2, sheet.height // 2), Image.Resampling.LANCZOS)  # small enough for docs/
    sheet.save(path, quality=85) if path.suffix == ".jpg" else sheet.save(path, optimize=True)


def memory(tile: int = 512) -> list[dict]:
    """Peak RSS of whole `transfigure translate --tile` processes on 2000x2000 and 12000x8000 photographs."""
    import torch

    from transfigure.models.generators import build_generator
    from transfigure.pipeline.bench.inference import METADATA
    from transfigure.pipeline.export.to_onnx import export_image_generator

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        model = root / "small.onnx"
        export_image_generator(build_generator("resnet_2blocks", ngf=8), model, dict(METADATA))
        for width, height in ((2000, 2000), (12000, 8000)):
            folder = root / f"in{width}"
            folder.mkdir()
            Image.fromarray(photograph(width, height)).save(folder / "photo.png")
            cli = Path(sys.executable).parent / "transfigure"
            command = [str(cli), "translate", str(folder), str(root / f"out{width}"), "--model", str(model)]
            command += ["--tile", str(tile), "--max-pixels", str(width * height), "--precision", "fp32"]
            start = time.perf_counter()
            done = subprocess.run(["/usr/bin/time", "-f", "%M", *command], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(done.stderr[-2000:])
            peak_kib = int(done.stderr.strip().splitlines()[-1])
            rows.append(
                {
                    "size": f"{width}x{height}",
                    "seconds": round(time.perf_counter() - start, 1),
                    "peak_gib": round(peak_kib / 2**20, 2),
                }
            )
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        kind, tile, thumbnail, model, image_path, out = sys.argv[2:8]
        one(Path(model), Path(image_path), Path(out), kind, int(tile) or None, int(thumbnail) or None)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--size", default="3000x2000")
    parser.add_argument("--crop", type=Path)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.memory:
        rows = memory()
        print(
            json.dumps(rows)
            if args.json
            else "\n".join(f"{r['size']}: {r['peak_gib']} GiB, {r['seconds']} s" for r in rows)
        )
        return
    width, height = (int(side) for side in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = args.model or export_random_resnet(root / "resnet_9blocks.onnx")
        image = photograph(width, height)
        np.save(root / "image.npy", image)
        outputs, rows = {}, []
        for config in CONFIGS:
            out = root / f"{'_'.join(str(c) for c in config)}.npy"
            row = {
                "kind": config[0],
                "tile": config[1],
                "thumbnail": config[2],
                **run_config(model, root / "image.npy", out, config),
            }
            outputs[config] = np.load(out)
            diff = np.abs(outputs[config].astype(np.int16) - outputs[CONFIGS[0]].astype(np.int16))
            row.update(mean_levels=round(float(diff.mean()), 2), p99_levels=float(np.percentile(diff, 99)))
            rows.append(row)
        if args.crop:
            side_by_side(
                image,
                outputs[CONFIGS[0]],
                outputs[("blended", 512, None)],
                outputs[("statistics", 512, 1024)],
                512,
                args.crop,
            )
    if args.json:
        print(json.dumps({"model": str(args.model or "resnet_9blocks (random init)"), "size": args.size, "rows": rows}))
        return
    print(f"{args.model or 'resnet_9blocks (random init)'} on a {args.size} photograph")
    print(
        "| tiling | tile | thumbnail | mean levels | p99 levels | seconds | peak GiB |\n|---|---|---|---|---|---|---|"
    )
    for r in rows:
        cells = [r["kind"], r["tile"] or "", r["thumbnail"] or "", r["mean_levels"], f"{r['p99_levels']:.0f}"]
        print("| " + " | ".join(str(c) for c in [*cells, r["seconds"], r["peak_gib"]]) + " |")


if __name__ == "__main__":
    main()
