"""Class-conditional DCGAN (Radford et al. 2016; Mirza and Osindero 2014): samples of p(x | y) on a labeled domain.

Loss balance, the objective's own: G = g_loss(D(G(z, y), y)); the critic d_loss(real, fake) + penalty, unhalved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import model_validator
from torch import nn

from transfigure.models.dcgan import ConditionalDiscriminator, ConditionalGenerator
from transfigure.models.init import init_weights
from transfigure.pipeline.data.datasets import LabeledDataset
from transfigure.pipeline.evaluate import measures
from transfigure.pipeline.schema import PositiveInt, RecipeParams, refuse_batch_norm_with_penalty
from transfigure.pipeline.train.parts import set_requires_grad
from transfigure.pipeline.train.recipes.base import Export, Recipe, TrainingState, register


class CDCGANParams(RecipeParams):
    domain: Literal["A", "B"] = "B"
    z_dim: PositiveInt = 100
    ngf: PositiveInt = 64
    ndf: PositiveInt = 64
    conditioning: Literal["projection", "concat"] = "projection"
    d_norm: Literal["none", "batch", "spectral"] = "spectral"

    @model_validator(mode="after")
    def _penalty_needs_a_critic_without_batch_norm(self) -> CDCGANParams:
        if self.d_norm == "batch":
            refuse_batch_norm_with_penalty(self.objective, "d_norm", "spectral or none")
        return self


@register
class CDCGAN(Recipe):
    name = "cdcgan"
    Params = CDCGANParams
    layout = "classes"
    losses = ("G", "D")
    tiny = ("ngf=4", "ndf=4", "z_dim=8", "batch_size=4")

    @classmethod
    def build_networks(cls, p: CDCGANParams, n_classes: int = 10, image_size: int = 32) -> dict[str, nn.Module]:
        nets = {
            "G": ConditionalGenerator(p.z_dim, n_classes, image_size, p.ngf),
            "D": ConditionalDiscriminator(n_classes, image_size, p.ndf, 3, p.conditioning, p.d_norm),
        }
        for net in nets.values():
            init_weights(net, p.init_type, p.init_gain)
        return nets

    @classmethod
    def exports(cls, p: CDCGANParams) -> dict[str, Export]:
        attributes = ("z_dim", "n_classes", "image_size")
        return {"generator": Export("G", "conditional_generation", "noise", p.domain, ("z", "label"), attributes)}

    @classmethod
    def evaluate(cls, generators, p: CDCGANParams, inputs: measures.EvalInputs) -> dict:
        return measures.conditional_samples(generators["generator"], p.z_dim, p.domain, inputs)

    def set_up(self, data_dir: Path) -> TrainingState:
        p, ctx = self.p, self.ctx
        dataset = LabeledDataset(data_dir, "train", p.domain, p.augment)
        self.n_classes = dataset.n_classes
        network_args = {"n_classes": self.n_classes, "image_size": dataset[0]["image"].shape[-1]}
        nets = {k: ctx.prepare(v) for k, v in self.build_networks(p, **network_args).items()}
        self.G, self.D = ctx.forward(nets["G"]), ctx.forward(nets["D"])
        optimizers = {"G": ctx.optimizer(nets["G"].parameters()), "D": ctx.optimizer(nets["D"].parameters())}
        generator = torch.Generator().manual_seed(0)
        self.fixed_z = torch.randn(self.n_classes * 4, p.z_dim, generator=generator).to(ctx.device)
        self.fixed_labels = torch.arange(self.n_classes).repeat_interleave(4).to(ctx.device)
        example_inputs = {"G": {"z": self.fixed_z[:2], "label": self.fixed_labels[:2]}}
        return TrainingState(dataset, nets, optimizers, example_inputs, network_args=network_args)

    def step(self, next_batch) -> dict[str, float]:
        ctx, obj = self.ctx, self.ctx.objective
        batch = next_batch()
        d_losses = [self._critic_step(batch["image"], batch["label"])]
        for _ in range(ctx.n_critic - 1):
            extra = next_batch()
            d_losses.append(self._critic_step(extra["image"], extra["label"]))

        set_requires_grad([self.state.nets["D"]], False)
        labels = batch["label"]
        z = torch.randn(len(labels), self.p.z_dim, device=ctx.device)
        with ctx.autocast():
            g_loss = obj.g_loss(self.D(self.G(z, labels), labels))
        ctx.update(g_loss, self.state.optimizers["G"])
        set_requires_grad([self.state.nets["D"]], True)
        values = torch.stack([g_loss, torch.stack(d_losses).mean()]).tolist()
        return dict(zip(self.losses, values, strict=True))

    def _critic_step(self, real: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ctx, obj = self.ctx, self.ctx.objective
        z = torch.randn(len(labels), self.p.z_dim, device=ctx.device)
        with ctx.autocast():
            # Fakes get the real batch's labels, so the penalty's interpolates share one condition.
            with torch.no_grad():
                fake = self.G(z, labels)
            loss = obj.d_loss(self.D(real, labels), self.D(fake, labels)) + obj.penalty(
                lambda x: self.D(x, labels), real, fake
            )
        ctx.update_critics(loss, self.state.optimizers["D"], self.state.nets["D"])
        return loss.detach()

    @torch.no_grad()
    def sample_columns(self) -> dict[str, torch.Tensor]:
        """One row per class, four fixed latents z1..z4 across."""
        with self.ctx.autocast():
            images = self.G(self.fixed_z, self.fixed_labels)
        columns = images.view(self.n_classes, 4, *images.shape[1:]).transpose(0, 1)
        return {f"z{index + 1}": column for index, column in enumerate(columns)}
