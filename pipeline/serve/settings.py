"""The HTTP service's own settings and their defaults: one definition, read by `serve`'s flags and by the app.
How the model runs (tiles, memory, precision, ...) is the engine's InferenceOptions; `max_batch` and
`max_pixels` are copied from them for the app. No heavy imports, so `transfigure --help` stays instant."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeSettings:
    model_name: str
    max_batch: int
    max_wait_ms: float = 5.0
    max_queue: int = 64
    timeout_s: float = 30.0
    max_body_bytes: int = 20_000_000
    max_pixels: int = 40_000_000
    timeout_graceful_shutdown: float = 20.0


def default_max_batch(provider: str) -> int:
    """8 on a GPU. On the CPU, 1: one image already fills the cores, and batching 8 clients' 128x128 photos
    served fewer requests per second than running them one by one (docs/BENCHMARKS.md, Serving)."""
    return 1 if provider == "cpu" else 8
