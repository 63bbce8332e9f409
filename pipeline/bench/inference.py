"""`bench inference`: images/s of `translate` and of the engine, side by side with a plain PyTorch eager loop.

One run exports a generator (random init, or given weights) to ONNX, writes synthetic photos, then times:
the eager loop as the reference test script runs it (one image at a time: PIL decode, forward, uint8, PNG save)
and the `translate` command, both as whole processes on the same folder; then, in this process, the engine
alone per provider and batch size against the eager model alone. Processes alternate and the best of
`repeats` counts, so load from other jobs on a shared machine hits both sides alike.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

EAGER_LOOP = """
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from transfigure.models.generators import build_generator

arch, weights, src, dst = sys.argv[1:5]
device = "cuda" if torch.cuda.is_available() else "cpu"
net = build_generator(arch)
net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
net.to(device).eval()
Path(dst).mkdir(parents=True, exist_ok=True)
with torch.no_grad():
    for path in sorted(Path(src).glob("*.png")):
        x = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None]
        y = net((x.float() / 127.5 - 1).to(device))[0].cpu().numpy()
        Image.fromarray(((y.transpose(1, 2, 0) + 1) / 2 * 255).astype(np.uint8)).save(Path(dst) / path.name)
"""

# Dense fp16 tensor-core peaks from NVIDIA's datasheets, in TFLOP/s, by torch's device name.
PEAK_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H200": 989.4, "A100": 312.0}

METADATA = {
    "recipe": "bench",
    "direction": "AtoB",
    "source_domain": "A",
    "target_domain": "B",
    "training_commit": "bench",
    "params_hash": "bench",
}


def run(
    arch: str = "resnet_9blocks",
    size: int = 256,
    batch_sizes: tuple[int, ...] = (1, 8),
    providers: tuple[str, ...] = ("cpu",),
    n_images: int = 24,
    fp16: bool = False,
    weights: Path | None = None,
    repeats: int = 2,
    peak_tflops: float | None = None,
    precisions: tuple[str, ...] = ("fp32",),
) -> dict:
    """Measure and return {"results": [rows], "arch", "size", "gflop_per_image", "machine", "load_average", "date"}.

    Rows: {"what", "provider", "batch_size", "images", "seconds", "images_per_second", "vs_eager"}, plus
    "peak_fraction" on a GPU (against `peak_tflops`, or the dense fp16 peak of a known GPU). The whole-process
    translate row runs with the first provider and translate's default batch size for it. `precisions` (fp32,
    int8) on the CPU: each gets its translate and engine rows; int8 is quantized on the bench's first photos and
    checked on the rest, its quality under "int8" (random weights unless `weights` is given).
    """
    import torch

    from transfigure.models.generators import build_generator
    from transfigure.pipeline.export.quantize import write_int8_companion
    from transfigure.pipeline.export.to_onnx import export_image_generator
    from transfigure.pipeline.schema import Int8Params
    from transfigure.pipeline.serve.translate import default_batch_size

    torch.manual_seed(0)
    net = build_generator(arch)
    if weights is not None:
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    net.eval()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    peak = peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if gpu and k in gpu), None)
    gflop = _gflop_per_image(net, size)

    with tempfile.TemporaryDirectory(prefix="transfigure-bench-") as tmp:
        root = Path(tmp)
        torch.save(net.state_dict(), root / "weights.pt")
        export_image_generator(net, root / "model.onnx", METADATA)
        images = _write_photos(root / "photos", n_images, size)
        int8 = None
        if "int8" in precisions:
            half = max(1, n_images // 2)
            int8 = write_int8_companion(root / "model.onnx", images[:half], images[half:], Int8Params(), "bench photos")
        eager_cmd = [sys.executable, "-c", EAGER_LOOP, arch, str(root / "weights.pt"), str(root / "photos")]
        translate_batch = default_batch_size(providers[0])
        eager_s, translate_s = float("inf"), dict.fromkeys(precisions, float("inf"))
        for attempt in range(repeats):
            eager_s = min(eager_s, _time_process([*eager_cmd, str(root / f"eager{attempt}")]))
            for precision in precisions:
                translate_cmd = _translate_command(root, root / f"out{attempt}{precision}", providers[0], precision)
                translate_s[precision] = min(translate_s[precision], _time_process(translate_cmd))
        rows = [_row("pytorch eager loop, one image at a time (whole process)", "torch", 1, n_images, eager_s, eager_s)]
        for precision, seconds in translate_s.items():
            what = f"transfigure translate (whole process), {precision}"
            rows.append(_row(what, providers[0], translate_batch, n_images, seconds, eager_s))
        eager_model_s = _time_eager_model(net, images, "cuda" if gpu else "cpu")
        rows.append(_row("pytorch eager model only, fp32", "torch", 1, n_images, eager_model_s, eager_model_s))
        for provider in providers:
            for precision in precisions if provider == "cpu" else ("fp32",):
                rows += _time_engine(root / "model.onnx", provider, fp16, batch_sizes, images, eager_model_s, precision)
    if gpu:
        for row in rows:
            row["peak_fraction"] = round(row["images_per_second"] * gflop / (peak * 1000), 4) if peak else None
    return {
        "results": rows,
        "arch": arch,
        "size": size,
        "gflop_per_image": round(gflop, 1),
        "machine": _machine(gpu),
        # Other jobs on a shared machine slow both sides, PyTorch's OpenMP threads the most: say how busy it was.
        "load_average": round(os.getloadavg()[0], 2),
        "int8": int8,
        "date": datetime.date.today().isoformat(),
    }


def markdown_table(result: dict) -> str:
    """The results as a Markdown table, as docs/BENCHMARKS.md shows them."""
    with_peak = any("peak_fraction" in row for row in result["results"])
    header = ["what", "provider", "batch", "images/s", "vs eager"] + (["of GPU peak"] if with_peak else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result["results"]:
        cells = [row["what"], row["provider"], str(row["batch_size"]), f"{row['images_per_second']:.2f}"]
        cells.append(f"{row['vs_eager']:.2f}x")
        if with_peak:
            fraction = row.get("peak_fraction")
            cells.append(f"{fraction:.1%}" if fraction is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    int8 = result.get("int8")
    if int8:
        lines.append(
            f"\nint8 against fp32 on the held-out bench photos: {int8['mean_levels']:.2f} levels mean, "
            f"{int8['max_levels']:.0f} max, {int8['psnr_db']:.1f} dB ({int8['quality']})"
        )
    return "\n".join(lines)


def _row(what: str, provider: str, batch_size: int, images: int, seconds: float, baseline: float) -> dict:
    return {
        "what": what,
        "provider": provider,
        "batch_size": batch_size,
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_second": round(images / seconds, 3),
        "vs_eager": round(baseline / seconds, 3),
    }


def _translate_command(root: Path, out: Path, provider: str, precision: str) -> list[str]:
    """The installed `transfigure translate` next to this interpreter, with its default batch size."""
    cli = Path(sys.executable).parent / "transfigure"
    return [
        str(cli),
        "translate",
        str(root / "photos"),
        str(out),
        "--model",
        str(root / "model.onnx"),
        "--providers",
        provider,
        "--precision",
        precision,
    ]


def _time_process(command: list[str]) -> float:
    """Wall-clock seconds of a whole process, start-up and imports included."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"benchmark process failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds


