"""The HTTP service: `/v1/translate` for people and scripts, the Open Inference Protocol v2 under `/v2`, a page at
`/`, and `/healthz`, `/readyz`, `/metrics` for operations. Every image goes through the one `Engine`, batched
by `MicroBatcher`; `uploads` checks what a request carries before any work. Every error is JSON
`{"error": "..."}`; no traceback reaches a client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata, resources
from typing import Literal

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.images import encode_image, encode_labels
from pipeline.serve import oip, uploads
from pipeline.serve.batching import DeadlineExceeded, MicroBatcher, QueueFull
from pipeline.serve.engine import Engine, InferenceError
from pipeline.serve.settings import ServeSettings
from pipeline.serve.uploads import ClientError

OUTPUT_FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg", "webp": "image/webp"}
WARM_UP_TIMEOUT_S = 900
access_log = logging.getLogger("transfigure.access")


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (so two apps in one process do not clash)."""

    def __init__(self, engine: Engine, settings: ServeSettings):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "transfigure_requests", "HTTP requests by route and status.", ["route", "status"], registry=self.registry
        )
        self.duration = Histogram(
            "transfigure_request_duration_seconds", "Time from request to response.", ["route"], registry=self.registry
        )
        self.batch_size = Histogram(
            "transfigure_batch_size", "Images per engine run.", buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry
        )
        self.queue_depth = Gauge("transfigure_queue_depth", "Images waiting or running.", registry=self.registry)
        info = Gauge(
            "transfigure_model_info",
            "The served model (value 1).",
            ["name", "recipe", "direction", "provider", "precision", "max_batch"],
            registry=self.registry,
        )
        meta = engine.metadata
        info.labels(
            settings.model_name,
            meta.get("recipe", ""),
            meta.get("direction", ""),
            engine.provider,
            engine.precision,
            str(settings.max_batch),
        ).set(1)


