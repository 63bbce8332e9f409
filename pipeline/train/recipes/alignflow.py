"""AlignFlow (Grover et al. 2020): two flows share one latent space, so A -> B -> A is the identity by construction.

f_A: A -> Z and f_B: B -> Z; G_AB = f_B^-1 . f_A and G_BA = f_A^-1 . f_B are exact inverses of each other and
need no cycle loss. The flows learn from the adversarial objective on both translations (PatchGAN critics
with image pools, as in CycleGAN) plus `nll_weight` times NLL_A + NLL_B, each in bits per dimension. The
adversarial terms and critics have CycleGAN's (the reference's) balance (parts.critic_loss).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from transfigure.models import flows, image_flows
from transfigure.models.discriminators import build_discriminator
from transfigure.models.init import init_weights
from transfigure.pipeline.data.datasets import UnpairedDataset
from transfigure.pipeline.evaluate import measures
from transfigure.pipeline.schema import AugmentParams, DiscriminatorParams, FlowParams, NonNegativeFloat, RecipeParams
from transfigure.pipeline.train.parts import (
    FLOW_TINY,
    build_flow,
    generator_adversarial,
    mean_bits_per_dim,
    set_requires_grad,
    unpaired_fixtures,
    update_two_critics,
)
from transfigure.pipeline.train.recipes.base import Export, Recipe, TrainingState, register


class AlignFlowParams(RecipeParams):
    augment: AugmentParams = AugmentParams(flip=True)  # unpaired photos: mirrored is as real, as in the reference
    flow: FlowParams = FlowParams()
    discriminator: DiscriminatorParams = DiscriminatorParams()
    nll_weight: NonNegativeFloat = 1.0
    pool_size: Annotated[int, Field(ge=0)] = 50


@register
class AlignFlow(Recipe):
    name = "alignflow"
    Params = AlignFlowParams
    losses = ("G", "G_adv", "bpd_A", "bpd_B", "D_A", "D_B")
    tiny = FLOW_TINY

    @classmethod
    def build_networks(cls, p: AlignFlowParams, image_size: int = 32) -> dict[str, nn.Module]:
        """G_AB and G_BA hold the same two flows (a checkpoint lists them under both names, so either export loads
        alone); f_B starts as a copy of f_A, so the translations start close to the identity on image structure."""
        flow_a = build_flow(p.flow, image_size, orient=True)
        flow_b = copy.deepcopy(flow_a)
        d = p.discriminator
        critics = {
            name: build_discriminator(d.kind, 3, d.ndf, d.n_layers, d.norm, d.spectral_norm) for name in ("D_A", "D_B")
        }
        # Only the critics get the GAN initialisation: the flows' own init makes every coupling start as the identity.
        for critic in critics.values():
            init_weights(critic, p.init_type, p.init_gain)
        translators = {
            "G_AB": image_flows.AlignedTranslator(flow_a, flow_b),
            "G_BA": image_flows.AlignedTranslator(flow_b, flow_a),
        }
        return translators | critics

    @classmethod
    def exports(cls, p: AlignFlowParams) -> dict[str, Export]:
        return {
            "AtoB": Export("G_AB", "image_translation", "A", "B"),
            "BtoA": Export("G_BA", "image_translation", "B", "A"),
        }

    @classmethod
    def evaluate(cls, generators, p: AlignFlowParams, inputs: measures.EvalInputs) -> dict:
        """The translation metrics, plus each domain's bits/dim under its flow (an exact likelihood)."""
        result = measures.translation(generators, inputs)
        flows_by_domain = {"A": generators["AtoB"].source, "B": generators["AtoB"].target}
        result["bits_per_dim"] = {
            domain: mean_bits_per_dim(flow, measures.load_split(inputs, domain)[1])
            for domain, flow in flows_by_domain.items()
        }
        return result

    def set_up(self, data_dir: Path) -> TrainingState:
        p, ctx = self.p, self.ctx
        dataset = UnpairedDataset(data_dir, "train", p.augment)
        network_args = {"image_size": dataset[0]["A"].shape[-1]}
        nets = {k: ctx.prepare(v) for k, v in self.build_networks(p, **network_args).items()}
        self.f_A, self.f_B = ctx.invertible(nets["G_AB"].source), ctx.invertible(nets["G_AB"].target)
        self.D_A, self.D_B = ctx.forward(nets["D_A"]), ctx.forward(nets["D_B"])
        optimizers = {
            "G": ctx.optimizer(nets["G_AB"].parameters()),
            "D": ctx.optimizer([*nets["D_A"].parameters(), *nets["D_B"].parameters()]),
        }
        pools, self.fixed, example_inputs = unpaired_fixtures(ctx, dataset, p.pool_size)
        return TrainingState(dataset, nets, optimizers, example_inputs, pools, network_args)

    def step(self, next_batch) -> dict[str, float]:
        p, ctx, obj = self.p, self.ctx, self.ctx.objective
        critics = [self.state.nets["D_A"], self.state.nets["D_B"]]
        batch = next_batch()
        real_A, real_B = batch["A"], batch["B"]
        n_dims = real_A[0].numel()

        set_requires_grad(critics, False)
        # The flows run in fp32: log-determinants and exact inverses lose too much in half precision.
        z_A, log_det_A = self.f_A(real_A)
        z_B, log_det_B = self.f_B(real_B)
        # One encoding serves both terms: the likelihood of the real image and its translation.
        nll_A = flows.bits_per_dim(flows.standard_normal_log_prob(z_A) + log_det_A, n_dims).mean()
        nll_B = flows.bits_per_dim(flows.standard_normal_log_prob(z_B) + log_det_B, n_dims).mean()
        # Unclamped, so the critics see any overshoot of [-1, 1], the one place the exported translators clamp.
        fake_B, fake_A = self.f_B.inverse(z_A), self.f_A.inverse(z_B)
        with ctx.autocast():
            adv = generator_adversarial(obj, self.D_B(fake_B)) + generator_adversarial(obj, self.D_A(fake_A))
        g_loss = adv + p.nll_weight * (nll_A + nll_B)
        ctx.update(g_loss, self.state.optimizers["G"])
        set_requires_grad(critics, True)

        d_losses = [update_two_critics(self, real_A, real_B, fake_A.detach(), fake_B.detach())]
        for _ in range(ctx.n_critic - 1):
            extra = next_batch()
            with torch.no_grad():
                fresh_B, fresh_A = self.f_B.inverse(self.f_A(extra["A"])[0]), self.f_A.inverse(self.f_B(extra["B"])[0])
            d_losses.append(update_two_critics(self, extra["A"], extra["B"], fresh_A, fresh_B))
        d_mean = torch.stack(d_losses).mean(0)
        values = torch.stack([g_loss, adv, nll_A, nll_B, d_mean[0], d_mean[1]]).tolist()
        return dict(zip(self.losses, values, strict=True))

    @torch.no_grad()
    def sample_columns(self) -> dict[str, torch.Tensor]:
        """real A | fake B | rec A (A->B->A), then real B | fake A | rec B."""
        G_AB, G_BA = self.state.nets["G_AB"], self.state.nets["G_BA"]
        fake_B, fake_A = G_AB(self.fixed["A"]), G_BA(self.fixed["B"])
        columns = {
            "real A": self.fixed["A"],
            "fake B": fake_B,
            "rec A": G_BA(fake_B),
            "real B": self.fixed["B"],
            "fake A": fake_A,
            "rec B": G_AB(fake_A),
        }
        return columns
