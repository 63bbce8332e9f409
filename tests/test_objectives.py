"""The GAN objectives against known closed-form answers and small toy trainings."""

import math

import pytest
import torch
from torch import nn

from transfigure.models import objectives

ALL = ["minimax", "nsgan", "lsgan", "wgan", "wgan-gp", "wgan-lp", "hinge"]
PENALISED = ["wgan-gp", "wgan-lp"]


def test_names_lists_every_objective():
    assert objectives.names() == ALL


@pytest.mark.parametrize(
    "name, params, score, d_expected, g_expected",
    [
        # D = sigmoid(0) = 1/2 everywhere: the value function is -2 ln 2 at the global optimum.
        ("minimax", {}, 0.0, 2 * math.log(2), -math.log(2)),
        ("nsgan", {}, 0.0, 2 * math.log(2), math.log(2)),
        ("lsgan", {}, 0.5, 0.25, 0.125),
        ("lsgan", {"a": -1, "b": 1, "c": 0}, 0.0, 1.0, 0.0),
        ("hinge", {}, 0.0, 2.0, 0.0),
        ("wgan", {}, 0.0, 0.0, 0.0),
    ],
)
def test_losses_at_known_points(name, params, score, d_expected, g_expected):
    objective = objectives.get(name, **params)
    scores = torch.full((4, 1, 3, 3), score)  # a PatchGAN-shaped map
    assert objective.d_loss(scores, scores).item() == pytest.approx(d_expected, abs=1e-6)
    assert objective.g_loss(scores).item() == pytest.approx(g_expected, abs=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_losses_average_over_every_score_element(name):
    objective = objectives.get(name)
    real, fake = torch.randn(4, 1, 5, 5), torch.randn(4, 1, 5, 5)
    flat_d = objective.d_loss(real.flatten(), fake.flatten())
    assert objective.d_loss(real, fake).dim() == 0
    assert objective.d_loss(real, fake).item() == pytest.approx(flat_d.item(), rel=1e-6)
    assert objective.g_loss(fake).item() == pytest.approx(objective.g_loss(fake.flatten()).item(), rel=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_extreme_logits_give_finite_losses_and_gradients(name):
    objective = objectives.get(name)
    real = torch.tensor([100.0, -100.0, 0.0], requires_grad=True)
    fake = torch.tensor([-100.0, 100.0, 0.0], requires_grad=True)
    d_loss, g_loss = objective.d_loss(real, fake), objective.g_loss(fake)
    assert torch.isfinite(d_loss) and torch.isfinite(g_loss)
    (d_loss + g_loss).backward()
    assert torch.isfinite(real.grad).all() and torch.isfinite(fake.grad).all()


def _linear_critic(shape, w_norm):
    """A bias-free linear critic D(x) = <w, x> with ||w|| = w_norm, as a module of the natural kind."""
    if len(shape) == 1:
        critic = nn.Linear(shape[0], 1, bias=False)
    else:  # a full-size convolution is the inner product with a (C, H, W) kernel
        critic = nn.Conv2d(shape[0], 1, kernel_size=shape[1:], bias=False)
    with torch.no_grad():
        critic.weight.mul_(w_norm / critic.weight.norm())
    return critic


@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("shape", [(5,), (3, 4, 4)])
@pytest.mark.parametrize("w_norm", [0.5, 2.5])
@pytest.mark.parametrize("name", PENALISED)
def test_penalty_of_linear_critic_is_exact_per_sample(name, w_norm, shape, batch):
    # grad D = w at every point, so any per-sample norm gives ||w||; a batch-global norm gives sqrt(N) ||w||.
    critic = _linear_critic(shape, w_norm)
    real, fake = torch.randn(batch, *shape), torch.randn(batch, *shape) + 3
    excess = w_norm - 1 if name == "wgan-gp" else max(0.0, w_norm - 1)
    penalty = objectives.get(name, weight=7.0).penalty(critic, real, fake)
    assert penalty.dim() == 0
    assert penalty.item() == pytest.approx(7.0 * excess**2, rel=1e-5, abs=1e-9)


def test_logistic_critic_recovers_the_optimal_discriminator():
    # For real N(0,1) and fake N(1,1) the optimal logit is log p_real/p_fake = -x + 1/2.
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(20000, 1, generator=gen)
    fake = torch.randn(20000, 1, generator=gen) + 1
    critic = nn.Linear(1, 1)
    objective = objectives.get("minimax")
    optimizer = torch.optim.LBFGS(critic.parameters(), max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = objective.d_loss(critic(real), critic(fake))
        loss.backward()
        return loss

    optimizer.step(closure)
    assert critic.weight.item() == pytest.approx(-1.0, abs=0.1)
    assert critic.bias.item() == pytest.approx(0.5, abs=0.1)


@pytest.mark.parametrize("name", PENALISED)
def test_penalised_critic_estimates_wasserstein_distance(name):
    # W1(N(0,1), N(2,1)) = 2. The penalised optimum is a line of slope 1 + 1/weight (maximise
    # 2s - weight (s - 1)^2), so the estimate is 2.2: within 15% of W1 and within 5% of the exact target.
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Linear(1, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    # A zero output layer starts the critic flat, so it cannot lock onto the wrong slope of norm 1 first.
    nn.init.zeros_(critic[-1].weight)
    objective = objectives.get(name, weight=10.0)
    optimizer = torch.optim.Adam(critic.parameters(), lr=1e-3, betas=(0.5, 0.9))
    for _ in range(300):
        real, fake = torch.randn(512, 1), torch.randn(512, 1) + 2
        loss = objective.d_loss(critic(real), critic(fake)) + objective.penalty(critic, real, fake)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        estimate = critic(torch.randn(20000, 1)).mean() - critic(torch.randn(20000, 1) + 2).mean()
    assert estimate.item() == pytest.approx(2.0, rel=0.15)
    assert estimate.item() == pytest.approx(2.0 * (1 + 1 / 10.0), rel=0.05)


@pytest.mark.parametrize("name", PENALISED)
def test_penalty_under_bf16_autocast_is_fp32_and_matches(name):
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LeakyReLU(0.2), nn.Conv2d(8, 1, 3))
    real, fake = torch.randn(4, 3, 8, 8).bfloat16(), torch.randn(4, 3, 8, 8).bfloat16()
    objective = objectives.get(name)
    torch.manual_seed(1)
    expected = objective.penalty(critic, real.float(), fake.float())
    torch.manual_seed(1)  # the same interpolation weights
    with torch.autocast("cpu", dtype=torch.bfloat16):
        penalty = objective.penalty(critic, real, fake)
    assert penalty.dtype == torch.float32
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)
    penalty.backward()
    assert all(torch.isfinite(layer.weight.grad).all() for layer in (critic[0], critic[2]))


def test_penalty_with_conditional_critic_trains_critic_only():
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Conv2d(1 + 3, 8, 3), nn.LeakyReLU(0.2), nn.Conv2d(8, 1, 3))  # a PatchGAN map
    generator = nn.Conv2d(1, 3, 1)
    cond, real = torch.randn(2, 1, 8, 8), torch.randn(2, 3, 8, 8)
    fake = generator(cond)
    penalty = objectives.get("wgan-gp").penalty(lambda x: critic(torch.cat([cond, x], 1)), real, fake)
    assert penalty.item() > 0
    penalty.backward()
    # Only weights shape the input gradient of a piecewise-linear critic; its biases get no penalty gradient.
    assert all(layer.weight.grad.abs().sum() > 0 for layer in (critic[0], critic[2]))
    assert all(p.grad is None for p in generator.parameters())


def test_penalty_interpolates_with_one_weight_per_sample():
    seen = []

    def critic(x):
        seen.append(x.detach())
        return x.sum(dim=(1, 2, 3))

    # With real = 1 and fake = 0 every element of x_hat equals its sample's mixing weight.
    objectives.get("wgan-gp").penalty(critic, torch.ones(256, 3, 4, 4), torch.zeros(256, 3, 4, 4))
    weights = seen[0].flatten(1)
    assert torch.equal(weights, weights[:, :1].expand_as(weights))
    assert weights.min() >= 0 and weights.max() <= 1
    assert weights[:, 0].unique().numel() > 200  # independent across the batch


def test_penalty_rejects_mismatched_batches():
    with pytest.raises(ValueError, match="shapes differ"):
        objectives.get("wgan-gp").penalty(nn.Linear(2, 1), torch.randn(4, 2), torch.randn(3, 2))


@pytest.mark.parametrize("name", [n for n in ALL if n not in PENALISED])
def test_objectives_without_penalty_return_a_zero_scalar(name):
    real = torch.randn(3, 2)
    penalty = objectives.get(name).penalty(nn.Linear(2, 1), real, torch.randn(3, 2))
    assert penalty.dim() == 0 and penalty.item() == 0.0 and penalty.device == real.device


@pytest.mark.parametrize("name", ALL)
def test_after_critic_step_clips_only_for_wgan(name):
    critic = nn.Linear(8, 8)
    with torch.no_grad():
        critic.weight.copy_(torch.linspace(-1, 1, 64).reshape(8, 8))
        critic.bias.fill_(0.005)
    before = [p.detach().clone() for p in critic.parameters()]
    objectives.get(name).after_critic_step(critic)
    if name == "wgan":
        assert critic.weight.abs().max().item() == pytest.approx(0.01)
        assert torch.equal(critic.weight, before[0].clamp(-0.01, 0.01))
        assert torch.equal(critic.bias, before[1])  # already inside the range
    else:
        assert all(torch.equal(p, b) for p, b in zip(critic.parameters(), before, strict=True))


def test_wgan_clip_is_a_parameter():
    critic = nn.Linear(4, 4)
    objectives.get("wgan", clip=0.001).after_critic_step(critic)
    assert all(p.abs().max() <= 0.001 for p in critic.parameters())
    with pytest.raises(ValueError, match="clip"):
        objectives.get("wgan", clip=0.0)


@pytest.mark.parametrize("name", ALL)
def test_recommended_settings_are_complete(name):
    objective = objectives.get(name)
    settings = objective.recommended
    assert objective.name == name
    assert settings["optimizer"] in {"adam", "rmsprop"}
    assert settings["lr"] > 0 and settings["n_critic"] >= 1
    if settings["optimizer"] == "adam":
        assert len(settings["betas"]) == 2
    settings["lr"] = 1.0  # instances own their copy
    assert objectives.get(name).recommended["lr"] != 1.0


def test_recommended_settings_follow_the_papers():
    assert objectives.get("wgan").recommended == {"optimizer": "rmsprop", "lr": 5e-5, "n_critic": 5}
    gulrajani = {"optimizer": "adam", "lr": 1e-4, "betas": (0.0, 0.9), "n_critic": 5}
    assert objectives.get("wgan-gp").recommended == gulrajani
    assert objectives.get("wgan-lp").recommended == gulrajani
    assert objectives.get("nsgan").recommended["betas"] == (0.5, 0.999)


def test_parameters_reach_the_objective():
    lsgan = objectives.get("lsgan", a=-1, b=1, c=0)
    assert (lsgan.a, lsgan.b, lsgan.c) == (-1, 1, 0)
    assert objectives.get("wgan-lp", weight=5.0).weight == 5.0


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        objectives.get("wgan_gp")
    assert "'wgan_gp'" in str(info.value)
    assert all(name in str(info.value) for name in ALL)


def test_unknown_parameter_is_named():
    with pytest.raises(ValueError, match=r"^lsgan has no parameter 'd' \(valid: a, b, c\)$"):
        objectives.get("lsgan", d=3)
    with pytest.raises(ValueError, match="hinge has no parameter 'weight'"):
        objectives.get("hinge", weight=1.0)
    with pytest.raises(ValueError, match="has no parameter 'recommended'"):
        objectives.get("nsgan", recommended={})
