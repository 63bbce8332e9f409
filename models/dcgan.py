"""Class-conditional DCGAN generator and discriminator for small images (e.g. 32x32 digits)."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

D_NORMS = ("none", "batch", "spectral")


def _check_image_size(image_size: int) -> int:
    """Number of 2x steps between 4x4 and `image_size`, which must be a power of two in [32, 256]."""
    if image_size not in (32, 64, 128, 256):
        raise ValueError(f"image_size must be a power of two in [32, 256], got {image_size}")
    return image_size.bit_length() - 3


class ConditionalGenerator(nn.Module):
    """DCGAN generator (Radford et al. 2016) conditioned on a class label through a learned embedding."""

    def __init__(
        self,
        z_dim: int = 100,
        n_classes: int = 10,
        image_size: int = 32,
        ngf: int = 64,
        out_channels: int = 3,
        embed_dim: int | None = None,
    ):
        super().__init__()
        n_up = _check_image_size(image_size)
        self.z_dim = z_dim
        self.n_classes = n_classes
        self.image_size = image_size
        embed_dim = n_classes if embed_dim is None else embed_dim
        self.embed = nn.Embedding(n_classes, embed_dim)

        # Width halves at every 2x step down to ngf before the output; capped at 8 * ngf for big images.
        widths = [ngf * min(2**i, 8) for i in reversed(range(n_up))]
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(z_dim + embed_dim, widths[0], 4, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        ]
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [
                nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
        layers += [nn.ConvTranspose2d(widths[-1], out_channels, 4, stride=2, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Map noise (N, z_dim) and integer labels (N,) to images (N, out_channels, S, S) in [-1, 1]."""
        h = torch.cat([z, self.embed(labels)], dim=1)
        return self.net(h[:, :, None, None])


class ConditionalDiscriminator(nn.Module):
    """Conditional DCGAN discriminator (Radford et al. 2016), projection head of Miyato & Koyama 2018."""

    def __init__(
        self,
        n_classes: int = 10,
        image_size: int = 32,
        ndf: int = 64,
        in_channels: int = 3,
        conditioning: str = "projection",
        norm: str = "none",
    ):
        super().__init__()
        n_down = _check_image_size(image_size)
        if conditioning not in ("projection", "concat"):
            raise ValueError(f"unknown conditioning {conditioning!r}; expected projection or concat")
        if norm not in D_NORMS:
            raise ValueError(f"unknown norm {norm!r}; expected none, batch or spectral")
        self.n_classes = n_classes
        self.image_size = image_size
        self.conditioning = conditioning

        def maybe_sn(module: nn.Module) -> nn.Module:
            return spectral_norm(module) if norm == "spectral" else module

        # "concat" appends one constant map per class to the image channels.
        c_in = in_channels + (n_classes if conditioning == "concat" else 0)
        widths = [ndf * min(2**i, 8) for i in range(n_down)]
        # DCGAN leaves the first layer unnormalised.
        layers: list[nn.Module] = [
            maybe_sn(nn.Conv2d(c_in, widths[0], 4, stride=2, padding=1)),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
            layers.append(maybe_sn(nn.Conv2d(w_in, w_out, 4, stride=2, padding=1, bias=norm != "batch")))
            if norm == "batch":
                layers.append(nn.BatchNorm2d(w_out))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
        self.net = nn.Sequential(*layers)
        self.linear = maybe_sn(nn.Linear(widths[-1], 1))
        if conditioning == "projection":
            # The class embedding is spectrally normalised too, as in Miyato & Koyama's released code.
            self.embed = maybe_sn(nn.Embedding(n_classes, widths[-1]))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return one real/fake logit per image: (N,)."""
        if self.conditioning == "concat":
            maps = F.one_hot(labels, self.n_classes).to(x.dtype)[:, :, None, None]
            x = torch.cat([x, maps.expand(-1, -1, x.shape[2], x.shape[3])], dim=1)
        # Sum pooling over the final 4x4 map, as in the projection discriminator.
        h = self.net(x).sum(dim=(2, 3))
        logits = self.linear(h).squeeze(1)
        if self.conditioning == "projection":
            logits = logits + (self.embed(labels) * h).sum(dim=1)
        return logits
