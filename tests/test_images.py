"""Tests for pipeline.images: the decoder's corpus of good and bad files, resizing, atomic writes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from transfigure.pipeline.files import sha256_of_file, write_bytes_atomic, write_json_atomic
from transfigure.pipeline.images import (
    IMAGE_SUFFIXES,
    BadImage,
    decode_rgb,
    decode_rgb_bytes,
    list_images,
    resize_image,
    write_image_atomic,
)

RED = (255, 0, 0)
WHITE = (255, 255, 255)


def save(img: Image.Image, path: Path, **options) -> Path:
    img.save(path, **options)
    return path


def gradient(width: int, height: int) -> np.ndarray:
    """A deterministic RGB test pattern with distinct values per pixel and channel."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 7 % 256, y * 11 % 256, (x + y) * 3 % 256], axis=2).astype(np.uint8)


def assert_close(actual, expected, tolerance: int) -> None:
    diff = np.abs(np.asarray(actual, dtype=int) - np.asarray(expected, dtype=int))
    assert diff.max() <= tolerance, f"{actual} differs from {expected} by {diff.max()}"


def png_with_declared_size(path: Path, width: int, height: int) -> Path:
    """A tiny valid PNG whose IHDR is patched to claim width x height (CRC recomputed)."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    # Signature (8) + chunk length (4) + b"IHDR" (4), then 13 data bytes and the CRC.
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def stored_as(path: Path) -> tuple[str, str]:
    """The (mode, format) Pillow reports for a file, to prove a fixture exercises the intended case."""
    with Image.open(path) as img:
        return img.mode, img.format


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------------
# Good inputs
# ---------------------------------------------------------------------------------------------------


def test_rgb_jpeg(tmp_path):
    pixels = np.full((48, 64, 3), (200, 100, 50), dtype=np.uint8)
    out = decode_rgb(save(Image.fromarray(pixels), tmp_path / "a.jpg", quality=95))
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    assert_close(out, pixels, tolerance=3)


def test_png_is_lossless_and_writable(tmp_path):
    pixels = gradient(64, 48)
    out = decode_rgb(save(Image.fromarray(pixels), tmp_path / "a.png"))
    np.testing.assert_array_equal(out, pixels)
    out[0, 0] = 0  # callers may modify the result in place


def test_odd_size(tmp_path):
    pixels = gradient(37, 23)
    out = decode_rgb(save(Image.fromarray(pixels), tmp_path / "odd.png"))
    np.testing.assert_array_equal(out, pixels)


def test_grayscale_png(tmp_path):
    out = decode_rgb(save(Image.new("L", (10, 6), 100), tmp_path / "gray.png"))
    assert out.shape == (6, 10, 3)
    assert (out == 100).all()


def test_rgba_transparent_area_becomes_white(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, :4] = (0, 0, 0, 0)  # fully transparent black
    rgba[:, 4:] = (255, 0, 0, 255)  # opaque red
    rgba[0, 0] = (0, 0, 0, 128)  # half-transparent black
    out = decode_rgb(save(Image.fromarray(rgba), tmp_path / "rgba.png"))
    assert (out[1:, :4] == WHITE).all()
    assert (out[:, 4:] == RED).all()
    assert_close(out[0, 0], (127, 127, 127), tolerance=1)


def test_la_png_becomes_white_where_transparent(tmp_path):
    la = Image.merge("LA", [Image.new("L", (4, 4), 0), Image.new("L", (4, 4), 0)])
    out = decode_rgb(save(la, tmp_path / "la.png"))
    assert (out == 255).all()


def test_palette_png_without_transparency(tmp_path):
    pixels = gradient(16, 16)
    palette = Image.fromarray(pixels).quantize(colors=16)
    path = save(palette, tmp_path / "p.png")
    assert stored_as(path)[0] == "P"
    np.testing.assert_array_equal(decode_rgb(path), np.asarray(palette.convert("RGB")))


def test_palette_png_with_transparency(tmp_path):
    palette = Image.new("P", (6, 6), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(0, (0, 0, 3, 6))
    path = save(palette, tmp_path / "pt.png", transparency=0)
    out = decode_rgb(path)
    assert (out[:, :3] == WHITE).all()
    assert (out[:, 3:] == RED).all()


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    path = save(Image.fromarray(values), tmp_path / "deep.png")
    assert stored_as(path)[0] in ("I;16", "I")
    out = decode_rgb(path)
    assert out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()


def test_16bit_pgm_is_scaled(tmp_path):
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    out = decode_rgb(save(Image.fromarray(values), tmp_path / "deep.pgm"))
    assert out[0, :, 0].tolist() == [0, 128, 255]


def test_32bit_int_tiff(tmp_path):
    values = np.array([[-5, 0, 32768, 65535, 1 << 20]], dtype=np.int32)
    path = save(Image.fromarray(values), tmp_path / "int.tif")
    assert stored_as(path)[0] == "I"
    assert decode_rgb(path)[0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_float_tiff(tmp_path):
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    path = save(Image.fromarray(values), tmp_path / "float.tif")
    assert stored_as(path)[0] == "F"
    assert decode_rgb(path)[0, :, 0].tolist() == [0, 128, 255]


def test_cmyk_jpeg(tmp_path):
    path = save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    assert stored_as(path)[0] == "CMYK"
    out = decode_rgb(path)
    assert out.shape == (16, 16, 3)
    assert_close(out[8, 8], RED, tolerance=8)


def test_ycbcr_tiff(tmp_path):
    ycbcr = Image.new("RGB", (8, 8), RED).convert("YCbCr")
    path = save(ycbcr, tmp_path / "ycbcr.tif")
    assert stored_as(path)[0] == "YCbCr"
    assert_close(decode_rgb(path)[4, 4], RED, tolerance=8)


def test_bilevel_bmp(tmp_path):
    out = decode_rgb(save(Image.new("1", (5, 3), 1), tmp_path / "bw.bmp"))
    assert out.shape == (3, 5, 3) and (out == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), WHITE)
    img.paste(RED, (0, 0, 10, 10))  # marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = save(img, tmp_path / "rotated.jpg", exif=exif, quality=95)
    out = decode_rgb(path)
    assert out.shape == (40, 20, 3)
    assert_close(out[3, 16], RED, tolerance=10)  # the stored top-left is displayed top-right
    assert_close(out[3, 3], WHITE, tolerance=10)


def test_animated_gif_takes_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert_close(decode_rgb(path)[4, 4], RED, tolerance=4)


def test_bytes_and_file_decode_identically(tmp_path):
    path = save(Image.fromarray(gradient(20, 12)), tmp_path / "a.webp", quality=90)
    np.testing.assert_array_equal(decode_rgb_bytes(path.read_bytes(), name="upload.webp"), decode_rgb(path))


def test_custom_max_pixels_allows_exact_limit(tmp_path):
    path = save(Image.new("RGB", (10, 10)), tmp_path / "a.png")
    assert decode_rgb(path, max_pixels=100).shape == (10, 10, 3)


# ---------------------------------------------------------------------------------------------------
# Bad inputs: every one raises BadImage with a readable reason, never another exception type
# ---------------------------------------------------------------------------------------------------


def truncated_jpeg(tmp_path: Path) -> Path:
    data = save(Image.fromarray(gradient(64, 64)), tmp_path / "whole.jpg").read_bytes()
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    return path


def truncated_png(tmp_path: Path) -> Path:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = save(Image.fromarray(noise), tmp_path / "whole.png").read_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    return path


def empty_png(tmp_path: Path) -> Path:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    return path


def text_as_jpg(tmp_path: Path) -> Path:
    path = tmp_path / "notes.jpg"
    path.write_text("these are not the pixels you are looking for\n")
    return path


def ico_file(tmp_path: Path) -> Path:
    return save(Image.new("RGB", (16, 16)), tmp_path / "icon.png", format="ICO")


def missing_file(tmp_path: Path) -> Path:
    return tmp_path / "does-not-exist.png"


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (truncated_jpeg, "truncated"),
        (truncated_png, "truncated"),
        (empty_png, "empty file"),
        (text_as_jpg, "not an image"),
        (ico_file, "unsupported format"),
        (missing_file, "cannot read"),
    ],
)
def test_bad_files_raise_bad_image(tmp_path, make, words):
    path = make(tmp_path)
    with pytest.raises(BadImage) as info:
        decode_rgb(path)
    assert words in str(info.value)
    assert info.value.source == str(path)
    if path.exists() and path.stat().st_size:
        with pytest.raises(BadImage, match=words):
            decode_rgb_bytes(path.read_bytes())


def test_empty_bytes():
    with pytest.raises(BadImage, match="empty file") as info:
        decode_rgb_bytes(b"", name="upload.png")
    assert info.value.source == "upload.png"


def test_truncated_refused_even_if_pillow_set_to_tolerate(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(BadImage, match="truncated"):
        decode_rgb(truncated_jpeg(tmp_path))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def test_concurrent_decodes_stay_strict_and_restore_the_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    good = save(Image.fromarray(gradient(64, 64)), tmp_path / "good.png")
    bad = truncated_jpeg(tmp_path)

    def outcome(path: Path) -> str:
        try:
            decode_rgb(path)
            return "ok"
        except BadImage:
            return "refused"

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(outcome, [good, bad] * 20))
    assert results == ["ok", "refused"] * 20
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_huge_declared_size_refused_before_decoding(tmp_path):
    path = png_with_declared_size(tmp_path / "bomb.png", 30000, 30000)
    started = time.perf_counter()
    with pytest.raises(BadImage) as info:
        decode_rgb(path)
    assert time.perf_counter() - started < 2.0
    reason = str(info.value)
    assert "decompression bomb" in reason and "900000000 pixels" in reason


def test_declared_size_above_our_limit_but_below_pillows(tmp_path):
    # 9000 x 9000 = 81M pixels: over the default 8192 x 8192, under Pillow's own warning threshold.
    path = png_with_declared_size(tmp_path / "big.png", 9000, 9000)
    started = time.perf_counter()
    with pytest.raises(BadImage) as info:
        decode_rgb(path)
    assert time.perf_counter() - started < 2.0
    assert str(info.value) == (
        "image of 9000x9000 pixels exceeds the limit of 67108864 pixels (possible decompression bomb)"
    )


def test_custom_max_pixels_refuses_real_image(tmp_path):
    path = save(Image.new("RGB", (11, 10)), tmp_path / "a.png")
    with pytest.raises(BadImage, match="11x10 pixels exceeds the limit of 100"):
        decode_rgb(path, max_pixels=100)


def test_pillow_bomb_warning_silenced_and_error_converted(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # Pillow warns above 50 pixels, raises above 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_rgb(save(Image.new("RGB", (10, 10)), tmp_path / "warns.png")).shape == (10, 10, 3)
    with pytest.raises(BadImage, match="possible decompression bomb: Image size \\(110 pixels\\)"):
        decode_rgb(save(Image.new("RGB", (11, 10)), tmp_path / "raises.png"))


def test_unconvertible_mode_is_reported(tmp_path, monkeypatch):
    path = save(Image.new("CMYK", (4, 4)), tmp_path / "cmyk.jpg")

    def refuse(self, mode=None, *args, **kwargs):
        raise ValueError(f"conversion from {self.mode} to {mode} not supported")

    monkeypatch.setattr(Image.Image, "convert", refuse)
    with pytest.raises(BadImage, match="unsupported image mode 'CMYK'"):
        decode_rgb(path)


def test_bad_image_is_a_value_error():
    assert issubclass(BadImage, ValueError)


# ---------------------------------------------------------------------------------------------------
# Resizing
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width", "mode", "size", "shape"),
    [
        (23, 37, "resize_and_crop", 16, (16, 16, 3)),
        (300, 200, "resize_and_crop", 256, (256, 256, 3)),
        (64, 64, "resize_and_crop", 64, (64, 64, 3)),
        (60, 100, "scale_width", 64, (36, 64, 3)),  # 60 * 0.64 = 38.4 -> 38 -> 36
        (100, 50, "scale_width", 32, (64, 32, 3)),
        (23, 37, "none", 999, (20, 36, 3)),
        (64, 128, "none", 999, (64, 128, 3)),
    ],
)
def test_resize_shapes(height, width, mode, size, shape):
    out = resize_image(gradient(width, height), size, mode)
    assert out.shape == shape and out.dtype == np.uint8 and out.flags.c_contiguous


def test_none_mode_crops_centre_without_resampling():
    pixels = gradient(37, 23)
    np.testing.assert_array_equal(resize_image(pixels, 1, "none"), pixels[1:21, 0:36])


def test_resize_rejects_unknown_mode_and_tiny_images():
    with pytest.raises(ValueError, match="unknown resize mode"):
        resize_image(gradient(8, 8), 8, "stretch")
    with pytest.raises(ValueError, match="too small"):
        resize_image(gradient(3, 8), 8, "none")
    with pytest.raises(ValueError, match="too small"):
        resize_image(gradient(100, 2), 64, "scale_width")


# ---------------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------------


def test_write_png_round_trip_leaves_no_temp_files(tmp_path):
    pixels = gradient(37, 23)
    path = tmp_path / "nested" / "dir" / "out.png"
    write_image_atomic(path, pixels)
    np.testing.assert_array_equal(decode_rgb(path), pixels)
    assert files_in(path.parent) == ["out.png"]


@pytest.mark.parametrize(
    ("name", "fmt", "pillow_format"),
    [
        ("a.jpg", None, "JPEG"),
        ("a.JPEG", None, "JPEG"),
        ("a.webp", None, "WEBP"),
        ("a.bin", "jpg", "JPEG"),
        ("a.bin", "png", "PNG"),
    ],
)
def test_write_format_from_suffix_or_argument(tmp_path, name, fmt, pillow_format):
    write_image_atomic(tmp_path / name, gradient(16, 8), format=fmt)
    assert stored_as(tmp_path / name)[1] == pillow_format


def test_write_unknown_suffix_needs_a_format(tmp_path):
    with pytest.raises(ValueError, match="cannot infer"):
        write_image_atomic(tmp_path / "a.bin", gradient(4, 4))
    assert files_in(tmp_path) == []


def test_write_bad_array_keeps_previous_file(tmp_path):
    path = tmp_path / "out.png"
    write_image_atomic(path, gradient(8, 8))
    before = path.read_bytes()
    with pytest.raises(ValueError, match="uint8"):
        write_image_atomic(path, gradient(8, 8).astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        write_image_atomic(path, np.zeros((8, 8), dtype=np.uint8))
    assert path.read_bytes() == before
    assert files_in(tmp_path) == ["out.png"]


def test_encoder_failure_mid_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "out.jpg"
    write_image_atomic(path, gradient(8, 8))
    before = path.read_bytes()

    def failing_save(self, fp, *args, **kwargs):
        fp.write(b"half an image")
        raise OSError("disk on fire")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk on fire"):
        write_image_atomic(path, gradient(8, 8))
    assert path.read_bytes() == before
    assert files_in(tmp_path) == ["out.jpg"]


def test_temp_file_is_hidden_and_in_the_same_directory(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spying_replace(src, dst):
        seen.append(Path(src))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spying_replace)
    write_bytes_atomic(tmp_path / "data.bin", b"x")
    (tmp,) = seen
    assert tmp.parent == tmp_path
    assert tmp.name.startswith(".data.bin.") and tmp.name.endswith(".tmp")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_written_file_respects_umask(tmp_path):
    umask = os.umask(0o022)
    try:
        write_bytes_atomic(tmp_path / "a.bin", b"x")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o644


def test_write_bytes_overwrites(tmp_path):
    path = tmp_path / "a.bin"
    write_bytes_atomic(path, b"first")
    write_bytes_atomic(path, b"second")
    assert path.read_bytes() == b"second"
    assert files_in(tmp_path) == ["a.bin"]


def test_write_json_format(tmp_path):
    obj = {"zeta": 1, "alpha": [1, 2], "name": "café"}
    path = tmp_path / "sub" / "report.json"
    write_json_atomic(path, obj)
    text = path.read_text(encoding="utf-8")
    assert text == json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    assert list(json.loads(text)) == ["zeta", "alpha", "name"]  # insertion order kept


# ---------------------------------------------------------------------------------------------------
# Scanning and hashing
# ---------------------------------------------------------------------------------------------------


def test_list_images_recursive_sorted_filtered(tmp_path):
    names = [
        "b.png",
        "A.JPG",
        "c.Jpeg",
        "notes.txt",
        "model.pt",
        ".hidden.png",
        "x.gif",
        "sub/d.tiff",
        "sub/e.TIF",
        "sub/deeper/f.webp",
        "sub/deeper/g.bmp",
        "sub/h.ppm",
        "sub/i.pgm",
        ".git/j.png",
        "sub/.cache/k.png",
        "sub/noext",
    ]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = list_images(tmp_path)
    assert found == sorted(found)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "A.JPG",
        "b.png",
        "c.Jpeg",
        "sub/d.tiff",
        "sub/deeper/f.webp",
        "sub/deeper/g.bmp",
        "sub/e.TIF",
        "sub/h.ppm",
        "sub/i.pgm",
        "x.gif",
    ]


def test_list_images_inside_a_hidden_parent(tmp_path):
    root = tmp_path / ".cache" / "dataset"
    root.mkdir(parents=True)
    (root / "a.png").write_bytes(b"")
    assert list_images(root) == [root / "a.png"]


def test_list_images_missing_folder(tmp_path):
    with pytest.raises(NotADirectoryError):
        list_images(tmp_path / "nope")


def test_image_suffixes_are_lowercase_with_dot():
    assert all(s.startswith(".") and s == s.lower() for s in IMAGE_SUFFIXES)
    assert {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".pgm"} <= IMAGE_SUFFIXES


def test_sha256_of_file(tmp_path):
    data = os.urandom(3 << 20)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_of_file(path) == hashlib.sha256(data).hexdigest()
