"""Image-to-image generators with the reference CycleGAN/pix2pix layout, so its checkpoints load strictly.

Module names, order and bias rules follow junyanz/pytorch-CycleGAN-and-pix2pix; state-dict keys such as
``model.10.conv_block.1.weight`` or ``model.model.1.model.3.weight`` therefore match its saved files.
"""

import re

import torch
from torch import nn

from transfigure.models.norms import norm_layer, uses_bias

PADDINGS = ("reflect", "replicate", "zero")
UPSAMPLES = ("transpose", "resize")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(choices)}")


def resize_conv(in_channels: int, out_channels: int, bias: bool, padding_mode: str = "zeros") -> nn.Module:
    """Resize-convolution (Odena et al. 2016): nearest 2x upsampling then a 3x3 conv, in place of a stride-2
    ConvTranspose2d, to avoid checkerboard artifacts."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(in_channels, out_channels, 3, padding=1, padding_mode=padding_mode, bias=bias),
    )


def _pad_layers(padding: str) -> list[nn.Module]:
    _check_choice("padding", padding, PADDINGS)
    if padding == "reflect":
        return [nn.ReflectionPad2d(1)]
    if padding == "replicate":
        return [nn.ReplicationPad2d(1)]
    return []


class ResnetBlock(nn.Module):
    """Residual block with two 3x3 convolutions (He et al. 2016), as used in CycleGAN (Zhu et al. 2017)."""

    def __init__(self, channels: int, norm: str = "instance", dropout: bool = False, padding: str = "reflect"):
        super().__init__()
        bias = uses_bias(norm)
        # Zero padding is done by the convolution itself; the other modes add a padding layer before it.
        conv_padding = 1 if padding == "zero" else 0
        layers = [
            *_pad_layers(padding),
            nn.Conv2d(channels, channels, 3, padding=conv_padding, bias=bias),
            norm_layer(norm, channels),
            nn.ReLU(inplace=True),
        ]
        if dropout:
            layers.append(nn.Dropout(0.5))
        layers += [
            *_pad_layers(padding),
            nn.Conv2d(channels, channels, 3, padding=conv_padding, bias=bias),
            norm_layer(norm, channels),
        ]
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    """ResNet encoder-decoder generator of CycleGAN (Zhu et al. 2017), after Johnson et al. 2016."""

    def __init__(
        self,
        input_nc: int = 3,
        output_nc: int = 3,
        ngf: int = 64,
        norm: str = "instance",
        dropout: bool = False,
        n_blocks: int = 9,
        padding: str = "reflect",
        upsample: str = "transpose",
        tanh: bool = True,
    ):
        super().__init__()
        _check_choice("upsample", upsample, UPSAMPLES)
        _check_choice("padding", padding, PADDINGS)
        if n_blocks < 0:
            raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")
        bias = uses_bias(norm)
        # Two stride-2 downsamplings then two 2x upsamplings: sizes must divide by 4 to come back exactly.
        self.size_multiple = 4

        # The stem and head always reflect-pad, as in the reference; `padding` only applies inside the blocks.
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(input_nc, ngf, 7, bias=bias),
            norm_layer(norm, ngf),
            nn.ReLU(inplace=True),
        ]
        for mult in (1, 2):
            layers += [
                nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=bias),
                norm_layer(norm, ngf * mult * 2),
                nn.ReLU(inplace=True),
            ]
        layers += [ResnetBlock(ngf * 4, norm, dropout, padding) for _ in range(n_blocks)]
        for mult in (4, 2):
            if upsample == "transpose":
                up = nn.ConvTranspose2d(
                    ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1, bias=bias
                )
            else:
                up = resize_conv(ngf * mult, ngf * mult // 2, bias, "zeros" if padding == "zero" else padding)
            layers += [up, norm_layer(norm, ngf * mult // 2), nn.ReLU(inplace=True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7)] + ([nn.Tanh()] if tanh else [])
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class UnetSkipBlock(nn.Module):
    """One level of the U-Net generator of pix2pix (Isola et al. 2017), after Ronneberger et al. 2015: it
    downsamples, runs `submodule`, upsamples and (except at the outermost level) concatenates its input."""

    def __init__(
        self,
        outer_nc: int,
        inner_nc: int,
        input_nc: int | None = None,
        submodule: nn.Module | None = None,
        outermost: bool = False,
        innermost: bool = False,
        norm: str = "batch",
        dropout: bool = False,
        upsample: str = "transpose",
    ):
        super().__init__()
        _check_choice("upsample", upsample, UPSAMPLES)
        self.outermost = outermost
        bias = uses_bias(norm)
        input_nc = outer_nc if input_nc is None else input_nc
        # The innermost level has no skip below it, so its up-convolution sees only inner_nc channels.
        up_in = inner_nc if innermost else inner_nc * 2
        # The outermost up-convolution produces the image and always has a bias, as in the reference.
        up_bias = True if outermost else bias
        if upsample == "transpose":
            upconv = nn.ConvTranspose2d(up_in, outer_nc, 4, stride=2, padding=1, bias=up_bias)
        else:
            upconv = resize_conv(up_in, outer_nc, up_bias)
        downconv = nn.Conv2d(input_nc, inner_nc, 4, stride=2, padding=1, bias=bias)

        if outermost:
            layers = [downconv, submodule, nn.ReLU(inplace=True), upconv, nn.Tanh()]
        elif innermost:
            layers = [nn.LeakyReLU(0.2), downconv, nn.ReLU(inplace=True), upconv, norm_layer(norm, outer_nc)]
        else:
            layers = [
                nn.LeakyReLU(0.2),
                downconv,
                norm_layer(norm, inner_nc),
                submodule,
                nn.ReLU(inplace=True),
                upconv,
                norm_layer(norm, outer_nc),
            ]
            if dropout:
                layers.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        # The reference's in-place LeakyReLU also activates this copy of x; the parent's ReLU cancels that.
        return torch.cat([x, self.model(x)], dim=1)


class UnetGenerator(nn.Module):
    """U-Net generator of pix2pix (Isola et al. 2017) with `num_downs` stride-2 levels."""

    def __init__(
        self,
        input_nc: int = 3,
        output_nc: int = 3,
        num_downs: int = 8,
        ngf: int = 64,
        norm: str = "batch",
        dropout: bool = False,
        upsample: str = "transpose",
        tanh: bool = True,
    ):
        super().__init__()
        if num_downs < 5:
            raise ValueError(f"num_downs must be >= 5 (four outer levels and the innermost), got {num_downs}")
        # Every level halves the size, so H and W must divide by 2**num_downs to reach the innermost 1x1.
        self.size_multiple = 2**num_downs
        opts = {"norm": norm, "upsample": upsample}
        block = UnetSkipBlock(ngf * 8, ngf * 8, innermost=True, **opts)
        for _ in range(num_downs - 5):
            block = UnetSkipBlock(ngf * 8, ngf * 8, submodule=block, dropout=dropout, **opts)
        for mult in (4, 2, 1):
            block = UnetSkipBlock(ngf * mult, ngf * mult * 2, submodule=block, **opts)
        self.model = UnetSkipBlock(output_nc, ngf, input_nc=input_nc, submodule=block, outermost=True, **opts)
        if not tanh:  # logits (a label map's classes): the last up-convolution stays linear
            del self.model.model[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


ARCH_FORMS = "resnet_9blocks, resnet_6blocks, resnet_<N>blocks, unet_256, unet_128, unet_<depth>down"
DEFAULT_NORM = {"resnet": "instance", "unet": "batch"}


def _parse_arch(arch: str) -> tuple[str, int]:
    """Split an architecture name into ("resnet", n_blocks) or ("unet", num_downs)."""
    named_unets = {"unet_256": 8, "unet_128": 7}
    if arch in named_unets:
        return "unet", named_unets[arch]
    match = re.fullmatch(r"resnet_(\d+)blocks", arch)
    if match:
        return "resnet", int(match.group(1))
    match = re.fullmatch(r"unet_(\d+)down", arch)
    if match:
        return "unet", int(match.group(1))
    raise ValueError(f"unknown generator architecture {arch!r}; valid forms: {ARCH_FORMS}")


def build_generator(
    arch: str,
    input_nc: int = 3,
    output_nc: int = 3,
    ngf: int = 64,
    norm: str | None = None,
    dropout: bool = False,
    upsample: str = "transpose",
    padding: str = "reflect",
    tanh: bool = True,
) -> nn.Module:
    """Build a generator by name; `norm=None` picks the reference default (instance: ResNet, batch: U-Net).

    `padding` applies to ResNet blocks only ("reflect", "replicate" or "zero"). `tanh=False` leaves the last
    layer linear, for `output_nc` logits instead of an image in [-1, 1].
    """
    family, depth = _parse_arch(arch)
    norm = DEFAULT_NORM[family] if norm is None else norm
    if family == "resnet":
        return ResnetGenerator(input_nc, output_nc, ngf, norm, dropout, depth, padding, upsample, tanh)
    return UnetGenerator(input_nc, output_nc, depth, ngf, norm, dropout, upsample, tanh)


class ReferenceLoadError(ValueError):
    """A checkpoint's keys or shapes do not match the network it is being loaded into."""


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _strip_wrapper_prefix(key: str) -> str:
    """Remove the DataParallel/DDP (`module.`) and torch.compile (`_orig_mod.`) prefixes, however nested."""
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _listing(title: str, items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")
    return f"{title} ({len(items)}): {shown}"


def load_reference_state_dict(net: nn.Module, state_dict: dict) -> None:
    """Load a reference (or our own) checkpoint into `net` with strict key and shape matching.

    Accepts `module.`/`_orig_mod.` prefixes and the running-stat keys that pre-0.4 PyTorch saved for instance
    norm layers; anything else that does not match raises ReferenceLoadError listing the offending keys.
    """
    modules = dict(net.named_modules())
    expected = net.state_dict()
    cleaned = {}
    for key, value in state_dict.items():
        key = _strip_wrapper_prefix(key)
        module_path, _, leaf = key.rpartition(".")
        is_legacy_stat = leaf in _RUNNING_STATS and key not in expected
        if is_legacy_stat and isinstance(modules.get(module_path), nn.InstanceNorm2d):
            continue
        cleaned[key] = value
    # Batch-norm files saved before PyTorch 0.4.1 lack num_batches_tracked, which never changes outputs.
    for key, value in expected.items():
        module_path, _, leaf = key.rpartition(".")
        is_batch_norm = isinstance(modules.get(module_path), nn.BatchNorm2d)
        if leaf == "num_batches_tracked" and is_batch_norm and key not in cleaned:
            cleaned[key] = value.clone()

    missing = [k for k in expected if k not in cleaned]
    unexpected = [k for k in cleaned if k not in expected]
    mismatched = [
        f"{k} (checkpoint {tuple(v.shape)}, network {tuple(expected[k].shape)})"
        for k, v in cleaned.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = [
            _listing(title, items)
            for title, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", mismatched),
            )
            if items
        ]
        raise ReferenceLoadError(f"checkpoint does not match {type(net).__name__}: " + "; ".join(parts))
    net.load_state_dict(cleaned, strict=True)


def _guess_norm(state_dict: dict, conv: str, norm: str) -> str:
    """Instance-norm convs carry biases; batch norm adds affine weights at the norm position; else no norm."""
    if f"{conv}.bias" in state_dict:
        return "instance"
    if f"{norm}.weight" in state_dict or f"{norm}.running_mean" in state_dict:
        return "batch"
    return "none"


def _guess_resnet(sd: dict) -> dict:
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"model\.(\d+)\.conv_block\.", k))})
    first = blocks[0]
    block_convs = sorted(
        int(m.group(1))
        for k, v in sd.items()
        if (m := re.fullmatch(rf"model\.{first}\.conv_block\.(\d+)\.weight", k)) and v.dim() == 4
    )
    conv_a, conv_b = block_convs
    # A block's first conv sits at 0 only with zero padding, which needs no padding layer.
    padding = "zero" if conv_a == 0 else "reflect"
    pad_layers = 0 if conv_a == 0 else 1
    # Between the two convs lie norm, ReLU, the padding layer and, with dropout, a Dropout layer.
    dropout = conv_b - conv_a - 1 == 2 + pad_layers + 1
    up = blocks[-1] + 1
    head = max(int(m.group(1)) for k in sd if (m := re.fullmatch(r"model\.(\d+)\.weight", k)))
    return {
        "arch": f"resnet_{len(blocks)}blocks",
        "norm": _guess_norm(sd, "model.1", "model.2"),
        "dropout": dropout,
        "ngf": sd["model.1.weight"].shape[0],
        "input_nc": sd["model.1.weight"].shape[1],
        "output_nc": sd[f"model.{head}.weight"].shape[0],
        "padding": padding,
        "upsample": "resize" if f"model.{up}.1.weight" in sd else "transpose",
    }


