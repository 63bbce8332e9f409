"""The built-in domains, made offline: `digits` from scikit-learn's handwritten digits (and `digits_labels`, the
same ink digits paired with their label maps), and `photos` (below) from the photographs bundled with
scikit-image and scikit-learn.

Domain A is ink on paper: dark strokes on a light, warm page. Domain B is the same digit as neon: a hot
core with a coloured glow on a dark night-blue ground. B is a deterministic function of A (recover the
ink from A's luminance, then restyle), so every A has one true B, and copying A scores about 2.3 dB PSNR
against it, far below any real translation.
"""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=1)  # `prepare` builds three datasets from the same pairs (about 11 MB)
def digit_pairs(seed: int) -> tuple[DigitPair, ...]:
    """Every sklearn digit as a true (A, B) pair, in sklearn's order, deterministic from the seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pairs = []
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        rng = np.random.default_rng([seed, index])
        a = render_paper(ink_from_digit(pixels, rng))
        a.flags.writeable = False  # shared by every caller of the cache
        b = neon_from_paper(a)
        b.flags.writeable = False
        pairs.append(DigitPair(source=index, label=int(label), a=a, b=b))
    return tuple(pairs)


def digit_label_map(a: np.ndarray, label: int) -> np.ndarray:
    """The label map of an ink digit A: 0 on the page, 1 + the digit's class on its strokes (K = 11); strokes
    are the pixels at least half ink, recovered from A's pixels as B is."""
    return np.where(ink_from_paper(a) >= 0.5, 1 + label, 0).astype(np.uint8)


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


# The built-in `photos` domains: crops of the colour photographs that ship inside scikit-image and scikit-learn
# (read from the installed packages; skimage.data fetches some others on demand, and those are not used). Test
# crops come from photographs that training never sees. B is a deterministic painterly rendering of A
# (edge-preserving smoothing, a reduced palette, dark outlines), so every test crop has its true counterpart.
PHOTOS = {
    "skimage/astronaut.png": "train",
    "skimage/coffee.png": "train",
    "skimage/rocket.jpg": "train",
    "skimage/motorcycle_left.png": "train",
    "sklearn/china.jpg": "train",
    "skimage/chelsea.png": "test",
    "sklearn/flower.jpg": "test",
}
PHOTO_SHORT_SIDE = 256  # each photograph is scaled to this before cropping, so a crop holds objects, not texture
CROPS = {"train": 300, "test": 60}  # per photograph and domain
PALETTE_LEVELS = 5


@dataclass(frozen=True)
class PhotoCrop:
    photo: str  # PHOTOS key
    split: str
    window: tuple[int, int]  # top, left
    a: np.ndarray  # (size, size, 3) uint8
    b: np.ndarray


def photo_path(key: str):
    """The file of a PHOTOS key inside its installed package; an error naming it when the package lacks it."""
    from pathlib import Path

    import skimage
    import sklearn

    package, name = key.split("/")
    folders = {
        "skimage": Path(skimage.__file__).parent / "data",
        "sklearn": Path(sklearn.__file__).parent / "datasets" / "images",
    }
    path = folders[package] / name
    if not path.exists():
        raise FileNotFoundError(f"built-in photos: {path} is not in the installed {package}")
    return path


def load_photo(key: str) -> np.ndarray:
    with Image.open(photo_path(key)) as image:
        rgb = image.convert("RGB")
        scale = PHOTO_SHORT_SIDE / min(rgb.size)
        return np.asarray(rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.LANCZOS))


def painterly(rgb: np.ndarray) -> np.ndarray:
    """Edge-preserving smoothing, a palette of PALETTE_LEVELS levels per channel, and dark outlines where the
    smoothed image has edges: the same pixels give the same painting."""
    import cv2

    smooth = cv2.bilateralFilter(cv2.bilateralFilter(rgb, 9, 60, 7), 9, 60, 7)
    step = 255 / (PALETTE_LEVELS - 1)
    flat = np.clip(np.rint(np.rint(smooth / step) * step), 0, 255).astype(np.uint8)
    edges = cv2.Canny(cv2.cvtColor(smooth, cv2.COLOR_RGB2GRAY), 50, 120) > 0
    flat[edges] = (flat[edges] * 0.2).astype(np.uint8)
    return flat


def photo_crops(seed: int, size: int) -> Iterator[PhotoCrop]:
    """Seeded square crops of every photograph: unpaired windows for A and B in training, the same windows for
    A and its painting in the test split."""
    for index, (key, split) in enumerate(PHOTOS.items()):
        photo = load_photo(key)
        painting = painterly(photo)
        rng = np.random.default_rng([seed, index])
        height, width = photo.shape[:2]
        for _ in range(CROPS[split]):
            top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
            if split == "test":
                b_top, b_left = top, left
            else:  # another window: training never sees a crop with its own painting
                b_top, b_left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
            yield PhotoCrop(
                key,
                split,
                (top, left),
                photo[top : top + size, left : left + size],
                painting[b_top : b_top + size, b_left : b_left + size],
            )
