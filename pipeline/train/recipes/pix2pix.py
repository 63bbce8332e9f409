"""pix2pix (Isola et al. 2017): a conditional GAN on aligned pairs, critic on concat(A, B), plus L1 to the truth.

Loss balance and order, the reference's (pix2pix_model.py): fake_B = G(A); the critic first, 0.5 x (real + fake)
on (A, B) and (A, fake_B) (parts.critic_loss); then G against the updated critic: adversarial(D(A, fake_B)) +
lambda_L1 |fake_B - B|. Its objective defaults to the reference's non-saturating cross-entropy (nsgan).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.discriminators import build_discriminator
from models.generators import build_generator
from models.init import init_weights
from pipeline.data.datasets import PairedDataset, first_items
from pipeline.evaluate import measures
from pipeline.schema import OBJECTIVES, DiscriminatorParams, GeneratorParams, NonNegativeFloat, RecipeParams
from pipeline.train.context import Context
from pipeline.train.parts import critic_loss, generator_adversarial, set_requires_grad
from pipeline.train.recipes.base import Export, Recipe, register


class Pix2PixParams(RecipeParams):
    dataset: str = "digits_paired"
    objective: Literal[OBJECTIVES] = "nsgan"  # the reference's "vanilla"
    generator: GeneratorParams = GeneratorParams(arch="unet_256", norm="batch", dropout=True)
    discriminator: DiscriminatorParams = DiscriminatorParams(norm="batch")
    lambda_L1: NonNegativeFloat = 100.0


@register
class Pix2Pix(Recipe):
    name = "pix2pix"
    Params = Pix2PixParams
    layout = "aligned"
    losses = ("G", "G_adv", "L1", "D")

    @classmethod
    def build_networks(cls, p: Pix2PixParams) -> dict[str, nn.Module]:
        g, d = p.generator, p.discriminator
        nets = {
            "G": build_generator(g.arch, 3, 3, g.ngf, g.norm, g.dropout, g.upsample),
            # The critic sees the condition and the image side by side: 3 + 3 channels.
            "D": build_discriminator(d.kind, 6, d.ndf, d.n_layers, d.norm, d.spectral_norm),
        }
        for net in nets.values():
            init_weights(net, p.init_type, p.init_gain)
        return nets

    @classmethod
    def exports(cls, p: Pix2PixParams) -> dict[str, Export]:
        return {"AtoB": Export("G", "image_translation", "A", "B")}

    @classmethod
    def evaluate(cls, generators, p: Pix2PixParams, inputs: measures.EvalInputs) -> dict:
        return measures.translation(generators, inputs)

    def __init__(self, p: Pix2PixParams, ctx: Context, data_dir: Path):
        self.p, self.ctx = p, ctx
        self.network_args: dict = {}
        self.dataset = PairedDataset(data_dir, "train", p.augment)
        self.nets = {k: ctx.prepare(v) for k, v in self.build_networks(p).items()}
        self.G, self.D = ctx.forward(self.nets["G"]), ctx.forward(self.nets["D"])
        self.optimizers = {
            "G": ctx.optimizer(self.nets["G"].parameters()),
            "D": ctx.optimizer(self.nets["D"].parameters()),
        }
        self.pools: dict = {}
        self.fixed = ctx.to_device(first_items(self.dataset, min(8, len(self.dataset))))
        self.example_inputs = {"G": {"image": self.fixed["A"][:2]}}

    def step(self, next_batch) -> dict[str, float]:
        p, ctx, obj = self.p, self.ctx, self.ctx.objective
        batch = next_batch()
        real_A, real_B = batch["A"], batch["B"]
        with ctx.autocast():
            fake_B = self.G(real_A)

        d_losses = [self._critic_step(real_A, real_B, fake_B.detach())]
        for _ in range(ctx.n_critic - 1):
            extra = next_batch()
            with torch.no_grad(), ctx.autocast():
                fresh = self.G(extra["A"])
            d_losses.append(self._critic_step(extra["A"], extra["B"], fresh))

        set_requires_grad([self.nets["D"]], False)
        with ctx.autocast():
            adv = generator_adversarial(obj, self.D(torch.cat([real_A, fake_B], 1)))
            l1 = F.l1_loss(fake_B, real_B) * p.lambda_L1
            g_loss = adv + l1
        ctx.update(g_loss, self.optimizers["G"])
        set_requires_grad([self.nets["D"]], True)
        values = torch.stack([g_loss, adv, l1, torch.stack(d_losses).mean()]).tolist()
        return dict(zip(self.losses, values, strict=True))

    def _critic_step(self, real_A, real_B, fake_B) -> torch.Tensor:
        ctx = self.ctx
        with ctx.autocast():
            # The critic sees (A, B) pairs; the penalty's critic has the same condition as the scores it regularises.
            loss = critic_loss(ctx.objective, lambda x: self.D(torch.cat([real_A, x], 1)), real_B, fake_B)
        ctx.update_critics(loss, self.optimizers["D"], self.nets["D"])
        return loss.detach()

    @torch.no_grad()
    def sample_columns(self) -> dict[str, torch.Tensor]:
        """real A | fake B | real B (the true pair)."""
        self.nets["G"].eval()
        with self.ctx.autocast():
            columns = {"real A": self.fixed["A"], "fake B": self.G(self.fixed["A"]), "real B": self.fixed["B"]}
        self.nets["G"].train()
        return columns
