"""CycleGAN (Zhu et al. 2017): two generators and two critics, cycle-consistency and identity losses."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.discriminators import build_discriminator
from models.generators import build_generator
from models.init import init_weights
from pipeline.data.datasets import UnpairedDataset, batches, first_items
from pipeline.params import CycleGANParams
from pipeline.train.loop import Context, ImagePool, set_requires_grad

EXPORTS = {"AtoB": "G_AB", "BtoA": "G_BA"}


def build_networks(p: CycleGANParams) -> dict[str, nn.Module]:
    g, d = p.generator, p.discriminator
    nets = {name: build_generator(g.arch, 3, 3, g.ngf, g.norm, g.dropout, g.upsample) for name in ("G_AB", "G_BA")}
    nets |= {
        name: build_discriminator(d.kind, 3, d.ndf, d.n_layers, d.norm, d.spectral_norm) for name in ("D_A", "D_B")
    }
    for net in nets.values():
        init_weights(net, p.init_type, p.init_gain)
    return nets


class Recipe:
    generator_names = ("G_AB", "G_BA")

    def __init__(self, p: CycleGANParams, ctx: Context, data_dir: Path):
        self.p, self.ctx = p, ctx
        self.network_args: dict = {}
        self.dataset = UnpairedDataset(data_dir, "train", p.augment)
        self.nets = {k: ctx.prepare(v) for k, v in build_networks(p).items()}
        self.G_AB, self.G_BA = ctx.forward(self.nets["G_AB"]), ctx.forward(self.nets["G_BA"])
        self.D_A, self.D_B = ctx.forward(self.nets["D_A"]), ctx.forward(self.nets["D_B"])
        self.optimizers = {
            "G": ctx.optimizer([*self.nets["G_AB"].parameters(), *self.nets["G_BA"].parameters()]),
            "D": ctx.optimizer([*self.nets["D_A"].parameters(), *self.nets["D_B"].parameters()]),
        }
        self.pools = {"fake_A": ImagePool(p.pool_size), "fake_B": ImagePool(p.pool_size)}
        self.fixed = ctx.to_device(first_items(self.dataset, min(8, len(self.dataset.a))))
        # Two samples: a batch of one would pin the exported batch size to 1.
        self.example_inputs = {
            name: {"image": self.fixed[domain][:2]} for name, domain in (("G_AB", "A"), ("G_BA", "B"))
        }

    def batches(self, seed: int, start_step: int):
        return batches(self.dataset, self.p.batch_size, seed, start_step, self.p.num_workers)

    def step(self, next_batch) -> dict[str, float]:
        p, ctx, obj = self.p, self.ctx, self.ctx.objective
        critics = [self.nets["D_A"], self.nets["D_B"]]
        batch = next_batch()
        real_A, real_B = batch["A"], batch["B"]

        set_requires_grad(critics, False)
        with ctx.autocast():
            fake_B, fake_A = self.G_AB(real_A), self.G_BA(real_B)
            rec_A, rec_B = self.G_BA(fake_B), self.G_AB(fake_A)
            adv = obj.g_loss(self.D_B(fake_B)) + obj.g_loss(self.D_A(fake_A))
            cycle = F.l1_loss(rec_A, real_A) * p.lambda_A + F.l1_loss(rec_B, real_B) * p.lambda_B
            identity = torch.zeros((), device=ctx.device)
            if p.lambda_identity > 0:
                identity = (
                    F.l1_loss(self.G_AB(real_B), real_B) * p.lambda_B
                    + F.l1_loss(self.G_BA(real_A), real_A) * p.lambda_A
                ) * p.lambda_identity
            g_loss = adv + cycle + identity
        ctx.update(g_loss, self.optimizers["G"])
        set_requires_grad(critics, True)

        d_losses = [self._critic_step(real_A, real_B, fake_A.detach(), fake_B.detach())]
        for _ in range(ctx.n_critic - 1):
            extra = next_batch()
            with torch.no_grad(), ctx.autocast():
                fresh_B, fresh_A = self.G_AB(extra["A"]), self.G_BA(extra["B"])
            d_losses.append(self._critic_step(extra["A"], extra["B"], fresh_A, fresh_B))
        d_mean = torch.stack(d_losses).mean(0)
        values = torch.stack([g_loss, adv, cycle, identity, d_mean[0], d_mean[1]]).tolist()
        return dict(zip(["G", "G_adv", "cycle", "identity", "D_A", "D_B"], values, strict=True))

    def _critic_step(self, real_A, real_B, fake_A, fake_B) -> torch.Tensor:
        return update_critics(self, real_A, real_B, fake_A, fake_B)

    @torch.no_grad()
    def sample_rows(self) -> list[torch.Tensor]:
        """input A | A->B | A->B->A, then input B | B->A | B->A->B."""
        for net in self.generator_names:
            self.nets[net].eval()
        with self.ctx.autocast():
            fake_B, fake_A = self.G_AB(self.fixed["A"]), self.G_BA(self.fixed["B"])
            rows = [self.fixed["A"], fake_B, self.G_BA(fake_B), self.fixed["B"], fake_A, self.G_AB(fake_A)]
        for net in self.generator_names:
            self.nets[net].train()
        return rows


def update_critics(recipe, real_A, real_B, fake_A, fake_B) -> torch.Tensor:
    """One update of both domains' critics on pooled fakes; shared by every recipe with two critics.

    `recipe` has ctx, pools fake_A/fake_B, forwards D_A/D_B, nets D_A/D_B and the optimizer "D".
    """
    ctx, obj = recipe.ctx, recipe.ctx.objective
    fake_A, fake_B = recipe.pools["fake_A"].query(fake_A), recipe.pools["fake_B"].query(fake_B)
    with ctx.autocast():
        # Halved as in the reference, so D learns at half the rate of G.
        loss_A = 0.5 * obj.d_loss(recipe.D_A(real_A), recipe.D_A(fake_A)) + obj.penalty(recipe.D_A, real_A, fake_A)
        loss_B = 0.5 * obj.d_loss(recipe.D_B(real_B), recipe.D_B(fake_B)) + obj.penalty(recipe.D_B, real_B, fake_B)
    ctx.update(loss_A + loss_B, recipe.optimizers["D"])
    obj.after_critic_step(recipe.nets["D_A"])
    obj.after_critic_step(recipe.nets["D_B"])
    return torch.stack([loss_A.detach(), loss_B.detach()])
