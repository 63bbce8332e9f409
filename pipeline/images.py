"""Image input/output shared by `prepare`, `translate` and the HTTP service.

Every image that enters the pipeline goes through `decode_rgb` / `decode_rgb_bytes`, which either
return an (H, W, 3) uint8 RGB array or raise `BadImage` with a short, user-facing reason.
Images are written through `pipeline.files.write_atomic`, so an interrupted run never leaves a half-written
image under its final name.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from transfigure.pipeline.files import write_atomic

DEFAULT_MAX_PIXELS = 8192 * 8192

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"})

# Only these Pillow decoders may run: untrusted uploads must never reach plugins such as EPS,
# which shells out to Ghostscript. (Camera MPO files are opened by the JPEG decoder.)
_ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF", "PPM")

# Errors Pillow's decoders raise on malformed input (struct.error/IndexError/EOFError come from
# plugins parsing garbage headers or running out of data).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError)

_MODES_WITH_ALPHA = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})

_SAVE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_LOSSY_FORMATS = frozenset({"JPEG", "WEBP"})

RESIZE_MODES = ("resize_and_crop", "scale_width", "none")


class BadImage(ValueError):
    """An input the pipeline refuses; str(exc) is a short reason fit to show a user, without a traceback."""

    def __init__(self, reason: str, source: str | None = None) -> None:
        super().__init__(reason)
        self.source = source  # the path or upload name, for callers that report many files


class ImageTooLarge(BadImage):
    """More pixels than allowed, found from the header before any pixel was decoded (HTTP 413, not 422)."""


# ---------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------


def decode_rgb(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode the image file at `path` into an (H, W, 3) uint8 RGB array, or raise BadImage."""
    return _decode_file(path, max_pixels)


