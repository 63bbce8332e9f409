"""Layout, shape and loading tests for the image-to-image networks, weight init and the digit classifier."""

import math

import pytest
import torch
from torch import nn

from transfigure.models.classifier import DigitClassifier
from transfigure.models.discriminators import NLayerDiscriminator, PixelDiscriminator, build_discriminator
from transfigure.models.generators import (
    ReferenceLoadError,
    ResnetGenerator,
    UnetGenerator,
    build_generator,
    guess_reference_arch,
    load_reference_state_dict,
)
from transfigure.models.init import init_weights
from transfigure.models.norms import norm_layer, uses_bias


def fixed_input(*shape: int) -> torch.Tensor:
    """A deterministic input in [-1, 1] that does not depend on the random generator."""
    return torch.sin(torch.linspace(0, 20, math.prod(shape))).reshape(shape)


def count(net: nn.Module) -> tuple[int, int]:
    """(number of parameters, number of state-dict entries)."""
    return sum(p.numel() for p in net.parameters()), len(net.state_dict())


def on_meta(arch: str, **kwargs) -> nn.Module:
    # Meta tensors have shapes but no storage or initialisation, so full-size networks cost nothing.
    with torch.device("meta"):
        return build_generator(arch, **kwargs)


# Norms


def test_norm_layers():
    assert isinstance(norm_layer("instance", 4), nn.InstanceNorm2d)
    assert not norm_layer("instance", 4).affine and not norm_layer("instance", 4).track_running_stats
    assert isinstance(norm_layer("batch", 4), nn.BatchNorm2d) and norm_layer("batch", 4).affine
    assert isinstance(norm_layer("none", 4), nn.Identity)
    assert [uses_bias(k) for k in ("instance", "batch", "none")] == [True, False, False]
    with pytest.raises(ValueError, match="group"):
        norm_layer("group", 4)
    with pytest.raises(ValueError, match="layer"):
        uses_bias("layer")


# Parameter counts of the full-size reference networks


def test_resnet_counts():
    assert count(on_meta("resnet_9blocks")) == (11_378_179, 48)
    assert count(on_meta("resnet_6blocks"))[0] == 7_837_699


def test_unet_counts():
    # 82 counts state-dict entries: 43 parameter tensors plus 13 batch norms x 3 buffers
    # (running_mean, running_var, num_batches_tracked).
    net = on_meta("unet_256", norm="batch")
    assert count(net) == (54_413_955, 82)
    assert len(list(net.parameters())) == 43 and len(list(net.buffers())) == 39
    assert len(on_meta("unet_256", norm="instance").state_dict()) == 32


# Key names at the reference positions


def test_resnet_keys():
    keys = on_meta("resnet_9blocks").state_dict()
    for key in (
        "model.1.weight",
        "model.1.bias",
        "model.10.conv_block.1.weight",
        "model.10.conv_block.5.weight",
    ):
        assert key in keys
    assert keys["model.19.weight"].shape == (256, 128, 3, 3)  # ConvTranspose2d(256, 128)
    assert keys["model.26.weight"].shape == (3, 64, 7, 7) and "model.26.bias" in keys
    assert not any(k.startswith("model.2.") for k in keys)  # instance norm adds no keys

    dropout = on_meta("resnet_9blocks", dropout=True).state_dict()
    assert "model.10.conv_block.6.weight" in dropout and "model.10.conv_block.5.weight" not in dropout

    batch = on_meta("resnet_6blocks", norm="batch").state_dict()
    assert "model.1.bias" not in batch and "model.2.running_mean" in batch
    assert "model.23.bias" in batch  # the output conv keeps its bias; 6 blocks shift it from 26 to 23

    zero = on_meta("resnet_6blocks", padding="zero").state_dict()
    assert "model.10.conv_block.0.weight" in zero and "model.10.conv_block.3.weight" in zero


def test_unet_keys():
    net = on_meta("unet_256", norm="batch", dropout=True)
    keys = net.state_dict()
    assert keys["model.model.0.weight"].shape == (64, 3, 4, 4) and "model.model.0.bias" not in keys
    assert keys["model.model.3.weight"].shape == (128, 3, 4, 4) and "model.model.3.bias" in keys
    assert keys["model.model.1.model.1.weight"].shape == (128, 64, 4, 4)
    assert "model.model.1.model.2.running_mean" in keys
    assert keys["model.model.1.model.5.weight"].shape == (256, 64, 4, 4)
    innermost = "model.model.1" + ".model.3" * 6 + ".model."
    assert keys[innermost + "1.weight"].shape == (512, 512, 4, 4)
    assert keys[innermost + "3.weight"].shape == (512, 512, 4, 4)
    assert innermost + "4.running_mean" in keys
    assert isinstance(net.get_submodule("model.model.1.model.3.model.3.model.3.model.7"), nn.Dropout)


