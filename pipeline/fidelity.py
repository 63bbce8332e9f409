"""How close a reduced-precision model's output is to float32's, in 8-bit levels and PSNR, and the verdict against
limits: one definition for the int8 check at export and the bf16 check on first use."""

from __future__ import annotations

import math

import numpy as np

MAX_MEAN_LEVELS = 1.0
MIN_PSNR_DB = 40.0
PASSED = "passed"
_PEAK = 255.0
# A PSNR of identical outputs is infinite; reported this high instead, so the JSON stays JSON.
_PSNR_CAP_DB = 99.0


def compare(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict[str, float]:
    """uint8 images against uint8 images: mean and max absolute difference in levels, PSNR in dB (peak 255)."""
    pairs = zip(reference, candidate, strict=True)
    diff = np.concatenate([np.abs(a.astype(np.int16) - b.astype(np.int16)).ravel() for a, b in pairs])
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    psnr = _PSNR_CAP_DB if mse == 0 else min(_PSNR_CAP_DB, 10 * math.log10(_PEAK**2 / mse))
    return {"mean_levels": float(diff.mean()), "max_levels": float(diff.max()), "psnr_db": psnr}


def verdict(
    measured: dict[str, float], max_mean_levels: float = MAX_MEAN_LEVELS, min_psnr_db: float = MIN_PSNR_DB
) -> str:
    """PASSED, or "failed: " with the limit that was missed."""
    if measured["mean_levels"] > max_mean_levels:
        return f"failed: mean difference {measured['mean_levels']:.2f} levels > {max_mean_levels:g}"
    if measured["psnr_db"] < min_psnr_db:
        return f"failed: PSNR {measured['psnr_db']:.1f} dB < {min_psnr_db:g}"
    return PASSED


def photo_like(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth random (H, W, 3) uint8 image: colours at an eighth of the size, bilinearly enlarged."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))
