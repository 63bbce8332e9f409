"""The training loop every recipe shares: device and precision, checkpoints and resume, the divergence guard,
logging to MLflow, the progress bar and the files DVC tracks. A recipe (pipeline/recipes/) only says how to
build its networks and how one generator step with its critic steps goes.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from models import objectives
from pipeline.errors import UserError
from pipeline.images import write_bytes_atomic, write_json_atomic
from pipeline.params import Params, RecipeParams, flatten, params_hash, training_params
from pipeline.train.checkpoint import LAST, checkpoint_dir, load_checkpoint, rng_state, save_checkpoint, set_rng_state


class TrainingDiverged(UserError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("device: 'cuda' was asked for but no CUDA device is available")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def resolve_precision(choice: str, device: torch.device) -> str:
    if choice == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if choice != "fp32" and device.type != "cuda":
        raise UserError(f"precision: {choice!r} needs a CUDA device; use fp32 or auto on CPU")
    return choice


@dataclass
class Context:
    """What a recipe needs from the loop: where to run, how to update, which objective."""

    params: RecipeParams
    device: torch.device
    precision: str
    objective: objectives.Objective
    n_critic: int
    scaler: torch.amp.GradScaler | None = None
    compiled: dict[int, Callable] = field(default_factory=dict)

    @classmethod
    def create(cls, p: RecipeParams) -> Context:
        device = resolve_device(p.device)
        precision = resolve_precision(p.precision, device)
        objective = objectives.get(p.objective, **p.objective_params)
        n_critic = p.n_critic or objective.recommended["n_critic"]
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        return cls(p, device, precision, objective, n_critic, scaler)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def prepare(self, net: nn.Module) -> nn.Module:
        net = net.to(self.device)
        if self.device.type == "cuda" and self.params.channels_last:
            net = net.to(memory_format=torch.channels_last)
        return net

    def forward(self, net: nn.Module) -> Callable:
        """The network's forward, compiled when asked; the module itself stays plain for its state dict."""
        if not self.params.compile:
            return net
        return self.compiled.setdefault(id(net), torch.compile(net))

    def optimizer(self, parameters, role: str = "generator") -> torch.optim.Optimizer:
        p, rec = self.params, self.objective.recommended
        kind = p.optimizer or rec["optimizer"]
        lr = p.lr or rec["lr"]
        if kind == "rmsprop":
            return torch.optim.RMSprop(parameters, lr=lr)
        betas = tuple(p.betas or rec.get("betas", (0.5, 0.999)))
        return torch.optim.Adam(parameters, lr=lr, betas=betas, fused=self.device.type == "cuda")

    def update(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        moved = {}
        for key, value in batch.items():
            value = value.to(self.device, non_blocking=True)
            if value.dim() == 4 and self.device.type == "cuda" and self.params.channels_last:
                value = value.contiguous(memory_format=torch.channels_last)
            moved[key] = value
        return moved


def set_requires_grad(nets: list[nn.Module], flag: bool) -> None:
    for net in nets:
        for parameter in net.parameters():
            parameter.requires_grad_(flag)


class ImagePool:
    """A history of generated images (Shrivastava et al. 2017): the critic also sees older fakes."""

    def __init__(self, size: int):
        self.size = size
        self.images: list[torch.Tensor] = []

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for image in images.detach():
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif torch.rand(()) < 0.5:
                slot = int(torch.randint(self.size, ()))
                out.append(self.images[slot].clone())
                self.images[slot] = image.clone()
            else:
                out.append(image)
        return torch.stack(out)

    def state(self) -> list[torch.Tensor]:
        return [image.cpu() for image in self.images]

    def load(self, images: list[torch.Tensor], device: torch.device) -> None:
        self.images = [image.to(device) for image in images]


def lr_factor(step: int, steps: int, decay: bool) -> float:
    """Constant for the first half, then linear to zero (the reference's schedule). Derived from the step,
    so resuming needs no scheduler state."""
    if not decay:
        return 1.0
    return min(1.0, 2.0 * (steps - step) / steps)


def check_finite(losses: dict[str, float], step: int, last_good: int | None) -> None:
    for name, value in losses.items():
        if not math.isfinite(value):
            kept = f"the last good checkpoint (step {last_good}) is kept" if last_good else "no checkpoint was written"
            raise TrainingDiverged(
                f"training diverged: loss {name} became {value} at step {step}; {kept}. "
                "Lower the learning rate or try another objective."
            )


class Progress:
    """A live bar on a terminal; plain log lines otherwise (DVC, CI logs)."""

    def __init__(self, console, total: int, start: int, log_every: int):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.console, self.total, self.log_every = console, total, log_every
        self.live = console.is_terminal
        self.bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:.2f} steps/s"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[losses]}"),
            console=console,
            disable=not self.live,
        )
        self.task = self.bar.add_task("train", total=total, completed=start, rate=0.0, losses="")

    def __enter__(self) -> Progress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def update(self, step: int, rate: float, losses: dict[str, float]) -> None:
        text = " ".join(f"{k}={v:.3f}" for k, v in losses.items())
        self.bar.update(self.task, completed=step, rate=rate, losses=text)
        if not self.live and (step % self.log_every == 0 or step == self.total):
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            self.console.print(f"step {step}/{self.total}  {rate:.2f} steps/s  eta {eta:.0f}s  {text}")


