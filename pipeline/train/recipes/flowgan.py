"""Flow-GAN (Grover et al. 2018): a normalizing flow as an unconditional generator of one domain, trained by the
adversarial objective plus `nll_weight` times its negative log-likelihood (in bits per dimension) of the data.

nll_weight 0 is pure adversarial training; `mle_only` is pure maximum likelihood and trains no critic. Because
the generator is a flow, its bits/dim are exact whatever objective trained it.

Loss balance, the objective's own: G = g_loss(D(fake)) + nll_weight x NLL; the critic d_loss + penalty, unhalved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import model_validator
from torch import nn

from transfigure.models import flows, image_flows
from transfigure.models.discriminators import build_discriminator
from transfigure.models.init import init_weights
from transfigure.pipeline.data.datasets import UnpairedDataset
from transfigure.pipeline.evaluate import measures
from transfigure.pipeline.schema import DiscriminatorParams, FlowParams, NonNegativeFloat, RecipeParams
from transfigure.pipeline.train.parts import FLOW_TINY, build_flow, mean_bits_per_dim, set_requires_grad
from transfigure.pipeline.train.recipes.base import Export, Recipe, TrainingState, register


class FlowGANParams(RecipeParams):
    domain: Literal["A", "B"] = "B"
    flow: FlowParams = FlowParams()
    discriminator: DiscriminatorParams = DiscriminatorParams()
    nll_weight: NonNegativeFloat = 1.0
    mle_only: bool = False

    @model_validator(mode="before")
    @classmethod
    def _mle_objective(cls, data):
        """`objective: mle` is pure maximum likelihood: the same as mle_only, with no critic to train."""
        if isinstance(data, dict) and data.get("objective") == "mle":
            return {**data, "objective": "nsgan", "mle_only": True}
        return data


@register
class FlowGAN(Recipe):
    name = "flowgan"
    Params = FlowGANParams
    losses = ("G", "G_adv", "bpd", "D")
    tiny = FLOW_TINY

    @classmethod
    def build_networks(cls, p: FlowGANParams, image_size: int = 32) -> dict[str, nn.Module]:
        d = p.discriminator
        critic = build_discriminator(d.kind, 3, d.ndf, d.n_layers, d.norm, d.spectral_norm)
        # Only the critic gets the GAN initialisation: the flow's own init makes every coupling start as the identity.
        init_weights(critic, p.init_type, p.init_gain)
        return {"G": image_flows.FlowSampler(build_flow(p.flow, image_size)), "D": critic}

    @classmethod
    def exports(cls, p: FlowGANParams) -> dict[str, Export]:
        return {"generator": Export("G", "flow_sampling", "noise", p.domain, ("z",), ("latent_shape",))}

    @classmethod
    def evaluate(cls, generators, p: FlowGANParams, inputs: measures.EvalInputs) -> dict:
        """KID/FID of samples against the domain's test images, and the bits/dim of those images."""
        generator = generators["generator"]
        real = measures.load_split(inputs, p.domain)[1]
        result = measures.flow_samples(generator, real, inputs)
        result["bits_per_dim"] = {p.domain: mean_bits_per_dim(generator.flow, real)}
        return result

    def set_up(self, data_dir: Path) -> TrainingState:
        p, ctx = self.p, self.ctx
        # Any unaligned dataset works: the other domain's images are simply not used.
        dataset = UnpairedDataset(data_dir, "train", p.augment)
        size = dataset[0][p.domain].shape[-1]
        nets = {k: ctx.prepare(v) for k, v in self.build_networks(p, image_size=size).items()}
        self.flow, self.D = ctx.invertible(nets["G"].flow), ctx.forward(nets["D"])
        optimizers = {"G": ctx.optimizer(nets["G"].parameters())}
        if not p.mle_only:
            optimizers["D"] = ctx.optimizer(nets["D"].parameters())
        self.fixed_z = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0)).to(ctx.device)
        example_inputs = {"G": {"z": self.fixed_z[:2]}}
        return TrainingState(dataset, nets, optimizers, example_inputs, network_args={"image_size": size})

    def step(self, next_batch) -> dict[str, float]:
        p, ctx, obj = self.p, self.ctx, self.ctx.objective
        real = next_batch()[p.domain]
        # The flows run in fp32: log-determinants and exact inverses lose too much in half precision.
        # The likelihood is always computed (it is the honest score); it only needs a graph when it is trained on.
        with torch.set_grad_enabled(p.mle_only or p.nll_weight > 0):
            z, log_det = self.flow(real)
            nll = flows.bits_per_dim(flows.standard_normal_log_prob(z) + log_det, real[0].numel()).mean()
        if p.mle_only:
            ctx.update(nll, self.state.optimizers["G"])
            return {"G": nll.item(), "bpd": nll.item()}

        set_requires_grad([self.state.nets["D"]], False)
        fake = self.flow.inverse(torch.randn_like(real))
        with ctx.autocast():
            adv = obj.g_loss(self.D(fake))
        g_loss = adv + p.nll_weight * nll
        ctx.update(g_loss, self.state.optimizers["G"])
        set_requires_grad([self.state.nets["D"]], True)

        d_losses = [self._critic_step(real, fake.detach())]
        for _ in range(ctx.n_critic - 1):
            extra = next_batch()[p.domain]
            with torch.no_grad():
                fresh = self.flow.inverse(torch.randn_like(extra))
            d_losses.append(self._critic_step(extra, fresh))
        values = torch.stack([g_loss, adv, nll, torch.stack(d_losses).mean()]).tolist()
        return dict(zip(self.losses, values, strict=True))

    def _critic_step(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        ctx, obj = self.ctx, self.ctx.objective
        with ctx.autocast():
            loss = obj.d_loss(self.D(real), self.D(fake)) + obj.penalty(self.D, real, fake)
        ctx.update_critics(loss, self.state.optimizers["D"], self.state.nets["D"])
        return loss.detach()

    @torch.no_grad()
    def sample_columns(self) -> dict[str, torch.Tensor]:
        """Eight fixed latents, one per row, at temperatures T = 1, 0.85, 0.7 and 0.5 across."""
        G = self.state.nets["G"]
        return {f"T={t}": G(self.fixed_z * t) for t in (1.0, 0.85, 0.7, 0.5)}
