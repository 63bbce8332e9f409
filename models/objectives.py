"""GAN objectives selected by name: critic and generator losses, Lipschitz penalties and weight clipping.

Losses take raw critic scores of any shape (logits for minimax/nsgan, so PatchGAN maps work unchanged) and
average over every element. ``d_loss`` is the sum of the real and the fake term at the scale each docstring
states (LSGAN keeps the paper's 1/2); a recipe's loss balance (pipeline/train/parts.py) builds on these.

    objective = get("wgan-gp", weight=10.0)
    d_loss = objective.d_loss(D(real), D(fake.detach())) + objective.penalty(D, real, fake)
    objective.after_critic_step(D)
    g_loss = objective.g_loss(D(fake))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Critic = Callable[[Tensor], Tensor]

# Radford et al. (DCGAN), also the pix2pix/CycleGAN default.
_DCGAN_ADAM = {"optimizer": "adam", "lr": 2e-4, "betas": (0.5, 0.999), "n_critic": 1}
# Gulrajani et al. (Algorithm 1 defaults); WGAN-LP uses the same settings.
_GP_ADAM = {"optimizer": "adam", "lr": 1e-4, "betas": (0.0, 0.9), "n_critic": 5}
# Zhang et al. (SAGAN): betas (0, 0.9) and 1:1 updates; one shared rate in place of its 4e-4 (D) / 1e-4 (G).
_SAGAN_ADAM = {"optimizer": "adam", "lr": 2e-4, "betas": (0.0, 0.9), "n_critic": 1}


@dataclass
class Objective:
    """Base class: no gradient penalty and no constraint on the critic unless a subclass adds one."""

    name: ClassVar[str]
    default_recommended: ClassVar[dict]
    recommended: dict = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # A copy per instance, so a recipe editing its settings cannot change other objectives.
        self.recommended = dict(self.default_recommended)

    def d_loss(self, real_scores: Tensor, fake_scores: Tensor) -> Tensor:
        raise NotImplementedError

    def g_loss(self, fake_scores: Tensor) -> Tensor:
        raise NotImplementedError

    def penalty(self, critic: Critic, real: Tensor, fake: Tensor) -> Tensor:
        return torch.zeros((), device=real.device)

    def after_critic_step(self, critic: nn.Module) -> None:
        pass


@dataclass
class Minimax(Objective):
    """Saturating minimax GAN of Goodfellow et al. (2014): D maximises V, G minimises E[log(1 - D(G(z)))]."""

    name: ClassVar[str] = "minimax"
    default_recommended: ClassVar[dict] = _DCGAN_ADAM

    def d_loss(self, real_scores: Tensor, fake_scores: Tensor) -> Tensor:
        # -log sigmoid(s) = softplus(-s) and -log(1 - sigmoid(s)) = softplus(s), stable for any logit.
        return F.softplus(-real_scores).mean() + F.softplus(fake_scores).mean()

    def g_loss(self, fake_scores: Tensor) -> Tensor:
        return -F.softplus(fake_scores).mean()


@dataclass
class NonSaturating(Minimax):
    """Non-saturating GAN of Goodfellow et al. (2014): G minimises -E[log D(G(z))] instead."""

    name: ClassVar[str] = "nsgan"

    def g_loss(self, fake_scores: Tensor) -> Tensor:
        return F.softplus(-fake_scores).mean()


@dataclass
class LeastSquares(Objective):
    """Least-squares GAN of Mao et al. (2017): D regresses fakes to a and reals to b, G pushes fakes to c.

    Both losses carry the paper's factor 1/2: d = 1/2 E[(D(x) - b)^2] + 1/2 E[(D(G(z)) - a)^2] and
    g = 1/2 E[(D(G(z)) - c)^2]. (The CycleGAN/pix2pix reference uses plain mean squared error, twice these.)
    """

    a: float = 0.0
    b: float = 1.0
    c: float = 1.0
    name: ClassVar[str] = "lsgan"
    default_recommended: ClassVar[dict] = _DCGAN_ADAM

    def d_loss(self, real_scores: Tensor, fake_scores: Tensor) -> Tensor:
        return 0.5 * (real_scores - self.b).pow(2).mean() + 0.5 * (fake_scores - self.a).pow(2).mean()

    def g_loss(self, fake_scores: Tensor) -> Tensor:
        return 0.5 * (fake_scores - self.c).pow(2).mean()


class _Wasserstein(Objective):
    """Shared critic and generator losses of the Wasserstein family."""

    def d_loss(self, real_scores: Tensor, fake_scores: Tensor) -> Tensor:
        # The critic maximises E[f(real)] - E[f(fake)], which estimates W1 when f is 1-Lipschitz.
        return fake_scores.mean() - real_scores.mean()

    def g_loss(self, fake_scores: Tensor) -> Tensor:
        return -fake_scores.mean()


@dataclass
class WGAN(_Wasserstein):
    """Wasserstein GAN of Arjovsky et al. (2017), keeping the critic Lipschitz by clipping its weights."""

    clip: float = 0.01
    name: ClassVar[str] = "wgan"
    # Arjovsky et al. (Algorithm 1): momentum-based optimisers made the clipped critic unstable.
    default_recommended: ClassVar[dict] = {"optimizer": "rmsprop", "lr": 5e-5, "n_critic": 5}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.clip <= 0:
            raise ValueError(f"wgan parameter 'clip' must be positive, got {self.clip}")

    @torch.no_grad()
    def after_critic_step(self, critic: nn.Module) -> None:
        for param in critic.parameters():
            param.clamp_(-self.clip, self.clip)


def gradient_norms(critic: Critic, real: Tensor, fake: Tensor) -> Tensor:
    """Per-sample L2 norm of the critic's input gradient at random interpolates of real and fake, in fp32."""
    if real.shape != fake.shape:
        raise ValueError(f"real and fake shapes differ: {list(real.shape)} and {list(fake.shape)}")
    # Detached: the penalty trains the critic only, never the generator that produced fake.
    real, fake = real.detach().float(), fake.detach().float()
    # One mixing weight per sample, broadcast over all other dimensions.
    eps = torch.rand((real.shape[0],) + (1,) * (real.dim() - 1), device=real.device)
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    # Low-precision gradients of gradients are too coarse for the penalty, so the critic runs in fp32 here.
    with torch.autocast(device_type=real.device.type, enabled=False):
        scores = critic(x_hat)
    # Summing is exact per sample as long as the critic mixes no samples (no BatchNorm in GP critics).
    # Out of place and for x_hat only, so the parameters' AccumulateGrad nodes (where DDP's reducer hooks) run
    # once, in the caller's single backward() of loss + penalty: DDP cannot reduce a double backward.
    (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    # The epsilon keeps the norm's gradient finite where the input gradient vanishes.
    return (grad.reshape(grad.shape[0], -1).pow(2).sum(dim=1) + 1e-12).sqrt()


@dataclass
class WGANGP(_Wasserstein):
    """WGAN with gradient penalty of Gulrajani et al. (2017): weight * E[(||grad D(x_hat)|| - 1)^2]."""

    weight: float = 10.0
    name: ClassVar[str] = "wgan-gp"
    default_recommended: ClassVar[dict] = _GP_ADAM

    def penalty(self, critic: Critic, real: Tensor, fake: Tensor) -> Tensor:
        return self.weight * (gradient_norms(critic, real, fake) - 1).pow(2).mean()


@dataclass
class WGANLP(_Wasserstein):
    """WGAN with Lipschitz penalty of Petzka et al. (2018): weight * E[max(0, ||grad D(x_hat)|| - 1)^2]."""

    weight: float = 10.0
    name: ClassVar[str] = "wgan-lp"
    default_recommended: ClassVar[dict] = _GP_ADAM

    def penalty(self, critic: Critic, real: Tensor, fake: Tensor) -> Tensor:
        # One-sided: only gradients steeper than 1 violate the Lipschitz constraint.
        return self.weight * F.relu(gradient_norms(critic, real, fake) - 1).pow(2).mean()


@dataclass
class Hinge(Objective):
    """Hinge loss of Lim & Ye (2017), as used by Miyato et al. (SNGAN, 2018) and Zhang et al. (SAGAN)."""

    name: ClassVar[str] = "hinge"
    default_recommended: ClassVar[dict] = _SAGAN_ADAM

    def d_loss(self, real_scores: Tensor, fake_scores: Tensor) -> Tensor:
        return F.relu(1 - real_scores).mean() + F.relu(1 + fake_scores).mean()

    def g_loss(self, fake_scores: Tensor) -> Tensor:
        return -fake_scores.mean()


_REGISTRY: dict[str, type[Objective]] = {
    cls.name: cls for cls in (Minimax, NonSaturating, LeastSquares, WGAN, WGANGP, WGANLP, Hinge)
}


def names() -> list[str]:
    """Names accepted by :func:`get`."""
    return list(_REGISTRY)


def get(name: str, **params: float) -> Objective:
    """Build the objective registered as `name`, e.g. ``get("lsgan", a=-1, b=1, c=0)``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown objective {name!r} (valid: {', '.join(_REGISTRY)})")
    cls = _REGISTRY[name]
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in params:
        if key not in valid:
            raise ValueError(f"{name} has no parameter {key!r} (valid: {', '.join(valid) or 'none'})")
    return cls(**params)
