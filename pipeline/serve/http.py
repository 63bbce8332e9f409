"""The HTTP service: `/v1/translate` for people and scripts, the Open Inference Protocol v2 under `/v2`, a page at
`/`, `/docs` and `/openapi.json`, and `/healthz`, `/readyz`, `/metrics` for operations. Every image goes through
`Inference`: the one `Engine`, batched by `MicroBatcher`, admitted by its estimated memory; `uploads` checks what
a request carries before any work. Every error is JSON `{"error": "..."}`; no traceback reaches a client.
Every response carries `X-Request-ID` (the client's, or a new one), which the JSON access log line has too.
"""

from __future__ import annotations

import asyncio
import contextvars
import html
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata, resources
from typing import Literal

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from transfigure.pipeline.images import encode_image, encode_labels
from transfigure.pipeline.serve import oip, uploads
from transfigure.pipeline.serve.engine import Engine
from transfigure.pipeline.serve.inference import Inference, Metrics
from transfigure.pipeline.serve.settings import ServeSettings
from transfigure.pipeline.serve.uploads import ClientError

OUTPUT_FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg", "webp": "image/webp"}
REQUEST_ID = "X-Request-ID"
access_log = logging.getLogger("transfigure.access")
log = logging.getLogger("transfigure.serve")
# The request a log line belongs to (each request runs in its own task, so its own context).
current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_CLIENT_REQUEST_ID = re.compile(r"[\w.:@/+=-]{1,128}")
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")


def create_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    metrics = Metrics(engine, settings)
    inference = Inference(engine, settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        inference.batcher.start()
        warming = asyncio.create_task(inference.warm_up())
        yield
        warming.cancel()
        await inference.batcher.stop()

    # No Swagger UI or ReDoc: they load from a CDN, blank offline; /docs is a page of our own.
    app = FastAPI(
        title="Transfigure",
        version=_version(),
        lifespan=lifespan,
        summary="Image-to-image translation with an ONNX model of the Transfigure pipeline.",
        docs_url=None,
        redoc_url=None,
    )
    _observe_requests(app, metrics)
    app.add_middleware(uploads.DrainUnreadBody)  # added last, so outermost: it reads what every layer left unread
    _answer_errors_in_json(app)
    _operations_routes(app, inference, metrics)
    _v1_routes(app, inference)
    _v2_routes(app, inference)
    app.state.inference = inference  # for tools and tests that look inside a running app
    return app


def _observe_requests(app: FastAPI, metrics: Metrics) -> None:
    """Each request gets an id (the client's X-Request-ID, or a new one), echoed in the response and written,
    with the W3C trace id when `traceparent` has one, in its JSON access log line."""

    @app.middleware("http")
    async def observe(request: Request, call_next):
        start = time.perf_counter()
        request_id = _request_id(request.headers.get(REQUEST_ID))
        current_request_id.set(request_id)
        response = await call_next(request)
        response.headers[REQUEST_ID] = request_id
        seconds = time.perf_counter() - start
        route = getattr(request.scope.get("route"), "path", "unmatched")
        metrics.requests.labels(route, str(response.status_code)).inc()
        metrics.duration.labels(route).observe(seconds)
        fields = {
            "method": request.method,
            "path": request.url.path,
            "route": route,
            "status": response.status_code,
            "ms": round(seconds * 1000, 2),
            "client": request.client.host if request.client else None,
            "request_id": request_id,
        }
        trace_id = _trace_id(request.headers.get("traceparent"))
        if trace_id:
            fields["trace_id"] = trace_id
        access_log.info("%s %s %s", request.method, request.url.path, response.status_code, extra={"fields": fields})
        return response


def _answer_errors_in_json(app: FastAPI) -> None:
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
        log.exception("unexpected error on %s", request.url.path)
        request_id = current_request_id.get()
        headers = {REQUEST_ID: request_id} if request_id else None
        return JSONResponse({"error": "internal error (logged on the server)"}, 500, headers=headers)


def _operations_routes(app: FastAPI, inference: Inference, metrics: Metrics) -> None:
    engine, settings = inference.engine, inference.settings
    page_html = resources.files("transfigure.pipeline.serve").joinpath("page.html").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html)

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(_docs_page(app.openapi()))

    @app.get("/healthz", summary="The process and its inference worker are alive.")
    async def healthz() -> JSONResponse:
        reason = inference.dead()
        return JSONResponse(
            {"status": "dead", "reason": reason} if reason else {"status": "alive"}, 503 if reason else 200
        )

    @app.get("/readyz", summary="The model is warmed up and no inference is stuck past the timeout.")
    async def readyz() -> JSONResponse:
        reason = inference.not_ready()
        body = {"status": "not ready", "reason": reason} if reason else {"status": "ready"}
        return JSONResponse({**body, "provider": engine.provider, "model": settings.model_name}, 503 if reason else 200)

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
            "card": engine.card.to_metadata(),
        }


