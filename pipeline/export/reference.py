"""Reference checkpoints: generators saved by junyanz/pytorch-CycleGAN-and-pix2pix, loaded strictly into our
networks and exported under our model card, with hints when the flags do not fit the file."""

from __future__ import annotations

from pathlib import Path

from transfigure.models.generators import (
    ReferenceLoadError,
    build_generator,
    guess_reference_arch,
    load_reference_state_dict,
)
from transfigure.pipeline.errors import UserError
from transfigure.pipeline.export.to_onnx import export_image_generator
from transfigure.pipeline.files import sha256_of_file
from transfigure.pipeline.train.checkpoint import read_state_dict


def import_reference_checkpoint(
    pth_path: Path, arch: str, norm: str, dropout: bool, out_path: Path, opset: int = 18
) -> dict:
    """Convert a generator checkpoint of junyanz/pytorch-CycleGAN-and-pix2pix into our ONNX contract.

    The file must be a plain state dict (as the reference saves it); keys and shapes must fit
    `build_generator(arch, 3, 3, 64, norm, dropout)` exactly, otherwise the UserError names the misfits
    and the flags the file probably needs. The export is in eval mode: the reference's test.py keeps
    pix2pix's batch norm in training mode and dropout on unless `--eval` is passed, so the ONNX model
    matches `test.py --eval`, not its default output. Domains are unknown, so the metadata says A to B.
    """
    pth_path = Path(pth_path)
    state_dict = read_state_dict(pth_path)
    flags = _flags(arch, norm, dropout)
    try:
        net = build_generator(arch, 3, 3, 64, norm, dropout)
    except ValueError as exc:
        raise UserError(f"cannot import {pth_path.name}: {exc}") from exc
    try:
        load_reference_state_dict(net, state_dict)
    except ReferenceLoadError as exc:
        # The key listing may end in an ellipsis, which needs no second full stop.
        separator = " " if str(exc).endswith(".") else ". "
        hint = _suggest_flags(state_dict, arch, norm, dropout)
        raise UserError(f"{pth_path.name} does not fit {flags}: {exc}{separator}{hint}") from exc
    metadata = {
        "recipe": "reference-import",
        "direction": "AtoB",
        "source_domain": "A",
        "target_domain": "B",
        "training_commit": "unknown",
        "params_hash": "",
        "source_checkpoint": pth_path.name,
        "source_checkpoint_sha256": sha256_of_file(pth_path),
        "source_flags": flags,
    }
    # Eval mode on purpose (see the docstring): this matches the reference's `test.py --eval`.
    return export_image_generator(net.eval(), Path(out_path), metadata, opset=opset)


def _flags(arch: str, norm: str, dropout: bool) -> str:
    return f"--arch {arch} --norm {norm}" + (" --dropout" if dropout else "")


def _suggest_flags(state_dict: dict, arch: str, norm: str, dropout: bool) -> str:
    """The flags the checkpoint's keys point to, plus what import-checkpoint cannot express."""
    try:
        guess = guess_reference_arch(state_dict)
    except (ValueError, KeyError, IndexError) as exc:
        return f"It does not look like a ResNet or U-Net generator of the reference either ({exc})"
    hint = f"This looks like {_flags(guess['arch'], guess['norm'], guess['dropout'])}"
    if guess["arch"].startswith("unet"):
        hint += " (U-Net dropout leaves no keys and does not change an eval-mode export)"
    unsupported = {
        key: guess[key]
        for key, default in (("ngf", 64), ("input_nc", 3), ("output_nc", 3), ("upsample", "transpose"))
        if guess[key] != default
    }
    if guess.get("padding", "reflect") != "reflect":
        unsupported["padding"] = guess["padding"]
    if unsupported:
        found = ", ".join(f"{key}={value}" for key, value in unsupported.items())
        return hint + f", but with {found}, which the reference layout import does not support"
    # Only ResNet dropout shifts keys; U-Net dropout cannot be told from the file.
    same_dropout = guess["dropout"] == dropout or arch.startswith("unet")
    if (guess["arch"], guess["norm"]) == (arch, norm) and same_dropout:
        return hint + ", as given: the file is damaged or was changed after training"
    return hint
