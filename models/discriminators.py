"""PatchGAN and per-pixel discriminators with the reference CycleGAN/pix2pix layout.

For conditional use (pix2pix) feed the condition and the image concatenated on the channel axis and set
``input_nc`` to the sum of their channels (e.g. 3 + 3 = 6 for RGB to RGB).
"""

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as apply_spectral_norm

from transfigure.models.norms import norm_layer, uses_bias


def _conv(*args, spectral_norm: bool, **kwargs) -> nn.Module:
    conv = nn.Conv2d(*args, **kwargs)
    return apply_spectral_norm(conv) if spectral_norm else conv


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator of pix2pix (Isola et al. 2017); n_layers=3 scores overlapping 70x70 patches."""

    def __init__(
        self,
        input_nc: int = 3,
        ndf: int = 64,
        n_layers: int = 3,
        norm: str = "batch",
        spectral_norm: bool = False,
    ):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        bias = uses_bias(norm)
        sn = spectral_norm
        layers: list[nn.Module] = [
            _conv(input_nc, ndf, 4, stride=2, padding=1, spectral_norm=sn),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        # Width doubles with depth but is capped at 8 * ndf, as in the reference.
        channels = ndf
        for n in range(1, n_layers):
            out_channels = ndf * min(2**n, 8)
            layers += [
                _conv(channels, out_channels, 4, stride=2, padding=1, bias=bias, spectral_norm=sn),
                norm_layer(norm, out_channels),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            channels = out_channels
        out_channels = ndf * min(2**n_layers, 8)
        layers += [
            _conv(channels, out_channels, 4, stride=1, padding=1, bias=bias, spectral_norm=sn),
            norm_layer(norm, out_channels),
            nn.LeakyReLU(0.2, inplace=True),
            _conv(out_channels, 1, 4, stride=1, padding=1, spectral_norm=sn),
        ]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return a map of real/fake logits, one per receptive-field patch: (N, 1, H', W')."""
        return self.model(x)


class PixelDiscriminator(nn.Module):
    """1x1 PixelGAN discriminator of pix2pix (Isola et al. 2017): classifies every pixel independently."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, norm: str = "batch", spectral_norm: bool = False):
        super().__init__()
        bias = uses_bias(norm)
        sn = spectral_norm
        self.net = nn.Sequential(
            _conv(input_nc, ndf, 1, spectral_norm=sn),
            nn.LeakyReLU(0.2, inplace=True),
            _conv(ndf, ndf * 2, 1, bias=bias, spectral_norm=sn),
            norm_layer(norm, ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            _conv(ndf * 2, 1, 1, bias=bias, spectral_norm=sn),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return one logit per pixel: (N, 1, H, W)."""
        return self.net(x)


def build_discriminator(
    kind: str,
    input_nc: int = 3,
    ndf: int = 64,
    n_layers: int = 3,
    norm: str = "batch",
    spectral_norm: bool = False,
) -> nn.Module:
    """Build a discriminator: "basic" (70x70 PatchGAN), "n_layers" (PatchGAN of depth n_layers) or "pixel"."""
    if kind == "basic":
        return NLayerDiscriminator(input_nc, ndf, 3, norm, spectral_norm)
    if kind == "n_layers":
        return NLayerDiscriminator(input_nc, ndf, n_layers, norm, spectral_norm)
    if kind == "pixel":
        return PixelDiscriminator(input_nc, ndf, norm, spectral_norm)
    raise ValueError(f"unknown discriminator {kind!r}; expected basic, n_layers or pixel")
