"""MicroBatcher: images of one size share a run, sizes do not wait for each other, the queue is bounded, a deadline
is kept and reaches the engine, and the worker's health shows. MemoryAdmission: admitted work stays within the
budget, first come first served. The translate function here records its batches and sleeps to stand for a slow
model."""

import asyncio
import time

import numpy as np
import pytest

from transfigure.pipeline.serve.batching import DeadlineExceeded, MemoryAdmission, MicroBatcher, NotAdmitted, QueueFull
from transfigure.pipeline.serve.engine import Cancelled


class Recorder:
    def __init__(self, seconds: float = 0.0):
        self.seconds, self.batches, self.deadlines = seconds, [], []

    def __call__(self, images, deadline):
        self.batches.append([int(image[0, 0, 0]) for image in images])
        self.deadlines.append(deadline)
        time.sleep(self.seconds)
        return [image + 1 for image in images]

    def alone(self, image, deadline):
        return self([image], deadline)[0]


def batcher_of(model: Recorder, **limits) -> MicroBatcher:
    return MicroBatcher(model, model.alone, **{"max_batch": 4, "max_wait_s": 0.05, "max_queue": 64, **limits})


def image(value: int, size: int = 4) -> np.ndarray:
    return np.full((size, size, 3), value, np.uint8)


def within(seconds: float) -> float:
    return time.monotonic() + seconds


async def run(batcher: MicroBatcher, *requests):
    batcher.start()
    try:
        return await asyncio.gather(*requests, return_exceptions=True)
    finally:
        await batcher.stop()


def test_concurrent_images_of_one_size_share_runs_in_arrival_order_and_get_their_own_answer():
    model = Recorder()
    batcher = batcher_of(model)
    outputs = asyncio.run(run(batcher, *(batcher.submit(image(i), within(5)) for i in range(10))))
    assert [int(out[0, 0, 0]) for out in outputs] == [i + 1 for i in range(10)]
    assert model.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_a_lone_image_waits_at_most_max_wait_and_other_sizes_are_not_held_back():
    model = Recorder()
    batcher = batcher_of(model, max_batch=8)

    async def timed(request):
        start = time.monotonic()
        await request
        return time.monotonic() - start

    requests = (timed(batcher.submit(image(1, 4), within(5))), timed(batcher.submit(image(2, 8), within(5))))
    seconds = asyncio.run(run(batcher, *requests))
    assert sorted(model.batches) == [[1], [2]], "two sizes, two runs"
    assert all(0.04 < s < 2.0 for s in seconds), seconds  # waited for company, never for a full batch


def test_a_full_queue_refuses_and_a_missed_deadline_drops_the_image_before_it_runs():
    model = Recorder(seconds=0.2)
    batcher = batcher_of(model, max_batch=1, max_wait_s=0, max_queue=2)

    async def scenario():
        first = asyncio.ensure_future(batcher.submit(image(0), within(5)))
        late = asyncio.ensure_future(batcher.submit(image(1), within(0.05)))  # waits behind the first's 0.2 s
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await batcher.submit(image(2), within(5))
        return await asyncio.gather(first, late, return_exceptions=True)

    first, late = asyncio.run(run(batcher, scenario()))[0]
    assert int(first[0, 0, 0]) == 1 and isinstance(late, DeadlineExceeded)
    assert model.batches == [[0]], "the late image never reached the model"


def test_an_engine_error_fails_that_batch_only():
    def model(images, deadline):
        if images[0].shape[0] == 2:
            raise ValueError("too small")
        return images

    batcher = MicroBatcher(model, model, max_batch=4, max_wait_s=0.01, max_queue=64)
    small, fine = asyncio.run(
        run(batcher, batcher.submit(image(0, 2), within(5)), batcher.submit(image(0, 4), within(5)))
    )
    assert isinstance(small, ValueError) and fine.shape == (4, 4, 3)