def grid_image(columns: list[torch.Tensor]) -> np.ndarray:
    """Equal-sized image batches, one per kind (input, translation, ...) -> one uint8 HWC picture in which each
    row is one sample and each column one kind."""
    from torchvision.utils import make_grid

    from pipeline.data.datasets import to_uint8

    stacked = torch.stack(columns, 1).flatten(0, 1)  # sample-major: one sample's kinds side by side
    grid = make_grid(stacked.float().cpu(), nrow=len(columns), padding=2, pad_value=1.0, normalize=False)
    return to_uint8(grid[None])[0]


def train(
    recipe_name: str,
    params: Params,
    console,
    *,
    fresh: bool = False,
    fresh_if_changed: bool = False,
    runs_root: Path = Path("runs"),
    metrics_root: Path = Path("metrics"),
) -> dict:
    """Trains one recipe to params' step count, resuming from the last checkpoint; returns the summary."""
    from pipeline import tracking
    from pipeline.train import recipes

    p = params.recipe(recipe_name)
    wanted = training_params(params, recipe_name)
    wanted_hash = params_hash(wanted)
    ckpt_path = checkpoint_dir(recipe_name, runs_root) / LAST

    state = None
    if ckpt_path.exists() and not fresh:
        state = load_checkpoint(ckpt_path)
        if state["params_hash"] != wanted_hash:
            if not fresh_if_changed:
                changed = _changed_keys(state["params"], wanted)
                raise UserError(
                    f"{ckpt_path} was made with other params (changed: {', '.join(changed) or 'unknown'}); "
                    "pass --fresh to start over, or restore the params to resume"
                )
            console.print(f"params changed since {ckpt_path}; starting fresh")
            state = None

    torch.manual_seed(params.seed)
    ctx = Context.create(p)
    recipe = recipes.build(recipe_name, p, ctx, Path(params.data.root) / p.dataset)
    ema = (
        {
            name: AveragedModel(recipe.nets[name], multi_avg_fn=get_ema_multi_avg_fn(p.ema_decay), use_buffers=True)
            for name in recipe.generator_names
        }
        if p.ema_decay
        else {}
    )

    # Captured before a restore: saved optimizers carry the decayed rate of their step, not the base rate.
    base_lrs = {name: [g["lr"] for g in opt.param_groups] for name, opt in recipe.optimizers.items()}
    start_step, history, run_id = 0, [], None
    if state is not None:
        start_step, history, run_id = state["step"], state["history"], state.get("mlflow_run_id")
        _restore(state, recipe, ema, ctx)
        console.print(f"resumed from step {start_step}")
    if start_step >= p.steps:
        console.print(f"{recipe_name}: already trained to step {start_step}; nothing to do")

    tags = {"git_commit": tracking.git_commit(), "params_hash": wanted_hash, "recipe": recipe_name}
    run = tracking.Run(recipe_name, flatten(wanted), tags, run_id=run_id)
    stream = iter(recipe.batches(params.seed, start_step))
    next_batch: Callable[[], dict] = lambda: ctx.to_device(next(stream))  # noqa: E731

    def checkpoint(step: int, steps_per_second: float) -> None:
        save_checkpoint(
            {
                "recipe": recipe_name,
                "step": step,
                "params": wanted,
                "params_hash": wanted_hash,
                "networks": {k: v.state_dict() for k, v in recipe.nets.items()},
                "ema": {k: v.state_dict() for k, v in ema.items()},
                "optimizers": {k: v.state_dict() for k, v in recipe.optimizers.items()},
                "scaler": ctx.scaler.state_dict() if ctx.scaler else None,
                "pools": {k: v.state() for k, v in recipe.pools.items()},
                "rng": rng_state(),
                "history": history,
                "mlflow_run_id": run.run_id,
                "network_args": recipe.network_args,
                "git_commit": tags["git_commit"],
                "steps_per_second": steps_per_second,
            },
            ckpt_path,
        )

    last_good = start_step or None
    window: dict[str, list[float]] = {}
    started, timed_from = time.perf_counter(), start_step
    status = "FAILED"
    try:
        with Progress(console, p.steps, start_step, p.log_every) as progress:
            for step in range(start_step + 1, p.steps + 1):
                factor = lr_factor(step - 1, p.steps, p.lr_decay)
                for name, opt in recipe.optimizers.items():
                    for group, base in zip(opt.param_groups, base_lrs[name], strict=True):
                        group["lr"] = base * factor
                losses = recipe.step(next_batch)
                check_finite(losses, step, last_good)
                for net_name, averaged in ema.items():
                    averaged.update_parameters(recipe.nets[net_name])
                for key, value in losses.items():
                    window.setdefault(key, []).append(value)
                rate = (step - timed_from) / (time.perf_counter() - started)
                if step % p.log_every == 0 or step == p.steps:
                    means = {k: sum(v) / len(v) for k, v in window.items()}
                    history.append({"step": step, **means})
                    lrs = {f"lr_{k}": o.param_groups[0]["lr"] for k, o in recipe.optimizers.items()}
                    run.log_metrics(
                        {**means, **lrs, "steps_per_second": rate, "images_per_second": rate * p.batch_size}, step
                    )
                    window = {}
                progress.update(step, rate, losses)
                if step % p.sample_every == 0 or step == p.steps:
                    run.log_image(grid_image(recipe.sample_rows()), key="samples", step=step)
                if step % p.checkpoint_every == 0 or step == p.steps:
                    checkpoint(step, rate)
                    last_good = step
        elapsed = time.perf_counter() - started
        steps_done = p.steps - timed_from
        # A run with nothing left to do reports the speed its checkpoint measured, not zero.
        rate = steps_done / elapsed if steps_done else state["steps_per_second"]
        summary = _write_outputs(recipe_name, metrics_root, history, rate, p.batch_size, p.steps)
        if steps_done:
            for net_name in recipe.generator_names:
                module = ema[net_name].module if net_name in ema else recipe.nets[net_name]
                run.log_model(module.cpu().eval(), name=net_name, example=recipe.example_inputs[net_name])
                module.to(ctx.device)
        status = "FINISHED"
    finally:
        run.end(status)
    losses_text = " ".join(f"{k}={v:.3f}" for k, v in summary["losses"].items())
    console.print(
        f"{recipe_name}: {p.steps} steps, {summary['steps_per_second']:.2f} steps/s, {losses_text}; "
        f"checkpoint {ckpt_path}, MLflow run {run.run_id}"
    )
    return summary


