"""The candidates for reduced-precision CPU translation, side by side on the same images and the same model:
ONNX Runtime float32 and int8 (our QDQ scheme, and quantizing every op), PyTorch float32 and bf16 autocast with
channels-last, OpenVINO f32 and bf16 (when installed). Images/s at batch 1 and fidelity against ONNX Runtime
float32, as docs/BENCHMARKS.md ("CPU precision") shows them.

    python benchmarks/cpu_precision_candidates.py [--size 256] [--weights G.pt] [--json]

Random weights unless --weights (a state dict of the same arch) is given; int8 fidelity then says little about a
trained model (see the doc).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from transfigure.models.generators import build_generator
from transfigure.pipeline import fidelity, threads
from transfigure.pipeline.bench.inference import METADATA
from transfigure.pipeline.export.quantize import quantize_qdq, write_int8_companion
from transfigure.pipeline.export.to_onnx import export_image_generator
from transfigure.pipeline.pixels import to_model_range, to_pixels
from transfigure.pipeline.schema import Int8Params
from transfigure.pipeline.serve import openvino_bf16
from transfigure.pipeline.serve.precision import cpu_flags


def best_seconds(run, x, repeats: int) -> float:
    run(x)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(x)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet_9blocks")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    n_threads = threads.apply("auto")
    torch.manual_seed(0)
    net = build_generator(args.arch).eval()
    if args.weights:
        net.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    photos = [fidelity.photo_like(args.size, args.size, seed) for seed in range(12)]
    batches = [np.ascontiguousarray(to_model_range(p.transpose(2, 0, 1)[None])) for p in photos]
    check = batches[8:]
    rows = []

    def record(what: str, run) -> None:
        seconds = best_seconds(run, check[0], args.repeats)
        outputs = [to_pixels(np.asarray(run(x), dtype=np.float32)[0]) for x in check]
        rows.append({"what": what, "images_per_second": round(1 / seconds, 3), "outputs": outputs})

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model.onnx"
        export_image_generator(net, model, dict(METADATA))
        options = ort.SessionOptions()
        options.intra_op_num_threads = n_threads
        fp32 = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        record("onnxruntime float32", lambda x: fp32.run(None, {"image": x})[0])
        write_int8_companion(model, photos[:8], photos[8:], Int8Params(), "photo-like images")
        int8 = ort.InferenceSession(str(model.with_suffix(".int8.onnx")), options, providers=["CPUExecutionProvider"])
        record("onnxruntime int8 (ours: QDQ, not the end convolutions)", lambda x: int8.run(None, {"image": x})[0])
        every = quantize_qdq(model, [{"image": x} for x in batches[:8]], exclude_end_convolutions=False)
        int8_all = ort.InferenceSession(every.SerializeToString(), options, providers=["CPUExecutionProvider"])
        record("onnxruntime int8, every convolution", lambda x: int8_all.run(None, {"image": x})[0])

        torch.set_num_threads(n_threads)
        with torch.no_grad():
            record("pytorch float32", lambda x: net(torch.from_numpy(x)).numpy())
            channels_last = net.to(memory_format=torch.channels_last)

            def bf16(x):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return channels_last(torch.from_numpy(x).to(memory_format=torch.channels_last)).float().numpy()

            record("pytorch bf16 autocast, channels-last", bf16)
        if openvino_bf16.installed():
            import openvino as ov

            for hint in ("f32", "bf16"):
                compiled = ov.Core().compile_model(
                    str(model), "CPU", {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": n_threads}
                )
                record(f"openvino {hint}", lambda x, c=compiled: c(x)[0])

    reference = rows[0]["outputs"]
    for row in rows:
        row.update(fidelity.compare(reference, row.pop("outputs")))
        row["vs_onnxruntime_fp32"] = round(row["images_per_second"] / rows[0]["images_per_second"], 2)
    flags = sorted(f for f in cpu_flags() if "vnni" in f or "amx" in f or "bf16" in f)
    result = {
        "arch": args.arch,
        "size": args.size,
        "threads": n_threads,
        "machine": platform.processor() or platform.machine(),
        "cpu_flags": flags,
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.arch} at {args.size}x{args.size}, batch 1, {n_threads} threads; CPU flags: {' '.join(flags)}")
    print("| candidate | images/s | vs ORT fp32 | mean levels | max levels | PSNR dB |\n|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['what']} | {row['images_per_second']:.2f} | {row['vs_onnxruntime_fp32']:.2f}x | "
            f"{row['mean_levels']:.2f} | {row['max_levels']:.0f} | {row['psnr_db']:.1f} |"
        )


if __name__ == "__main__":
    main()
