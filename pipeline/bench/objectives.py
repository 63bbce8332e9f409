"""Which objective should I choose? Every objective trains the same small MLP GAN on two 2-D mixtures of
Gaussians, each with the optimizer, betas, n_critic and clip or penalty its authors recommend, and is scored on how
many modes it covers and how many of its samples land on a mode, in the spirit of Lucic et al., "Are GANs Created
Equal?".

Learning rates: each objective's recommended rate times LR_SCALE (20): Adam 4e-3 for minimax, nsgan, lsgan and
hinge, 2e-3 for wgan-gp and wgan-lp, RMSprop 1e-3 for wgan. The recommended rates are tuned for images; at them,
hardly any objective reaches a mode of these toys within the time budget. One common factor keeps every other
convention of each recipe and the ratios between their rates; one common optimizer for all (e.g. Adam 1e-3, betas
(0.5, 0.999)) would instead hand the clipped WGAN critic the momentum its authors found unstable and the gradient
penalty betas it was not tuned for. Factors 5, 10 and 20 were tried on one seed: 20 covered the most grid25 modes
in STEPS steps and was as stable as 10 on ring8.

Datasets (the standard mode-collapse benchmarks):
    ring8   8 Gaussians evenly spaced on a circle of radius 2, std 0.02 (Metz et al., unrolled GAN; VEEGAN).
    grid25  25 Gaussians at {-4, -2, 0, 2, 4}^2, std 0.05 (VEEGAN; PacGAN).

Metrics, on 2500 generated samples as in VEEGAN and PacGAN:
    high_quality   fraction of samples within 3 std of their nearest mode.
    modes_covered  modes with at least 0.8% of the samples (20 of 2500) within 3 std of them. Counting a mode on
                   one stray sample would reward noise; 20 is a fifth of a grid25 mode's fair share (100), so an
                   under-weighted but real mode still counts.

Networks: generator z (16-d normal) -> 2 and critic 2 -> 1, each an MLP of 3 hidden layers of 64 units (ReLU in
the generator, LeakyReLU 0.2 in the critic, no normalisation), trained for STEPS generator steps on batches of 256.

Flow generators (Flow-GAN, Grover et al. 2018): `flow-mle` and `flow-hybrid` train the flow of models.flows
(FLOW_COUPLINGS channel-mask affine couplings with actnorm, on the points seen as 2x1x1 images) instead of the MLP
generator, by maximum likelihood alone, or by nsgan against the same MLP critic plus FLOW_NLL_WEIGHT times the
negative log-likelihood in bits per dimension, as the `flowgan` recipe does on images.
"""

from __future__ import annotations

import functools
import io
import itertools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from transfigure.models import flows
from transfigure.models import objectives as registry
from transfigure.pipeline.errors import UserError
from transfigure.pipeline.files import write_bytes_atomic, write_json_atomic

SAMPLES = 2500
MIN_SHARE = 20 / SAMPLES
Z_DIM = 16
HIDDEN = 64
BATCH = 256
STEPS = 3000
LR_SCALE = 20
FLOW_COUPLINGS = 8
FLOW_LR = 1e-3
FLOW_NLL_WEIGHT = 1.0


@dataclass(frozen=True)
class Toy:
    """A mixture of equally weighted isotropic Gaussians with a shared standard deviation."""

    name: str
    means: Tensor  # (modes, 2)
    std: float

    def sample(self, n: int) -> Tensor:
        return self.means[torch.randint(len(self.means), (n,))] + self.std * torch.randn(n, 2)


def ring8() -> Toy:
    angles = torch.arange(8) * (2 * math.pi / 8)
    return Toy("ring8", 2.0 * torch.stack([angles.cos(), angles.sin()], dim=1), 0.02)


def grid25() -> Toy:
    axis = torch.tensor([-4.0, -2.0, 0.0, 2.0, 4.0])
    return Toy("grid25", torch.cartesian_prod(axis, axis), 0.05)


DATASETS: dict[str, Callable[[], Toy]] = {"ring8": ring8, "grid25": grid25}


def mode_metrics(samples: Tensor, toy: Toy, min_share: float = MIN_SHARE) -> tuple[int, float]:
    """(modes_covered, high_quality) of `samples` (n, 2): see the module docstring."""
    distance, nearest = torch.cdist(samples.float(), toy.means).min(dim=1)
    good = distance <= 3 * toy.std
    counts = torch.bincount(nearest[good], minlength=len(toy.means))
    return int((counts >= min_share * len(samples)).sum()), good.float().mean().item()


