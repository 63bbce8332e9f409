"""Normalizing flows for images: RealNVP's affine couplings and multi-scale architecture, Glow's actnorm and
invertible 1x1 convolution, and the dequantisation that makes their likelihoods comparable with the literature.

Every bijection here has ``forward(x) -> (y, log_det)``, with ``log_det`` of shape (N,) the exact
log|det dy/dx| per sample, and ``inverse(y) -> x``. A ``Flow`` adds a standard normal prior on its output z, so
``log_prob(x) = log N(z; 0, I) + log_det``. The multi-scale models built from these (RealNVP, ImageFlow, the
translator and the sampler the recipes export) are in models/image_flows.py.

Inverses use plain tensor operations only (no data-dependent Python control flow, no matrix inverse op), so
an inverse, or a translation f_B^-1(f_A(x)), exports to ONNX with dynamic batch, height and width.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

MASKS = ("checkerboard", "channel")


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) per sample, summed over all but the batch dimension: shape (N,)."""
    return -0.5 * (z.pow(2) + math.log(2 * math.pi)).flatten(1).sum(1)


def bits_per_dim(log_prob: Tensor, n_dims: int) -> Tensor:
    """Negative log-likelihood in bits per dimension from a log-probability in nats over `n_dims` dimensions."""
    return -log_prob / (n_dims * math.log(2))


