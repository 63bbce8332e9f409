"""Weight initialisation as in the reference CycleGAN/pix2pix implementation (after Radford et al. 2016)."""

from torch import nn
from torch.nn.utils import parametrize

INIT_TYPES = ("normal", "xavier", "kaiming", "orthogonal")


def init_weights(net: nn.Module, init_type: str = "normal", gain: float = 0.02) -> nn.Module:
    """Initialise conv/linear weights by `init_type` with zero biases, and batch norm weights ~ N(1, gain).

    Returns `net` for chaining.
    """
    if init_type not in INIT_TYPES:
        raise ValueError(f"unknown init_type {init_type!r}; expected one of {', '.join(INIT_TYPES)}")
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            # Spectral norm computes `weight` from a stored original; initialise that one. Its power-iteration
            # vectors then adapt to the new weight over the first training steps.
            if parametrize.is_parametrized(module, "weight"):
                weight = module.parametrizations.weight.original
            else:
                weight = module.weight
            if init_type == "normal":
                nn.init.normal_(weight, 0.0, gain)
            elif init_type == "xavier":
                nn.init.xavier_normal_(weight, gain=gain)
            elif init_type == "kaiming":
                nn.init.kaiming_normal_(weight, a=0, mode="fan_in")
            else:
                nn.init.orthogonal_(weight, gain=gain)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight, 1.0, gain)
            nn.init.zeros_(module.bias)
    return net