def mlp(n_in: int, n_out: int, activation: Callable[[], nn.Module]) -> nn.Sequential:
    """Three hidden layers of HIDDEN units; no normalisation, so the gradient penalty sees independent samples."""
    sizes = [n_in, HIDDEN, HIDDEN, HIDDEN]
    layers = [m for a, b in itertools.pairwise(sizes) for m in (nn.Linear(a, b), activation())]
    return nn.Sequential(*layers, nn.Linear(HIDDEN, n_out))


def _optimizer(net: nn.Module, rec: dict) -> torch.optim.Optimizer:
    """The recommended optimizer at LR_SCALE times the recommended learning rate (see the module docstring)."""
    lr = LR_SCALE * rec["lr"]
    if rec["optimizer"] == "rmsprop":
        return torch.optim.RMSprop(net.parameters(), lr=lr)
    return torch.optim.Adam(net.parameters(), lr=lr, betas=rec["betas"])


def train_gan(name: str, toy: Toy, steps: int, n: int) -> Tensor:
    """Train a GAN with objective `name` for `steps` generator steps; return n generated samples."""
    objective = registry.get(name)
    rec = objective.recommended
    G, D = mlp(Z_DIM, 2, nn.ReLU), mlp(2, 1, lambda: nn.LeakyReLU(0.2))
    opt_g, opt_d = _optimizer(G, rec), _optimizer(D, rec)
    for _ in range(steps):
        for _ in range(rec["n_critic"]):
            real = toy.sample(BATCH)
            with torch.no_grad():
                fake = G(torch.randn(BATCH, Z_DIM))
            loss = objective.d_loss(D(real), D(fake)) + objective.penalty(D, real, fake)
            opt_d.zero_grad(set_to_none=True)
            loss.backward()
            opt_d.step()
            objective.after_critic_step(D)
        loss = objective.g_loss(D(G(torch.randn(BATCH, Z_DIM))))
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
    with torch.no_grad():
        return G(torch.randn(n, Z_DIM))


def train_flow(adversarial: str | None, toy: Toy, steps: int, n: int) -> Tensor:
    """Train the flow generator for `steps` steps: maximum likelihood alone when `adversarial` is None, else that
    objective against the MLP critic plus FLOW_NLL_WEIGHT times the NLL; return n generated samples."""
    # Points are 1x1 images: a 3x3 kernel would only use its centre tap, at four times the cost.
    flow = flows.flow_steps(2, "channel", FLOW_COUPLINGS, HIDDEN, 1, actnorm=True, invconv=False, kernel_size=1)
    flow(toy.sample(BATCH)[:, :, None, None])  # actnorm initialises itself from a first batch
    # Glow's Adam rate: the likelihood is a plain regression-like loss, without the GAN rates' stability concerns.
    opt_g = torch.optim.Adam(flow.parameters(), lr=FLOW_LR)
    if adversarial:
        objective = registry.get(adversarial)
        D = mlp(2, 1, lambda: nn.LeakyReLU(0.2))
        opt_d = _optimizer(D, objective.recommended)
    for _ in range(steps):
        real = toy.sample(BATCH)
        z, log_det = flow(real[:, :, None, None])
        # In bits per dimension, the unit the flowgan recipe weighs its likelihood term in.
        loss = flows.bits_per_dim(flows.standard_normal_log_prob(z) + log_det, 2).mean()
        if adversarial:
            fake = flow.inverse(torch.randn(BATCH, 2, 1, 1)).flatten(1)
            loss = FLOW_NLL_WEIGHT * loss + objective.g_loss(D(fake))
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        if adversarial:
            fake = fake.detach()
            d_loss = objective.d_loss(D(real), D(fake)) + objective.penalty(D, real, fake)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            objective.after_critic_step(D)
    with torch.no_grad():
        return flow.inverse(torch.randn(n, 2, 1, 1)).flatten(1)


# name -> trainer(toy, steps, n) returning n samples; every trainer is seeded by run_benchmark.
Trainer = Callable[[Toy, int, int], Tensor]
TRAINERS: dict[str, Trainer] = {name: functools.partial(train_gan, name) for name in registry.names()}
TRAINERS["flow-mle"] = functools.partial(train_flow, None)
TRAINERS["flow-hybrid"] = functools.partial(train_flow, "nsgan")


