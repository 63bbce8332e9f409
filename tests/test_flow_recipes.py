"""The alignflow and flowgan recipes on the built-in digits: a few steps of tiny flows, finite losses, translations
that invert exactly up to the output clamp, and bits/dim. Their export (each direction one ONNX graph, checked
against PyTorch by the exporter) is tests/test_pipeline_e2e.py's."""

import math
from pathlib import Path

import pytest
import torch

from transfigure.pipeline.params import load_params
from transfigure.pipeline.train import recipes
from transfigure.pipeline.train.context import Context
from transfigure.pipeline.train.parts import mean_bits_per_dim

TINY_FLOW = ["flow.n_scales=2", "flow.n_couplings=1", "flow.hidden_channels=4", "flow.n_res_blocks=1"]
TINY_CRITIC = ["discriminator.kind=n_layers", "discriminator.n_layers=1", "discriminator.ndf=4"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks: on shared cores a second thread's hand-offs cost more than it computes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def recipe(name: str, *overrides: str):
    sections = [f"{name}.{o}" for o in [*TINY_FLOW, *TINY_CRITIC, "batch_size=4", *overrides]]
    params = load_params("params.yaml", sections)
    p = recipes.params_of(params, name)
    torch.manual_seed(params.seed)
    ctx = Context.create(p)
    model = recipes.get(name)(p, ctx, Path(params.data.root) / p.dataset)
    stream = iter(model.batches(params.seed, 0))
    return model, lambda: ctx.to_device(next(stream))


def test_alignflow_trains_and_translates_through_exact_inverses(workdir):
    model, next_batch = recipe("alignflow", "pool_size=2", "objective=wgan-gp")
    for _ in range(3):
        losses = model.step(next_batch)
        assert set(losses) == {"G", "G_adv", "bpd_A", "bpd_B", "D_A", "D_B"}
        assert all(math.isfinite(v) for v in losses.values())
        assert 0 < losses["bpd_A"] < 16 and 0 < losses["bpd_B"] < 16

    G_AB, G_BA = model.state.nets["G_AB"].eval(), model.state.nets["G_BA"].eval()
    f_A, f_B = model.f_A, model.f_B
    assert G_BA.source is f_B and G_BA.target is f_A, "both translators share the same two flows"
    real_A = model.fixed["A"]
    with torch.no_grad():
        fake_B = G_AB(real_A)
        assert fake_B.shape == real_A.shape and fake_B.min() >= -1 and fake_B.max() <= 1
        # A -> Z -> B -> Z -> A is the identity before the output is clamped to [-1, 1] (and rounded to 8 bits).
        z_A = f_A(real_A)[0]
        unclamped_B = f_B.inverse(z_A)
        assert torch.equal(fake_B, unclamped_B.clamp(-1, 1))
        assert (f_A.inverse(f_B(unclamped_B)[0]) - real_A).abs().max() < 1e-4
        columns = model.sample_columns()
    assert list(columns) == ["real A", "fake B", "rec A", "real B", "fake A", "rec B"]
    assert all(column.shape == real_A.shape for column in columns.values())

    bpd = [mean_bits_per_dim(flow, images) for flow, images in ((f_A, real_A), (f_B, model.fixed["B"]))]
    assert all(0 < v < 16 for v in bpd)
    assert bpd[0] == mean_bits_per_dim(f_A, real_A), "seeded noise"


@pytest.mark.parametrize("mode", ["mle_only=true", "nll_weight=0.5", "nll_weight=0"])
def test_flowgan_trains_by_likelihood_adversarially_or_both(workdir, mode):
    model, next_batch = recipe("flowgan", mode, "objective=hinge")
    expected = {"G", "bpd"} if mode == "mle_only=true" else {"G", "G_adv", "bpd", "D"}
    assert ("D" in model.state.optimizers) == (mode != "mle_only=true")
    flow_before = [p.detach().clone() for p in model.flow.parameters()]
    for _ in range(2):
        losses = model.step(next_batch)
        assert set(losses) == expected and all(math.isfinite(v) for v in losses.values())
    assert any(not torch.equal(a, b) for a, b in zip(flow_before, model.flow.parameters(), strict=True))
    columns = model.sample_columns()
    assert list(columns) == ["T=1.0", "T=0.85", "T=0.7", "T=0.5"]
    assert all(c.shape == (8, 3, 32, 32) and c.abs().max() <= 1 for c in columns.values())

    generator = model.state.nets["G"].eval()
    with torch.no_grad():
        assert generator(torch.randn(3, 3, 32, 32)).shape == (3, 3, 32, 32)
    images = torch.stack([model.state.dataset[i]["B"] for i in range(8)])
    assert 0 < mean_bits_per_dim(generator.flow, images) < 16
