"""The `transfigure` command. Imports of torch, mlflow and onnxruntime stay inside the commands so --help is instant."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from transfigure.pipeline.cli_support import (
    ParamsOption,
    SetOption,
    ThreadsOption,
    guard,
    load,
    recipe_names,
    use_threads,
)
from transfigure.pipeline.cli_support import console as _console

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Image-to-image translation: prepare, train, evaluate, export, translate.",
)


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
    threads: ThreadsOption = None,
) -> None:
    """Build every dataset named in params.yaml, or one folder with --from DIR --layout L --size N --out DIR."""

    def work() -> None:
        from pydantic import ValidationError

        from transfigure.pipeline.data.prepare import prepare_dataset, prepare_folder
        from transfigure.pipeline.errors import UserError
        from transfigure.pipeline.params import ParamsError, describe
        from transfigure.pipeline.schema import DatasetParams

        console = _console()
        if source is not None:
            if out is None:
                raise UserError("--out: where to write the prepared dataset (required with --from)")
            try:
                spec = DatasetParams(source="folder", path=str(source), layout=layout, size=size, resize=resize)
            except ValidationError as exc:
                raise ParamsError(describe(exc, "prepare")) from None
            use_threads(threads)
            report = prepare_folder(source, out, spec, seed=0, log=console.print)
            rejected = len(report["rejected"])
            console.print(f"prepared {report['prepared']}, rejected {rejected}; see {out / 'report.json'}")
            return
        p = load(params, overrides, threads)
        for name, spec in p.data.datasets.items():
            prepare_dataset(name, spec, Path(p.data.root), p.seed, log=console.print)

    guard(work)


@app.command()
def train(
    recipe: Annotated[str, typer.Argument(help=f"{recipe_names()}, or classifier (the digit classifier)")],
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
    threads: ThreadsOption = None,
) -> None:
    """Train a recipe; resumes from runs/RECIPE/checkpoints/last.pt unless --fresh (a higher `steps` extends it)."""

    def work() -> None:
        p = load(params, overrides, threads)
        if recipe == "classifier":
            from transfigure.pipeline.errors import UserError
            from transfigure.pipeline.evaluate.classifier import fit_classifier
            from transfigure.pipeline.train.distributed import World

            if World.from_environment().parallel:
                raise UserError("the digit classifier trains in one process: run it without torchrun")

            fit_classifier(p, _console())
            return
        from transfigure.pipeline.train.loop import train as run_training

        run_training(recipe, p, _console(), fresh=fresh, fresh_if_changed=fresh_if_changed)

    guard(work)


@app.command()
def evaluate(
    recipe: Annotated[str | None, typer.Argument(help="A trained recipe, or nothing with --real/--fake.")] = None,
    real: Annotated[Path | None, typer.Option(help="Folder of real images (compare two folders).")] = None,
    fake: Annotated[Path | None, typer.Option(help="Folder of generated images (compare two folders).")] = None,
    features: Annotated[
        str | None,
        typer.Option(
            help="KID/FID features: auto | digits-classifier | pixels-16 | inception-v3 "
            "(a recipe: default evaluate.features; two folders: default pixels-16)."
        ),
    ] = None,
    weights: Annotated[Path | None, typer.Option(help="Local Inception-v3 state dict (two folders).")] = None,
    sha256: Annotated[
        str | None, typer.Option(help="The weights file's expected sha256; refused if it differs.")
    ] = None,
    classifier: Annotated[
        Path | None, typer.Option(help="The digit classifier for --features digits-classifier (two folders).")
    ] = None,
    step: Annotated[int | None, typer.Option(help="A kept checkpoint of this step instead of last.pt.")] = None,
    on_dataset: Annotated[
        str | None, typer.Option(help="Score on this dataset of params, not the one it was trained on.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Write metrics/RECIPE.json and reports/RECIPE/ (on the checkpoint's data), or compare --real with --fake."""

    def work() -> None:
        import json

        from transfigure.pipeline.errors import UserError
        from transfigure.pipeline.evaluate import stage
        from transfigure.pipeline.train import recipes

        console = _console()
        if real is not None or fake is not None:
            if real is None or fake is None:
                raise UserError("--real and --fake go together")
            use_threads(threads)
            result = stage.compare(real, fake, features or "pixels-16", weights, sha256, classifier)
            warning = stage.small_sample_warning(min(result["n_real"], result["n_fake"]))
            if warning:
                typer.echo(warning, err=True)
            if as_json:
                print(json.dumps(result))
            else:
                for key, value in result.items():
                    console.print(f"{key}: {value}")
            return
        if recipe is None:
            raise UserError("name a recipe, or pass --real DIR --fake DIR")
        p = load(params, overrides, threads)
        if recipe == "classifier":
            from transfigure.pipeline.errors import UserError
            from transfigure.pipeline.evaluate.classifier import fit_classifier
            from transfigure.pipeline.train.distributed import World

            if World.from_environment().parallel:
                raise UserError("the digit classifier trains in one process: run it without torchrun")

            console.print("note: `evaluate classifier` is now `train classifier`; it trains the digit classifier")
            fit_classifier(p, console)
            return
        recipes.params_of(p, recipe)
        metrics = stage.evaluate_recipe(recipe, p, console, step=step, on_dataset=on_dataset, features=features)
        if as_json:
            print(json.dumps(metrics))

    guard(work)


