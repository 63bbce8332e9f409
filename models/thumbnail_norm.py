"""Instance normalization with statistics from elsewhere, for tiled translation without seams.

Instance norm normalizes each image by its own per-channel mean and variance, so a tile of a large image
normalized by its own statistics comes out in a different tone from its neighbours. Thumbnail Instance
Normalization (Chen et al. 2022, "Towards Ultra-Resolution Neural Style Transfer via Thumbnail Instance
Normalization") runs the network once on a downscaled thumbnail of the whole image, keeps every instance-norm
layer's statistics, and normalizes every tile with them. With the thumbnail at full size the statistics are the
whole image's, and a tile seen with enough context (`context_radius`) equals the same region of the whole output.

`StatisticsGraph(net)`: image (N, 3, h, w) -> statistics (N, 2 * sum of channels): for each instance-norm layer in
order, its mean then its variance (biased, as instance norm uses). `TileGraph(net)`: (image, statistics) -> the
net's output with every instance-norm layer using the given statistics. Both copy `net`; neither changes it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def instance_norms(net: nn.Module) -> list[nn.InstanceNorm2d]:
    return [module for module in net.modules() if isinstance(module, nn.InstanceNorm2d)]


class _Statistics:
    """What the replaced layers share during one forward: collecting (given is None) or applying."""

    def __init__(self):
        self.collected: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.given: list[tuple[torch.Tensor, torch.Tensor]] | None = None


class _ExternalInstanceNorm(nn.Module):
    """nn.InstanceNorm2d (no running statistics) whose mean and variance are collected or supplied per forward."""

    def __init__(self, source: nn.InstanceNorm2d, index: int, shared: _Statistics):
        super().__init__()
        if source.track_running_stats:
            raise ValueError("instance norm with running statistics already normalizes tiles alike; nothing to do")
        self.index, self.shared, self.eps = index, shared, source.eps
        self.weight, self.bias = source.weight, source.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared.given is None:
            mean, var = x.mean((2, 3)), x.var((2, 3), unbiased=False)
            self.shared.collected.append((mean, var))
        else:
            mean, var = self.shared.given[self.index]
        y = (x - mean[:, :, None, None]) * torch.rsqrt(var[:, :, None, None] + self.eps)
        if self.weight is not None:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def _with_external_norms(net: nn.Module) -> tuple[nn.Module, _Statistics, list[int]]:
    """A copy of `net` whose instance norms read `_Statistics`; the channel count of each, in forward order."""
    copied, shared = copy.deepcopy(net), _Statistics()
    norms = instance_norms(copied)
    if not norms:
        raise ValueError("the network has no instance normalization; its tiles need no shared statistics")
    replacements = {id(norm): _ExternalInstanceNorm(norm, index, shared) for index, norm in enumerate(norms)}
    for parent in copied.modules():
        for name, child in list(parent.named_children()):
            if id(child) in replacements:
                setattr(parent, name, replacements[id(child)])
    return copied, shared, [norm.num_features for norm in norms]


class StatisticsGraph(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self._shared, self.channels = _with_external_norms(net)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        self._shared.collected, self._shared.given = [], None
        self.net(image)
        means = [mean for mean, _ in self._shared.collected]
        variances = [var for _, var in self._shared.collected]
        return torch.cat([torch.cat([m, v], dim=1) for m, v in zip(means, variances, strict=True)], dim=1)


class TileGraph(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self._shared, self.channels = _with_external_norms(net)
        self.size_multiple = getattr(net, "size_multiple", 1)

    def forward(self, image: torch.Tensor, statistics: torch.Tensor) -> torch.Tensor:
        given, start = [], 0
        for channels in self.channels:
            given.append(
                (statistics[:, start : start + channels], statistics[:, start + channels : start + 2 * channels])
            )
            start += 2 * channels
        self._shared.given = given
        try:
            return self.net(image)
        finally:
            self._shared.given = None


def statistics_width(net: nn.Module) -> int:
    """The length of one image's statistics vector: mean and variance of every instance-norm channel."""
    return 2 * sum(norm.num_features for norm in instance_norms(net))


def context_radius(net: nn.Module, multiple: int, largest: int = 1024) -> int | None:
    """How far, in input pixels, any output pixel of `net` can see once its normalization statistics are fixed
    (its receptive field's radius), rounded up to `multiple`; None when it reaches past `largest` / 2 (a U-Net's
    bottleneck sees the whole image: tiles cannot be exact). Measured, not derived from the layers: the input
    gradient of a `multiple` x `multiple` block of centre output pixels (every phase of the strides) is nonzero
    exactly within the field (random input)."""
    tile = TileGraph(net).eval()
    size = -(-max(64, 2 * multiple) // multiple) * multiple
    while size <= max(largest, 2 * multiple):
        generator = torch.Generator().manual_seed(0)
        x = torch.rand(1, 3, size, size, generator=generator) * 2 - 1
        statistics = StatisticsGraph(net).eval()(x).detach()
        x.requires_grad_(True)
        first, last = size // 2, size // 2 + multiple - 1
        tile(x, statistics)[0, :, first : last + 1, first : last + 1].sum().backward()
        rows, cols = torch.nonzero(x.grad[0].abs().sum(0), as_tuple=True)
        radius = int(max(first - rows.min(), rows.max() - last, first - cols.min(), cols.max() - last))
        if radius < first - 1 and radius < size - 1 - last - 1:
            return -(-radius // multiple) * multiple
        size *= 2
    return None
