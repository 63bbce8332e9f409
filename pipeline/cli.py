"""The `transfigure` command. Imports of torch, mlflow and onnxruntime stay inside the commands so --help is instant."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Image-to-image translation: prepare, train, evaluate, export, translate.",
)

ParamsOption = Annotated[Path, typer.Option("--params", help="The params file.")]
SetOption = Annotated[list[str] | None, typer.Option("--set", help="Override a param: section.key=value (repeatable).")]


def _console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _fail(message: str, code: int) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {message}", markup=True)
    raise typer.Exit(code)


def _guard(work: Callable[[], object]) -> object:
    """A user's mistake ends with one line and exit 2; a diverged run with exit 1; bugs keep their traceback."""
    from pipeline.errors import UserError
    from pipeline.images import BadImage

    try:
        return work()
    except UserError as exc:
        from pipeline.train.loop import TrainingDiverged

        _fail(str(exc), 1 if isinstance(exc, TrainingDiverged) else 2)
    except BadImage as exc:
        _fail(str(exc), 2)
    except KeyboardInterrupt:
        _fail("interrupted; finished work is kept (train resumes from its last checkpoint)", 130)


def _recipe_names() -> str:
    """The recipes, read from the recipes folder's module names without importing them (torch), for --help."""
    import importlib.util
    import pkgutil

    folder = importlib.util.find_spec("pipeline.train.recipes").submodule_search_locations
    return " | ".join(m.name for m in pkgutil.iter_modules(folder) if m.name != "base")


def _params(path: Path, overrides: list[str] | None):
    from pipeline.params import load_params

    return load_params(path, overrides or [])


@app.command()
def prepare(
    source: Annotated[
        Path | None, typer.Option("--from", help="Prepare this one folder instead of params' datasets.")
    ] = None,
    layout: Annotated[str, typer.Option(help="unaligned | aligned | classes (with --from).")] = "unaligned",
    size: Annotated[int, typer.Option(help="Output size in pixels, a multiple of 4 (with --from).")] = 256,
    resize: Annotated[
        str, typer.Option(help="resize_and_crop | scale_width | none (with --from).")
    ] = "resize_and_crop",
    out: Annotated[Path | None, typer.Option(help="Output folder (with --from).")] = None,
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
) -> None:
    """Build every dataset named in params.yaml, or one folder with --from DIR --layout L --size N --out DIR."""

    def work() -> None:
        from pydantic import ValidationError

        from pipeline.data.prepare import prepare_dataset, prepare_folder
        from pipeline.errors import UserError
        from pipeline.params import ParamsError, describe
        from pipeline.schema import DatasetParams

        console = _console()
        if source is not None:
            if out is None:
                raise UserError("--out: where to write the prepared dataset (required with --from)")
            try:
                spec = DatasetParams(source="folder", path=str(source), layout=layout, size=size, resize=resize)
            except ValidationError as exc:
                raise ParamsError(describe(exc, "prepare")) from None
            report = prepare_folder(source, out, spec, seed=0, log=console.print)
            rejected = len(report["rejected"])
            console.print(f"prepared {report['prepared']}, rejected {rejected}; see {out / 'report.json'}")
            return
        p = _params(params, overrides)
        for name, spec in p.data.datasets.items():
            prepare_dataset(name, spec, Path(p.data.root), p.seed, log=console.print)

    _guard(work)


@app.command()
def train(
    recipe: Annotated[str, typer.Argument(help=f"{_recipe_names()}, or classifier (the digit classifier)")],
    fresh: Annotated[bool, typer.Option("--fresh", help="Start over instead of resuming.")] = False,
    fresh_if_changed: Annotated[
        bool,
        typer.Option(
            "--fresh-if-changed",
            help="Resume if params and training code match the checkpoint's, else start over (the DVC stage).",
        ),
    ] = False,
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
) -> None:
    """Train a recipe; resumes from runs/RECIPE/checkpoints/last.pt unless --fresh."""

    def work() -> None:
        p = _params(params, overrides)
        if recipe == "classifier":
            from pipeline.evaluate.classifier import fit_classifier

            fit_classifier(p, _console())
            return
        from pipeline.train.loop import train as run_training

        p.recipe(recipe)
        run_training(recipe, p, _console(), fresh=fresh, fresh_if_changed=fresh_if_changed)

    _guard(work)