def _time_eager_model(net, images: list[np.ndarray], device: str) -> float:
    import torch

    net = net.to(device)
    tensors = [torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1 for image in images]
    with torch.no_grad():
        net(tensors[0].to(device))
        _sync(device)
        start = time.perf_counter()
        for x in tensors:
            net(x.to(device)).cpu()
        _sync(device)
        return time.perf_counter() - start


def _time_engine(
    model: Path,
    provider: str,
    fp16: bool,
    batch_sizes: tuple[int, ...],
    images: list,
    baseline: float,
    precision: str = "fp32",
) -> list[dict]:
    from transfigure.pipeline.serve.engine import Engine
    from transfigure.pipeline.serve.options import InferenceOptions

    fp16 = fp16 and provider == "tensorrt"
    engine = Engine(model, InferenceOptions(providers=(provider,), tensorrt_fp16=fp16, precision=precision))
    label = "engine only, " + ("fp16" if engine.fp16 else engine.precision)
    rows = []
    for batch_size in batch_sizes:
        batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        # Warm-up at every shape the timed loop will see (TensorRT builds an engine per shape).
        for shape in {len(batch) for batch in batches}:
            engine.translate_batch(images[:shape])
        start = time.perf_counter()
        for batch in batches:
            engine.translate_batch(batch)
        rows.append(_row(label, engine.provider, batch_size, len(images), time.perf_counter() - start, baseline))
    return rows


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _write_photos(folder: Path, n: int, size: int) -> list[np.ndarray]:
    """Smooth random images with fine noise, saved as PNG: PNG decoding cost like photos, unlike flat noise."""
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = []
    for index in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
        image = np.clip(smooth + rng.integers(-8, 9, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"photo{index:04d}.png")
        images.append(image)
    return images


def _gflop_per_image(net, size: int) -> float:
    """FLOPs (2 per multiply-add) of one size x size image, counted by torch's FlopCounterMode on a real forward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def _machine(gpu: str | None) -> str:
    from transfigure.pipeline.threads import available_cpus

    cpus = f"{len(available_cpus())}-core CPU ({platform.machine()})"
    return f"{gpu}, {cpus}" if gpu else f"{cpus}, no GPU"