def _restore(state: dict, recipe, ema: dict, ctx: Context) -> None:
    for name, net in recipe.nets.items():
        net.load_state_dict(state["networks"][name])
    for name, opt in recipe.optimizers.items():
        opt.load_state_dict(state["optimizers"][name])
    for name, averaged in ema.items():
        averaged.load_state_dict(state["ema"][name])
    for name, pool in recipe.pools.items():
        pool.load(state["pools"][name], ctx.device)
    if ctx.scaler is not None and state["scaler"]:
        ctx.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])


def _changed_keys(old: dict, new: dict) -> list[str]:
    a, b = flatten(old), flatten(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def _write_outputs(
    recipe: str, root: Path, history: list[dict], steps_per_second: float, batch_size: int, steps: int
) -> dict:
    last = history[-1] if history else {}
    summary = {
        "steps": steps,
        "steps_per_second": round(steps_per_second, 4),
        "images_per_second": round(steps_per_second * batch_size, 4),
        "losses": {k: round(v, 6) for k, v in last.items() if k != "step"},
    }
    write_json_atomic(root / f"{recipe}.train.json", summary)
    columns = sorted({k for row in history for k in row} - {"step"})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["step", *columns], lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_bytes_atomic(root / f"{recipe}.train_losses.csv", buffer.getvalue().encode())
    return summary