@app.command()
def evaluate(
    recipe: Annotated[str | None, typer.Argument(help="A trained recipe, or nothing with --real/--fake.")] = None,
    real: Annotated[Path | None, typer.Option(help="Folder of real images (compare two folders).")] = None,
    fake: Annotated[Path | None, typer.Option(help="Folder of generated images (compare two folders).")] = None,
    features: Annotated[str, typer.Option(help="builtin | inception (needs --weights).")] = "builtin",
    weights: Annotated[
        Path | None, typer.Option(help="Local Inception-v3 state dict for --features inception.")
    ] = None,
    sha256: Annotated[
        str | None, typer.Option(help="The weights file's expected sha256; refused if it differs.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
) -> None:
    """Write metrics/RECIPE.json and reports/RECIPE/, or compare --real DIR with --fake DIR."""

    def work() -> None:
        import json

        from pipeline.errors import UserError
        from pipeline.evaluate import stage

        console = _console()
        if real is not None or fake is not None:
            if real is None or fake is None:
                raise UserError("--real and --fake go together")
            result = stage.compare(real, fake, features, weights, sha256)
            if as_json:
                print(json.dumps(result))
            else:
                for key, value in result.items():
                    console.print(f"{key}: {value}")
            return
        if recipe is None:
            raise UserError("name a recipe, or pass --real DIR --fake DIR")
        p = _params(params, overrides)
        if recipe == "classifier":
            from pipeline.evaluate.classifier import fit_classifier

            console.print("note: `evaluate classifier` is now `train classifier`; it trains the digit classifier")
            fit_classifier(p, console)
            return
        p.recipe(recipe)
        metrics = stage.evaluate_recipe(recipe, p, console)
        if as_json:
            print(json.dumps(metrics))

    _guard(work)


@app.command()
def export(
    recipe: Annotated[str | None, typer.Argument(help="A trained recipe, or nothing with --checkpoint.")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Export this checkpoint file instead.")] = None,
    out: Annotated[Path | None, typer.Option(help="The .onnx file to write (with --checkpoint).")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write an fp16 model (IO stays float32).")] = False,
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
) -> None:
    """Write artifacts/RECIPE/*.onnx (checked and parity-tested), or one checkpoint with --checkpoint --out."""

    def work() -> None:
        from pipeline.errors import UserError
        from pipeline.export import stage

        console = _console()
        if checkpoint is not None:
            if out is None:
                raise UserError("--out: the .onnx file to write (required with --checkpoint)")
            stage.export_checkpoint(checkpoint, out, fp16=fp16, console=console)
            return
        if recipe is None:
            raise UserError("name a recipe, or pass --checkpoint FILE --out FILE.onnx")
        p = _params(params, overrides)
        p.recipe(recipe)
        stage.export_recipe(recipe, p, console, fp16=fp16 or p.export.fp16)

    _guard(work)


@app.command()
def translate(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT", help="An image, or a folder searched recursively.")],
    output: Annotated[Path, typer.Argument(help="Output folder (or output file for a single image).")],
    model: Annotated[str, typer.Option(help="FILE.onnx or models:/NAME@ALIAS.")],
    batch_size: Annotated[
        int | None, typer.Option(help="Images of one size per batch (default: 1 on the CPU, 8 on a GPU).")
    ] = None,
    providers: Annotated[
        str | None, typer.Option(help="Comma-separated, in order: tensorrt,cuda,cpu (default: the best that loads).")
    ] = None,
    require_gpu: Annotated[bool, typer.Option("--require-gpu", help="Fail unless CUDA or TensorRT loaded.")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="TensorRT fp16 engines.")] = False,
    tensorrt_cache: Annotated[Path | None, typer.Option(help="TensorRT engine cache folder.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="png | jpg | webp")] = "png",
    skip_existing: Annotated[bool, typer.Option("--skip-existing", help="Keep outputs that already exist.")] = False,
    tile: Annotated[int | None, typer.Option(help="Translate images larger than N px in overlapping tiles.")] = None,
    workers: Annotated[int, typer.Option(help="Decode/encode threads.")] = 2,
    report: Annotated[Path | None, typer.Option(help="Write the JSON report here.")] = None,
) -> None:
    """Translate an image or a folder with an ONNX model; exit 1 if some inputs were rejected."""

    def work() -> int:
        from pipeline.serve.engine import open_engine
        from pipeline.serve.translate import exit_code, translate_path

        names = [p.strip() for p in providers.split(",") if p.strip()] if providers else None
        engine = open_engine(model, providers=names, require_gpu=require_gpu, fp16=fp16, tensorrt_cache=tensorrt_cache)
        result = translate_path(
            input_path,
            output,
            engine,
            batch_size=batch_size,
            fmt=fmt,
            skip_existing=skip_existing,
            tile=tile,
            workers=workers,
            report_path=report,
        )
        _console().print(
            f"translated {result['translated']}, skipped {result['skipped']}, "
            f"rejected {len(result['rejected'])} on {result['provider']}"
        )
        return exit_code(result)

    raise typer.Exit(_guard(work))


@app.command("import-checkpoint")
def import_checkpoint(
    checkpoint: Annotated[Path, typer.Argument(help="A generator .pth of junyanz/pytorch-CycleGAN-and-pix2pix.")],
    arch: Annotated[str, typer.Option(help="resnet_9blocks | resnet_6blocks | unet_256 | unet_128")],
    out: Annotated[Path, typer.Option(help="The .onnx file to write.")],
    norm: Annotated[str, typer.Option(help="instance | batch | none")] = "instance",
    dropout: Annotated[bool, typer.Option("--dropout", help="The checkpoint was trained with dropout.")] = False,
) -> None:
    """Convert a reference CycleGAN/pix2pix generator checkpoint into our ONNX contract (eval mode)."""

    def work() -> None:
        from pipeline.export.reference import import_reference_checkpoint

        result = import_reference_checkpoint(checkpoint, arch, norm, dropout, out)
        _console().print(f"wrote {out} (max abs error vs PyTorch {result['max_abs_error']:.2e})")

    _guard(work)


@app.command()
def sample(
    model: Annotated[Path, typer.Option(help="An exported generator.onnx (cdcgan or flowgan).")],
    out: Annotated[Path, typer.Option(help="Folder for the PNG files.")],
    label: Annotated[int | None, typer.Option(help="The class to sample (class-conditional models).")] = None,
    n: Annotated[int, typer.Option("--n", help="How many images.")] = 16,
    walk: Annotated[bool, typer.Option("--walk", help="A latent walk between two points instead.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the latent draws.")] = 0,
    temperature: Annotated[float, typer.Option(help="Scale of the latent draws (below 1: smoother).")] = 1.0,
) -> None:
    """Samples, or a latent walk, from an exported generator: of one class (cdcgan) or of a flow (flowgan)."""

    def work() -> None:
        from pipeline.serve.sample import sample as draw

        paths = draw(model, label, n, out, walk=walk, seed=seed, temperature=temperature)
        _console().print(f"wrote {len(paths)} images to {out}")

    _guard(work)


bench_app = typer.Typer(no_args_is_help=True, help="The built-in benchmarks.")
app.add_typer(bench_app, name="bench")


@bench_app.command("train")
def bench_train(
    recipe: Annotated[str, typer.Option(help=_recipe_names())] = "cyclegan",
    size: Annotated[int, typer.Option(help="Image size in pixels.")] = 32,
    steps: Annotated[int, typer.Option(help="Timed training steps.")] = 20,
    precision: Annotated[
        str | None, typer.Option(help="auto | fp32 | bf16 | fp16 (default: the recipe's param).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
) -> None:
    """Images/s of real training steps for a recipe, size and precision (other knobs with --set)."""

    def work() -> None:
        import json

        from pipeline.bench.train import run

        settings = [*(overrides or []), *([f"{recipe}.precision={precision}"] if precision else [])]
        result = run(recipe, _params(params, settings), size, steps)
        if as_json:
            print(json.dumps(result))
        else:
            _console().print(" ".join(f"{k}={v}" for k, v in result.items()))

    _guard(work)


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

        from pipeline.bench.objectives import STEPS, format_table, run_benchmark

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

    _guard(work)


@bench_app.command("inference")
def bench_inference(
    arch: Annotated[str, typer.Option(help="Generator architecture.")] = "resnet_9blocks",
    size: Annotated[int, typer.Option(help="Image size in pixels.")] = 256,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes for the engine.")] = "1,8",
    providers: Annotated[str, typer.Option(help="Comma-separated: cpu, cuda, tensorrt.")] = "cpu",
    n_images: Annotated[int, typer.Option(help="Synthetic photos per timed run.")] = 24,
    fp16: Annotated[bool, typer.Option("--fp16", help="TensorRT fp16.")] = False,
    weights: Annotated[Path | None, typer.Option(help="A checkpoint instead of random weights.")] = None,
    repeats: Annotated[int, typer.Option(help="Timed repeats; the best counts.")] = 2,
    peak_tflops: Annotated[float | None, typer.Option(help="The GPU's peak, for the fraction reached.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Images/s of the translate CLI and the engine against a plain PyTorch eager loop, side by side."""

    def work() -> None:
        import json

        from pipeline.bench.inference import markdown_table, run

        result = run(
            arch,
            size,
            tuple(int(b) for b in batch_sizes.split(",")),
            tuple(providers.split(",")),
            n_images,
            fp16,
            weights,
            repeats,
            peak_tflops,
        )
        print(json.dumps(result) if as_json else markdown_table(result))

    _guard(work)


@app.command()
def doctor() -> None:
    """Print versions, devices, and which ONNX Runtime providers really load."""

    def work() -> None:
        from pipeline.doctor import report

        report(_console())

    _guard(work)
