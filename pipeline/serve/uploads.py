"""What a request to the HTTP service may carry, checked as early as possible: the body's bytes while it is read,
the content type, the pixels from the image header before any decoding, the size the network needs."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
from fastapi import Request
from starlette.formparsers import MultiPartException, MultiPartParser

from pipeline.images import BadImage, ImageTooLarge, decode_labels_bytes, decode_rgb_bytes

IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
MULTIPART = "multipart/form-data"


class ClientError(Exception):
    """A request we refuse: `status` and a message that says what was wrong."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


async def read_limited(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (or at once by its Content-Length)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ClientError(413, f"the body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ClientError(413, f"the body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def image_upload(request: Request, limit: int) -> tuple[bytes, str]:
    """The uploaded image's bytes and a name for errors: a raw body of an image type, or multipart field `image`."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != MULTIPART and content_type not in IMAGE_TYPES:
        allowed = ", ".join([*IMAGE_TYPES, MULTIPART])
        raise ClientError(415, f"Content-Type {content_type or '(none)'!r} is not accepted; send one of {allowed}")
    body = await read_limited(request, limit)
    if content_type != MULTIPART:
        return body, "the body"

    async def replay() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(request.headers, replay(), max_files=1, max_fields=8, max_part_size=limit)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ClientError(422, f"malformed multipart body: {exc.message}") from None
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise ClientError(422, "the multipart body has no file field named 'image'")
    part_type = (upload.content_type or "").split(";")[0].strip().lower()
    if part_type and part_type not in IMAGE_TYPES and part_type != "application/octet-stream":
        raise ClientError(415, f"field 'image' has Content-Type {part_type!r}; send PNG, JPEG or WebP")
    return await upload.read(), f"field 'image' ({upload.filename or 'no file name'})"


def decode(data: bytes, name: str, max_pixels: int, classes: int | None = None) -> np.ndarray:
    """An upload as RGB, or with `classes` as a label map of class indices; 413/422 say what is wrong."""
    try:
        if classes is not None:
            return decode_labels_bytes(data, name, classes, max_pixels)
        return decode_rgb_bytes(data, name, max_pixels, formats=tuple(IMAGE_TYPES.values()))
    except ImageTooLarge as exc:
        raise ClientError(413, f"{name}: {exc}") from None
    except BadImage as exc:
        raise ClientError(422, f"{name}: {exc} (PNG, JPEG and WebP are accepted)") from None


def check_size(image: np.ndarray, multiple: int) -> None:
    height, width = image.shape[:2]
    if min(height, width) < multiple:
        raise ClientError(422, f"the image is {width}x{height}; this model needs at least {multiple} px on each side")


IMAGE_BODY = {
    "required": True,
    "content": {
        **{t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGE_TYPES},
        MULTIPART: {
            "schema": {
                "type": "object",
                "properties": {"image": {"type": "string", "format": "binary"}},
                "required": ["image"],
            }
        },
    },
}