def test_nlayer_discriminator_layout():
    torch.manual_seed(0)
    net = NLayerDiscriminator()
    keys = net.state_dict()
    assert "model.0.bias" in keys and "model.11.bias" in keys
    assert "model.2.bias" not in keys and "model.3.running_mean" in keys
    assert keys["model.8.weight"].shape == (512, 256, 4, 4)
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    assert "model.2.bias" in NLayerDiscriminator(norm="instance").state_dict()
    assert build_discriminator("basic").state_dict().keys() == keys.keys()
    assert len(build_discriminator("n_layers", n_layers=2).model) == 9


def test_pixel_discriminator_layout():
    keys = PixelDiscriminator().state_dict()
    assert "net.0.bias" in keys and "net.5.weight" in keys and "net.3.running_mean" in keys
    assert "net.2.bias" not in keys and "net.5.bias" not in keys
    assert "net.5.bias" in PixelDiscriminator(norm="instance").state_dict()
    x = fixed_input(2, 6, 8, 8)
    assert build_discriminator("pixel", input_nc=6)(x).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="basic"):
        build_discriminator("multiscale")


def test_spectral_norm_wraps_every_conv():
    torch.manual_seed(0)
    patch = NLayerDiscriminator(ndf=8, norm="none", spectral_norm=True)
    pixel = PixelDiscriminator(ndf=8, spectral_norm=True)
    for net in (patch, pixel):
        convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
        assert convs and all(hasattr(m, "parametrizations") for m in convs)
    assert "model.0.parametrizations.weight.original" in patch.state_dict()
    out = patch(fixed_input(1, 3, 32, 32))
    assert out.shape == (1, 1, 2, 2)


# Output shapes


@pytest.mark.parametrize("size", [(32, 32), (64, 64), (100, 68)])
@pytest.mark.parametrize("upsample", ["transpose", "resize"])
def test_resnet_shapes(size, upsample):
    torch.manual_seed(0)
    net = build_generator("resnet_6blocks", ngf=8, upsample=upsample)
    assert net.size_multiple == 4
    with torch.no_grad():
        assert net(fixed_input(2, 3, *size)).shape == (2, 3, *size)


@pytest.mark.parametrize("upsample", ["transpose", "resize"])
def test_unet_shapes(upsample):
    torch.manual_seed(0)
    net = build_generator("unet_5down", ngf=8, upsample=upsample)
    assert net.size_multiple == 32
    with torch.no_grad():
        assert net(fixed_input(2, 3, 32, 64)).shape == (2, 3, 32, 64)
    assert on_meta("unet_256").size_multiple == 256 and on_meta("unet_128").size_multiple == 128


@torch.no_grad()
def test_unet_skip_matches_reference_in_place_activation():
    # The reference's in-place LeakyReLU also overwrites the skip copy of x; outputs must not change.
    torch.manual_seed(0)
    net = build_generator("unet_5down", ngf=8).eval()
    x = fixed_input(1, 3, 32, 32)
    ours = net(x)
    for module in net.modules():
        if isinstance(module, nn.LeakyReLU):
            module.inplace = True
    torch.testing.assert_close(net(x), ours, atol=0, rtol=0)


def test_conditional_generator_channels():
    torch.manual_seed(0)
    net = build_generator("unet_5down", input_nc=1, output_nc=2, ngf=4)
    assert net(fixed_input(1, 1, 32, 32)).shape == (1, 2, 32, 32)


def test_resize_upsampling_has_no_transposed_convs():
    for arch in ("resnet_9blocks", "unet_256"):
        transpose, resize = on_meta(arch), on_meta(arch, upsample="resize")
        assert any(isinstance(m, nn.ConvTranspose2d) for m in transpose.modules())
        assert not any(isinstance(m, nn.ConvTranspose2d) for m in resize.modules())
        assert any(isinstance(m, nn.Upsample) for m in resize.modules())
        # Same layout: every up-convolution slot holds a small Sequential instead, at the same index.
        for name, module in transpose.named_modules():
            if isinstance(module, nn.ConvTranspose2d):
                assert isinstance(resize.get_submodule(name), nn.Sequential)
            elif isinstance(module, nn.Sequential):
                assert len(resize.get_submodule(name)) == len(module)


