"""What every `transfigure` command shares: the console, one-line failures, and params loading with the thread
setting. Imports of torch and the pipeline stay inside the functions, so --help is instant."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

ParamsOption = Annotated[Path, typer.Option("--params", help="The params file.")]
SetOption = Annotated[list[str] | None, typer.Option("--set", help="Override a param: section.key=value (repeatable).")]
PrecisionOption = Annotated[
    str,
    typer.Option(
        envvar="TRANSFIGURE_PRECISION",
        help="On the CPU: auto (int8 where the CPU has VNNI/AMX and the model's int8 companion passed; bf16 with "
        "AMX and OpenVINO), fp32, int8 or bf16 (OpenVINO).",
    ),
]
ThreadsOption = Annotated[
    str | None,
    typer.Option(
        "--threads",
        envvar="TRANSFIGURE_THREADS",
        help="CPU threads: auto (the free cores) or a number (default: params).",
    ),
]


def console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def fail(message: str, code: int) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {message}", markup=True)
    raise typer.Exit(code)


def guard(work: Callable[[], object]) -> object:
    """A user's mistake ends with one line and exit 2; a diverged run with exit 1; bugs keep their traceback."""
    from transfigure.pipeline.errors import TrainingDiverged, UserError
    from transfigure.pipeline.images import BadImage

    try:
        return work()
    except UserError as exc:
        fail(str(exc), 1 if isinstance(exc, TrainingDiverged) else 2)
    except BadImage as exc:
        fail(str(exc), 2)
    except KeyboardInterrupt:
        fail("interrupted; finished work is kept (train resumes from its last checkpoint)", 130)


def recipe_names() -> str:
    """The recipes, as params knows them (without importing them: torch), for --help."""
    from transfigure.pipeline.params import recipe_names as names

    return " | ".join(names())


def load(path: Path, overrides: list[str] | None, threads: str | None = None):
    """Params from the file with --set applied; the thread setting (--threads, else params) takes effect here."""
    from transfigure.pipeline.params import load_params

    params = load_params(path, overrides or [])
    use_threads(threads if threads is not None else params.threads)
    return params


def use_threads(setting: str | int | None) -> int:
    """Applies `auto` or a thread count (also for commands without params); returns the count."""
    from transfigure.pipeline import threads

    return threads.apply(threads.parse(setting if setting is not None else "auto", "--threads"))