def squeeze(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, 4C, H/2, W/2): each 2x2 spatial block becomes four channels (Dinh et al. 2017)."""
    return F.pixel_unshuffle(x, 2)


def unsqueeze(x: Tensor) -> Tensor:
    """The inverse of squeeze: (N, 4C, H, W) -> (N, C, 2H, 2W)."""
    return F.pixel_shuffle(x, 2)


class ActNorm(nn.Module):
    """Activation normalisation of Glow (Kingma & Dhariwal 2018): a per-channel affine map set from the first
    training batch so that batch leaves it with zero mean and unit variance per channel.

    With `orient`, the initialisation also picks each channel's sign so the batch's skewness is positive: the rare,
    heavy tail (a digit's ink, say) lands on the positive side whether it is dark or light. The standard normal
    prior is symmetric, so the likelihood does not care; two flows fitted to different domains then agree on it.
    """

    def __init__(self, channels: int, orient: bool = False):
        super().__init__()
        self.orient = orient
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("sign", torch.ones(1, channels, 1, 1))
        # A buffer, so a loaded checkpoint is never re-initialised from new data.
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        mean, variance, third = channel_moments(x)
        self.loc.copy_(-mean)
        self.log_scale.copy_(-variance.add(1e-12).sqrt().log())
        if self.orient:
            self.sign.copy_(torch.where(third < 0, -1.0, 1.0))
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # `self.training` first: in eval mode (and so in ONNX export) the tensor flag is never read.
        if self.training and not self.initialized:
            self.initialize(x)
        log_det = self.log_scale.sum() * (x.shape[2] * x.shape[3])
        return (x + self.loc) * (self.sign * self.log_scale.exp()), log_det.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return y * (self.sign * (-self.log_scale).exp()) - self.loc


def channel_moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean, variance and third central moment of an NCHW batch, each (1, C, 1, 1). Under
    torch.distributed (data-parallel training) they are of every rank's batch together, so that all ranks
    initialise alike."""
    if not (dist.is_available() and dist.is_initialized()):
        mean = x.mean((0, 2, 3), keepdim=True)
        centred = x - mean
        return mean, centred.pow(2).mean((0, 2, 3), keepdim=True), centred.pow(3).mean((0, 2, 3), keepdim=True)
    wide = x.double()
    sums = torch.stack([wide.sum((0, 2, 3)), wide.pow(2).sum((0, 2, 3)), wide.pow(3).sum((0, 2, 3))])
    count = torch.tensor(float(x.numel() // x.shape[1]), dtype=torch.float64, device=x.device)
    dist.all_reduce(sums)
    dist.all_reduce(count)
    m1, m2, m3 = sums / count
    variance, third = m2 - m1**2, m3 - 3 * m1 * m2 + 2 * m1**3
    return tuple(m.to(x.dtype).reshape(1, -1, 1, 1) for m in (m1, variance, third))


def unitriangular_inverse(n: Tensor) -> Tensor:
    """(I + n)^-1 for a strictly triangular C x C matrix n, as (I - n)(I + n^2)(I + n^4)...: exact once the
    power n^(2^k) vanishes (2^k >= C), and made of matmuls only, because ONNX has no matrix inverse."""
    eye = torch.eye(n.shape[0], dtype=n.dtype, device=n.device)
    inverse, power, order = eye - n, n @ n, 2
    while order < n.shape[0]:
        inverse = inverse @ (eye + power)
        power, order = power @ power, order * 2
    return inverse


class InvConv1x1(nn.Module):
    """Invertible 1x1 convolution of Glow (Kingma & Dhariwal 2018) in its LU-decomposed form W = P L (U + diag(s)),
    so log|det W| = sum(log|s|) and W^-1 is a product of triangular inverses."""

    def __init__(self, channels: int):
        super().__init__()
        # Starts as a random rotation, as in Glow: a learned generalisation of a fixed channel permutation.
        rotation = torch.linalg.qr(torch.randn(channels, channels))[0]
        perm, lower, upper = torch.linalg.lu(rotation)
        diagonal = upper.diagonal()
        self.register_buffer("perm", perm)
        self.register_buffer("sign", diagonal.sign())
        self.lower = nn.Parameter(lower.tril(-1))
        self.upper = nn.Parameter(upper.triu(1))
        self.log_scale = nn.Parameter(diagonal.abs().log())

    def _upper_with_diagonal(self) -> tuple[Tensor, Tensor]:
        """(U with its diagonal s, s)."""
        scale = self.sign * self.log_scale.exp()
        return self.upper.triu(1) + torch.diag(scale), scale

    def weight(self) -> Tensor:
        lower = self.lower.tril(-1) + torch.eye(len(self.sign), dtype=self.lower.dtype, device=self.lower.device)
        return self.perm @ lower @ self._upper_with_diagonal()[0]

    def inverse_weight(self) -> Tensor:
        upper, scale = self._upper_with_diagonal()
        # U = (I + M) diag(s) with M = triu(U, 1) / s strictly upper, so U^-1 = diag(1/s) (I + M)^-1.
        upper_inverse = unitriangular_inverse(self.upper.triu(1) / scale) / scale[:, None]
        lower_inverse = unitriangular_inverse(self.lower.tril(-1))
        return upper_inverse @ lower_inverse @ self.perm.T

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        log_det = self.log_scale.sum() * (x.shape[2] * x.shape[3])
        return F.conv2d(x, self.weight()[:, :, None, None]), log_det.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return F.conv2d(y, self.inverse_weight()[:, :, None, None])


class ResBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016) inside the coupling networks."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class CouplingNet(nn.Module):
    """The scale-and-shift network of an affine coupling (Dinh et al. 2017): a small ResNet whose last convolution
    starts at zero, so every coupling starts as the identity."""

    def __init__(
        self, in_channels: int, out_channels: int, hidden_channels: int, n_res_blocks: int, kernel_size: int = 3
    ):
        super().__init__()
        padding = kernel_size // 2
        self.head = nn.Conv2d(in_channels, hidden_channels, kernel_size, padding=padding)
        self.blocks = nn.Sequential(*[ResBlock(hidden_channels, kernel_size) for _ in range(n_res_blocks)])
        self.tail = nn.Conv2d(hidden_channels, out_channels, kernel_size, padding=padding)
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.tail(F.relu(self.blocks(self.head(x))))


class AffineCoupling(nn.Module):
    """Affine coupling layer of RealNVP (Dinh et al. 2017): y = x * exp(s) + t on the masked-out half, with s and t
    computed from the kept half and s = scale * tanh(raw) bounded by a learned per-channel scale.

    `mask` is "checkerboard" (alternate pixels) or "channel" (first half of the channels, which must be even);
    `flip` swaps the kept and the changed halves; `kernel_size` is the coupling network's (1 for points).
    """

    def __init__(
        self, channels: int, mask: str, flip: bool, hidden_channels: int, n_res_blocks: int, kernel_size: int = 3
    ):
        super().__init__()
        if mask not in MASKS:
            raise ValueError(f"unknown mask {mask!r}; expected one of {', '.join(MASKS)}")
        if mask == "channel" and channels % 2:
            raise ValueError(f"a channel mask needs an even number of channels, got {channels}")
        self.mask_kind, self.flip = mask, flip
        self.net = CouplingNet(channels, 2 * channels, hidden_channels, n_res_blocks, kernel_size)
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))

    def mask(self, x: Tensor) -> Tensor:
        """1 where x is kept (and conditions the rest), 0 where it is changed; built from x's shape, so any size."""
        if self.mask_kind == "checkerboard":
            rows = torch.arange(x.shape[2], device=x.device)[:, None]
            cols = torch.arange(x.shape[3], device=x.device)[None, :]
            kept = (rows + cols) % 2 == int(self.flip)
            return kept.to(x.dtype)[None, None]
        kept = (torch.arange(x.shape[1], device=x.device) < x.shape[1] // 2) != self.flip
        return kept.to(x.dtype)[None, :, None, None]

    def _scale_shift(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(s, t) from the kept half of x, both zero where x is kept."""
        mask = self.mask(x)
        raw, shift = self.net(x * mask).chunk(2, dim=1)
        changed = 1 - mask
        return self.scale * torch.tanh(raw) * changed, shift * changed

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self._scale_shift(x)
        return x * s.exp() + t, s.flatten(1).sum(1)

    def inverse(self, y: Tensor) -> Tensor:
        # The kept half passes unchanged, so s and t computed from y are the ones the forward pass used.
        s, t = self._scale_shift(y)
        return (y - t) * (-s).exp()


class FlowSequence(nn.ModuleList):
    """Bijections applied in order: log-determinants add, and the inverse runs them backwards."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        log_det = x.new_zeros(x.shape[0])
        for layer in self:
            x, layer_log_det = layer(x)
            log_det = log_det + layer_log_det
        return x, log_det

    def inverse(self, y: Tensor) -> Tensor:
        for layer in reversed(self):
            y = layer.inverse(y)
        return y


def flow_steps(
    channels: int,
    mask: str,
    n_couplings: int,
    hidden_channels: int,
    n_res_blocks: int,
    actnorm: bool,
    invconv: bool,
    orient: bool = False,
    kernel_size: int = 3,
) -> FlowSequence:
    """n_couplings steps of [actnorm] [1x1 conv] coupling (Glow's step), the couplings alternating their halves;
    `orient` orients the first actnorm."""
    layers: list[nn.Module] = []
    for i in range(n_couplings):
        if actnorm:
            layers.append(ActNorm(channels, orient=orient and i == 0))
        if invconv:
            layers.append(InvConv1x1(channels))
        layers.append(AffineCoupling(channels, mask, i % 2 == 1, hidden_channels, n_res_blocks, kernel_size))
    return FlowSequence(layers)


class Flow(nn.Module):
    """A normalizing flow (Dinh et al. 2017): a bijection x -> z with a standard normal prior on z."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) in nats per sample, by the change of variables: log N(z; 0, I) + log|det dz/dx|."""
        z, log_det = self(x)
        return standard_normal_log_prob(z) + log_det