def test_build_generator_names():
    assert isinstance(on_meta("resnet_6blocks"), ResnetGenerator)
    assert sum(1 for k in on_meta("resnet_3blocks").state_dict() if k.endswith("conv_block.1.weight")) == 3
    assert isinstance(on_meta("unet_128"), UnetGenerator)
    assert on_meta("unet_256").model.model[0].weight.shape == (64, 3, 4, 4)
    assert isinstance(on_meta("resnet_9blocks").model[2], nn.InstanceNorm2d)  # reference default norms
    assert isinstance(on_meta("unet_128").model.model[1].model[2], nn.BatchNorm2d)
    with pytest.raises(ValueError, match=r"resnet_<N>blocks"):
        build_generator("vgg16")
    with pytest.raises(ValueError, match="num_downs"):
        build_generator("unet_4down")
    with pytest.raises(ValueError, match="padding"):
        build_generator("resnet_6blocks", padding="circular")
    with pytest.raises(ValueError, match="upsample"):
        build_generator("unet_128", upsample="bilinear")


# Loading reference checkpoints


def reference_style(net: nn.Module, prefix: str = "module.") -> dict:
    """Our state dict as the reference would save it from DataParallel, with pre-0.4 instance-norm stats."""
    sd = {prefix + k: v.clone() for k, v in net.state_dict().items()}
    for norm_key in ("model.2", "model.10.conv_block.2", "model.11.conv_block.6"):
        sd[f"{prefix}{norm_key}.running_mean"] = torch.zeros(8)
        sd[f"{prefix}{norm_key}.running_var"] = torch.ones(8)
        sd[f"{prefix}{norm_key}.num_batches_tracked"] = torch.tensor(0)
    return sd


def test_load_reference_checkpoint():
    torch.manual_seed(0)
    source = build_generator("resnet_6blocks", ngf=8)
    target = build_generator("resnet_6blocks", ngf=8)
    load_reference_state_dict(target, reference_style(source))
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key]), key
    load_reference_state_dict(target, reference_style(source, prefix="_orig_mod.module."))


def test_load_batch_norm_checkpoint_without_num_batches_tracked():
    torch.manual_seed(0)
    source = build_generator("unet_5down", ngf=4)
    sd = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    load_reference_state_dict(build_generator("unet_5down", ngf=4), sd)


def test_load_reference_errors_name_the_keys():
    torch.manual_seed(0)
    net = build_generator("resnet_6blocks", ngf=8)

    sd = reference_style(net)
    sd["module.model.99.weight"] = torch.zeros(1)
    with pytest.raises(ReferenceLoadError, match=r"unexpected keys \(1\): model\.99\.weight"):
        load_reference_state_dict(net, sd)

    sd = reference_style(net)
    sd["module.model.1.weight"] = torch.zeros(8, 3, 3, 3)
    with pytest.raises(ReferenceLoadError, match=r"shape mismatches \(1\): model\.1\.weight"):
        load_reference_state_dict(net, sd)

    sd = reference_style(net)
    del sd["module.model.23.bias"]
    with pytest.raises(ReferenceLoadError, match=r"missing keys \(1\): model\.23\.bias"):
        load_reference_state_dict(net, sd)

    # Running stats are only legacy at instance-norm positions; on a conv they are an error.
    sd = reference_style(net)
    sd["module.model.1.running_mean"] = torch.zeros(8)
    with pytest.raises(ReferenceLoadError, match=r"model\.1\.running_mean"):
        load_reference_state_dict(net, sd)

    # A batch-norm checkpoint does not fit an instance-norm network.
    with pytest.raises(ReferenceLoadError, match="unexpected keys"):
        load_reference_state_dict(net, build_generator("resnet_6blocks", ngf=8, norm="batch").state_dict())
    assert issubclass(ReferenceLoadError, ValueError)


