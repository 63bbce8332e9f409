"""The training step's supply of batches: on the device as model input, the next batch's copy already under way
on a side CUDA stream while the current step runs, and how long the steps waited for their data."""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from transfigure.pipeline.train.context import Context

# More of a run spent waiting for batches than this, and the end of the run says which knob to turn.
DATA_WAIT_WARNING = 0.20


class Feed:
    """`feed()` gives the next batch on `ctx.device`. `drawn` counts the batches handed out over the whole run
    (a resumed run's stream starts there); `waited` the seconds this process spent waiting for the loader."""

    def __init__(self, stream: Iterator[dict[str, torch.Tensor]], ctx: Context, drawn: int = 0):
        self.stream, self.ctx, self.drawn, self.waited = stream, ctx, drawn, 0.0
        self.copies = torch.cuda.Stream(ctx.device) if ctx.device.type == "cuda" else None
        self.ahead: dict[str, torch.Tensor] | None = None

    def __call__(self) -> dict[str, torch.Tensor]:
        batch = self.ahead if self.ahead is not None else self._fetch()
        if self.copies is not None:
            current = torch.cuda.current_stream(self.ctx.device)
            current.wait_stream(self.copies)
            for value in batch.values():
                value.record_stream(current)  # made on the side stream, used on this one
            self.ahead = self._fetch()
        self.drawn += 1
        return batch

    def _fetch(self) -> dict[str, torch.Tensor]:
        started = time.perf_counter()
        batch = next(self.stream)
        self.waited += time.perf_counter() - started
        if self.copies is None:
            return self.ctx.to_device(batch)
        with torch.cuda.stream(self.copies):
            return self.ctx.to_device(batch)


def data_wait_warning(recipe: str, fraction: float, workers: int | str) -> str | None:
    """The one line that says a run was starved of data, naming the knob; None when it was not."""
    if fraction <= DATA_WAIT_WARNING:
        return None
    return (
        f"warning: {fraction:.0%} of the training time waited for data; more loader processes may help: "
        f"--set {recipe}.num_workers=N (now {workers}), or smaller images"
    )