def create_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    metrics = Metrics(engine, settings)
    batcher = MicroBatcher(
        engine.translate_batch,
        max_batch=settings.max_batch,
        max_wait_s=settings.max_wait_ms / 1000,
        max_queue=settings.max_queue,
        on_batch=metrics.batch_size.observe,
    )
    metrics.queue_depth.set_function(lambda: batcher.depth)
    state = {"ready": False}
    signature = oip.Signature(engine.labels_in, engine.labels_out)
    classes_in = engine.classes if engine.labels_in else None

    async def warm_up() -> None:
        # The first run of a session allocates and picks kernels (TensorRT builds engines, minutes); a client
        # should not pay for it, so it has its own long deadline and readiness waits for it.
        side = max(engine.multiple, 64 // engine.multiple * engine.multiple)
        try:
            await batcher.submit(
                np.zeros((side, side) if engine.labels_in else (side, side, 3), np.uint8), WARM_UP_TIMEOUT_S
            )
        except Exception:
            logging.getLogger("transfigure.serve").exception("warm-up failed; /readyz stays 503")
            return
        state["ready"] = True

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        warming = asyncio.create_task(warm_up())
        yield
        warming.cancel()
        await batcher.stop()

    app = FastAPI(
        title="Transfigure",
        version=_version(),
        lifespan=lifespan,
        summary="Image-to-image translation with an ONNX model of the Transfigure pipeline.",
    )

    @app.middleware("http")
    async def measure(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        seconds = time.perf_counter() - start
        route = getattr(request.scope.get("route"), "path", "unmatched")
        metrics.requests.labels(route, str(response.status_code)).inc()
        metrics.duration.labels(route).observe(seconds)
        access_log.info(
            json.dumps(
                {
                    "time": round(time.time(), 3),
                    "method": request.method,
                    "path": request.url.path,
                    "route": route,
                    "status": response.status_code,
                    "ms": round(seconds * 1000, 2),
                    "client": request.client.host if request.client else None,
                }
            )
        )
        return response

    @app.exception_handler(ClientError)
    async def client_error(request: Request, exc: ClientError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": where}, 422)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        logging.getLogger("transfigure.serve").exception("unexpected error on %s", request.url.path)
        return JSONResponse({"error": "internal error (logged on the server)"}, 500)

    async def translate_images(images: list[np.ndarray]) -> list[np.ndarray]:
        for image in images:
            uploads.check_size(image, engine.multiple)
        alone = None
        if settings.tile is not None and max(images[0].shape[:2]) > settings.tile:
            alone = lambda image: engine.translate(image, settings.tile, thumbnail=settings.thumbnail)  # noqa: E731
        try:
            return list(await asyncio.gather(*(batcher.submit(im, settings.timeout_s, alone) for im in images)))
        except QueueFull as exc:
            raise ClientError(503, f"busy: {exc}; retry shortly", {"Retry-After": "1"}) from None
        except DeadlineExceeded as exc:
            raise ClientError(504, str(exc)) from None
        except InferenceError as exc:
            raise ClientError(422, str(exc)) from None

    page_html = resources.files("pipeline.serve").joinpath("page.html").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html)

    @app.get("/healthz", summary="The process is alive.")
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz", summary="The model is loaded and warmed up.")
    async def readyz() -> JSONResponse:
        body = {"status": "ready" if state["ready"] else "warming up", "provider": engine.provider}
        return JSONResponse({**body, "model": settings.model_name}, 200 if state["ready"] else 503)

    @app.get("/metrics", summary="Prometheus metrics.")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", summary="The served model's name and card (its ONNX metadata).")
    async def models() -> dict:
        return {
            "name": settings.model_name,
            "provider": engine.provider,
            "precision": engine.precision,
            "precision_reason": engine.precision_reason,
            "max_batch": settings.max_batch,
            "card": engine.metadata,
        }

    @app.post(
        "/v1/translate",
        summary="Translate one image; the answer has the input's size.",
        response_class=Response,
        responses={200: {"content": {t: {} for t in uploads.IMAGE_TYPES}}, **_ERRORS},
        openapi_extra={"requestBody": uploads.IMAGE_BODY},
    )
    async def translate(
        request: Request, format: Literal["png", "jpeg", "jpg", "webp"] | None = Query(None)
    ) -> Response:
        start = time.perf_counter()
        media_type = OUTPUT_FORMATS[format] if format else _accepted(request.headers.get("accept", ""))
        data, name = await uploads.image_upload(request, settings.max_body_bytes)
        if engine.labels_out and media_type != "image/png":
            if format:
                raise ClientError(422, f"format {format}: label maps come as PNG, whose indices are the classes")
            media_type = "image/png"  # whatever Accept prefers: only PNG keeps the classes
        image = await asyncio.to_thread(uploads.decode, data, name, settings.max_pixels, classes_in)
        (output,) = await translate_images([image])
        if engine.labels_out:
            encoded = await asyncio.to_thread(encode_labels, output, engine.palette)
        else:
            encoded = await asyncio.to_thread(encode_image, output, uploads.IMAGE_TYPES[media_type])
        seconds = f"{time.perf_counter() - start:.4f}"
        return Response(encoded, media_type=media_type, headers={"X-Transfigure-Seconds": seconds})

    @app.get("/v2", summary="Open Inference Protocol: server metadata.")
    async def v2() -> dict:
        return oip.server_metadata(_version())

    @app.get("/v2/health/live", summary="Open Inference Protocol: liveness.")
    async def v2_live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready", summary="Open Inference Protocol: readiness.")
    async def v2_ready() -> JSONResponse:
        return JSONResponse({"ready": state["ready"]}, 200 if state["ready"] else 503)

    def known(name: str, version: str | None = None) -> None:
        if name != settings.model_name:
            raise ClientError(404, f"no model named {name!r}; this server serves {settings.model_name!r}")
        if version not in (None, oip.VERSION):
            raise ClientError(404, f"model {name!r} has only version {oip.VERSION!r}, not {version!r}")

    @app.get("/v2/models/{name}", summary="Open Inference Protocol: model metadata.")
    @app.get("/v2/models/{name}/versions/{version}", include_in_schema=False)
    async def v2_model(name: str, version: str | None = None) -> dict:
        known(name, version)
        return oip.model_metadata(name, signature)

    @app.get("/v2/models/{name}/ready", summary="Open Inference Protocol: model readiness.")
    @app.get("/v2/models/{name}/versions/{version}/ready", include_in_schema=False)
    async def v2_model_ready(name: str, version: str | None = None) -> JSONResponse:
        known(name, version)
        return JSONResponse({"name": name, "ready": state["ready"]}, 200 if state["ready"] else 503)

    @app.post(
        "/v2/models/{name}/infer",
        summary="Open Inference Protocol: translate a UINT8 [N, H, W, 3] tensor `image` into `translated`.",
        response_class=Response,
        responses=_ERRORS,
        openapi_extra={"requestBody": oip.INFER_BODY},
    )
    @app.post("/v2/models/{name}/versions/{version}/infer", include_in_schema=False)
    async def v2_infer(request: Request, name: str, version: str | None = None) -> Response:
        known(name, version)
        if request.headers.get("content-encoding", "identity") != "identity":
            raise ClientError(415, "compressed requests are not accepted; send the body uncompressed")
        body = await uploads.read_limited(request, settings.max_body_bytes)
        try:
            parsed = oip.parse_infer_request(body, request.headers.get(oip.HEADER_LENGTH), signature)
        except oip.ProtocolError as exc:
            raise ClientError(400, str(exc)) from None
        count, height, width = parsed.images.shape[:3]
        if count > settings.max_queue:
            raise ClientError(413, f"{count} images in one request; this server takes at most {settings.max_queue}")
        if height * width > settings.max_pixels:
            raise ClientError(413, f"images of {width}x{height} exceed the limit of {settings.max_pixels} pixels")
        outputs = await translate_images(list(parsed.images))
        content, headers = oip.infer_response(name, parsed.id, np.stack(outputs), parsed.binary_output, signature)
        return Response(content, headers=headers, media_type=headers.pop("Content-Type"))

    return app


def configure_access_log() -> None:
    """One JSON line per request on stderr (uvicorn's own access log is turned off)."""
    if not access_log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_log.addHandler(handler)
        access_log.setLevel(logging.INFO)
        access_log.propagate = False


def _accepted(accept: str) -> str:
    """The first image type of the Accept header that we can write; PNG when it names none."""
    for item in accept.split(","):
        media_type = item.split(";")[0].strip().lower()
        if media_type in uploads.IMAGE_TYPES:
            return media_type
    return "image/png"


def _version() -> str:
    try:
        return metadata.version("transfigure")
    except metadata.PackageNotFoundError:
        return "unknown"


_ERRORS = {
    status: {"description": text, "content": {"application/json": {"example": {"error": text}}}}
    for status, text in {
        400: "not the protocol",
        404: "unknown model",
        413: "body or image too large",
        415: "content type not accepted",
        422: "undecodable, truncated or too small image",
        503: "busy: retry after the Retry-After seconds",
        504: "not translated before the deadline",
    }.items()
}
