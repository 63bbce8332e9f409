"""The one checkpoint format: a dict of tensors and plain values, written atomically, read without pickles.

    {"format": 1, "recipe": str, "step": int, "params": dict, "params_hash": str,
     "networks": {name: state_dict}, "ema": {name: state_dict}, "optimizers": {name: state_dict},
     "scaler": state_dict | None, "pools": {name: [tensor, ...]}, "rng": {...}, "history": [row, ...],
     "mlflow_run_id": str | None}

Evaluation and export rebuild the networks from `params` alone, so a checkpoint file is self-contained.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from pipeline.errors import UserError

FORMAT = 1
LAST = "last.pt"


def checkpoint_dir(recipe: str, root: Path = Path("runs")) -> Path:
    return root / recipe / "checkpoints"


def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, rename: a kill leaves the old file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({"format": FORMAT, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
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
