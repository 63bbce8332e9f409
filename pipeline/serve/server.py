"""`transfigure serve`: the HTTP app of `http.py` on uvicorn, one ONNX Runtime session per process. Everything
it logs (uvicorn's startup and errors, the access log, warnings) is one JSON object per line on stderr."""

from __future__ import annotations

import json
import logging
import signal
import warnings

from PIL import Image

from transfigure.pipeline.errors import UserError
from transfigure.pipeline.serve.engine import Engine
from transfigure.pipeline.serve.http import create_app, current_request_id
from transfigure.pipeline.serve.registry import MODEL_URI_PREFIX
from transfigure.pipeline.serve.settings import ServeSettings

LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "transfigure.pipeline.serve.server.JsonLines"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
    "root": {"handlers": ["stderr"], "level": "WARNING"},
    "loggers": {
        name: {"handlers": ["stderr"], "level": "INFO", "propagate": False}
        for name in ("uvicorn", "transfigure", "py.warnings")
    },
}


class JsonLines(logging.Formatter):
    """A record as one JSON object: time, level, logger, message, the request's id when it belongs to one, the
    `fields` an access line carries, and a traceback as one string."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = current_request_id.get()
        if request_id:
            line["request_id"] = request_id
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


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

    logging.captureWarnings(True)
    # --max-pixels, checked from the header, is the limit here; Pillow's warning below its own would be noise.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    config = uvicorn.Config(
        create_app(engine, settings),
        host=host,
        port=port,
        access_log=False,
        timeout_graceful_shutdown=settings.timeout_graceful_shutdown,
        log_config=LOG_CONFIG,
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
