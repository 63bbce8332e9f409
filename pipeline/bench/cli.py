"""`transfigure bench ...`: the built-in benchmarks (their scripts and results: benchmarks/, docs/BENCHMARKS.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from transfigure.pipeline.cli_support import ParamsOption, SetOption, ThreadsOption, guard, load, recipe_names
from transfigure.pipeline.cli_support import console as _console

bench_app = typer.Typer(no_args_is_help=True, help="The built-in benchmarks.")


@bench_app.command("train")
def bench_train(
    recipe: Annotated[str, typer.Option(help=recipe_names())] = "cyclegan",
    size: Annotated[int, typer.Option(help="Image size in pixels.")] = 32,
    steps: Annotated[int, typer.Option(help="Timed training steps.")] = 20,
    precision: Annotated[
        str | None, typer.Option(help="auto | fp32 | bf16 | fp16 (default: the recipe's param).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Images/s of real training steps for a recipe, size and precision (other knobs with --set)."""

    def work() -> None:
        import json

        from transfigure.pipeline.bench.train import run

        settings = [*(overrides or []), *([f"{recipe}.precision={precision}"] if precision else [])]
        result = run(recipe, load(params, settings, threads), size, steps)
        if as_json:
            print(json.dumps(result))
        else:
            _console().print(" ".join(f"{k}={v}" for k, v in result.items()))

    guard(work)


@bench_app.command("objectives")
def bench_objectives(
    steps: Annotated[int | None, typer.Option(help="Generator steps per run (default: the benchmark's).")] = None,
    seeds: Annotated[int, typer.Option(help="Seeds per objective and dataset.")] = 3,
    objective: Annotated[
        list[str] | None, typer.Option(help="Only this objective (repeatable), e.g. flow-mle; default: all.")
    ] = None,
    dataset: Annotated[list[str] | None, typer.Option(help="Only this dataset (repeatable): ring8, grid25.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Every objective and flow generator on 2-D toy mixtures (ring8, grid25): modes covered and sample quality."""

    def work() -> None:
        import json

        from transfigure.pipeline.bench.objectives import STEPS, format_table, run_benchmark

        console = _console()
        # With --json, stdout carries only the JSON object.
        report = run_benchmark(
            objective, dataset, seeds=seeds, steps=steps or STEPS, progress=None if as_json else console.print
        )
        if as_json:
            print(json.dumps(report))
        else:
            console.print(format_table(report["results"]))
            console.print("scatter plots: reports/bench/objectives.png")

    guard(work)


@bench_app.command("inference")
def bench_inference(
    arch: Annotated[str, typer.Option(help="Generator architecture.")] = "resnet_9blocks",
    size: Annotated[int, typer.Option(help="Image size in pixels.")] = 256,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes for the engine.")] = "1,8",
    providers: Annotated[str, typer.Option(help="Comma-separated: cpu, cuda, tensorrt.")] = "cpu",
    n_images: Annotated[int, typer.Option(help="Synthetic photos per timed run.")] = 24,
    tensorrt_fp16: Annotated[bool, typer.Option("--tensorrt-fp16", help="TensorRT fp16 engines.")] = False,
    weights: Annotated[Path | None, typer.Option(help="A checkpoint instead of random weights.")] = None,
    repeats: Annotated[int, typer.Option(help="Timed repeats; the best counts.")] = 2,
    peak_tflops: Annotated[float | None, typer.Option(help="The GPU's peak, for the fraction reached.")] = None,
    precisions: Annotated[str, typer.Option(help="Comma-separated CPU precisions: fp32, int8.")] = "fp32",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Images/s of the translate CLI and the engine against a plain PyTorch eager loop, side by side."""

    def work() -> None:
        import json

        from transfigure.pipeline.bench.inference import markdown_table, run

        result = run(
            arch,
            size,
            tuple(int(b) for b in batch_sizes.split(",")),
            tuple(providers.split(",")),
            n_images,
            tensorrt_fp16,
            weights,
            repeats,
            peak_tflops,
            tuple(precisions.split(",")),
        )
        print(json.dumps(result) if as_json else markdown_table(result))

    guard(work)


@bench_app.command("serve")
def bench_serve(
    arch: Annotated[str, typer.Option(help="Generator architecture.")] = "resnet_9blocks",
    size: Annotated[int, typer.Option(help="Photo size in pixels.")] = 128,
    clients: Annotated[str, typer.Option(help="Comma-separated concurrent client counts.")] = "1,8,32",
    max_batches: Annotated[str, typer.Option(help="Comma-separated --max-batch settings, side by side.")] = "1,8",
    requests_per_client: Annotated[int, typer.Option(help="Requests each client sends per timed run.")] = 6,
    max_wait_ms: Annotated[float, typer.Option(help="The servers' --max-wait-ms.")] = 5.0,
    weights: Annotated[Path | None, typer.Option(help="A checkpoint instead of random weights.")] = None,
    repeats: Annotated[int, typer.Option(help="Timed repeats; the best counts.")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Requests/s and p50/p99 latency of `transfigure serve` by client count, max batch 1 against N."""

    def work() -> None:
        import json

        from transfigure.pipeline.bench.serve import markdown_table, run

        result = run(
            arch,
            size,
            tuple(int(c) for c in clients.split(",")),
            tuple(int(b) for b in max_batches.split(",")),
            requests_per_client,
            max_wait_ms,
            weights,
            repeats,
        )
        print(json.dumps(result) if as_json else markdown_table(result))

    guard(work)
