"""The one checkpoint format, written and read here only: a dict of tensors and plain values, written atomically,
read without pickles. Evaluation and export rebuild the networks from `params` and `network_args` alone, so a
checkpoint file is self-contained. The classifier's checkpoint uses the same writer with fewer keys. Weights from
elsewhere (the reference's state dicts, for `init_from` and `import-checkpoint`) are read here too."""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import nn

from transfigure.models.generators import ReferenceLoadError, guess_reference_arch, load_reference_state_dict
from transfigure.pipeline.errors import UserError
from transfigure.pipeline.files import sha256_of_file, write_atomic

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
    steps_per_second: float  # of the last segment (since the last resume)
    seconds: float  # training time of the whole run, every segment
    init_from: dict[str, dict[str, str]]  # network -> {"path", "sha256"} it began from (fine-tuning)
    world_size: int  # training processes (torchrun); batch_size is per process
    parameter_sha256: dict[str, list[str]]  # network -> its parameters' sha256 on each rank (all equal: in sync)


def checkpoint_dir(recipe: str, root: Path = Path("runs")) -> Path:
    return root / recipe / "checkpoints"


def samples_dir(recipe: str, root: Path = Path("runs")) -> Path:
    """The sample sheets and loss curves of a run, as it trains."""
    return root / recipe / "samples"


def step_name(step: int) -> str:
    return f"step_{step:06d}.pt"


def checkpoint_path(recipe: str, step: int | None = None, root: Path = Path("runs")) -> Path:
    """last.pt, or the periodic checkpoint of `step` (kept by `keep_checkpoints`), naming the steps there are."""
    folder = checkpoint_dir(recipe, root)
    if step is None:
        return folder / LAST
    path = folder / step_name(step)
    if not path.exists():
        kept = sorted(int(p.stem.removeprefix("step_")) for p in folder.glob("step_*.pt"))
        listed = ", ".join(map(str, kept)) or "none (keep_checkpoints: N keeps the last N)"
        raise UserError(f"--step {step}: no checkpoint of that step in {folder}; kept steps: {listed}")
    return path


def keep_step_copy(last: Path, step: int, keep: int) -> None:
    """A copy of `last` under its step's name, and only the newest `keep` of those (none with keep 0)."""
    folder = last.parent
    if keep > 0:
        copy = folder / step_name(step)
        copy.unlink(missing_ok=True)
        try:
            os.link(last, copy)  # the same bytes: no second write of a large file
        except OSError:
            shutil.copyfile(last, copy)
    for old in sorted(folder.glob("step_*.pt"))[: -keep or None]:
        old.unlink(missing_ok=True)


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


def read_state_dict(pth_path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict as the reference saves one (`torch.save(net.state_dict(), path)`), read without pickles."""
    return _as_state_dict(_load_weights(pth_path), pth_path)


def _load_weights(pth_path: Path):
    try:
        return torch.load(pth_path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise UserError(f"cannot read checkpoint {pth_path}: {exc.strerror or exc}") from exc
    except pickle.UnpicklingError as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(
            f"{pth_path.name} is not a plain state dict ({first_line.rstrip('.')}); "
            "save the generator with torch.save(net.state_dict(), path)"
        ) from exc
    except Exception as exc:
        # Garbage bytes surface as whatever the unpickler tripped on (KeyError, EOFError, RuntimeError, ...).
        raise UserError(f"{pth_path.name} is not a PyTorch checkpoint ({type(exc).__name__})") from exc


def _as_state_dict(loaded, pth_path: Path) -> dict[str, torch.Tensor]:
    is_state_dict = (
        isinstance(loaded, Mapping)
        and loaded
        and all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items())
    )
    if not is_state_dict:
        raise UserError(f"{pth_path.name} is not a generator state dict (a mapping of names to tensors)")
    return dict(loaded)


def init_from_files(nets: dict[str, nn.Module], files: dict[str, str]) -> dict[str, dict[str, str]]:
    """Loads each named network from a file: one of our checkpoints (its network of the same name) or a reference
    state dict (`latest_net_G_A.pth` ...), strictly by key and shape, with the reference's `module.` prefixes and
    old instance-norm statistics accepted. Returns {name: {"path", "sha256"}} for the run's record."""
    record = {}
    for name, file in files.items():
        if name not in nets:
            raise UserError(f"init_from.{name}: this recipe has no network {name!r} (it has {', '.join(nets)})")
        path = Path(file)
        if not path.is_file():
            raise UserError(f"init_from.{name}: {path}: no such file")
        state = _weights_in(path, name)
        try:
            load_reference_state_dict(nets[name], state)
        except ReferenceLoadError as exc:
            raise UserError(f"init_from.{name}: {path.name} does not fit {name}: {exc}{_hint(state)}") from None
        record[name] = {"path": str(path), "sha256": sha256_of_file(path)}
    return record


def _weights_in(path: Path, name: str) -> dict[str, torch.Tensor]:
    """The named network of one of our checkpoints, or the file itself as a reference state dict."""
    loaded = _load_weights(path)
    if isinstance(loaded, dict) and loaded.get("format") == FORMAT:
        if name not in loaded.get("networks", {}):
            raise UserError(f"init_from.{name}: {path} holds no network {name!r} ({', '.join(loaded['networks'])})")
        return loaded["networks"][name]
    return _as_state_dict(loaded, path)


def _hint(state: dict) -> str:
    """What a reference generator file looks like, in params' terms, so the section can be made to fit."""
    try:
        guess = guess_reference_arch(state)
    except (ValueError, KeyError, IndexError):
        return ""
    return f" (the file looks like generator arch {guess['arch']}, ngf {guess['ngf']}, norm {guess['norm']})"
