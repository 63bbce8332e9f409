"""MicroBatcher: images of one size share a run, sizes do not wait for each other, the queue is bounded and a
deadline is kept. The translate function here records its batches and sleeps to stand for a slow model."""

import asyncio
import time

import numpy as np
import pytest

from pipeline.serve.batching import DeadlineExceeded, MicroBatcher, QueueFull


class Recorder:
    def __init__(self, seconds: float = 0.0):
        self.seconds, self.batches = seconds, []

    def __call__(self, images):
        self.batches.append([int(image[0, 0, 0]) for image in images])
        time.sleep(self.seconds)
        return [image + 1 for image in images]


def image(value: int, size: int = 4) -> np.ndarray:
    return np.full((size, size, 3), value, np.uint8)


async def run(batcher: MicroBatcher, *requests):
    batcher.start()
    try:
        return await asyncio.gather(*requests, return_exceptions=True)
    finally:
        await batcher.stop()


def test_concurrent_images_of_one_size_share_runs_in_arrival_order_and_get_their_own_answer():
    model = Recorder()
    batcher = MicroBatcher(model, max_batch=4, max_wait_s=0.05, max_queue=64)
    outputs = asyncio.run(run(batcher, *(batcher.submit(image(i), 5) for i in range(10))))
    assert [int(out[0, 0, 0]) for out in outputs] == [i + 1 for i in range(10)]
    assert model.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_a_lone_image_waits_at_most_max_wait_and_other_sizes_are_not_held_back():
    model = Recorder()
    batcher = MicroBatcher(model, max_batch=8, max_wait_s=0.05, max_queue=64)

    async def timed(request):
        start = time.monotonic()
        await request
        return time.monotonic() - start

    seconds = asyncio.run(run(batcher, timed(batcher.submit(image(1, 4), 5)), timed(batcher.submit(image(2, 8), 5))))
    assert sorted(model.batches) == [[1], [2]], "two sizes, two runs"
    assert all(0.04 < s < 2.0 for s in seconds), seconds  # waited for company, never for a full batch


def test_a_full_queue_refuses_and_a_missed_deadline_drops_the_image_before_it_runs():
    model = Recorder(seconds=0.2)
    batcher = MicroBatcher(model, max_batch=1, max_wait_s=0, max_queue=2)

    async def scenario():
        first = asyncio.ensure_future(batcher.submit(image(0), 5))
        late = asyncio.ensure_future(batcher.submit(image(1), 0.05))  # waits behind the first's 0.2 s
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await batcher.submit(image(2), 5)
        return await asyncio.gather(first, late, return_exceptions=True)

    first, late = asyncio.run(run(batcher, scenario()))[0]
    assert int(first[0, 0, 0]) == 1 and isinstance(late, DeadlineExceeded)
    assert model.batches == [[0]], "the late image never reached the model"


def test_an_engine_error_fails_that_batch_only():
    def model(images):
        if images[0].shape[0] == 2:
            raise ValueError("too small")
        return images

    batcher = MicroBatcher(model, max_batch=4, max_wait_s=0.01, max_queue=64)
    small, fine = asyncio.run(run(batcher, batcher.submit(image(0, 2), 5), batcher.submit(image(0, 4), 5)))
    assert isinstance(small, ValueError) and fine.shape == (4, 4, 3)
