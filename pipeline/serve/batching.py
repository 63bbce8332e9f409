"""Dynamic micro-batching for the HTTP service: concurrent images of one size share one run of the engine, and
admission by memory keeps what waits or runs within the engine's memory budget.

Each size has its own queue. A queue runs when it holds `max_batch` images or when its oldest image has waited
`max_wait_s`, so a lone 64x64 request never waits for 128x128 ones to fill a batch. Batches run one at a time on
one worker thread (one ONNX Runtime session per process, which already uses every core it was given), off the
event loop, and the queue whose oldest image arrived first runs first. At most `max_queue` images wait or run
(`QueueFull` past that); an image that waited past its deadline is dropped before it runs (`DeadlineExceeded`).
A batch runs with the latest deadline of its images, so the engine stops it (`Cancelled`) only once every client
in it has had its 504, and the worker is free for the next batch.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np

from transfigure.pipeline.serve.engine import Cancelled


class QueueFull(RuntimeError):
    """Too many images are waiting; the client should retry later (HTTP 503 with Retry-After)."""


class DeadlineExceeded(RuntimeError):
    """The image was not translated within the request's deadline (HTTP 504)."""


class NotAdmitted(RuntimeError):
    """The work's estimated memory did not fit the budget before its deadline (HTTP 503 with Retry-After)."""


@dataclass(frozen=True)
class Run:
    """One engine run, for metrics: how long each of its images waited in the queue, and the compute seconds."""

    waits: list[float]
    seconds: float


@dataclass
class _Pending:
    image: np.ndarray
    future: asyncio.Future
    arrived: float
    deadline: float
    alone: bool
    on_leave: Callable[[], None]


