"""The one checkpoint format, written and read here only: a dict of tensors and plain values, written atomically,
read without pickles. Evaluation and export rebuild the networks from `params` and `network_args` alone, so a
checkpoint file is self-contained. The classifier's checkpoint uses the same writer with fewer keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypedDict

import torch

from pipeline.errors import UserError
from pipeline.files import write_atomic

FORMAT = 1
LAST = "last.pt"


class Checkpoint(TypedDict):
    recipe: str
    step: int
    params: dict  # what training depends on (pipeline.params.training_params)
    params_hash: str
    code: dict[str, str]  # the training code's source files -> sha256 (pipeline.train.fingerprint)
    networks: dict[str, dict[str, torch.Tensor]]
    ema: dict[str, dict[str, torch.Tensor]]  # AveragedModel state dicts, for the generators
    optimizers: dict[str, dict]
    scaler: dict | None
    pools: dict[str, list[torch.Tensor]]
    rng: dict
    history: list[dict]  # the smoothed losses, one row per log step
    mlflow_run_id: str | None
    network_args: dict  # what build_networks needs beyond params (image size, classes)
    git_commit: str
    steps_per_second: float


def checkpoint_dir(recipe: str, root: Path = Path("runs")) -> Path:
    return root / recipe / "checkpoints"


def save_checkpoint(state: Checkpoint | dict[str, Any], path: Path) -> None:
    """torch.save through the atomic writer: a kill leaves the old file intact."""
    write_atomic(path, lambda handle: torch.save({"format": FORMAT, **state}, handle))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """weights_only=True: a checkpoint is data, never code."""
    if not Path(path).exists():
        raise UserError(f"{path}: no checkpoint here; train first (`transfigure train RECIPE`)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        raise UserError(f"{path}: not a readable Transfigure checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path}: not a Transfigure checkpoint of format {FORMAT}")
    return state


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
