"""Memory bounded by design: the measured cost of a forward pass, the tiles and thumbnail a budget allows, the
same result as explicit tiles, a real peak that stays within the budget, and the options that set it."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import METADATA, make_engine

from tests.corpus import gradient
from transfigure.models.generators import build_generator
from transfigure.pipeline.errors import UserError
from transfigure.pipeline.export.to_onnx import export_image_generator
from transfigure.pipeline.serve import memory
from transfigure.pipeline.serve.options import InferenceOptions, parse_bytes

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not memory.measurable(), reason="needs Linux's peak-memory counters")


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_translator):
    """An instance-norm translator with its tiling graphs, and a batch-norm one (blended tiles)."""
    folder = tmp_path_factory.mktemp("memory")
    tiny_translator(folder / "in.onnx")
    torch.manual_seed(1)
    export_image_generator(build_generator("resnet_2blocks", ngf=8, norm="batch"), folder / "bn.onnx", METADATA)
    return {"instance": folder / "in.onnx", "batch": folder / "bn.onnx"}


def test_the_peak_meter_sees_a_known_allocation():
    held = []
    grown = memory.peak_growth(lambda: held.append(np.ones(64 * 2**20, np.uint8)))
    assert 60 * 2**20 < grown < 72 * 2**20, grown / 2**20
    held.clear()
    assert memory.peak_growth(lambda: sum(range(1000))) < 4 * 2**20


def test_tiles_and_thumbnail_from_a_budget_known_answers():
    # 100 bytes a pixel, 10 px of context each side: a 400 px core runs as 420x420 = 17.64 MB, the largest that fits.
    plan = memory.plan_tiles(1000, 1000, 100 * 420 * 420, 100, multiple=4, smallest=8, context=10)
    assert (plan.tile, plan.tiles_per_run, plan.thumbnail) == (400, 1, 420)
    assert plan.peak_bytes == 100 * 420 * 420
    # Room for four crops: four per run; a wide image's thumbnail is longer for the same pixels (sqrt 2 here).
    plan = memory.plan_tiles(1000, 2000, 4 * 100 * 420 * 420, 100, multiple=4, smallest=8, context=10, tile=400)
    assert (plan.tile, plan.tiles_per_run, plan.thumbnail) == (400, 4, int((4 * 420 * 420 * 2) ** 0.5))
    # Never past the cap, nor past the image.
    assert memory.plan_tiles(9000, 9000, 2**40, 1, 4, 8, 10).thumbnail == memory.THUMBNAIL_CAP


@pytest.mark.parametrize("kind", ["instance", "batch"])
def test_automatic_tiles_equal_explicit_tiles_of_the_same_size(models, kind):
    image = gradient(300, 200, seed=3)
    auto = make_engine(models[kind], providers=["cpu"], memory_budget=8 * 2**20)
    assert auto.tiled(200, 300) and not auto.tiled(64, 64)
    plan = auto.plan(200, 300)
    explicit = make_engine(models[kind], providers=["cpu"], tile=plan.tile, thumbnail=plan.thumbnail)
    assert np.array_equal(auto.translate(image), explicit.translate(image))
    assert auto.tiling == explicit.tiling and auto.tiling.startswith(
        "thumbnail statistics" if kind == "instance" else "blended overlaps"
    )
    # A budget the whole image fits goes whole.
    assert not make_engine(models[kind], providers=["cpu"], memory_budget=2**30).tiled(200, 300)


# In a process of its own: the peak counter is the whole process's, which a thread that an earlier test left in
# this worker (a server, a thread pool) would move while the image runs.
MEASURE_IN_A_FRESH_PROCESS = """
import json, sys
from transfigure.pipeline.serve import memory
from transfigure.pipeline.serve.engine import Engine
from transfigure.pipeline.serve.options import InferenceOptions
from tests.corpus import gradient

budget = 160 * 2**20
engine = Engine(sys.argv[1], InferenceOptions(providers=("cpu",), memory_budget=budget))
image = gradient(3000, 2000)
grown = memory.peak_growth(lambda: engine.translate(image))
whole = engine.bytes_per_pixel * 3000 * 2000
print(json.dumps({"budget": budget, "grown": grown, "whole": whole, "needed": engine.memory_needed(2000, 3000)}))
"""


def test_a_large_image_holds_no_more_than_its_budget(models):
    ran = subprocess.run(
        [sys.executable, "-c", MEASURE_IN_A_FRESH_PROCESS, str(models["instance"])],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    measured = json.loads(ran.stdout.splitlines()[-1])
    budget, grown = measured["budget"], measured["grown"]
    assert measured["whole"] > 5 * budget, "the image must be far past the budget for this test to mean anything"
    assert measured["needed"] <= budget
    # On top of the forward passes' budget come the image's own arrays (36 MB in and out here), allocators and
    # Python objects: 215-257 MiB measured for 160 (1.34-1.61x, 13 runs, 2026-12-04; the old bound of 1.5x failed
    # 5 of them, the session's starting commit 1 of 3); untiled, this image would take `whole`, over 11x.
    assert grown < 2 * budget, f"{grown / 2**20:.0f} MiB for a budget of {budget / 2**20:.0f}"


def test_options_are_checked_once_naming_each_flag():
    assert parse_bytes("1500M") == 1500 * 2**20 and parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("123") == 123
    with pytest.raises(UserError, match="--memory-budget 'lots': expected bytes"):
        parse_bytes("lots")
    with pytest.raises(UserError) as wrong:
        InferenceOptions(providers=("cuda",), precision="int8", tile=0, memory_budget=1000).check()
    message = str(wrong.value)
    for part in ("--precision int8 runs on the CPU", "--tile must be at least 1", "--memory-budget 1000 bytes"):
        assert part in message


def test_label_map_models_refuse_tiles(tmp_path):
    from transfigure.pipeline.export.to_onnx import export_label_map_generator

    torch.manual_seed(0)
    path = tmp_path / "labels.onnx"
    export_label_map_generator(build_generator("resnet_1blocks", output_nc=4, ngf=4, tanh=False), path, METADATA)
    with pytest.raises(UserError, match="--tile: label-map models translate whole images"):
        make_engine(path, tile=64)
    # Past the budget they still go whole: an argmax cannot be blended.
    assert not make_engine(path, memory_budget=2**20).tiled(2000, 2000)
