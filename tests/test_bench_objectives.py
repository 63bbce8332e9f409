"""The objectives benchmark: its datasets and metrics against known answers, and a tiny end-to-end run."""

import json

import pytest
import torch

from transfigure.pipeline.bench import objectives as bench
from transfigure.pipeline.errors import UserError


@pytest.mark.parametrize("make, modes, std", [(bench.ring8, 8, 0.02), (bench.grid25, 25, 0.05)])
def test_datasets_have_their_modes_and_std(make, modes, std):
    toy = make()
    assert toy.means.shape == (modes, 2) and toy.std == std
    torch.manual_seed(0)
    samples = toy.sample(20_000)
    distance, nearest = torch.cdist(samples, toy.means).min(dim=1)
    assert torch.bincount(nearest, minlength=modes).min() > 0.5 * 20_000 / modes  # every mode drawn, about evenly
    # The offset from the nearest mode is the per-axis noise: its per-axis std is the dataset's.
    offsets = samples - toy.means[nearest]
    assert offsets.std(dim=0) == pytest.approx([std, std], rel=0.05)
    assert distance.max() < 6 * std


def test_ring8_means_lie_on_a_circle_of_radius_2():
    assert bench.ring8().means.norm(dim=1) == pytest.approx([2.0] * 8)


def test_grid25_means_cover_the_grid():
    means = {tuple(m) for m in bench.grid25().means.tolist()}
    assert means == {(x, y) for x in (-4, -2, 0, 2, 4) for y in (-4, -2, 0, 2, 4)}


@pytest.mark.parametrize("make", [bench.ring8, bench.grid25])
def test_samples_exactly_at_every_mode_cover_all_with_full_quality(make):
    toy = make()
    samples = toy.means.repeat(100, 1)
    assert bench.mode_metrics(samples, toy) == (len(toy.means), 1.0)


def test_samples_all_at_one_mode_cover_one():
    toy = bench.grid25()
    assert bench.mode_metrics(toy.means[7].repeat(2500, 1), toy) == (1, 1.0)


def test_samples_far_from_every_mode_cover_none():
    toy = bench.ring8()
    assert bench.mode_metrics(torch.full((2500, 2), 10.0), toy) == (0, 0.0)
    # The ring's centre is 2 away from every mode: no quality either.
    assert bench.mode_metrics(torch.zeros(2500, 2), toy) == (0, 0.0)


def test_three_std_is_the_quality_radius_and_the_share_the_coverage_threshold():
    toy = bench.ring8()
    inside, outside = toy.means[0] + torch.tensor([2.9 * toy.std, 0]), toy.means[0] + torch.tensor([3.1 * toy.std, 0])
    samples = torch.cat([inside.repeat(19, 1), outside.repeat(2481, 1)])
    assert bench.mode_metrics(samples, toy) == (0, pytest.approx(19 / 2500))  # 19 < 20 of 2500: not covered
    samples[19] = inside
    assert bench.mode_metrics(samples, toy) == (1, pytest.approx(20 / 2500))


def test_a_tiny_run_writes_the_report_and_the_plot(tmp_path):
    lines = []
    report = bench.run_benchmark(
        ["nsgan", "wgan-gp"], ["ring8"], seeds=1, steps=5, out_dir=tmp_path, progress=lines.append
    )
    results = report["results"]
    assert [(r["dataset"], r["objective"]) for r in results] == [("ring8", "nsgan"), ("ring8", "wgan-gp")]
    for r in results:
        assert {"dataset", "objective", "modes_covered", "high_quality", "seconds"} <= r.keys()
        assert 0 <= r["modes_covered"] <= r["modes_total"] == 8 and 0.0 <= r["high_quality"] <= 1.0
        assert r["seconds"] >= 0
    assert len(lines) == 2
    assert json.loads((tmp_path / "objectives.json").read_text()) == report
    assert (tmp_path / "objectives.png").read_bytes().startswith(b"\x89PNG")
    table = bench.format_table(results)
    assert table.count("\n") == 3 and "| ring8 | wgan-gp |" in table


def test_optimizers_are_the_recommended_ones_at_the_scaled_rate():
    from transfigure.models import objectives

    net = torch.nn.Linear(2, 1)
    for name in objectives.names():
        rec = objectives.get(name).recommended
        opt = bench._optimizer(net, rec)
        assert isinstance(opt, torch.optim.RMSprop if rec["optimizer"] == "rmsprop" else torch.optim.Adam)
        assert opt.param_groups[0]["lr"] == pytest.approx(bench.LR_SCALE * rec["lr"])
        if "betas" in rec:
            assert opt.param_groups[0]["betas"] == rec["betas"]


@pytest.mark.slow
def test_the_scaled_learning_rate_is_what_lets_a_short_run_reach_the_ring(tmp_path, monkeypatch):
    # The benchmark is only informative if training reaches the modes within its budget, which is what LR_SCALE
    # is for. Adversarial training amplifies rounding, so a seed's outcome depends on the CPU's kernels: seeds 0-5
    # under ATEN_CPU_CAPABILITY=avx512/avx2/default and with oneDNN off covered 2-8 modes with 0.148-0.883 of the
    # samples on a mode; at the unscaled (image) rates none covered a mode and at most 0.0104 landed on one.
    # The bars sit between the two groups with room on both sides.
    scaled = bench.run_benchmark(["lsgan"], ["ring8"], seeds=1, steps=1500, out_dir=tmp_path)["results"][0]
    assert scaled["modes_covered"] >= 2 and scaled["high_quality"] >= 0.10
    monkeypatch.setattr(bench, "LR_SCALE", 1)
    report = bench.run_benchmark(["lsgan"], ["ring8"], seeds=1, steps=1500, out_dir=tmp_path)
    (unscaled,) = report["results"]
    assert unscaled["modes_covered"] == 0 and unscaled["high_quality"] < 0.05
    assert report["settings"]["lr_scale"] == 1


def test_unknown_names_are_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no-such-gan"):
        bench.run_benchmark(["no-such-gan"], out_dir=tmp_path)
    assert not (tmp_path / "objectives.json").exists()


def test_every_registered_objective_has_a_trainer():
    from transfigure.models import objectives

    assert set(objectives.names()) <= bench.TRAINERS.keys()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flow-mle", "flow-hybrid"])
def test_flow_generators_learn_to_split_two_modes(name):
    # Two modes 4 apart: a Gaussian fitted by moments (the flow before training, after actnorm's initialisation)
    # puts 0.40 of its samples near a mode; a trained flow must move its mass onto both. Over seeds 0-7 and the
    # CPU paths of tests/README.md, 300 steps put 0.87 or more on the modes and the untrained flow 0.44 at most.
    toy = bench.Toy("pair", torch.tensor([[-2.0, 0.0], [2.0, 0.0]]), 0.3)
    torch.manual_seed(0)
    assert bench.mode_metrics(bench.TRAINERS[name](toy, 0, 2500), toy)[1] < 0.5
    torch.manual_seed(0)
    modes, quality = bench.mode_metrics(bench.TRAINERS[name](toy, 300, 2500), toy)
    assert modes == 2 and quality > 0.75
