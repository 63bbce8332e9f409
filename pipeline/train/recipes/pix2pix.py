"""pix2pix (Isola et al. 2017): a conditional GAN on aligned pairs, critic on concat(A, B), plus L1 to the truth."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.discriminators import build_discriminator
from models.generators import build_generator
from models.init import init_weights
from pipeline.data.datasets import PairedDataset, first_items
from pipeline.evaluate import measures
from pipeline.schema import DiscriminatorParams, GeneratorParams, NonNegativeFloat, RecipeParams
from pipeline.train.context import Context
from pipeline.train.parts import set_requires_grad
from pipeline.train.recipes.base import Export, Recipe, register


class Pix2PixParams(RecipeParams):
    dataset: str = "digits_paired"
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

        set_requires_grad([self.nets["D"]], False)
        with ctx.autocast():
            fake_B = self.G(real_A)
            adv = obj.g_loss(self.D(torch.cat([real_A, fake_B], 1)))
            l1 = F.l1_loss(fake_B, real_B) * p.lambda_L1
            g_loss = adv + l1
        ctx.update(g_loss, self.optimizers["G"])
        set_requires_grad([self.nets["D"]], True)

        d_losses = [self._critic_step(real_A, real_B, fake_B.detach())]
        for _ in range(ctx.n_critic - 1):
            extra = next_batch()
            with torch.no_grad(), ctx.autocast():
                fresh = self.G(extra["A"])
            d_losses.append(self._critic_step(extra["A"], extra["B"], fresh))
        values = torch.stack([g_loss, adv, l1, torch.stack(d_losses).mean()]).tolist()
        return dict(zip(self.losses, values, strict=True))

    def _critic_step(self, real_A, real_B, fake_B) -> torch.Tensor:
        ctx, obj = self.ctx, self.ctx.objective
        with ctx.autocast():
            scores_real = self.D(torch.cat([real_A, real_B], 1))
            scores_fake = self.D(torch.cat([real_A, fake_B], 1))
            # The penalty's critic sees the same condition as the scores it regularises.
            loss = 0.5 * obj.d_loss(scores_real, scores_fake) + obj.penalty(
                lambda x: self.D(torch.cat([real_A, x], 1)), real_B, fake_B
            )
        ctx.update_critics(loss, self.optimizers["D"], self.nets["D"])
        return loss.detach()

    @torch.no_grad()
    def sample_rows(self) -> list[torch.Tensor]:
        """input A | A->B | true B."""
        self.nets["G"].eval()
        with self.ctx.autocast():
            rows = [self.fixed["A"], self.G(self.fixed["A"]), self.fixed["B"]]
        self.nets["G"].train()
        return rows
