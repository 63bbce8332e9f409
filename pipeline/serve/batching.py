"""Dynamic micro-batching for the HTTP service: concurrent images of one size share one run of the engine.

Each size has its own queue. A queue runs when it holds `max_batch` images or when its oldest image has waited
`max_wait_s`, so a lone 64x64 request never waits for 128x128 ones to fill a batch. Batches run one at a time on
one worker thread (one ONNX Runtime session per process, which already uses every core it was given), off the
event loop, and the queue whose oldest image arrived first runs first. At most `max_queue` images wait or run
(`QueueFull` past that); an image that waited past its deadline is dropped before it runs (`DeadlineExceeded`).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np


class QueueFull(RuntimeError):
    """Too many images are waiting; the client should retry later (HTTP 503 with Retry-After)."""


class DeadlineExceeded(RuntimeError):
    """The image was not translated within the request's deadline (HTTP 504)."""


@dataclass
class _Pending:
    image: np.ndarray
    future: asyncio.Future
    arrived: float
    deadline: float
    alone: Callable[[np.ndarray], np.ndarray] | None = None


@dataclass
class MicroBatcher:
    """`translate_batch(images)` translates equal-sized images in one run; `translate_one(image)` one image that
    goes alone (a large image in tiles). `on_batch(size)` is told each batch's size (metrics)."""

    translate_batch: Callable[[list[np.ndarray]], list[np.ndarray]]
    max_batch: int
    max_wait_s: float
    max_queue: int
    on_batch: Callable[[int], None] = lambda size: None
    _queues: dict[object, deque[_Pending]] = field(default_factory=dict)
    _depth: int = 0
    _wakeup: asyncio.Event | None = None
    _worker: asyncio.Task | None = None
    _executor: ThreadPoolExecutor | None = None

    @property
    def depth(self) -> int:
        """Images waiting or running now."""
        return self._depth

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self._worker = asyncio.get_running_loop().create_task(self._run_forever())

    async def stop(self) -> None:
        """After the server stopped taking requests: everything queued has been answered by then."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def submit(self, image: np.ndarray, timeout_s: float, alone: Callable | None = None) -> np.ndarray:
        """The translated image; `alone(image)` instead of a shared batch when given. Raises QueueFull or
        DeadlineExceeded, or what the engine raised for this image's batch."""
        if self._depth >= self.max_queue:
            raise QueueFull(f"{self._depth} images are waiting (the limit is {self.max_queue})")
        now = time.monotonic()
        pending = _Pending(image, asyncio.get_running_loop().create_future(), now, now + timeout_s, alone)
        key = ("alone", id(pending)) if alone is not None else image.shape
        self._queues.setdefault(key, deque()).append(pending)
        self._depth += 1
        self._wakeup.set()
        try:
            return await asyncio.wait_for(asyncio.shield(pending.future), timeout=timeout_s)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"not translated within {timeout_s:g} s") from None
        finally:
            self._depth -= 1

    async def _run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch, key = self._next_batch(time.monotonic())
            if batch is None:
                await self._sleep_until(key)
                continue
            self.on_batch(len(batch))
            try:
                outputs = await loop.run_in_executor(self._executor, self._translate, batch)
            except Exception as exc:  # the engine's error belongs to this batch's requests, not to the server
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            for pending, output in zip(batch, outputs, strict=True):
                if not pending.future.done():
                    pending.future.set_result(output)

    def _translate(self, batch: list[_Pending]) -> list[np.ndarray]:
        if batch[0].alone is not None:
            return [batch[0].alone(batch[0].image)]
        return self.translate_batch([pending.image for pending in batch])

    def _next_batch(self, now: float) -> tuple[list[_Pending] | None, object]:
        """The batch to run now, oldest queue first, or (None, the time the next queue becomes due)."""
        for key in [key for key, queue in self._queues.items() if not queue]:
            del self._queues[key]
        for queue in self._queues.values():
            while queue and (queue[0].future.done() or queue[0].deadline <= now):
                queue.popleft()  # its client was answered 504 already
        live = {key: queue for key, queue in self._queues.items() if queue}
        if not live:
            return None, None
        due = min(queue[0].arrived + self.max_wait_s for queue in live.values())
        ready = [k for k, q in live.items() if len(q) >= self.max_batch or q[0].arrived + self.max_wait_s <= now]
        if not ready:
            return None, due
        key = min(ready, key=lambda k: live[k][0].arrived)
        queue = live[key]
        size = 1 if queue[0].alone is not None else self.max_batch
        return [queue.popleft() for _ in range(min(size, len(queue)))], key

    async def _sleep_until(self, due: float | None) -> None:
        self._wakeup.clear()
        timeout = None if due is None else max(0.0, due - time.monotonic())
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except asyncio.TimeoutError:
            pass
