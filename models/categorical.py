"""Label maps as a translator's output or input: K classes per pixel (pure PyTorch).

A label-map generator ends in K logits per pixel. Its critic sees a one-hot map, and a categorical sample of the
logits has no reparametrization gradient; the Gumbel-softmax (Concrete) relaxation (Jang et al. 2017, Maddison
et al. 2017; the first lecture deck's bonus section) gives one, exact as the temperature goes to 0. With `hard`
the forward value is exactly one-hot and the gradient is the relaxed sample's (straight-through). Inference is
deterministic: the argmax (`LabelMapOutput`), no noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def one_hot_map(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """(N, H, W) int64 classes -> (N, K, H, W) float32 one-hot channels."""
    # A comparison with arange, not F.one_hot: it exports to ONNX as one Equal, with any batch and size.
    values = torch.arange(classes, device=labels.device).view(1, classes, 1, 1)
    return (labels.unsqueeze(1) == values).float()


def relaxed_one_hot(logits: torch.Tensor, temperature: float, hard: bool, noise: bool = True) -> torch.Tensor:
    """A (N, K, H, W) sample on the simplex from (N, K, H, W) logits: Gumbel-softmax at `temperature` (torch's
    own), or without `noise` the plain softmax of logits / temperature; `hard` makes the forward value the
    one-hot argmax while the gradient stays the relaxed sample's."""
    logits = logits.float()  # Gumbel noise and a low temperature need float32, also under autocast
    if noise:
        return F.gumbel_softmax(logits, tau=temperature, hard=hard, dim=1)
    soft = F.softmax(logits / temperature, dim=1)
    if not hard:
        return soft
    one_hot = torch.zeros_like(soft).scatter_(1, soft.argmax(1, keepdim=True), 1.0)
    return one_hot - soft.detach() + soft


def annealed_temperature(progress: float, start: float, end: float) -> float:
    """The temperature at `progress` (0 at the first step, 1 at the last), exponential from `start` to `end`:
    every step divides it by the same factor, as in Jang et al.'s exp(-r t) schedule, because the temperature
    acts on the logits by division, so equal ratios are equal changes of the sample's sharpness."""
    return start * (end / start) ** min(max(progress, 0.0), 1.0)


class OneHotInput(nn.Module):
    """A generator fed a label map: (N, H, W) int64 classes become K one-hot channels for `generator`."""

    def __init__(self, generator: nn.Module, classes: int):
        super().__init__()
        self.generator, self.classes = generator, classes
        self.size_multiple = generator.size_multiple

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.generator(one_hot_map(labels, self.classes))


class LabelMapOutput(nn.Module):
    """The label map of a logits generator: the argmax class of every pixel, (N, H, W) int64."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator
        self.size_multiple = generator.size_multiple

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.generator(image).argmax(1)