def decode_labels(path: str | os.PathLike[str], classes: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a label map (a single-channel or palette image whose pixel values are class indices) into an
    (H, W) uint8 array, or raise BadImage: an RGB image, or a value not below `classes`, is refused."""
    return _decode_file(path, max_pixels, convert=lambda img, name: _to_labels(img, name, classes))


def _decode_file(path: str | os.PathLike[str], max_pixels: int, convert=None) -> np.ndarray:
    source = os.fspath(path)
    try:
        fp = open(source, "rb")
    except OSError as exc:
        raise BadImage(f"cannot read file ({exc.strerror or exc})", source) from exc
    with fp:
        if os.fstat(fp.fileno()).st_size == 0:
            raise BadImage("empty file", source)
        return _decode(fp, source, max_pixels, convert=convert)


def decode_labels_bytes(data: bytes, name: str, classes: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """`decode_labels` for an in-memory file (an HTTP upload)."""
    if not data:
        raise BadImage("empty file", name)
    return _decode(io.BytesIO(data), name, max_pixels, convert=lambda img, n: _to_labels(img, n, classes))


def _to_labels(img: Image.Image, source: str, classes: int) -> np.ndarray:
    if img.mode not in ("P", "L", "I", "I;16", "1"):
        raise BadImage(
            f"a label map must be a single-channel or palette image of class indices; this one is {img.mode}", source
        )
    values = np.asarray(img)
    top = int(values.max()) if values.size else 0
    if top >= classes:
        raise BadImage(f"label value {top} is not below the {classes} classes", source)
    return values.astype(np.uint8)


def decode_rgb_bytes(
    data: bytes, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS, formats: tuple[str, ...] | None = None
) -> np.ndarray:
    """Decode an in-memory image (e.g. an HTTP upload) exactly like `decode_rgb`; `name` labels errors.
    `formats` narrows the allowed Pillow formats (e.g. ("PNG", "JPEG", "WEBP")): others are "not an image file"."""
    if not data:
        raise BadImage("empty file", name)
    return _decode(io.BytesIO(data), name, max_pixels, formats)


def _decode(
    fp: IO[bytes], source: str, max_pixels: int, formats: tuple[str, ...] | None = None, convert=None
) -> np.ndarray:
    """The single decode path: header size check, full decode, EXIF orientation, then RGB conversion (or
    `convert`, for label maps)."""
    with _refusing_truncated_images():
        try:
            with _open_header(fp, formats) as img:
                # Image.open only parsed the header, so this check runs before any pixel is allocated.
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageTooLarge(
                        f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels "
                        "(possible decompression bomb)",
                        source,
                    )
                # Decoding everything now makes truncated or corrupt files fail here, not mid-training.
                img.load()
                # In place, so the common no-orientation case costs no copy of the pixels.
                ImageOps.exif_transpose(img, in_place=True)
                return (convert or _to_rgb_array)(img, source)
        except BadImage:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(f"possible decompression bomb: {exc}", source) from exc
        except UnidentifiedImageError as exc:
            raise BadImage("not an image file (or an unsupported format)", source) from exc
        except _DECODE_ERRORS as exc:
            raise BadImage(f"truncated or corrupt image data ({exc})", source) from exc


_open_lock = threading.Lock()
_strict_lock = threading.Lock()
_strict_decodes = 0
_caller_load_truncated = False


def _open_header(fp: IO[bytes], formats: tuple[str, ...] | None = None) -> ImageFile.ImageFile:
    """Image.open, which reads only the header, with Pillow's bomb warning silenced.

    Our max_pixels check is the authority (Pillow's hard DecompressionBombError still applies).
    Warning filters are process-wide, so the lock keeps concurrent decodes from undoing each other's
    catch_warnings; it covers only the cheap header parse, not the decoding.
    """
    with _open_lock, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        allowed = _available_formats()
        return Image.open(fp, formats=[f for f in allowed if formats is None or f in formats])


def _available_formats() -> tuple[str, ...]:
    """The allowed formats this Pillow build can open (Image.open raises KeyError for missing ones)."""
    Image.init()
    return tuple(f for f in _ALLOWED_FORMATS if f in Image.OPEN)


@contextlib.contextmanager
def _refusing_truncated_images() -> Iterator[None]:
    """Force ImageFile.LOAD_TRUNCATED_IMAGES off while any decode runs, then restore the caller's value.

    The flag is a Pillow global read during load(); counting active decodes (prepare decodes in a
    thread pool) means the caller's value is saved by the first and restored by the last, never mid-decode.
    """
    global _strict_decodes, _caller_load_truncated
    with _strict_lock:
        if _strict_decodes == 0:
            _caller_load_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        _strict_decodes += 1
    try:
        yield
    finally:
        with _strict_lock:
            _strict_decodes -= 1
            if _strict_decodes == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _caller_load_truncated


def _to_rgb_array(img: Image.Image, source: str) -> np.ndarray:
    """Convert any decodable Pillow mode to an (H, W, 3) uint8 RGB array."""
    if img.mode in _SIXTEEN_BIT_MODES:
        # 16-bit samples keep their top 8 bits: a scaled conversion, where Pillow's convert() would clip.
        return _gray_to_rgb(np.asarray(img).astype(np.uint16) >> 8)
    if img.mode == "I":
        # Pillow uses 32-bit "I" for 16-bit PNG/PGM/TIFF sources; wider data is rare and gets clipped.
        return _gray_to_rgb(np.clip(np.asarray(img), 0, 65535).astype(np.uint16) >> 8)
    if img.mode == "F":
        return _gray_to_rgb(_float_to_uint8(np.asarray(img, dtype=np.float64)))
    if img.mode in _MODES_WITH_ALPHA or "transparency" in img.info:
        # Transparent regions become paper-white, not black: datasets of drawings, logos and scans
        # assume a white page, and black holes would teach the model a background that is not there.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    try:
        return np.array(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
    except ValueError as exc:
        raise BadImage(f"unsupported image mode {img.mode!r}", source) from exc


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray.astype(np.uint8)[:, :, None], 3, axis=2)


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
    """Float images have no standard range: [0, 1] data is scaled by 255, anything else read as 0..255."""
    values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        values = values * 255.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# Scanning, resizing, hashing
# ---------------------------------------------------------------------------------------------------


def list_images(folder: str | os.PathLike[str], others: list[Path] | None = None) -> list[Path]:
    """All files under `folder` with an image suffix (any case), sorted, skipping hidden files and dirs; the
    other files are appended to `others` when it is given, so that a caller can say what it left out."""
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"not a directory: {root}")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending into hidden dirs such as .git or .cache.
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(Path(dirpath) / name)
            elif others is not None and not name.startswith("."):
                others.append(Path(dirpath) / name)
    if others is not None:
        others.sort()
    return sorted(found)


def resize_image(array: np.ndarray, size: int, mode: str, nearest: bool = False) -> np.ndarray:
    """Resize an (H, W, C) uint8 image (or an (H, W) label map, with `nearest`) according to `mode`.

    resize_and_crop: short side scaled to `size`, then a centred size x size crop.
    scale_width:     width scaled to `size` keeping the aspect ratio, height cropped to a multiple of 4.
    none:            no resampling, just a centred crop to multiples of 4.
    Heights and widths end up divisible by 4 because the generators downsample twice by 2 and
    must upsample back to the same size. `nearest` resamples without interpolating, so a label map keeps
    only classes it had.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {', '.join(RESIZE_MODES)}")
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    height, width = array.shape[:2]
    if mode == "resize_and_crop":
        scale = size / min(height, width)
        resized = _resample(array, max(size, round(width * scale)), max(size, round(height * scale)), nearest)
        return _center_crop(resized, size, size)
    if mode == "scale_width":
        resized = _resample(array, size, max(1, round(height * size / width)), nearest)
        return _center_crop(resized, resized.shape[0] // 4 * 4, size)
    return _center_crop(array, height // 4 * 4, width // 4 * 4)


def _resample(array: np.ndarray, width: int, height: int, nearest: bool = False) -> np.ndarray:
    if array.shape[1] == width and array.shape[0] == height:
        return array
    method = Image.Resampling.NEAREST if nearest else Image.Resampling.LANCZOS
    return np.asarray(Image.fromarray(array).resize((width, height), method))


def _center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    if height < 4 or width < 4:
        raise ValueError(f"image of {array.shape[1]}x{array.shape[0]} pixels is too small to crop to a multiple of 4")
    top = (array.shape[0] - height) // 2
    left = (array.shape[1] - width) // 2
    return np.ascontiguousarray(array[top : top + height, left : left + width])


# ---------------------------------------------------------------------------------------------------
# Atomic writing
# ---------------------------------------------------------------------------------------------------


def write_image_atomic(
    path: str | os.PathLike[str], array: np.ndarray, format: str | None = None, quality: int = 95
) -> None:
    """Encode an (H, W, 3) uint8 RGB array and atomically place it at `path` (format from the suffix)."""
    path = Path(path)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got shape {array.shape} dtype {array.dtype}")
    write_atomic(path, lambda fp: _save(fp, array, _save_format(path, format), quality))


def write_labels_atomic(path: str | os.PathLike[str], labels: np.ndarray, colours: list[tuple[int, int, int]]) -> None:
    """An (H, W) label map as a palette PNG whose pixel indices are the classes, placed atomically."""
    write_atomic(Path(path), lambda fp: fp.write(encode_labels(labels, colours)))


def encode_labels(labels: np.ndarray, colours: list[tuple[int, int, int]]) -> bytes:
    """An (H, W) label map encoded as a palette PNG (indices = classes, colours for people), in memory."""
    if labels.ndim != 2:
        raise ValueError(f"expected an (H, W) label map, got shape {labels.shape}")
    image = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8))
    image.putpalette([value for colour in colours for value in colour])  # L -> P, the indices unchanged
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_image(array: np.ndarray, pil_format: str, quality: int = 95) -> bytes:
    """An (H, W, 3) uint8 RGB array encoded as PNG, JPEG or WEBP, in memory (an HTTP answer)."""
    buffer = io.BytesIO()
    _save(buffer, array, pil_format, quality)
    return buffer.getvalue()


def _save(fp: IO[bytes], array: np.ndarray, pil_format: str, quality: int) -> None:
    options = {"quality": quality} if pil_format in _LOSSY_FORMATS else {}
    Image.fromarray(array).save(fp, format=pil_format, **options)


def _save_format(path: Path, format: str | None) -> str:
    if format is None:
        try:
            return _SAVE_FORMATS[path.suffix.lower()]
        except KeyError:
            raise ValueError(
                f"cannot infer an image format from {path.name!r}; use one of {', '.join(_SAVE_FORMATS)}"
            ) from None
    format = format.upper()
    return "JPEG" if format == "JPG" else format
