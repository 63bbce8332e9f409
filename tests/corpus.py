"""Small generated image files, good and bad, for tests of everything that reads user images."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def gradient(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    base = (x + y) / 2 + rng.integers(0, 30, size=(height, width, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A valid 1x1 PNG whose IHDR is patched to declare another size (a decompression bomb's header)."""
    Image.new("RGB", (1, 1)).save(path, format="PNG")
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def write_good(folder: Path, n: int, size: tuple[int, int] = (40, 36), prefix: str = "img") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{prefix}{i:03d}.png"
        Image.fromarray(gradient(*size, seed=i)).save(path)
        paths.append(path)
    return paths


def write_bad_corpus(folder: Path) -> dict[str, str]:
    """Bad files and odd-but-good files; returns {file name: 'bad' | 'good'}."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = gradient(48, 40)
    Image.fromarray(rgb).save(folder / "full.jpg", quality=90)
    data = (folder / "full.jpg").read_bytes()
    (folder / "full.jpg").unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not an image\n")
    png_declaring(folder / "bomb.png", 30000, 30000)
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(folder / "rgba.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(folder / "sixteen.png")
    Image.fromarray(gradient(37, 23)).save(folder / "odd.png")
    return {
        "truncated.jpg": "bad",
        "empty.png": "bad",
        "notes.jpg": "bad",
        "bomb.png": "bad",
        "gray.png": "good",
        "rgba.png": "good",
        "palette.png": "good",
        "sixteen.png": "good",
        "odd.png": "good",
    }