def run_benchmark(
    objectives: list[str] | None = None,
    datasets: list[str] | None = None,
    seeds: int = 3,
    steps: int = STEPS,
    out_dir: Path = Path("reports/bench"),
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Train each objective on each dataset with seeds 0..seeds-1, write objectives.json and objectives.png to
    out_dir and return {"results": [...], "settings": {...}}. A result averages its seeds; "seconds" is the mean
    wall time of one seed's training. `progress` receives one line per finished seed."""
    objectives = objectives or list(TRAINERS)
    datasets = datasets or list(DATASETS)
    unknown = [n for n in objectives if n not in TRAINERS] + [n for n in datasets if n not in DATASETS]
    if unknown:
        valid = ", ".join([*TRAINERS, *DATASETS])
        raise UserError(f"unknown objective or dataset: {', '.join(unknown)} (valid: {valid})")
    if seeds < 1 or steps < 1:
        raise UserError(f"seeds and steps must be at least 1, got {seeds} and {steps}")
    threads = torch.get_num_threads()
    # The networks are tiny: on shared cores a second thread's hand-offs cost more than it computes.
    torch.set_num_threads(1)
    results, first_samples = [], {}
    try:
        for dataset in datasets:
            for name in objectives:
                result, first_samples[name, dataset] = _run_seeds(name, DATASETS[dataset](), seeds, steps, progress)
                results.append(result)
    finally:
        torch.set_num_threads(threads)
    settings = dict(
        steps=steps, lr_scale=LR_SCALE, batch=BATCH, samples=SAMPLES, min_share=MIN_SHARE, z_dim=Z_DIM, hidden=HIDDEN
    )
    settings |= dict(flow_couplings=FLOW_COUPLINGS, flow_lr=FLOW_LR, flow_nll_weight=FLOW_NLL_WEIGHT)
    report = {"results": results, "settings": settings}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "objectives.json", report)
    write_bytes_atomic(out_dir / "objectives.png", _scatter_grid(objectives, datasets, first_samples))
    return report


def _run_seeds(
    name: str, toy: Toy, seeds: int, steps: int, progress: Callable[[str], None] | None
) -> tuple[dict, Tensor]:
    """One objective on one dataset over seeds 0..seeds-1: its averaged result and the first seed's samples."""
    covered, quality, seconds = [], [], []
    for seed in range(seeds):
        torch.manual_seed(seed)
        start = time.perf_counter()
        samples = TRAINERS[name](toy, steps, SAMPLES)
        seconds.append(time.perf_counter() - start)
        modes, hq = mode_metrics(samples, toy)
        covered.append(modes)
        quality.append(hq)
        if seed == 0:
            first = samples
        if progress:
            progress(f"{toy.name} {name} seed {seed}: {modes}/{len(toy.means)} modes, hq {hq:.3f}, {seconds[-1]:.1f}s")
    result = {
        "dataset": toy.name,
        "objective": name,
        "modes_covered": round(statistics.mean(covered), 2),
        "high_quality": round(statistics.mean(quality), 4),
        "seconds": round(statistics.mean(seconds), 2),
        "modes_total": len(toy.means),
        "modes_covered_std": round(statistics.pstdev(covered), 2),
        "high_quality_std": round(statistics.pstdev(quality), 4),
        "seeds": seeds,
    }
    return result, first


def _scatter_grid(objectives: list[str], datasets: list[str], samples: dict) -> bytes:
    """PNG of the first seed's samples: one row per objective, one column per dataset, real modes in red."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure on the Agg canvas: no pyplot, so no global backend switch for the caller.
    fig = Figure(figsize=(2.6 * len(datasets), 2.6 * len(objectives)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(objectives), len(datasets), squeeze=False)
    for row, name in enumerate(objectives):
        for col, dataset in enumerate(datasets):
            ax, toy, points = axes[row][col], DATASETS[dataset](), samples[name, dataset]
            modes, hq = mode_metrics(points, toy)
            ax.scatter(points[:, 0], points[:, 1], s=1, alpha=0.4, color="tab:blue", rasterized=True)
            ax.scatter(toy.means[:, 0], toy.means[:, 1], s=12, marker="x", color="tab:red")
            limit = 1.5 * toy.means.abs().max().item()
            ax.set(xlim=(-limit, limit), ylim=(-limit, limit), xticks=[], yticks=[], aspect="equal")
            ax.set_title(f"{name} / {dataset}\n{modes}/{len(toy.means)} modes, hq {hq:.2f}", fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def format_table(results: list[dict]) -> str:
    """Markdown table of run_benchmark's results, one row per dataset and objective; ± is the std over seeds."""
    lines = ["| dataset | objective | modes covered | high quality | seconds / seed |", "|---|---|---|---|---|"]
    for r in results:
        modes = f"{r['modes_covered']:.1f} ± {r['modes_covered_std']:.1f} of {r['modes_total']}"
        quality = f"{r['high_quality']:.3f} ± {r['high_quality_std']:.3f}"
        lines.append(f"| {r['dataset']} | {r['objective']} | {modes} | {quality} | {r['seconds']:.1f} |")
    return "\n".join(lines)