@app.command()
def export(
    recipe: Annotated[str | None, typer.Argument(help="A trained recipe, or nothing with --checkpoint.")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Export this checkpoint file instead.")] = None,
    out: Annotated[Path | None, typer.Option(help="The .onnx file to write (with --checkpoint).")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write an fp16 model (IO stays float32).")] = False,
    step: Annotated[int | None, typer.Option(help="A kept checkpoint of this step (not registered).")] = None,
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Write artifacts/RECIPE/*.onnx (checked and parity-tested), or one checkpoint with --checkpoint --out."""

    def work() -> None:
        from transfigure.pipeline.errors import UserError
        from transfigure.pipeline.export import stage
        from transfigure.pipeline.train import recipes

        console = _console()
        if checkpoint is not None:
            if out is None:
                raise UserError("--out: the .onnx file to write (required with --checkpoint)")
            # The params, when there are any, say where prepared data lives to calibrate the int8 models on.
            p = load(params, overrides, threads) if params.exists() or overrides else None
            stage.export_checkpoint(checkpoint, out, fp16=fp16, console=console, params=p)
            return
        if recipe is None:
            raise UserError("name a recipe, or pass --checkpoint FILE --out FILE.onnx")
        p = load(params, overrides, threads)
        recipes.params_of(p, recipe)
        stage.export_recipe(recipe, p, console, fp16=fp16 or p.export.fp16, step=step)

    guard(work)


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
        from transfigure.pipeline.export.reference import import_reference_checkpoint

        result = import_reference_checkpoint(checkpoint, arch, norm, dropout, out)
        _console().print(f"wrote {out} (max abs error vs PyTorch {result['max_abs_error']:.2e})")

    guard(work)


from transfigure.pipeline import cli_inference  # noqa: E402 - after the helpers it uses
from transfigure.pipeline.bench.cli import bench_app  # noqa: E402

for command in (cli_inference.translate, cli_inference.serve, cli_inference.quantize, cli_inference.sample):
    app.command()(command)

app.add_typer(bench_app, name="bench")


@app.command()
def doctor() -> None:
    """Print versions, devices, and which ONNX Runtime providers really load."""

    def work() -> None:
        from transfigure.pipeline.doctor import report

        report(_console())

    guard(work)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def repro(ctx: typer.Context) -> None:
    """`dvc repro` of the whole pipeline, with "stage k of n" and the time left before each stage; DVC's options
    (--force, --keep-going ...) pass through."""
    import shutil

    from transfigure.pipeline.repro import reproduce

    dvc = shutil.which("dvc") or "dvc"
    raise typer.Exit(reproduce(ctx.args, dvc))
