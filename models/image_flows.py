"""Flows over images, built from the bijections of models/flows.py: RealNVP's multi-scale architecture, the
dequantisation that makes likelihoods of 8-bit images comparable with the literature, ``ImageFlow`` (the model
the recipes train), and the two ways the recipes use it, AlignFlow's translator and Flow-GAN's sampler:

    flow = ImageFlow(n_scales=2, n_couplings=4)
    z, log_det = flow(images)                      # images in [-1, 1], z of the same shape
    bpd = bits_per_dim(flow.log_prob(images), images[0].numel())
    samples = flow.sample(16, temperature=0.7)     # images in [-1, 1]

Inverses use plain tensor operations only, so an inverse, or a translation f_B^-1(f_A(x)), exports to ONNX with
dynamic batch, height and width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from transfigure.models.flows import Flow, flow_steps, squeeze, standard_normal_log_prob, unsqueeze


class RealNVP(Flow):
    """The multi-scale architecture of RealNVP (Dinh et al. 2017) on unbounded inputs, z the same shape as x.

    Each scale but the last: checkerboard couplings, squeeze, channel couplings, then half the channels are
    factored out (they are final latents) and the other half goes on to the next scale. The last scale has
    checkerboard couplings only. The factored-out halves are put back where they came from, so z has x's shape
    and height and width must be multiples of `size_multiple`.
    """

    def __init__(
        self,
        in_channels: int = 3,
        n_scales: int = 2,
        n_couplings: int = 4,
        hidden_channels: int = 64,
        n_res_blocks: int = 2,
        actnorm: bool = True,
        invconv: bool = False,
        orient: bool = False,
    ):
        super().__init__()
        if n_scales < 1 or n_couplings < 1:
            raise ValueError(f"need at least one scale and one coupling, got {n_scales} and {n_couplings}")
        self.size_multiple = 2 ** (n_scales - 1)
        steps = dict(n_couplings=n_couplings, hidden_channels=hidden_channels, n_res_blocks=n_res_blocks)
        steps |= dict(actnorm=actnorm, invconv=invconv)
        self.checkerboard = nn.ModuleList()
        self.channelwise = nn.ModuleList()
        channels = in_channels
        for scale in range(n_scales):
            self.checkerboard.append(flow_steps(channels, "checkerboard", **steps, orient=orient and scale == 0))
            if scale < n_scales - 1:
                self.channelwise.append(flow_steps(4 * channels, "channel", **steps))
                channels *= 2

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._forward_from(0, x)

    def _forward_from(self, scale: int, x: Tensor) -> tuple[Tensor, Tensor]:
        x, log_det = self.checkerboard[scale](x)
        if scale == len(self.channelwise):
            return x, log_det
        x, channel_log_det = self.channelwise[scale](squeeze(x))
        factored, rest = x.chunk(2, dim=1)
        rest, rest_log_det = self._forward_from(scale + 1, rest)
        return unsqueeze(torch.cat([factored, rest], dim=1)), log_det + channel_log_det + rest_log_det

    def inverse(self, z: Tensor) -> Tensor:
        return self._inverse_from(0, z)

    def _inverse_from(self, scale: int, z: Tensor) -> Tensor:
        if scale < len(self.channelwise):
            factored, rest = squeeze(z).chunk(2, dim=1)
            rest = self._inverse_from(scale + 1, rest)
            z = unsqueeze(self.channelwise[scale].inverse(torch.cat([factored, rest], dim=1)))
        return self.checkerboard[scale].inverse(z)


class DequantizeLogit(nn.Module):
    """The dequantisation and logit preprocessing of RealNVP (Dinh et al. 2017): an image x in [-1, 1] holds 8-bit
    values v = (x + 1) * 127.5; u = v + noise lies in [0, 256) and y = logit(alpha + (1 - 2 alpha) u / 256).

    forward(x, noise) returns (y, log|det dy/du|). With `noise` the offset is uniform in [0, 1), making the
    density of u a bound on the probability of the 8-bit image; without it it is the bin's midpoint 0.5, a
    deterministic map that `inverse` undoes exactly (y -> x, not clamped).
    """

    def __init__(self, alpha: float = 0.05, levels: int = 256):
        super().__init__()
        self.alpha, self.levels = alpha, levels

    def forward(self, x: Tensor, noise: bool) -> tuple[Tensor, Tensor]:
        u = (x + 1) * ((self.levels - 1) / 2)
        u = u + (torch.rand_like(u) if noise else 0.5)
        p = self.alpha + (1 - 2 * self.alpha) * u / self.levels
        y = p.log() - (-p).log1p()
        # dy/du = (1 - 2 alpha) / (levels p (1 - p)), per dimension.
        log_det = math.log((1 - 2 * self.alpha) / self.levels) - p.log() - (-p).log1p()
        return y, log_det.flatten(1).sum(1)

    def inverse(self, y: Tensor) -> Tensor:
        u = (torch.sigmoid(y) - self.alpha) * (self.levels / (1 - 2 * self.alpha))
        return (u - 0.5) / ((self.levels - 1) / 2) - 1


class ImageFlow(Flow):
    """RealNVP (Dinh et al. 2017) for 8-bit images in [-1, 1], with Glow's actnorm and 1x1 convolutions as options.

    forward(x) -> (z, log_det): z has x's shape and log_det = log|det dz/du|, u the dequantised pixel values in
    [0, 256)^D, so log_prob is a density over pixel values and

        bits/dim = -log p(u) / (D ln 2) = (-log N(z) - log|dz/dy| - log|dy/du|) / (D ln 2),

    the convention of the literature: 8-bit noise spread uniformly over all 256 levels scores exactly 8 at the
    optimum. forward dequantises with uniform noise in training mode and with the bin midpoint in eval mode, so
    eval-mode forward and inverse are exact inverses; `log_prob` always uses noise (the reported estimate).
    inverse(z) returns images in [-1, 1] up to the dequantisation margin, unclamped; `sample` clamps.
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        n_scales: int = 2,
        n_couplings: int = 4,
        hidden_channels: int = 64,
        n_res_blocks: int = 2,
        actnorm: bool = True,
        invconv: bool = False,
        orient: bool = False,
        alpha: float = 0.05,
    ):
        super().__init__()
        self.in_channels, self.image_size = in_channels, image_size
        self.preprocess = DequantizeLogit(alpha)
        self.core = RealNVP(in_channels, n_scales, n_couplings, hidden_channels, n_res_blocks, actnorm, invconv, orient)
        self.size_multiple = self.core.size_multiple

    def forward(self, x: Tensor, noise: bool | None = None) -> tuple[Tensor, Tensor]:
        """`noise` None follows the mode: uniform dequantisation noise in training, the bin midpoint in eval."""
        y, preprocess_log_det = self.preprocess(x, self.training if noise is None else noise)
        z, log_det = self.core(y)
        return z, log_det + preprocess_log_det

    def inverse(self, z: Tensor) -> Tensor:
        return self.preprocess.inverse(self.core.inverse(z))

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(u) in nats per sample for u = x's pixel values plus uniform noise: a lower bound, in expectation,
        on the log-probability of the 8-bit image."""
        z, log_det = self(x, noise=True)
        return standard_normal_log_prob(z) + log_det

    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        """n images in [-1, 1] from z ~ N(0, temperature^2 I); temperatures below 1 trade diversity for quality."""
        shape = (n, self.in_channels, self.image_size, self.image_size)
        z = torch.randn(shape, device=next(self.parameters()).device)
        return self.inverse(z * temperature).clamp(-1, 1)


class AlignedTranslator(nn.Module):
    """AlignFlow's translation (Grover et al. 2020): G = f_target^-1 . f_source through a latent space both flows
    share, so the translator the other way round is its exact inverse. Deterministic (midpoint dequantisation);
    the output is clamped to [-1, 1], the only place the round trip can lose anything."""

    def __init__(self, source: ImageFlow, target: ImageFlow):
        super().__init__()
        self.source, self.target = source, target
        self.size_multiple = max(source.size_multiple, target.size_multiple)

    def forward(self, x: Tensor) -> Tensor:
        z, _ = self.source(x, noise=False)
        return self.target.inverse(z).clamp(-1, 1)


class FlowSampler(nn.Module):
    """A flow used as a generator, as in Flow-GAN (Grover et al. 2018): latents z (N, C, H, W) -> images in [-1, 1].
    z ~ N(0, I) samples the model; scaling z by a temperature below 1 trades diversity for quality."""

    def __init__(self, flow: ImageFlow):
        super().__init__()
        self.flow = flow
        self.latent_shape = (flow.in_channels, flow.image_size, flow.image_size)
        self.size_multiple = flow.size_multiple

    def forward(self, z: Tensor) -> Tensor:
        return self.flow.inverse(z).clamp(-1, 1)
