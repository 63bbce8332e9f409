"""Normalizing flows against known answers: exact inverses, log-determinants equal to autograd's Jacobian, the
entropy of Gaussian data reached by maximum likelihood, and 8 bits per dimension for uniform 8-bit noise."""

import copy
import math

import pytest
import torch

from transfigure.models.flows import (
    ActNorm,
    AffineCoupling,
    InvConv1x1,
    bits_per_dim,
    standard_normal_log_prob,
    unitriangular_inverse,
)
from transfigure.models.image_flows import AlignedTranslator, DequantizeLogit, FlowSampler, ImageFlow, RealNVP

GAUSSIAN_ENTROPY = 0.5 * math.log(2 * math.pi * math.e)  # 1.4189 nats per dimension for N(0, 1)


def perturbed(module: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Moves every parameter off its initial value, so identity-initialised layers are really tested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * scale)
    return module


def initialised(flow: torch.nn.Module, x: torch.Tensor, scale: float = 0.1) -> torch.nn.Module:
    """Runs one training-mode batch (actnorm's data-dependent init), then perturbs and switches to eval."""
    flow.train()
    flow(x)
    return perturbed(flow, scale).eval()


def autograd_log_det(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det J| of fn at one input, from the full Jacobian of the flattened map."""
    jacobian = torch.autograd.functional.jacobian(lambda v: fn(v.view_as(x)).flatten(), x.flatten())
    return torch.linalg.slogdet(jacobian)[1]


LAYERS = {
    "actnorm": lambda: ActNorm(4, orient=True),
    "invconv": lambda: InvConv1x1(4),
    "coupling-checkerboard": lambda: AffineCoupling(4, "checkerboard", False, 8, 1),
    "coupling-checkerboard-flipped": lambda: AffineCoupling(4, "checkerboard", True, 8, 1),
    "coupling-channel": lambda: AffineCoupling(4, "channel", False, 8, 1),
    "coupling-channel-flipped": lambda: AffineCoupling(4, "channel", True, 8, 1),
    "realnvp": lambda: RealNVP(4, n_scales=2, n_couplings=2, hidden_channels=8, n_res_blocks=1, invconv=True),
    "realnvp-3-scales": lambda: RealNVP(2, n_scales=3, n_couplings=1, hidden_channels=8, n_res_blocks=1),
}


@pytest.mark.parametrize("name", LAYERS)
def test_inverse_undoes_forward(name):
    torch.manual_seed(0)
    layer = LAYERS[name]()
    channels = 2 if name == "realnvp-3-scales" else 4
    x = torch.randn(8, channels, 8, 8) * 2 + 0.5
    layer = initialised(layer, x)
    with torch.no_grad():
        y, log_det = layer(x)
        assert y.shape == x.shape and log_det.shape == (8,)
        assert (layer.inverse(y) - x).abs().max() < 1e-4
        assert (y - x).abs().max() > 1e-2, "the perturbed layer should not be the identity"


@pytest.mark.parametrize("name", LAYERS)
def test_log_det_equals_autograd_jacobian(name):
    torch.manual_seed(1)
    channels = 2 if name == "realnvp-3-scales" else 4
    layer = initialised(LAYERS[name](), torch.randn(8, channels, 4, 4) * 2 + 0.5).double()
    x = torch.randn(1, channels, 4, 4, dtype=torch.float64)
    expected = autograd_log_det(lambda v: layer(v)[0], x)
    assert torch.allclose(layer(x)[1], expected, atol=1e-8)


def test_image_flow_log_det_includes_the_preprocessing():
    torch.manual_seed(2)
    images = torch.randint(0, 256, (8, 3, 4, 4)).float() / 127.5 - 1
    flow = initialised(ImageFlow(3, 4, n_scales=2, n_couplings=2, hidden_channels=8, n_res_blocks=1), images)
    flow = flow.double()
    x = images[:1].double()
    # log_det is relative to pixel values u = 127.5 (x + 1) + 1/2, so d/dx adds D log 127.5.
    expected = autograd_log_det(lambda v: flow(v)[0], x) - x.numel() * math.log(127.5)
    assert torch.allclose(flow(x)[1], expected, atol=1e-8)


def test_image_flow_round_trip_and_sampling():
    torch.manual_seed(3)
    images = torch.randint(0, 256, (6, 3, 8, 8)).float() / 127.5 - 1
    flow = ImageFlow(3, 8, n_scales=3, n_couplings=2, hidden_channels=8, n_res_blocks=1, invconv=True)
    flow = initialised(flow, images, scale=0.03)
    with torch.no_grad():
        z, log_det = flow(images)
        assert z.shape == images.shape and log_det.shape == (6,)
        assert (flow.inverse(z) - images).abs().max() < 1e-4
        # Eval-mode forward is deterministic (bin midpoints); log_prob dequantises with noise every call.
        assert torch.equal(flow(images)[0], z)
        assert not torch.equal(flow.log_prob(images), flow.log_prob(images))
        samples = flow.sample(5, temperature=0.7)
    assert samples.shape == (5, 3, 8, 8) and samples.min() >= -1 and samples.max() <= 1
    assert flow.size_multiple == 4


def test_actnorm_initialises_from_the_first_training_batch_only():
    torch.manual_seed(4)
    layer = ActNorm(3, orient=True)
    # Channel 0 has a heavy negative tail (dark ink on light paper), channel 1 a positive one, 2 is symmetric-ish.
    x = torch.randn(64, 3, 4, 4) * torch.tensor([2.0, 0.5, 1.0])[:, None, None] + 3
    x[:, 0] -= 6 * (torch.rand(64, 4, 4) < 0.1)
    x[:, 1] += 6 * (torch.rand(64, 4, 4) < 0.1)
    layer.eval()
    assert torch.equal(layer(x)[0], x), "an uninitialised actnorm is the identity and eval mode never initialises"
    layer.train()
    y, _ = layer(x)
    assert torch.allclose(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)
    assert (y[:, :2] - y[:, :2].mean()).pow(3).mean((0, 2, 3)).min() > 0, "orient makes the heavy tails positive"
    assert layer.sign[0, 0].item() == -1 and layer.sign[0, 1].item() == 1
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(x * 5 + 1)
    assert all(torch.equal(state[k], v) for k, v in layer.state_dict().items()), "the second batch must not re-init"


@pytest.mark.parametrize("channels", [1, 2, 3, 5, 12, 48])
def test_invconv_inverse_weight_is_the_matrix_inverse(channels):
    torch.manual_seed(channels)
    layer = perturbed(InvConv1x1(channels), scale=0.3).double()
    eye = torch.eye(channels, dtype=torch.float64)
    assert torch.allclose(layer.inverse_weight() @ layer.weight(), eye, atol=1e-10)
    assert torch.allclose(layer.log_scale.sum(), torch.linalg.slogdet(layer.weight())[1])
    strictly_lower = torch.randn(channels, channels, dtype=torch.float64).tril(-1)
    assert torch.allclose(unitriangular_inverse(strictly_lower) @ (eye + strictly_lower), eye, atol=1e-9)


@pytest.mark.parametrize("kind", ["checkerboard", "channel"])
def test_coupling_masks_keep_half_and_alternate(kind):
    x = torch.randn(2, 4, 6, 6)
    layers = [AffineCoupling(4, kind, flip, 8, 1) for flip in (False, True)]
    masks = [layer.mask(x).expand_as(x) for layer in layers]
    assert torch.equal(masks[0] + masks[1], torch.ones_like(x)), "flipped masks are complementary"
    assert masks[0].mean() == 0.5
    layer = perturbed(layers[0])
    y, _ = layer(x)
    kept = masks[0].bool()
    assert torch.equal(y[kept], x[kept]) and not torch.allclose(y[~kept], x[~kept])
    with pytest.raises(ValueError, match="even number"):
        AffineCoupling(3, "channel", False, 8, 1)


@pytest.fixture
def one_thread():
    """Tiny networks: on shared cores a second thread's hand-offs cost more than it computes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fit(flow: torch.nn.Module, data, steps: int, lr: float) -> None:
    optimizer = torch.optim.Adam(flow.parameters(), lr=lr)
    flow.train()
    for step in range(steps):
        loss = -flow.log_prob(data(step)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    flow.eval()


@pytest.mark.parametrize("correlated", [False, True])
def test_maximum_likelihood_on_gaussian_data_reaches_its_entropy(correlated, one_thread):
    torch.manual_seed(5)
    channels = 4
    # x = mean + A eps per pixel, A lower-triangular: the entropy per dimension is 1.4189 + mean(log |diag A|).
    mix = torch.eye(channels)
    if correlated:
        mix = torch.tensor([[0.5, 0, 0, 0], [1.0, 2.0, 0, 0], [-0.5, 0.3, 0.25, 0], [0.2, -1.0, 0.5, 1.5]])
    mean = torch.tensor([1.0, -2.0, 0.5, 3.0]) if correlated else torch.zeros(channels)
    entropy = GAUSSIAN_ENTROPY + mix.diagonal().log().mean().item()

    def data(step: int) -> torch.Tensor:
        eps = torch.randn(128, channels, 4, 4, generator=torch.Generator().manual_seed(step))
        return torch.einsum("ij,njhw->nihw", mix, eps) + mean[:, None, None]

    flow = RealNVP(channels, n_scales=2, n_couplings=2, hidden_channels=8, n_res_blocks=1, invconv=True)
    fit(flow, data, steps=100, lr=2e-2)
    with torch.no_grad():
        held_out = torch.cat([data(10_000 + i) for i in range(16)])
        nll = -flow.log_prob(held_out).mean().item() / held_out[0].numel()
    # Cross-entropy is never below the entropy; the tolerance covers the sampling error of the estimate.
    assert entropy - 0.01 < nll < entropy + 0.05, (nll, entropy)


def test_preprocessing_scores_exactly_8_bits_under_the_uniform_density():
    """Known answer for the Jacobian convention: if u is uniform on [0, 256)^D, then y = logit(alpha + (1 - 2 alpha)
    u / 256) has density sigmoid(y)(1 - sigmoid(y)) / (1 - 2 alpha), and log p(y) + log|dy/du| = -D log 256 exactly."""
    preprocess = DequantizeLogit(alpha=0.05)
    x = torch.randint(0, 256, (16, 3, 4, 4)).double() / 127.5 - 1
    y, log_det = preprocess(x, noise=True)
    log_density_y = (torch.sigmoid(y) * torch.sigmoid(-y) / 0.9).log().flatten(1).sum(1)
    assert torch.allclose(bits_per_dim(log_density_y + log_det, 48), torch.full((16,), 8.0, dtype=torch.float64))


def test_uniform_8_bit_noise_scores_8_bits_per_dimension_at_the_optimum(one_thread):
    def noise(step: int, n: int = 256) -> torch.Tensor:
        generator = torch.Generator().manual_seed(step)
        return torch.randint(0, 256, (n, 3, 4, 4), generator=generator).float() / 127.5 - 1

    def mean_bits(flow) -> float:
        with torch.no_grad():
            return bits_per_dim(flow.eval().log_prob(noise(10_000, 2048)), 48).mean().item()

    torch.manual_seed(6)
    flow = ImageFlow(3, 4, n_scales=1, n_couplings=2, hidden_channels=8, n_res_blocks=1)
    # Known answer before training: the core is the identity, so each logit pixel y is scored by N(0, 1) and the
    # excess over 8 bits is KL(law of y || N(0, 1)), by quadrature over u / 256 = t uniform on (0, 1).
    t = (torch.arange(1_000_000, dtype=torch.float64) + 0.5) / 1_000_000
    p = 0.05 + 0.9 * t
    y = p.log() - (-p).log1p()
    entropy_y = -(p * (1 - p) / 0.9).log().mean()
    cross_entropy_y = 0.5 * math.log(2 * math.pi) + 0.5 * y.pow(2).mean()
    assert mean_bits(flow) == pytest.approx(8 + (cross_entropy_y - entropy_y).item() / math.log(2), abs=0.02)

    fit(flow, noise, steps=150, lr=1e-2)
    fitted = mean_bits(flow)
    # 8 is the entropy of the dequantised noise: no model goes below it beyond the estimate's sampling error.
    assert 8.0 - 0.01 < fitted < 8.1
    worse = perturbed(copy.deepcopy(flow), scale=0.3)
    assert mean_bits(worse) > fitted


def test_standard_normal_log_prob_and_bits_per_dim():
    z = torch.zeros(2, 3, 4, 4)
    assert torch.allclose(standard_normal_log_prob(z), torch.full((2,), -24 * math.log(2 * math.pi)))
    assert bits_per_dim(torch.tensor([-48 * math.log(2)]), 48).item() == pytest.approx(1.0)


def test_translators_are_exact_inverses_and_export_with_dynamic_shapes():
    torch.manual_seed(7)
    a = torch.rand(8, 3, 8, 8) * 1.6 - 0.8
    b = -0.5 * a.flip(1)
    flow_a = initialised(ImageFlow(3, 8, n_scales=2, n_couplings=2, hidden_channels=8, n_res_blocks=1), a, 0.02)
    flow_b = initialised(ImageFlow(3, 8, n_scales=2, n_couplings=2, hidden_channels=8, n_res_blocks=1), b, 0.02)
    a_to_b, b_to_a = AlignedTranslator(flow_a, flow_b), AlignedTranslator(flow_b, flow_a)
    with torch.no_grad():
        fake_b = a_to_b(a)
        # Exact wherever the output needed no clamping to [-1, 1]; here that is every image.
        assert fake_b.abs().max() < 1
        assert (b_to_a(fake_b) - a).abs().max() < 1e-4
    # No data-dependent Python control flow: the translator exports with symbolic batch, height and width.
    dims = {"x": {0: torch.export.Dim("n"), 2: torch.export.Dim("h", min=1) * 2, 3: torch.export.Dim("w", min=1) * 2}}
    program = torch.export.export(a_to_b, (torch.zeros(2, 3, 8, 6),), dynamic_shapes=dims)
    other = torch.rand(3, 3, 10, 4) * 2 - 1
    assert torch.allclose(program.module()(other), a_to_b(other), atol=1e-5)
    sampler = FlowSampler(flow_b)
    z = torch.randn(4, 3, 8, 8)
    assert torch.equal(sampler(z), flow_b.inverse(z).clamp(-1, 1))