@pytest.mark.parametrize(
    ("arch", "kwargs", "expected"),
    [
        (
            "resnet_6blocks",
            {"norm": "instance"},
            {"norm": "instance", "dropout": False, "padding": "reflect"},
        ),
        ("resnet_9blocks", {"norm": "batch", "dropout": True}, {"norm": "batch", "dropout": True}),
        ("resnet_2blocks", {"norm": "none", "padding": "zero"}, {"norm": "none", "padding": "zero"}),
        ("unet_128", {"norm": "batch", "dropout": True}, {"norm": "batch", "dropout": True}),
        ("unet_256", {"norm": "instance"}, {"norm": "instance"}),
        ("unet_5down", {"norm": "none", "upsample": "resize"}, {"norm": "none", "upsample": "resize"}),
    ],
)
def test_guess_reference_arch(arch, kwargs, expected):
    net = on_meta(arch, ngf=16, **kwargs)
    guess = guess_reference_arch({"module." + k: v for k, v in net.state_dict().items()})
    assert guess["arch"] == arch and guess["ngf"] == 16
    assert guess["input_nc"] == 3 and guess["output_nc"] == 3
    assert {k: guess[k] for k in expected} == expected


def test_guess_reference_arch_legacy_instance_norm():
    torch.manual_seed(0)
    guess = guess_reference_arch(reference_style(build_generator("resnet_6blocks", ngf=8)))
    assert guess["norm"] == "instance" and guess["arch"] == "resnet_6blocks"
    with pytest.raises(ValueError, match="neither"):
        guess_reference_arch(NLayerDiscriminator().state_dict())


# Stored outputs: these change if a layer is added, removed, reordered or re-parameterised.
# Values were computed once with this code (seed 0, default PyTorch initialisation, eval mode).


def summary(out: torch.Tensor) -> torch.Tensor:
    return torch.cat([out.sum().reshape(1), out.abs().mean().reshape(1), out.flatten()[:4]])


@torch.no_grad()
def test_stored_outputs():
    torch.manual_seed(0)
    resnet = ResnetGenerator(ngf=8, n_blocks=2).eval()
    torch.manual_seed(0)
    unet = build_generator("unet_5down", ngf=8).eval()
    torch.manual_seed(0)
    patch = NLayerDiscriminator(ndf=8).eval()

    expected = {
        "resnet": (resnet(fixed_input(1, 3, 16, 16)), RESNET_EXPECTED),
        "unet": (unet(fixed_input(1, 3, 32, 32)), UNET_EXPECTED),
        "nlayer": (patch(fixed_input(1, 3, 64, 64)), NLAYER_EXPECTED),
    }
    for name, (out, values) in expected.items():
        torch.testing.assert_close(summary(out), torch.tensor(values), atol=1e-4, rtol=1e-5, msg=name)


RESNET_EXPECTED = [67.929611, 0.296349, 0.165100, -0.349648, -0.221742, -0.201293]
UNET_EXPECTED = [-154.747971, 0.106627, -0.105651, -0.092772, -0.120121, -0.079882]
NLAYER_EXPECTED = [-1.110375, 0.030844, -0.026740, -0.032664, -0.030478, -0.030749]


# Initialisation


def test_init_normal_std():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(256, 256, 3), nn.BatchNorm2d(256), nn.ConvTranspose2d(256, 8, 3))
    init_weights(net, "normal", 0.02)
    assert abs(net[0].weight.std().item() - 0.02) < 0.001
    assert abs(net[0].weight.mean().item()) < 0.001
    assert torch.all(net[0].bias == 0) and torch.all(net[2].bias == 0) and torch.all(net[1].bias == 0)
    assert abs(net[1].weight.mean().item() - 1.0) < 0.01


@pytest.mark.parametrize("init_type", ["normal", "xavier", "kaiming", "orthogonal"])
def test_init_types_and_spectral_norm(init_type):
    torch.manual_seed(0)
    net = NLayerDiscriminator(ndf=8, spectral_norm=True)
    before = net.model[0].parametrizations.weight.original.clone()
    assert init_weights(net, init_type) is net
    assert not torch.equal(before, net.model[0].parametrizations.weight.original)
    assert torch.all(net.model[0].bias == 0)
    assert torch.isfinite(net(fixed_input(1, 3, 32, 32))).all()


def test_init_unknown_type():
    with pytest.raises(ValueError, match="uniform"):
        init_weights(nn.Linear(2, 2), "uniform")


# Digit classifier


@pytest.mark.parametrize("size", [28, 32, 64])
def test_digit_classifier_shapes(size):
    torch.manual_seed(0)
    net = DigitClassifier().eval()
    x = fixed_input(2, 3, size, size)
    assert net(x).shape == (2, 10)
    assert net.features(x).shape == (2, 128)
    assert DigitClassifier(in_channels=1, n_classes=5)(fixed_input(2, 1, 32, 32)).shape == (2, 5)
