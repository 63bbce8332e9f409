"""The one tensor-range contract: 8-bit RGB pixels <-> model values in [-1, 1] (what every network and ONNX
model of this pipeline takes and returns). Works on numpy arrays and on torch tensors alike, in any layout."""

from __future__ import annotations

import numpy as np

HALF_RANGE = 127.5
MODEL_RANGE = "RGB float32 NCHW in [-1, 1]"


def to_model_range(pixels):
    """uint8 values 0..255 -> float32 in [-1, 1]."""
    if isinstance(pixels, np.ndarray):
        return pixels.astype(np.float32) / HALF_RANGE - 1
    return pixels.float() / HALF_RANGE - 1


def to_pixels(values):
    """Model values -> uint8 0..255, rounded to nearest; values outside [-1, 1] are clipped."""
    if isinstance(values, np.ndarray):
        return np.clip(np.rint((values + 1) * HALF_RANGE), 0, 255).astype(np.uint8)
    import torch

    return values.detach().float().add(1).mul(HALF_RANGE).round().clamp(0, 255).to(torch.uint8)


def sample_sheet(columns) -> np.ndarray:
    """Equal-sized image batches, one per kind (input, translation, ...) -> one uint8 HWC picture in which each
    row is one sample and each column one kind."""
    import torch
    from torchvision.utils import make_grid

    stacked = torch.stack(columns, 1).flatten(0, 1)  # sample-major: one sample's kinds side by side
    grid = make_grid(stacked.float().cpu(), nrow=len(columns), padding=2, pad_value=1.0, normalize=False)
    return to_pixels(grid.permute(1, 2, 0)).numpy()