@dataclass
class MicroBatcher:
    """`translate_batch(images, deadline)` translates equal-sized images in one run; `translate_alone(image,
    deadline)` one image that goes alone (a large image in tiles). Both raise `Cancelled` once `deadline` (a
    `time.monotonic()` value) has passed. `on_run(run)` is told of each run (metrics)."""

    translate_batch: Callable[[list[np.ndarray], float], list[np.ndarray]]
    translate_alone: Callable[[np.ndarray, float], np.ndarray]
    max_batch: int
    max_wait_s: float
    max_queue: int
    on_run: Callable[[Run], None] = lambda run: None
    _queues: dict[object, deque[_Pending]] = field(default_factory=dict)
    _depth: int = 0
    _running_since: float | None = None
    _wakeup: asyncio.Event | None = None
    _worker: asyncio.Task | None = None
    _executor: ThreadPoolExecutor | None = None
    _thread: threading.Thread | None = None

    @property
    def depth(self) -> int:
        """Images waiting or running now."""
        return self._depth

    @property
    def running_for(self) -> float:
        """Seconds the batch in flight has been running; 0 when none is."""
        started = self._running_since
        return 0.0 if started is None else time.monotonic() - started

    @property
    def alive(self) -> bool:
        """The worker still takes batches: its task has not ended and its thread (once started) is there."""
        working = self._worker is not None and not self._worker.done()
        return working and (self._thread is None or self._thread.is_alive())

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="inference", initializer=self._remember_thread)
        self._worker = asyncio.get_running_loop().create_task(self._run_forever())

    async def stop(self) -> None:
        """After the server stopped taking requests: everything queued has been answered by then."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def submit(
        self, image: np.ndarray, deadline: float, alone: bool = False, on_leave: Callable[[], None] = lambda: None
    ) -> np.ndarray:
        """The translated image, in a batch of its size or `alone`; `deadline` is a `time.monotonic()` value.
        Raises QueueFull or DeadlineExceeded, or what the engine raised for this image's batch. `on_leave()` is
        called once the image is out of the batcher: refused, dropped, or its run over (maybe after its 504)."""
        if self._depth >= self.max_queue:
            on_leave()
            raise QueueFull(f"{self._depth} images are waiting (the limit is {self.max_queue})")
        future = asyncio.get_running_loop().create_future()
        pending = _Pending(image, future, time.monotonic(), deadline, alone, on_leave)
        key = ("alone", id(pending)) if alone else image.shape
        self._queues.setdefault(key, deque()).append(pending)
        self._depth += 1
        self._wakeup.set()
        try:
            return await asyncio.wait_for(asyncio.shield(pending.future), timeout=deadline - time.monotonic())
        except asyncio.TimeoutError:
            raise DeadlineExceeded("not translated before the deadline") from None
        finally:
            self._depth -= 1
            pending.future.cancel()  # a no-op once answered; otherwise the queue drops it, and no result is kept

    def _remember_thread(self) -> None:
        self._thread = threading.current_thread()

    async def _run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch, due = self._next_batch(time.monotonic())
            if batch is None:
                await self._sleep_until(due)
                continue
            started = self._running_since = time.monotonic()
            try:
                outputs = await loop.run_in_executor(self._executor, self._translate, batch)
            except Cancelled:  # every client of the batch gave up: their 504s went out at their deadlines
                _settle(batch, error=DeadlineExceeded("not translated before the deadline"))
            except Exception as exc:  # the engine's error belongs to this batch's requests, not to the server
                _settle(batch, error=exc)
            else:
                _settle(batch, outputs=outputs)
            finally:
                self._running_since = None
                self.on_run(Run([started - pending.arrived for pending in batch], time.monotonic() - started))
                for pending in batch:
                    pending.on_leave()

    def _translate(self, batch: list[_Pending]) -> list[np.ndarray]:
        deadline = max(pending.deadline for pending in batch)
        if batch[0].alone:
            return [self.translate_alone(batch[0].image, deadline)]
        return self.translate_batch([pending.image for pending in batch], deadline)

    def _next_batch(self, now: float) -> tuple[list[_Pending] | None, float | None]:
        """The batch to run now, oldest queue first, or (None, the time the next queue becomes due)."""
        for key in [key for key, queue in self._queues.items() if not queue]:
            del self._queues[key]
        for queue in self._queues.values():
            while queue and (queue[0].future.done() or queue[0].deadline <= now):
                queue.popleft().on_leave()  # its client was answered 504 already
        live = {key: queue for key, queue in self._queues.items() if queue}
        if not live:
            return None, None
        due = min(queue[0].arrived + self.max_wait_s for queue in live.values())
        ready = [k for k, q in live.items() if len(q) >= self.max_batch or q[0].arrived + self.max_wait_s <= now]
        if not ready:
            return None, due
        queue = live[min(ready, key=lambda k: live[k][0].arrived)]
        size = 1 if queue[0].alone else self.max_batch
        return [queue.popleft() for _ in range(min(size, len(queue)))], None

    async def _sleep_until(self, due: float | None) -> None:
        self._wakeup.clear()
        timeout = None if due is None else max(0.0, due - time.monotonic())
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except asyncio.TimeoutError:
            pass


def _settle(batch: list[_Pending], outputs: list[np.ndarray] | None = None, error: Exception | None = None) -> None:
    """Answers the batch's clients that still wait: each its own output, or all the batch's error."""
    for i, pending in enumerate(batch):
        if not pending.future.done():
            if error is not None:
                pending.future.set_exception(error)
            else:
                pending.future.set_result(outputs[i])


class Hold:
    """Admitted bytes, given back once the request and every image it handed to the batcher have let go: an
    image whose client had its 504 still holds memory while its run goes on."""

    def __init__(self, release: Callable[[], None]):
        self._release, self._holders = release, 1

    def share(self) -> Callable[[], None]:
        """One more holder; call what this returns, once, when it lets go."""
        self._holders += 1
        return self.let_go

    def let_go(self) -> None:
        self._holders -= 1
        if self._holders == 0:
            self._release()


class MemoryAdmission:
    """Admits work while the estimated bytes of everything admitted (waiting or running) stay within `budget`,
    first come first served, so a large image is not overtaken forever by small ones. Work whose estimate alone
    passes the budget is admitted when nothing else is: it has to run some time, and alone is the safest."""

    def __init__(self, budget: int):
        self.budget = budget
        self.admitted_bytes = 0
        self._admitted = 0
        self._waiting: deque[tuple[int, asyncio.Future]] = deque()

    @asynccontextmanager
    async def admit(self, nbytes: int, deadline: float) -> AsyncIterator[Hold]:
        """Holds `nbytes` of the budget for the block and whoever shares its Hold, after waiting for them until
        `deadline` (NotAdmitted)."""
        await self._acquire(nbytes, deadline)
        hold = Hold(lambda: self._release(nbytes))
        try:
            yield hold
        finally:
            hold.let_go()

    def _fits(self, nbytes: int) -> bool:
        return self._admitted == 0 or self.admitted_bytes + nbytes <= self.budget

    def _take(self, nbytes: int) -> None:
        self.admitted_bytes += nbytes
        self._admitted += 1

    def _release(self, nbytes: int) -> None:
        self.admitted_bytes -= nbytes
        self._admitted -= 1
        self._admit_waiting()

    def _admit_waiting(self) -> None:
        while self._waiting and self._fits(self._waiting[0][0]):
            nbytes, turn = self._waiting.popleft()
            self._take(nbytes)
            turn.set_result(None)

    async def _acquire(self, nbytes: int, deadline: float) -> None:
        if not self._waiting and self._fits(nbytes):
            self._take(nbytes)
            return
        entry = (nbytes, asyncio.get_running_loop().create_future())
        turn = entry[1]
        self._waiting.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(turn), timeout=deadline - time.monotonic())
        except asyncio.TimeoutError:
            if not turn.done():
                raise NotAdmitted(
                    f"{nbytes / 2**20:.0f} MiB of work waits for memory: {self.admitted_bytes / 2**20:.0f} MiB "
                    f"of the {self.budget / 2**20:.0f} MiB budget are in use"
                ) from None
        except asyncio.CancelledError:
            if turn.done():  # admitted as its request went away: give the bytes back
                self._release(nbytes)
            raise
        finally:
            if not turn.done():  # gave up its place: the work behind it may fit now
                turn.cancel()
                self._waiting.remove(entry)
                self._admit_waiting()
