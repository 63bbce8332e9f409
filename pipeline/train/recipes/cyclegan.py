"""CycleGAN (Zhu et al. 2017): two generators and two critics, cycle-consistency and identity losses.

Loss balance, the reference's (cycle_gan_model.py): G = adversarial(D_B(G_AB(A))) + adversarial(D_A(G_BA(B)))
+ lambda_A |G_BA(G_AB(A)) - A| + lambda_B |G_AB(G_BA(B)) - B| + lambda_identity (lambda_B |G_AB(B) - B| +
lambda_A |G_BA(A) - A|); each critic 0.5 x (real + fake) on pooled fakes (parts.critic_loss). The reference
calls G_AB "G_A" and the critic of domain B "D_A".
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from transfigure.models.discriminators import build_discriminator
from transfigure.models.generators import build_generator
from transfigure.models.init import init_weights
from transfigure.pipeline.data.datasets import UnpairedDataset
from transfigure.pipeline.evaluate import measures
from transfigure.pipeline.schema import (
    AugmentParams,
    DiscriminatorParams,
    GeneratorParams,
    NonNegativeFloat,
    RecipeParams,
)
from transfigure.pipeline.train.parts import (
    TINY_CRITIC,
    generator_adversarial,
    set_requires_grad,
    unpaired_fixtures,
    update_two_critics,
)
from transfigure.pipeline.train.recipes.base import Export, Recipe, TrainingState, register


class CycleGANParams(RecipeParams):
    augment: AugmentParams = AugmentParams(flip=True)  # unpaired photos: mirrored is as real, as in the reference
    generator: GeneratorParams = GeneratorParams()
    discriminator: DiscriminatorParams = DiscriminatorParams()
    lambda_A: NonNegativeFloat = 10.0
    lambda_B: NonNegativeFloat = 10.0
    lambda_identity: NonNegativeFloat = 0.5
    pool_size: Annotated[int, Field(ge=0)] = 50


@register
class CycleGAN(Recipe):
    name = "cyclegan"
    Params = CycleGANParams
    losses = ("G", "G_adv", "cycle", "identity", "D_A", "D_B")
    tiny = ("generator.arch=resnet_1blocks", "generator.ngf=4", *TINY_CRITIC, "pool_size=3")

    @classmethod
    def build_networks(cls, p: CycleGANParams) -> dict[str, nn.Module]:
        g, d = p.generator, p.discriminator
        nets = {name: build_generator(g.arch, 3, 3, g.ngf, g.norm, g.dropout, g.upsample) for name in ("G_AB", "G_BA")}
        nets |= {
            name: build_discriminator(d.kind, 3, d.ndf, d.n_layers, d.norm, d.spectral_norm) for name in ("D_A", "D_B")
        }
        for net in nets.values():
            init_weights(net, p.init_type, p.init_gain)
        return nets

    @classmethod
    def exports(cls, p: CycleGANParams) -> dict[str, Export]:
        return {
            "AtoB": Export("G_AB", "image_translation", "A", "B"),
            "BtoA": Export("G_BA", "image_translation", "B", "A"),
        }

    @classmethod
    def evaluate(cls, generators, p: CycleGANParams, inputs: measures.EvalInputs) -> dict:
        return measures.translation(generators, inputs)

    def set_up(self, data_dir: Path) -> TrainingState:
        p, ctx = self.p, self.ctx
        dataset = UnpairedDataset(data_dir, "train", p.augment)
        nets = {k: ctx.prepare(v) for k, v in self.build_networks(p).items()}
        self.G_AB, self.G_BA = ctx.forward(nets["G_AB"]), ctx.forward(nets["G_BA"])
        self.D_A, self.D_B = ctx.forward(nets["D_A"]), ctx.forward(nets["D_B"])
        optimizers = {
            "G": ctx.optimizer([*nets["G_AB"].parameters(), *nets["G_BA"].parameters()]),
            "D": ctx.optimizer([*nets["D_A"].parameters(), *nets["D_B"].parameters()]),
        }
        pools, self.fixed, example_inputs = unpaired_fixtures(ctx, dataset, p.pool_size)
        return TrainingState(dataset, nets, optimizers, example_inputs, pools)

    def step(self, next_batch) -> dict[str, float]:
        p, ctx, obj = self.p, self.ctx, self.ctx.objective
        critics = [self.state.nets["D_A"], self.state.nets["D_B"]]
        batch = next_batch()
        real_A, real_B = batch["A"], batch["B"]

        set_requires_grad(critics, False)
        with ctx.autocast():
            fake_B, fake_A = self.G_AB(real_A), self.G_BA(real_B)
            rec_A, rec_B = self.G_BA(fake_B), self.G_AB(fake_A)
            adv = generator_adversarial(obj, self.D_B(fake_B)) + generator_adversarial(obj, self.D_A(fake_A))
            cycle = F.l1_loss(rec_A, real_A) * p.lambda_A + F.l1_loss(rec_B, real_B) * p.lambda_B
            identity = torch.zeros((), device=ctx.device)
            if p.lambda_identity > 0:
                identity = (
                    F.l1_loss(self.G_AB(real_B), real_B) * p.lambda_B
                    + F.l1_loss(self.G_BA(real_A), real_A) * p.lambda_A
                ) * p.lambda_identity
            g_loss = adv + cycle + identity
        ctx.update(g_loss, self.state.optimizers["G"])
        set_requires_grad(critics, True)

        d_losses = [update_two_critics(self, real_A, real_B, fake_A.detach(), fake_B.detach())]
        for _ in range(ctx.n_critic - 1):
            extra = next_batch()
            with torch.no_grad(), ctx.autocast():
                fresh_B, fresh_A = self.G_AB(extra["A"]), self.G_BA(extra["B"])
            d_losses.append(update_two_critics(self, extra["A"], extra["B"], fresh_A, fresh_B))
        d_mean = torch.stack(d_losses).mean(0)
        values = torch.stack([g_loss, adv, cycle, identity, d_mean[0], d_mean[1]]).tolist()
        return dict(zip(self.losses, values, strict=True))

    @torch.no_grad()
    def sample_columns(self) -> dict[str, torch.Tensor]:
        """The reference's names: real A | fake B | rec A (A->B->A), then real B | fake A | rec B."""
        with self.ctx.autocast():
            fake_B, fake_A = self.G_AB(self.fixed["A"]), self.G_BA(self.fixed["B"])
            columns = {
                "real A": self.fixed["A"],
                "fake B": fake_B,
                "rec A": self.G_BA(fake_B),
                "real B": self.fixed["B"],
                "fake A": fake_A,
                "rec B": self.G_AB(fake_A),
            }
        return columns
