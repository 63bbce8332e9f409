"""The built-in `digits` domains, made offline from scikit-learn's handwritten digits.

Domain A is ink on paper: dark strokes on a light, warm page. Domain B is the same digit as neon: a hot
core with a coloured glow on a dark night-blue ground. B is a deterministic function of A (recover the
ink from A's luminance, then restyle), so every A has one true B, and copying A scores about 2.3 dB PSNR
against it, far below any real translation.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

SIZE = 32
PAPER = np.array([0.96, 0.94, 0.88])
INK = np.array([0.08, 0.09, 0.20])
NIGHT = np.array([0.04, 0.05, 0.16])
CORE = np.array([1.00, 0.92, 0.55])
GLOW = np.array([1.00, 0.25, 0.45])


@dataclass(frozen=True)
class DigitPair:
    source: int  # index into sklearn's digits
    label: int
    a: np.ndarray  # (32, 32, 3) uint8
    b: np.ndarray  # (32, 32, 3) uint8


def ink_from_digit(pixels_8x8: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 32x32 ink map in [0, 1] from an 8x8 sklearn digit, with a small seeded pose jitter."""
    image = Image.fromarray((pixels_8x8 / 16.0 * 255).astype(np.uint8))
    angle = rng.uniform(-12, 12)
    side = int(rng.integers(22, 27))
    image = image.resize((side, side), Image.BICUBIC).rotate(angle, Image.BICUBIC, expand=False)
    canvas = np.zeros((SIZE, SIZE), dtype=np.float64)
    top, left = rng.integers(0, SIZE - side + 1, size=2)
    canvas[top : top + side, left : left + side] = np.asarray(image, dtype=np.float64) / 255.0
    # Sharpen the bicubic blur into strokes with soft edges.
    return np.clip((canvas - 0.2) / 0.55, 0.0, 1.0)


def render_paper(ink: np.ndarray) -> np.ndarray:
    rgb = PAPER * (1 - ink[..., None]) + INK * ink[..., None]
    return to_uint8(rgb)


def ink_from_paper(a: np.ndarray) -> np.ndarray:
    """Inverts render_paper through luminance, so B is a function of A's pixels alone."""
    luminance_weights = np.array([0.299, 0.587, 0.114])
    lum = (a.astype(np.float64) / 255.0) @ luminance_weights
    paper, ink = PAPER @ luminance_weights, INK @ luminance_weights
    return np.clip((paper - lum) / (paper - ink), 0.0, 1.0)


def neon_from_paper(a: np.ndarray) -> np.ndarray:
    ink = ink_from_paper(a)
    glow = np.clip(gaussian_filter(ink, sigma=1.6) * 1.8, 0.0, 1.0)
    rgb = NIGHT * (1 - glow[..., None]) + GLOW * glow[..., None]
    rgb = rgb * (1 - ink[..., None]) + CORE * ink[..., None]
    return to_uint8(rgb)


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def digit_pairs(seed: int) -> Iterator[DigitPair]:
    """Every sklearn digit as a true (A, B) pair, in sklearn's order, deterministic from the seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        rng = np.random.default_rng([seed, index])
        a = render_paper(ink_from_digit(pixels, rng))
        yield DigitPair(source=index, label=int(label), a=a, b=neon_from_paper(a))


def split_sources(n: int, seed: int, test_fraction: float) -> dict[str, np.ndarray]:
    """Disjoint source indices: `test` (kept as true pairs), `trainA` and `trainB` (halves of the rest)."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    rest = order[n_test:]
    return {
        "test": np.sort(order[:n_test]),
        "trainA": np.sort(rest[: len(rest) // 2]),
        "trainB": np.sort(rest[len(rest) // 2 :]),
    }