def test_a_batch_runs_until_its_last_clients_deadline_and_a_cancelled_one_frees_the_worker_at_once():
    deadlines = []

    def model(images, deadline):
        deadlines.append(deadline)
        if images[0][0, 0, 0] == 0:  # the engine stops at the deadline, as between tiles
            time.sleep(max(0.0, deadline - time.monotonic()))
            raise Cancelled("stopped at the deadline")
        return images

    batcher = MicroBatcher(model, model, max_batch=2, max_wait_s=0.05, max_queue=64)
    runs, left = [], []
    batcher.on_run = runs.append

    async def scenario():
        early, late = within(0.2), within(0.3)
        leave = lambda: left.append(time.monotonic())  # noqa: E731
        cancelled = [batcher.submit(image(0), early, on_leave=leave), batcher.submit(image(0), late, on_leave=leave)]
        outcome = asyncio.gather(*cancelled, return_exceptions=True)
        await asyncio.sleep(0.25)
        busy = batcher.running_for
        next_one = await batcher.submit(image(5, 8), within(5))
        return await outcome, busy, next_one, time.monotonic() - late, late

    (first, second), busy, next_one, after, late = asyncio.run(run(batcher, scenario()))[0]
    assert deadlines == [late, pytest.approx(time.monotonic() + 5, abs=1)], "one run for both, then the next"
    assert isinstance(first, DeadlineExceeded) and isinstance(second, DeadlineExceeded)
    assert 0.1 < busy < 0.3 and next_one.shape == (8, 8, 3)
    assert after < 0.5, "the next image ran as soon as the cancelled batch stopped"
    assert len(runs) == 2 and len(runs[0].waits) == 2 and runs[0].seconds >= 0.25
    assert batcher.running_for == 0.0
    assert len(left) == 2 and min(left) >= late, "the images held their memory until their run was over"


def test_the_worker_is_alive_between_start_and_stop():
    batcher = batcher_of(Recorder())

    async def lifecycle():
        before = batcher.alive
        batcher.start()
        await batcher.submit(image(1), within(5))
        during = batcher.alive
        await batcher.stop()
        return before, during, batcher.alive

    assert asyncio.run(lifecycle()) == (False, True, False)


def test_memory_admission_keeps_the_budget_first_come_first_served():
    admission = MemoryAdmission(budget=100)
    order, peak = [], []

    async def work(name: str, nbytes: int, seconds: float, timeout: float = 5):
        async with admission.admit(nbytes, within(timeout)):
            order.append(name)
            peak.append(admission.admitted_bytes)
            await asyncio.sleep(seconds)

    async def scenario():
        first = asyncio.ensure_future(work("a 60", 60, 0.1))
        await asyncio.sleep(0)
        large = asyncio.ensure_future(work("b 70", 70, 0.05))  # must wait for the first
        await asyncio.sleep(0)
        small = asyncio.ensure_future(work("c 30", 30, 0.01))  # would fit, but comes after the large one
        impatient = asyncio.ensure_future(work("d 50", 50, 0, timeout=0.02))
        return await asyncio.gather(first, large, small, impatient, return_exceptions=True)

    outcomes = asyncio.run(scenario())
    assert order == ["a 60", "b 70", "c 30"] and max(peak) <= 100, (order, peak)
    assert isinstance(outcomes[3], NotAdmitted) and "MiB" in str(outcomes[3])
    assert admission.admitted_bytes == 0


def test_work_larger_than_the_budget_runs_alone_and_a_request_that_goes_away_gives_its_place_back():
    admission = MemoryAdmission(budget=100)

    async def scenario():
        async with admission.admit(500, within(1)):
            alone = admission.admitted_bytes
        release = asyncio.Event()

        async def hold(nbytes: int):
            async with admission.admit(nbytes, within(5)):
                await release.wait()

        holder = asyncio.ensure_future(hold(60))
        await asyncio.sleep(0)
        gone = asyncio.ensure_future(hold(60))  # waits for the holder, then its client goes away
        await asyncio.sleep(0.01)
        gone.cancel()
        behind = asyncio.ensure_future(hold(40))  # fits beside the holder once nobody waits ahead of it
        await asyncio.sleep(0.01)
        admitted = admission.admitted_bytes
        release.set()
        await asyncio.gather(holder, gone, behind, return_exceptions=True)
        return alone, admitted, admission.admitted_bytes

    assert asyncio.run(scenario()) == (500, 100, 0)
