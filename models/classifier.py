"""Small CNN digit classifier used to score class preservation and as a KID/FID feature extractor."""

import torch
from torch import nn


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class DigitClassifier(nn.Module):
    """VGG-style digit classifier (Simonyan & Zisserman 2015) for images in [-1, 1], 28x28 or larger."""

    feature_dim = 128

    def __init__(self, in_channels: int = 3, n_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn_relu(in_channels, 32),
            *_conv_bn_relu(32, 32),
            nn.MaxPool2d(2),
            *_conv_bn_relu(32, 64),
            *_conv_bn_relu(64, 64),
            nn.MaxPool2d(2),
            # A fixed 4x4 grid makes the head independent of the input size.
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )
        self.embed = nn.Sequential(nn.Linear(64 * 4 * 4, self.feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(self.feature_dim, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, 128), used for KID/FID."""
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, n_classes)."""
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """The most likely class of each image, in chunks of `batch_size`."""
        return torch.cat([self(chunk).argmax(1) for chunk in x.split(batch_size)])
