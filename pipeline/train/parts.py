"""Pieces that several recipes and the loop share: freezing critics, eval mode for a moment, the image pool, the
reference's loss balance, the two-critic update, image flows."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from transfigure.models import flows, image_flows
from transfigure.models.objectives import Critic, LeastSquares, Objective
from transfigure.pipeline.data.datasets import first_items
from transfigure.pipeline.schema import FlowParams


def set_requires_grad(nets: list[nn.Module], flag: bool) -> None:
    for net in nets:
        for parameter in net.parameters():
            parameter.requires_grad_(flag)


@contextlib.contextmanager
def eval_mode(nets: Iterable[nn.Module]) -> Iterator[None]:
    """The networks (every submodule) in eval mode inside, each module back in its own mode after: batch norm and
    dropout behave as at inference for a sample sheet, and training steps keep exactly the mode they had."""
    nets = list(nets)
    modes = {module: module.training for net in nets for module in net.modules()}
    for net in nets:
        net.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


class ImagePool:
    """A history of generated images (Shrivastava et al. 2017): the critic also sees older fakes."""

    def __init__(self, size: int):
        self.size = size
        self.images: list[torch.Tensor] = []

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for image in images.detach():
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif torch.rand(()) < 0.5:
                slot = int(torch.randint(self.size, ()))
                out.append(self.images[slot].clone())
                self.images[slot] = image.clone()
            else:
                out.append(image)
        return torch.stack(out)

    def state(self) -> list[torch.Tensor]:
        return [image.cpu() for image in self.images]

    def load(self, images: list[torch.Tensor], device: torch.device) -> None:
        self.images = [image.to(device) for image in images]


def unpaired_fixtures(ctx, dataset, pool_size: int) -> tuple[dict, dict, dict]:
    """What a two-domain translator keeps besides its networks: image pools of fakes per domain, eight fixed inputs
    per domain for the sample sheets, and the example inputs that MLflow logs each generator with."""
    pools = {"fake_A": ImagePool(pool_size), "fake_B": ImagePool(pool_size)}
    fixed = ctx.to_device(first_items(dataset, min(8, len(dataset.a))))
    # Two samples: a batch of one would pin the exported batch size to 1.
    examples = {name: {"image": fixed[domain][:2]} for name, domain in (("G_AB", "A"), ("G_BA", "B"))}
    return pools, fixed, examples


# The reference's loss balance (junyanz/pytorch-CycleGAN-and-pix2pix: GANLoss, backward_D_basic, backward_G), the
# one of cyclegan, pix2pix and alignflow: the generator's adversarial term is GANLoss(D(fake), True), and each
# critic minimises 0.5 x (GANLoss(D(real), True) + GANLoss(D(fake), False)). models.objectives keeps the LSGAN
# paper's 1/2 on both of its terms (the objectives benchmark and its oracle tests use that form), where the
# reference's LSGAN is a plain mean squared error: twice ours.
def reference_scale(objective: Objective) -> float:
    return 2.0 if isinstance(objective, LeastSquares) else 1.0


def generator_adversarial(objective: Objective, fake_scores: Tensor) -> Tensor:
    """The generator's adversarial term at the reference's scale."""
    return reference_scale(objective) * objective.g_loss(fake_scores)


def critic_loss(objective: Objective, critic: Critic, real: Tensor, fake: Tensor) -> Tensor:
    """0.5 x (real term + fake term) at the reference's scale. The penalty is inside the halving, so it keeps the
    weight that params give relative to the adversarial term."""
    adversarial = reference_scale(objective) * objective.d_loss(critic(real), critic(fake))
    return 0.5 * (adversarial + objective.penalty(critic, real, fake))


def update_two_critics(recipe, real_A, real_B, fake_A, fake_B) -> torch.Tensor:
    """One update of both domains' critics on pooled fakes; shared by every recipe with two critics.

    `recipe` has ctx, forwards D_A/D_B, and in its state pools fake_A/fake_B, nets D_A/D_B and the optimizer "D".
    """
    ctx, obj = recipe.ctx, recipe.ctx.objective
    state = recipe.state
    fake_A, fake_B = state.pools["fake_A"].query(fake_A), state.pools["fake_B"].query(fake_B)
    with ctx.autocast():
        loss_A = critic_loss(obj, recipe.D_A, real_A, fake_A)
        loss_B = critic_loss(obj, recipe.D_B, real_B, fake_B)
    ctx.update_critics(loss_A + loss_B, state.optimizers["D"], state.nets["D_A"], state.nets["D_B"])
    return torch.stack([loss_A.detach(), loss_B.detach()])


# The `tiny` overrides (base.py) every recipe with a PatchGAN critic shares: the smallest critic, two images a batch.
TINY_CRITIC = ("discriminator.kind=n_layers", "discriminator.n_layers=1", "discriminator.ndf=4", "batch_size=2")
# Both flow recipes' `tiny` overrides: one coupling of 4 channels, and the smallest critic.
FLOW_TINY = ("flow.n_couplings=1", "flow.hidden_channels=4", "flow.n_res_blocks=1", *TINY_CRITIC)


def build_flow(p: FlowParams, image_size: int, orient: bool = False) -> image_flows.ImageFlow:
    return image_flows.ImageFlow(
        3, image_size, p.n_scales, p.n_couplings, p.hidden_channels, p.n_res_blocks, p.actnorm, p.invconv, orient
    )


@torch.no_grad()
def mean_bits_per_dim(flow: image_flows.ImageFlow, images: torch.Tensor, batch_size: int = 256) -> float:
    """Mean bits/dim of `images` under `flow`, with seeded dequantisation noise (on the CPU, where evaluation runs)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        log_probs = torch.cat([flow.log_prob(chunk) for chunk in images.split(batch_size)])
    return float(flows.bits_per_dim(log_probs, images[0].numel()).mean())
