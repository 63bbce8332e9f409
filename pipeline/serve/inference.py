"""The service's side of inference: what every translating route goes through (the size check, admission by
estimated memory, the micro-batcher and the engine, each refusal as a ClientError), the health that the
operations routes report, and the Prometheus metrics of both."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector

from transfigure.pipeline.serve import uploads
from transfigure.pipeline.serve.batching import (
    DeadlineExceeded,
    Hold,
    MemoryAdmission,
    MicroBatcher,
    NotAdmitted,
    QueueFull,
    Run,
)
from transfigure.pipeline.serve.engine import Engine, InferenceError
from transfigure.pipeline.serve.settings import ServeSettings
from transfigure.pipeline.serve.uploads import ClientError

WARM_UP_TIMEOUT_S = 900
log = logging.getLogger("transfigure.serve")
SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (so two apps in one process do not clash),
    with the process's own (memory, CPU, open files) beside them."""

    def __init__(self, engine: Engine, settings: ServeSettings):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.requests = Counter(
            "transfigure_requests", "HTTP requests by route and status.", ["route", "status"], registry=self.registry
        )
        self.duration = Histogram(
            "transfigure_request_duration_seconds", "Time from request to response.", ["route"], registry=self.registry
        )
        self.batch_size = Histogram(
            "transfigure_batch_size", "Images per engine run.", buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry
        )
        self.queue_wait = Histogram(
            "transfigure_queue_wait_seconds",
            "Time an image waited for its engine run.",
            buckets=SECONDS,
            registry=self.registry,
        )
        self.compute = Histogram(
            "transfigure_compute_seconds", "Time of one engine run.", buckets=SECONDS, registry=self.registry
        )
        self.queue_depth = Gauge("transfigure_queue_depth", "Images waiting or running.", registry=self.registry)
        self.admitted_bytes = Gauge(
            "transfigure_admitted_bytes", "Estimated memory of the work admitted.", registry=self.registry
        )
        Gauge("transfigure_memory_budget_bytes", "What admitted work may use.", registry=self.registry).set(
            engine.memory_budget
        )
        info = Gauge(
            "transfigure_model_info",
            "The served model (value 1).",
            ["name", "recipe", "direction", "provider", "precision", "max_batch"],
            registry=self.registry,
        )
        info.labels(
            settings.model_name,
            engine.card.recipe or "",
            engine.card.direction or "",
            engine.provider,
            engine.precision,
            str(settings.max_batch),
        ).set(1)

    def observe_run(self, run: Run) -> None:
        self.batch_size.observe(len(run.waits))
        for seconds in run.waits:
            self.queue_wait.observe(seconds)
        self.compute.observe(run.seconds)


class Inference:
    """What every translating route goes through: the size check, admission by estimated memory, the batcher
    and the engine, each refusal as a ClientError; and the health the operations routes report."""

    def __init__(self, engine: Engine, settings: ServeSettings, metrics: Metrics):
        self.engine, self.settings = engine, settings
        self.batcher = MicroBatcher(
            engine.translate_batch,
            engine.translate,
            max_batch=settings.max_batch,
            max_wait_s=settings.max_wait_ms / 1000,
            max_queue=settings.max_queue,
            on_run=metrics.observe_run,
        )
        self.memory = MemoryAdmission(engine.memory_budget)
        metrics.queue_depth.set_function(lambda: self.batcher.depth)
        metrics.admitted_bytes.set_function(lambda: self.memory.admitted_bytes)
        self.warm_up_state = "warming up"

    async def warm_up(self) -> None:
        # The first run of a session allocates and picks kernels (TensorRT builds engines, minutes); a client
        # should not pay for it, so it has its own long deadline and readiness waits for it.
        side = max(self.engine.min_side, 64 // self.engine.multiple * self.engine.multiple)
        image = np.zeros((side, side) if self.engine.labels_in else (side, side, 3), np.uint8)
        try:
            # Sizing a large image needs the tiling companions; loaded here, not on the event loop by a request.
            await asyncio.to_thread(self.engine.load_tiling)
            await self.batcher.submit(image, time.monotonic() + WARM_UP_TIMEOUT_S)
        except Exception:
            log.exception("warm-up failed; /readyz stays 503")
            self.warm_up_state = "the warm-up failed (the server's log says why)"
            return
        self.warm_up_state = "done"

    def not_ready(self) -> str | None:
        """Why the service should get no traffic now, or None when it is ready."""
        if self.warm_up_state != "done":
            return self.warm_up_state
        running = self.batcher.running_for
        if running > self.settings.timeout_s:
            return f"an inference has run {running:.0f} s, past the timeout of {self.settings.timeout_s:g} s"
        return None

    def dead(self) -> str | None:
        """Why the service cannot answer any translation, or None while its inference worker lives."""
        return None if self.batcher.alive else "the inference worker stopped"

    @asynccontextmanager
    async def admitted(self, height: int, width: int, count: int, deadline: float) -> AsyncIterator[Hold]:
        """Holds the estimated memory of `count` images of this size while the block decodes, translates and
        encodes them (and their runs last); 422 when the model cannot take the size, 503 when the memory is
        not free by `deadline`."""
        uploads.check_size(height, width, self.engine.min_side)
        try:
            async with self.memory.admit(count * self.engine.memory_needed(height, width), deadline) as hold:
                yield hold
        except NotAdmitted as exc:
            raise ClientError(503, f"busy: {exc}; retry shortly", {"Retry-After": "1"}) from None

    async def translate(self, images: list[np.ndarray], deadline: float, hold: Hold) -> list[np.ndarray]:
        """Equal-sized images, translated by `deadline` (a `time.monotonic()` value); their runs share `hold`."""
        alone = self.engine.tiled(*images[0].shape[:2])
        try:
            runs = (self.batcher.submit(im, deadline, alone, hold.share()) for im in images)
            return list(await asyncio.gather(*runs))
        except QueueFull as exc:
            raise ClientError(503, f"busy: {exc}; retry shortly", {"Retry-After": "1"}) from None
        except DeadlineExceeded:
            raise ClientError(504, f"not translated within {self.settings.timeout_s:g} s") from None
        except InferenceError as exc:  # the engine words it for clients; the runtime's own text is logged here
            log.warning("inference failed: %s", exc, exc_info=exc)
            raise ClientError(422, str(exc)) from None

    def deadline(self) -> float:
        return time.monotonic() + self.settings.timeout_s
