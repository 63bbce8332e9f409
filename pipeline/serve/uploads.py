"""What a request to the HTTP service may carry, checked as early as possible: the body's bytes while it is read,
the content type, the pixels from the image header before any decoding, the size the network needs. A body
left unread by a refusal is drained before the answer, so clients that send it all first read the answer."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import numpy as np
from fastapi import Request
from PIL import Image
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from transfigure.pipeline.images import BadImage, ImageTooLarge, decode_labels_bytes, decode_rgb_bytes

IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
MULTIPART = "multipart/form-data"
DRAIN_AT_MOST = 64 * 2**20  # past this, a refused body is not read: the connection closes instead


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


def dimensions(data: bytes, name: str, max_pixels: int, classes: int | None = None) -> tuple[int, int]:
    """(height, width) from the image's header alone, so no pixel is decoded before the image is admitted;
    413 past `max_pixels`. Without a header Pillow can read, the full decode refuses it, in its own words."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Exception:  # noqa: BLE001 (Pillow raises many kinds for a bad header; decode words each)
        return decode(data, name, max_pixels, classes).shape[:2]
    if width * height > max_pixels:
        raise ClientError(413, f"{name}: image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels")
    return height, width


def check_size(height: int, width: int, min_side: int) -> None:
    if min(height, width) < min_side:
        raise ClientError(422, f"the image is {width}x{height}; this model needs at least {min_side} px on each side")


class DrainUnreadBody:
    """ASGI middleware: before an answer goes out, reads and discards what is left of the request's body (up to
    `DRAIN_AT_MOST` bytes). A server that closes a socket holding unread data resets the connection, so clients
    that send the whole body before reading (urllib, requests) would see "connection reset" instead of our 413.
    Past the cap, or when the client waits for `100 Continue` and sent nothing, the answer says
    `Connection: close`."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body = {"read": 0, "done": False}
        headers = dict(scope["headers"])
        expects_continue = headers.get(b"expect", b"").lower() == b"100-continue"
        declared = headers.get(b"content-length", b"")

        async def counting_receive() -> Message:
            message = await receive()
            _count(body, message)
            return message

        async def draining_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not body["done"]:
                too_long = declared.isdigit() and int(declared) > DRAIN_AT_MOST
                if not too_long and not (expects_continue and body["read"] == 0):
                    while not body["done"] and body["read"] <= DRAIN_AT_MOST:
                        _count(body, await receive())
                if not body["done"]:
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, counting_receive, draining_send)


def _count(body: dict, message: Message) -> None:
    if message["type"] == "http.disconnect":
        body["done"] = True
    elif message["type"] == "http.request":
        body["read"] += len(message.get("body", b""))
        body["done"] = not message.get("more_body", False)


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
