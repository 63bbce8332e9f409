"""`bench train`: images/s of real training steps for a recipe, size and precision, on synthetic images."""

from __future__ import annotations

import math
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from transfigure.pipeline.data.datasets import loader_workers
from transfigure.pipeline.data.prepare import prepare_folder
from transfigure.pipeline.params import Params
from transfigure.pipeline.schema import DatasetParams, LabelMapParams
from transfigure.pipeline.train import recipes
from transfigure.pipeline.train.context import Context
from transfigure.pipeline.train.feed import Feed


def _synthetic_dataset(root: Path, size: int, layout: str, labels: LabelMapParams | None = None) -> Path:
    """Smooth random images at the asked size, prepared like user data (a few per domain is enough); the side
    that `labels` names gets label maps of random class blocks instead."""
    rng = np.random.default_rng(0)
    source = root / "source"
    folders = {"unaligned": ["trainA", "trainB"], "aligned": ["A/train", "B/train"], "classes": ["0", "1"]}[layout]
    for folder in folders:
        (source / folder).mkdir(parents=True)
        for i in range(8):
            if labels is not None and folder.startswith(f"{labels.domain}/"):
                blocks = rng.integers(0, labels.classes, size=(8, 8), dtype=np.uint8)
                image = Image.fromarray(blocks).resize((size, size), Image.NEAREST)
            else:
                small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
                image = Image.fromarray(small).resize((size, size), Image.BICUBIC)
            image.save(source / folder / f"{i}.png")
    spec = DatasetParams(source="folder", path=str(source), layout=layout, size=size, test_fraction=0, labels=labels)
    prepare_folder(source, root / "prepared", spec, seed=0, log=lambda _: None)
    return root / "prepared"


def run(recipe: str, params: Params, size: int, steps: int = 20, warmup: int = 3, resident: bool = False) -> dict:
    """Times `steps` training steps after `warmup` untimed ones (compilation, allocator, cuDNN autotuning, the
    loader's workers starting) and the share of them spent waiting for data; also says whether every step's
    losses were finite, the last step's, and the GPU's peak memory over the run. `resident`: every step takes
    the same first batch, already on the device (no data pipeline: the device's own speed)."""
    recipe_class = recipes.get(recipe)
    p = recipes.params_of(params, recipe)
    if "domain" in type(p).model_fields:
        # The synthetic dataset is one domain (A); a recipe that learns one domain learns that one here.
        p = p.model_copy(update={"domain": "A"})
    torch.manual_seed(params.seed)
    with tempfile.TemporaryDirectory() as tmp:
        # A recipe that trains on label maps gets them where its own dataset has them.
        labels = params.data.datasets[p.dataset].labels
        data_dir = _synthetic_dataset(Path(tmp), size, recipe_class.layout, labels)
        ctx = Context.create(p)
        cuda = ctx.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        model = recipe_class(p, ctx, data_dir)
        ctx.settle_precision(model.state.nets, model.state.example_inputs)
        feed = Feed(iter(model.batches(params.seed, 0)), ctx)
        if resident:
            first = feed()
            feed = _Resident(first)
        losses = [model.step(feed) for _ in range(warmup)]
        if cuda:
            torch.cuda.synchronize()
        started, waited_before = time.perf_counter(), feed.waited
        losses += [model.step(feed) for _ in range(steps)]
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        waited = feed.waited - waited_before
    # One step trains on n_critic critic batches and one generator batch; images/s counts generator images.
    return {
        "recipe": recipe,
        "size": size,
        "batch_size": p.batch_size,
        "precision": ctx.precision,
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "channels_last": p.channels_last and cuda,
        "compile": p.compile,
        "steps": steps,
        "seconds": round(seconds, 3),
        "steps_per_second": round(steps / seconds, 3),
        "images_per_second": round(steps * p.batch_size / seconds, 3),
        # The share of the timed steps spent waiting for the data pipeline (decoding, augmenting, collating).
        "data_wait_fraction": round(waited / seconds, 4),
        "resident_batch": resident,
        "num_workers": loader_workers(p.num_workers, cuda),
        "losses_finite": all(math.isfinite(value) for step in losses for value in step.values()),
        "losses": losses[-1],
        "peak_memory_mib": round(torch.cuda.max_memory_allocated(ctx.device) / 2**20, 1) if cuda else None,
        "machine": platform.machine(),
        "date": date.today().isoformat(),
    }


class _Resident:
    """A feed that hands out one device batch again and again, waiting for nothing."""

    waited = 0.0

    def __init__(self, batch: dict[str, torch.Tensor]):
        self.batch = batch

    def __call__(self) -> dict[str, torch.Tensor]:
        return self.batch
