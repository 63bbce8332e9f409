"""Normalisation layers selected by name, with the reference implementation's bias convention."""

from torch import nn

NORM_KINDS = ("instance", "batch", "none")


def _check(kind: str) -> None:
    if kind not in NORM_KINDS:
        raise ValueError(f"unknown norm {kind!r}; expected one of {', '.join(NORM_KINDS)}")


def norm_layer(kind: str, channels: int) -> nn.Module:
    """Return the normalisation layer for `kind` ("instance", "batch" or "none") over `channels` channels."""
    _check(kind)
    if kind == "instance":
        # No affine parameters or running stats: adds no state-dict keys, matching reference checkpoints.
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    if kind == "batch":
        return nn.BatchNorm2d(channels, affine=True)
    return nn.Identity()


def uses_bias(kind: str) -> bool:
    """Whether a convolution followed by this norm has a bias (only instance norm, as in the reference)."""
    _check(kind)
    return kind == "instance"
