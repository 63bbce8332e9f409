"""`transfigure serve`: the HTTP app of `http.py` on uvicorn, one ONNX Runtime session per process."""

from __future__ import annotations

import signal

from pipeline.errors import UserError
from pipeline.serve.engine import MODEL_URI_PREFIX, Engine
from pipeline.serve.http import configure_access_log, create_app
from pipeline.serve.settings import ServeSettings


def model_name(model: str) -> str:
    """The name clients use: the registered model's name for models:/NAME@ALIAS or models:/NAME/VERSION, else
    the file's stem."""
    if model.startswith(MODEL_URI_PREFIX):
        return model[len(MODEL_URI_PREFIX) :].split("@")[0].split("/")[0]
    return model.replace("\\", "/").rsplit("/", 1)[-1].removesuffix(".onnx")


def check(settings: ServeSettings) -> None:
    """Refuses settings that cannot serve, naming each flag."""
    wrong = {
        "--max-batch must be at least 1": settings.max_batch < 1,
        "--max-queue must be at least 1": settings.max_queue < 1,
        "--max-wait-ms must be 0 or more": settings.max_wait_ms < 0,
        "--timeout-s must be more than 0": settings.timeout_s <= 0,
    }
    if any(wrong.values()):
        raise UserError("; ".join(message for message, bad in wrong.items() if bad))


def run(engine: Engine, settings: ServeSettings, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT: then stop accepting, finish in-flight requests for at most
    `settings.timeout_graceful_shutdown` seconds, and return."""
    import uvicorn

    configure_access_log()
    config = uvicorn.Config(
        create_app(engine, settings),
        host=host,
        port=port,
        access_log=False,
        timeout_graceful_shutdown=settings.timeout_graceful_shutdown,
        log_level="info",
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it stopped on once it has shut down gracefully, so that the default action
    # (death by SIGTERM, exit 143) follows; handlers that ignore it, installed first, make that a clean exit 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise UserError(f"could not serve on {host}:{port} (uvicorn's message is above)")
