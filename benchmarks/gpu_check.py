"""The GPU check kit's measurements (run it through benchmarks/gpu_check.sh; benchmarks/README.md, "GPU check").

One process runs, each against its baseline: `bench train` (pipeline/bench/train.py, with --set overrides) for the
reference-sized cyclegan and pix2pix in fp32, bf16 + channels-last and compiled, cut and fastcut on cyclegan's
networks; every recipe of the default pipeline in fp32, auto, fp16 and auto with the wgan-gp objective (autocast,
the fp16 scaler, the float32 gradient penalty), with its losses; fp32 training steps again on one batch that stays
on the device (the gap to the data pipeline's rows is data stall); and the exported generator's PyTorch inference,
eager against half precision, CUDA graphs and compiled. Compiled measurements go last, and none starts after the
time budget: what does not fit is marked skipped. The JSON is rewritten after every measurement, so a killed run
still leaves what it measured.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.metadata
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from transfigure.models.generators import build_generator
from transfigure.pipeline.bench import train as bench_train
from transfigure.pipeline.cli_support import load
from transfigure.pipeline.train import recipes

TRAIN_VARIANTS = {
    "fp32": ["precision=fp32", "channels_last=false"],
    "bf16 channels-last": ["precision=bf16", "channels_last=true"],
    "bf16 channels-last compiled": ["precision=bf16", "channels_last=true", "compile=true"],
}
# The steps again on one batch that stays on the device: the gap to the same steps with the data pipeline is the
# time the device waited for data.
RESIDENT = "one resident batch"
RECIPE_VARIANTS = {
    "fp32": ["precision=fp32"],
    f"fp32 {RESIDENT}": ["precision=fp32"],
    "auto": ["precision=auto"],
    "fp16": ["precision=fp16"],
    # A gradient penalty refuses a batch-norm critic (pix2pix's default): instance norm where a recipe has the knob.
    "wgan-gp auto": ["precision=auto", "objective=wgan-gp", "discriminator.norm=instance"],
}
# name: (dtype, channels_last, CUDA graphs, compiled)
INFERENCE_VARIANTS = {
    "eager fp32": (torch.float32, False, False, False),
    "eager bf16 channels-last": (torch.bfloat16, True, False, False),
    "eager fp16 channels-last": (torch.float16, True, False, False),
    "bf16 channels-last CUDA graph": (torch.bfloat16, True, True, False),
    "compiled bf16 channels-last": (torch.bfloat16, True, False, True),
    "compiled bf16 channels-last CUDA graphs": (torch.bfloat16, True, True, True),
}
TRAIN_BATCHES = (1, 4)
INFERENCE_BATCHES = (1, 8, 32)

# The reference networks (Zhu et al.): resnet_9blocks / unet_256, the 70x70 PatchGAN, 64 filters, 256x256 images;
# CUT and FastCUT on cyclegan's networks (the CUT paper: about 2x CycleGAN's speed), without the compiled rows.
_REFERENCE_RESNET = ["generator.arch=resnet_9blocks", "generator.ngf=64", "discriminator.kind=basic"]
_REFERENCE_RESNET += ["discriminator.ndf=64"]
FULL = {
    "size": 256,
    "train_steps": 30,
    "recipe_steps": 30,
    "warmup": 3,
    "nets": {
        "cyclegan": _REFERENCE_RESNET,
        "pix2pix": ["generator.arch=unet_256", "generator.ngf=64", "generator.dropout=true"]
        + ["discriminator.kind=basic", "discriminator.ndf=64"],
        "cut": _REFERENCE_RESNET,
        "fastcut": [*_REFERENCE_RESNET, "variant=fastcut"],
    },
    "recipe_overrides": [],
    "inference": {"arch": "resnet_9blocks", "ngf": 64, "images": 256},
}
# The same steps with small nets on the CPU, to check the kit itself.
DRY = {
    "size": 32,
    "train_steps": 2,
    "recipe_steps": 2,
    "warmup": 0,
    "nets": {
        "cyclegan": ["generator.arch=resnet_1blocks", "generator.ngf=8", "discriminator.kind=basic"]
        + ["discriminator.ndf=8"],
        "pix2pix": ["generator.arch=unet_5down", "generator.ngf=8", "generator.dropout=true"]
        + ["discriminator.kind=basic", "discriminator.ndf=8"],
        "cut": ["generator.arch=resnet_1blocks", "generator.ngf=8", "discriminator.ndf=8", "num_patches=16"],
        "fastcut": ["generator.arch=resnet_1blocks", "generator.ngf=8", "discriminator.ndf=8", "num_patches=16"]
        + ["variant=fastcut"],
    },
    "recipe_overrides": ["batch_size=2"],
    "inference": {"arch": "resnet_1blocks", "ngf": 8, "images": 8},
}


def plan(kit: dict, recipe_names: tuple[str, ...]) -> list[dict]:
    """Every measurement in reporting order; `baseline` names the row each is compared with."""
    rows = []
    for label, nets in kit["nets"].items():
        recipe = "cut" if label == "fastcut" else label
        variants = {**TRAIN_VARIANTS, f"fp32 {RESIDENT}": TRAIN_VARIANTS["fp32"]}
        for batch in TRAIN_BATCHES:
            for variant, settings in variants.items():
                if recipe == "cut" and "compile=true" in settings:
                    continue
                rows.append(
                    {
                        "group": "train",
                        "name": f"{label} b{batch} {variant}",
                        "baseline": f"{label} b{batch} fp32",
                        "recipe": recipe,
                        "size": kit["size"],
                        "steps": kit["train_steps"],
                        "settings": [*nets, f"batch_size={batch}", *settings],
                        "resident": variant.endswith(RESIDENT),
                    }
                )
    for recipe in recipe_names:
        fields = recipes.get(recipe).Params.model_fields
        for variant, settings in RECIPE_VARIANTS.items():
            settings = [one for one in settings if one.partition(".")[0].partition("=")[0] in fields]
            rows.append(
                {
                    "group": "recipes",
                    "name": f"{recipe} {variant}",
                    "baseline": f"{recipe} fp32",
                    "recipe": recipe,
                    "size": None,  # the size of the recipe's own dataset in params
                    "steps": kit["recipe_steps"],
                    "settings": [*kit["recipe_overrides"], *settings],
                    "resident": variant.endswith(RESIDENT),
                }
            )
    for batch in INFERENCE_BATCHES:
        for variant in INFERENCE_VARIANTS:
            rows.append(
                {
                    "group": "inference",
                    "name": f"b{batch} {variant}",
                    "baseline": f"b{batch} eager fp32",
                    "variant": variant,
                    "batch_size": batch,
                    "size": kit["size"],
                    **kit["inference"],
                }
            )
    return rows


def compiled(row: dict) -> bool:
    if row["group"] == "inference":
        return INFERENCE_VARIANTS[row["variant"]][3]
    return "compile=true" in row["settings"]


def measure_training(row: dict, params_path: Path, dry_run: bool, warmup: int) -> dict:
    """`transfigure bench train --recipe R --size S --steps N --set R.key=value ...`, in this process."""
    recipe = row["recipe"]
    settings = [f"{recipe}.{setting}" for setting in row["settings"]]
    if dry_run:
        settings += [f"{recipe}.device=cpu", f"{recipe}.precision=fp32"]
    params = load(params_path, settings)
    size = row["size"] or params.data.datasets[recipes.params_of(params, recipe).dataset].size
    return bench_train.run(recipe, params, size, row["steps"], warmup, resident=row["resident"])


def measure_inference(row: dict, warmup: int) -> dict:
    """Images/s of the generator alone on one fixed GPU-resident batch: the PyTorch side's ceiling."""
    dtype, channels_last, graphs, compile_it = INFERENCE_VARIANTS[row["variant"]]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    if not cuda:
        dtype, channels_last, graphs = torch.float32, False, False
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    net = build_generator(row["arch"], ngf=row["ngf"]).eval().to(device)
    x = torch.rand(row["batch_size"], 3, row["size"], row["size"], device=device) * 2 - 1
    with torch.no_grad():
        reference = net(x).float()
        net = net.to(dtype=dtype, memory_format=memory_format)
        x = x.to(dtype=dtype, memory_format=memory_format)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        if compile_it:
            forward = torch.compile(net, mode="reduce-overhead" if graphs else None)
        elif graphs:
            forward = _graphed(net, x)
        else:
            forward = net
        for _ in range(warmup):
            forward(x)
        iterations = max(2, row["images"] // row["batch_size"])
        _sync(device)
        started = time.perf_counter()
        for _ in range(iterations):
            y = forward(x)
        _sync(device)
        seconds = time.perf_counter() - started
        error = (y.float() - reference).abs().max().item()
    return {
        "arch": row["arch"],
        "size": row["size"],
        "batch_size": row["batch_size"],
        "precision": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "channels_last": channels_last,
        "compile": compile_it,
        "cuda_graphs": graphs,
        "images": iterations * row["batch_size"],
        "seconds": round(seconds, 4),
        "images_per_second": round(iterations * row["batch_size"] / seconds, 3),
        "max_abs_error": error,  # against the eager fp32 output of the same batch, on the [-1, 1] scale
        "peak_memory_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if cuda else None,
    }


def _graphed(net: torch.nn.Module, x: torch.Tensor):
    """The eager forward captured once as a CUDA graph and replayed on the same input buffer."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        net(x)  # warm-up outside the capture: cuDNN picks its kernels here
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = net(x)

    def forward(_):
        graph.replay()
        return out

    return forward


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_row(row: dict, params_path: Path, dry_run: bool, warmup: int) -> dict:
    """One measurement; a failure is recorded with its message and the kit goes on with the next."""
    if compiled(row):
        torch._dynamo.reset()  # each compiled run starts cold with static shapes, like its own `bench train`
    started = time.perf_counter()
    try:
        if row["group"] == "inference":
            result = measure_inference(row, warmup)
        else:
            result = measure_training(row, params_path, dry_run, warmup)
        status = "ok" if result.get("losses_finite", True) else "non-finite losses"
    except Exception as exc:  # one broken path must not hide the other measurements' figures
        result, status = {"error": f"{type(exc).__name__}: {exc}"[-500:]}, "failed"
    finally:
        if torch.cuda.is_available():
            gc.collect()  # the last run's networks and cached blocks out of the next one's peak memory
            torch.cuda.empty_cache()
    return {**result, "status": status, "wall_s": round(time.perf_counter() - started, 1)}


def compare(results: list[dict]) -> None:
    """vs_baseline: images/s over the baseline row's, where both were measured."""
    by_name = {(row["group"], row["name"]): row for row in results}
    for row in results:
        base = by_name[(row["group"], row["baseline"])]
        if row.get("images_per_second") and base.get("images_per_second"):
            row["vs_baseline"] = round(row["images_per_second"] / base["images_per_second"], 3)


def table(results: list[dict]) -> str:
    lines = ["| group | measurement | status | images/s | vs baseline | peak MiB | check |", "|" + "---|" * 7]
    for row in results:
        if row["status"] == "failed":
            check = row["error"][:80]
        elif row["group"] == "inference" and "max_abs_error" in row:
            check = f"max err {row['max_abs_error']:.3g}"
        elif "losses" in row:
            check = "losses finite" if row["losses_finite"] else "NON-FINITE losses"
        else:
            check = ""
        cells = [
            row["group"],
            row["name"],
            row["status"],
            f"{row['images_per_second']:.1f}" if "images_per_second" in row else "-",
            f"{row['vs_baseline']:.2f}x" if "vs_baseline" in row else "-",
            f"{row['peak_memory_mib']:.0f}" if row.get("peak_memory_mib") is not None else "-",
            check,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def imported_distributions() -> list[str]:
    """The installed distributions this run imported: what the device machine must have or be carried."""
    owners = importlib.metadata.packages_distributions()
    top = {name.partition(".")[0] for name in sys.modules}
    return sorted({dist for name in top for dist in owners.get(name, [])})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Folder for gpu_check.json and gpu_check.md.")
    parser.add_argument("--dry-run", action="store_true", help="The same steps, small nets on the CPU.")
    parser.add_argument("--budget", type=float, default=240, help="Seconds after which no measurement starts.")
    parser.add_argument("--only", help="Only the measurements whose 'group: name' holds this text, and baselines.")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device here: --dry-run runs the kit on the CPU")
    if args.dry_run:
        # Inductor's C++ build takes minutes on a small CPU; dynamo's tracing is what a dry run can check.
        torch.compile = functools.partial(torch.compile, backend="eager")
    kit = DRY if args.dry_run else FULL
    rows = plan(kit, recipes.names())
    if args.only:
        wanted = [row for row in rows if args.only in f"{row['group']}: {row['name']}"]
        keep = {(row["group"], name) for row in wanted for name in (row["name"], row["baseline"])}
        rows = [row for row in rows if (row["group"], row["name"]) in keep]
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "kit": "gpu_check",
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.dry_run else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": date.today().isoformat(),
        "budget_s": args.budget,
        "results": rows,
    }
    started = time.perf_counter()
    # Compiled runs cost the most start-up time, training's most of all: everything else is measured first.
    for index in sorted(range(len(rows)), key=lambda i: (compiled(rows[i]), rows[i]["group"] == "train")):
        row = rows[index]
        elapsed = time.perf_counter() - started
        if elapsed > args.budget:
            rows[index] = {**row, "status": "skipped", "reason": f"over the {args.budget:.0f} s budget"}
        else:
            rows[index] = {**row, **run_row(row, args.params, args.dry_run, kit["warmup"])}
        print(f"[{elapsed:5.0f} s] {row['group']}: {row['name']}: {rows[index]['status']}", file=sys.stderr, flush=True)
        compare(rows)
        report["wall_s"] = round(time.perf_counter() - started, 1)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    report["distributions"] = imported_distributions()
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    text = table(rows)
    (args.out / "gpu_check.md").write_text(text + "\n")
    print(f"\n{report['device']}, torch {report['torch']}, {report['wall_s']} s; JSON: {args.out / 'gpu_check.json'}")
    print(text)
    return 0 if all(row["status"] in ("ok", "skipped") for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
