"""The one tensor-range contract: 8-bit RGB pixels <-> model values in [-1, 1] (what every network and ONNX
model of this pipeline takes and returns). Works on numpy arrays and on torch tensors alike, in any layout.
Label maps are class indices 0..K-1 per pixel; `palette` gives each class its colour for people."""

from __future__ import annotations

import numpy as np

HALF_RANGE = 127.5
MODEL_RANGE = "RGB float32 NCHW in [-1, 1]"


def to_model_range(pixels):
    """uint8 values 0..255 -> float32 in [-1, 1]."""
    if isinstance(pixels, np.ndarray):
        return pixels.astype(np.float32) / HALF_RANGE - 1
    return pixels.float() / HALF_RANGE - 1


def pad_to_multiple(images, multiple: int):
    """(..., H, W, 3) uint8 images reflect-padded at the bottom and right to multiples of `multiple`: how every
    model here sees an image of any size (the output is cropped back)."""
    height, width = images.shape[-3:-1]
    pad = [(0, 0)] * (images.ndim - 3) + [(0, -height % multiple), (0, -width % multiple), (0, 0)]
    return np.pad(images, pad, mode="reflect") if height % multiple or width % multiple else images


def to_pixels(values):
    """Model values -> uint8 0..255, rounded to nearest; values outside [-1, 1] are clipped."""
    if isinstance(values, np.ndarray):
        return np.clip(np.rint((values + 1) * HALF_RANGE), 0, 255).astype(np.uint8)
    import torch

    return values.detach().float().add(1).mul(HALF_RANGE).round().clamp(0, 255).to(torch.uint8)


def palette(classes: int) -> list[tuple[int, int, int]]:
    """The colour of each class: the PASCAL VOC colour map (class 0 black, then well-separated colours), which
    label-map tools and datasets widely share."""
    colours = []
    for index in range(classes):
        r = g = b = 0
        for shift in range(7, -1, -1):
            r |= ((index >> 0) & 1) << shift
            g |= ((index >> 1) & 1) << shift
            b |= ((index >> 2) & 1) << shift
            index >>= 3
        colours.append((r, g, b))
    return colours


def palette_text(colours: list[tuple[int, int, int]]) -> str:
    """A palette as the model card stores it: "#000000,#800000,..."."""
    return ",".join(f"#{r:02x}{g:02x}{b:02x}" for r, g, b in colours)


def parse_palette(text: str) -> list[tuple[int, int, int]]:
    return [tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5)) for colour in text.split(",")]


def colorize(labels, colours: list[tuple[int, int, int]]):
    """(..., H, W) class indices -> (..., H, W, 3) uint8 RGB in the palette's colours."""
    return np.asarray(colours, dtype=np.uint8)[np.asarray(labels)]


def label_maps_in_model_range(labels, colours: list[tuple[int, int, int]]):
    """(N, H, W) class indices (a torch tensor) -> (N, 3, H, W) float32 palette colours in [-1, 1], on the same
    device: label maps beside images in a sample sheet."""
    import torch

    rgb = torch.from_numpy(colorize(labels.cpu().numpy(), colours)).permute(0, 3, 1, 2)
    return to_model_range(rgb).to(labels.device)


def sample_sheet(columns: dict) -> np.ndarray:
    """Equal-sized image batches, one per kind, by label ("real A": ..., "fake B": ...) -> one uint8 HWC picture
    in which each row is one sample and each column one kind, named above it. Small images are enlarged
    (nearest neighbour, whole multiples) to at least 64 px so that the labels fit and digits stay legible."""
    import torch
    import torch.nn.functional as F
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid

    padding, header = 2, 14
    stacked = torch.stack(list(columns.values()), 1).flatten(0, 1).float().cpu()  # one sample's kinds side by side
    scale = -(-64 // stacked.shape[-1])
    if scale > 1:
        stacked = F.interpolate(stacked, scale_factor=scale, mode="nearest")
    grid = make_grid(stacked, nrow=len(columns), padding=padding, pad_value=1.0, normalize=False)
    body = to_pixels(grid.permute(1, 2, 0)).numpy()
    title = Image.new("RGB", (body.shape[1], header), "white")
    draw, font, width = ImageDraw.Draw(title), ImageFont.load_default(), stacked.shape[-1]
    for index, label in enumerate(columns):
        text = str(label)
        while len(text) > 1 and draw.textlength(text, font=font) > width:
            text = text[:-1]
        left = padding + index * (width + padding) + (width - draw.textlength(text, font=font)) / 2
        draw.text((left, 1), text, fill="black", font=font)
    return np.concatenate([np.asarray(title), body])
