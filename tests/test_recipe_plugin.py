"""A recipe is one module: a throw-away recipe defined here, and registered, trains, evaluates and exports through
the ordinary code paths, with nothing else in the pipeline naming it."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_engine
from torch import nn

from tests.corpus import gradient
from transfigure.models.discriminators import build_discriminator
from transfigure.models.generators import build_generator
from transfigure.pipeline.data.datasets import PairedDataset, first_items
from transfigure.pipeline.evaluate import measures
from transfigure.pipeline.evaluate.stage import evaluate_recipe
from transfigure.pipeline.export.stage import export_recipe
from transfigure.pipeline.params import load_params
from transfigure.pipeline.schema import NonNegativeFloat, RecipeParams
from transfigure.pipeline.train import recipes
from transfigure.pipeline.train.loop import train
from transfigure.pipeline.train.parts import set_requires_grad
from transfigure.pipeline.train.recipes.base import Export, Recipe, registered


class TinyParams(RecipeParams):
    dataset: str = "digits_paired"
    steps: int = 3
    batch_size: int = 4
    checkpoint_every: int = 3
    sample_every: int = 3
    log_every: int = 1
    lambda_L1: NonNegativeFloat = 10.0


class TinyPaired(Recipe):
    """A one-block ResNet generator learning A -> B by L1 plus a pixel critic."""

    name = "tinypaired"
    Params = TinyParams
    layout = "aligned"
    losses = ("G", "L1", "D")

    @classmethod
    def build_networks(cls, p: TinyParams) -> dict[str, nn.Module]:
        return {"G": build_generator("resnet_1blocks", ngf=4, norm="instance"), "D": build_discriminator("pixel", 3, 4)}

    @classmethod
    def exports(cls, p: TinyParams) -> dict[str, Export]:
        return {"AtoB": Export("G", "image_translation", "A", "B")}

    @classmethod
    def evaluate(cls, generators, p: TinyParams, inputs: measures.EvalInputs) -> dict:
        return measures.translation(generators, inputs)

    def __init__(self, p: TinyParams, ctx, data_dir: Path):
        self.p, self.ctx, self.network_args, self.pools = p, ctx, {}, {}
        self.dataset = PairedDataset(data_dir, "train", p.augment)
        self.nets = {k: ctx.prepare(v) for k, v in self.build_networks(p).items()}
        self.optimizers = {name: ctx.optimizer(net.parameters()) for name, net in self.nets.items()}
        self.fixed = first_items(self.dataset, 4)
        self.example_inputs = {"G": {"image": self.fixed["A"][:2]}}

    def step(self, next_batch) -> dict[str, float]:
        obj, batch = self.ctx.objective, next_batch()
        G, D = self.nets["G"], self.nets["D"]
        set_requires_grad([D], False)
        fake = G(batch["A"])
        l1 = F.l1_loss(fake, batch["B"]) * self.p.lambda_L1
        g_loss = obj.g_loss(D(fake)) + l1
        self.ctx.update(g_loss, self.optimizers["G"])
        set_requires_grad([D], True)
        d_loss = obj.d_loss(D(batch["B"]), D(fake.detach()))
        self.ctx.update(d_loss, self.optimizers["D"])
        return {"G": g_loss.item(), "L1": l1.item(), "D": d_loss.item()}

    @torch.no_grad()
    def sample_columns(self) -> dict[str, torch.Tensor]:
        return {"real A": self.fixed["A"], "fake B": self.nets["G"](self.fixed["A"]), "real B": self.fixed["B"]}


@pytest.fixture
def tiny_recipe(monkeypatch):
    # What @register does, undone after the test.
    monkeypatch.setitem(registered(), TinyPaired.name, TinyPaired)
    return TinyPaired


def test_a_new_recipe_trains_evaluates_and_exports_through_the_ordinary_paths(workdir, tiny_recipe):
    from rich.console import Console

    console = Console(quiet=True)
    assert recipes.get("tinypaired") is TinyPaired
    params = load_params("params.yaml", ["tinypaired.lambda_L1=5"])
    assert params.recipe("tinypaired").lambda_L1 == 5.0  # its section is part of the one schema

    summary = train("tinypaired", params, console)
    assert summary["steps"] == 3 and set(summary["losses"]) == {"G", "L1", "D"}
    assert (workdir / "runs/tinypaired/losses.csv").read_text().startswith("step,G,L1,D\n")

    metrics = evaluate_recipe("tinypaired", params, console, features="pixels-16")
    assert {"psnr", "ssim", "kid", "fid"} <= set(metrics["AtoB"])
    assert json.loads((workdir / "metrics/tinypaired.json").read_text())["AtoB"]["psnr"] == metrics["AtoB"]["psnr"]
    assert (workdir / "reports/tinypaired/AtoB.png").exists()

    export_recipe("tinypaired", params, console, fp16=False)
    engine = make_engine(workdir / "artifacts/tinypaired/AtoB.onnx", providers=["cpu"])
    assert engine.card.recipe == "tinypaired" and engine.card.source_domain == "digits_paired:A"
    image = gradient(36, 28)
    assert engine.translate(image).shape == image.shape and engine.translate(image).dtype == np.uint8


def test_an_unknown_section_is_still_refused_once_a_recipe_is_registered(workdir, tiny_recipe):
    from transfigure.pipeline.params import ParamsError

    with pytest.raises(ParamsError, match="tinypaired.stepz: unknown key"):
        load_params("params.yaml", ["tinypaired.stepz=3"])