def _v1_routes(app: FastAPI, inference: Inference) -> None:
    engine, settings = inference.engine, inference.settings
    classes_in = engine.classes if engine.labels_in else None

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
        height, width = uploads.dimensions(data, name, settings.max_pixels, classes_in)
        deadline = inference.deadline()
        async with inference.admitted(height, width, 1, deadline) as hold:
            image = await asyncio.to_thread(uploads.decode, data, name, settings.max_pixels, classes_in)
            (output,) = await inference.translate([image], deadline, hold)
            if engine.labels_out:
                encoded = await asyncio.to_thread(encode_labels, output, engine.palette)
            else:
                encoded = await asyncio.to_thread(encode_image, output, uploads.IMAGE_TYPES[media_type])
        seconds = f"{time.perf_counter() - start:.4f}"
        return Response(encoded, media_type=media_type, headers={"X-Transfigure-Seconds": seconds})


def _v2_routes(app: FastAPI, inference: Inference) -> None:
    """The Open Inference Protocol v2: what Triton's, KServe's and MLServer's clients speak."""
    settings = inference.settings
    signature = oip.Signature(inference.engine.labels_in, inference.engine.labels_out)

    def ready_answer(body: dict) -> JSONResponse:
        reason = inference.not_ready()
        return JSONResponse(
            {**body, "ready": False, "reason": reason} if reason else {**body, "ready": True}, 503 if reason else 200
        )

    @app.get("/v2", summary="Open Inference Protocol: server metadata.")
    async def v2() -> dict:
        return oip.server_metadata(_version())

    @app.get("/v2/health/live", summary="Open Inference Protocol: liveness.")
    async def v2_live() -> JSONResponse:
        reason = inference.dead()
        return JSONResponse({"live": False, "reason": reason} if reason else {"live": True}, 503 if reason else 200)

    @app.get("/v2/health/ready", summary="Open Inference Protocol: readiness.")
    async def v2_ready() -> JSONResponse:
        return ready_answer({})

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
        return ready_answer({"name": name})

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
        deadline = inference.deadline()
        async with inference.admitted(height, width, count, deadline) as hold:
            outputs = await inference.translate(list(parsed.images), deadline, hold)
        content, headers = oip.infer_response(name, parsed.id, np.stack(outputs), parsed.binary_output, signature)
        return Response(content, headers=headers, media_type=headers.pop("Content-Type"))


def _request_id(given: str | None) -> str:
    """The client's X-Request-ID when it is a plain token; otherwise (none, or odd characters that would make
    log lines ambiguous) a new one."""
    if given and _CLIENT_REQUEST_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex


def _trace_id(traceparent: str | None) -> str | None:
    """The trace id of a W3C `traceparent` header (version-traceid-parentid-flags), None when it has none."""
    match = _TRACEPARENT.fullmatch((traceparent or "").strip())
    if match is None or match.group(1) == "ff" or set(match.group(2)) == {"0"}:
        return None
    return match.group(2)


def _docs_page(openapi: dict) -> str:
    """The API's routes and a link to its OpenAPI document, with nothing loaded from elsewhere."""
    rows = "".join(
        f"<tr><td>{method.upper()}</td><td><code>{html.escape(path)}</code></td>"
        f"<td>{html.escape(operation.get('summary', ''))}</td></tr>"
        for path, operations in openapi["paths"].items()
        for method, operation in operations.items()
    )
    info = openapi["info"]
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(info['title'])} API</title><style>"
        "body{font:15px/1.4 system-ui,sans-serif;margin:2rem auto;max-width:60rem;padding:0 1rem}"
        "td{border-top:1px solid #ddd;padding:3px 8px;vertical-align:top}</style></head><body>"
        f"<h1>{html.escape(info['title'])} {html.escape(info['version'])}</h1>"
        f"<p>{html.escape(info.get('summary', ''))}</p>"
        '<p>The whole API, with every request and response schema: <a href="/openapi.json">/openapi.json</a> '
        '(OpenAPI 3; any OpenAPI viewer or client generator reads it). A page to try it: <a href="/">/</a>.</p>'
        f"<table><tr><th>method</th><th>path</th><th>what it does</th></tr>{rows}</table></body></html>"
    )


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
        503: "busy (queue or memory): retry after the Retry-After seconds",
        504: "not translated before the deadline",
    }.items()
}