def _guess_unet(sd: dict) -> dict:
    num_downs = 1
    prefix = "model.model.1.model."
    while any(k.startswith(prefix) for k in sd):
        num_downs += 1
        prefix += "3.model."
    resize = "model.model.3.1.weight" in sd
    output_nc = sd["model.model.3.1.weight"].shape[0] if resize else sd["model.model.3.weight"].shape[1]
    return {
        "arch": {8: "unet_256", 7: "unet_128"}.get(num_downs, f"unet_{num_downs}down"),
        "norm": _guess_norm(sd, "model.model.0", "model.model.1.model.2"),
        # Dropout layers hold no weights, so a U-Net file cannot show them; pix2pix trains with dropout on.
        "dropout": True,
        "ngf": sd["model.model.0.weight"].shape[0],
        "input_nc": sd["model.model.0.weight"].shape[1],
        "output_nc": output_nc,
        "upsample": "resize" if resize else "transpose",
    }


def guess_reference_arch(state_dict: dict) -> dict:
    """Guess the generator flags a checkpoint was trained with, from its keys and shapes alone.

    Returns "arch", "norm", "dropout", "ngf", "input_nc", "output_nc" and "upsample", plus "padding" for
    ResNet ("reflect" also stands for "replicate"). U-Net dropout leaves no trace in a state dict and is
    reported as True, the pix2pix default. Raises ValueError when the keys fit neither generator.
    """
    sd = {_strip_wrapper_prefix(k): v for k, v in state_dict.items()}
    if any(re.match(r"model\.\d+\.conv_block\.", k) for k in sd):
        return _guess_resnet(sd)
    if "model.model.0.weight" in sd:
        return _guess_unet(sd)
    raise ValueError("state dict matches neither the ResNet nor the U-Net generator layout")
