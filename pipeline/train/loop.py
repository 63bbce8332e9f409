"""The training loop every recipe shares: checkpoints and resume, the learning-rate schedule, EMA, the divergence
guard, logging to MLflow, the progress display and the files DVC tracks. A recipe (pipeline/train/recipes/) only
says how to build its networks and how one generator step with its critic steps goes.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline.errors import UserError
from pipeline.files import write_bytes_atomic, write_json_atomic
from pipeline.params import Params, flatten, params_hash, training_params
from pipeline.pixels import sample_sheet
from pipeline.progress import Progress
from pipeline.train import recipes
from pipeline.train.checkpoint import (
    LAST,
    Checkpoint,
    checkpoint_dir,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pipeline.train.context import Context
from pipeline.train.fingerprint import changed_files, code_fingerprint


class TrainingDiverged(UserError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


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

    recipe_class = recipes.get(recipe_name)
    p = params.recipe(recipe_name)
    wanted = training_params(params, recipe_name)
    wanted_hash = params_hash(wanted)
    code = code_fingerprint(recipe_class)
    ckpt_path = checkpoint_dir(recipe_name, runs_root) / LAST
    state = None if fresh else _resumable(ckpt_path, wanted, wanted_hash, code, fresh_if_changed, console)

    torch.manual_seed(params.seed)
    ctx = Context.create(p)
    recipe = recipe_class(p, ctx, Path(params.data.root) / p.dataset)
    generator_names = recipe_class.generator_names(p)
    ema = {
        name: AveragedModel(recipe.nets[name], multi_avg_fn=get_ema_multi_avg_fn(p.ema_decay), use_buffers=True)
        for name in (generator_names if p.ema_decay else ())
    }

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
    lineage = lambda: tracking.lineage(state, ckpt_path)  # noqa: E731 - hashed only when the run is missing
    run = tracking.Run(recipe_name, flatten(wanted), tags, run_id=run_id, lineage=lineage)
    if run.replaced:
        console.print(f"MLflow run {run.replaced} is not in {tracking.tracking_uri()}; logging to new run {run.run_id}")
    stream = iter(recipe.batches(params.seed, start_step))
    next_batch: Callable[[], dict] = lambda: ctx.to_device(next(stream))  # noqa: E731

    def checkpoint(step: int, steps_per_second: float) -> None:
        state: Checkpoint = {
            "recipe": recipe_name,
            "step": step,
            "params": wanted,
            "params_hash": wanted_hash,
            "code": code,
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
        }
        save_checkpoint(state, ckpt_path)

    last_good = start_step or None
    window: dict[str, list[float]] = {}
    status = "FAILED"
    try:
        with Progress(console, "step", p.steps, start_step, log_every=p.log_every) as progress:
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
                progress.update(step, " ".join(f"{k}={v:.3f}" for k, v in losses.items()))
                if step % p.log_every == 0 or step == p.steps:
                    means = {k: sum(v) / len(v) for k, v in window.items()}
                    history.append({"step": step, **means})
                    lrs = {f"lr_{k}": o.param_groups[0]["lr"] for k, o in recipe.optimizers.items()}
                    speed = {"steps_per_second": progress.rate, "images_per_second": progress.rate * p.batch_size}
                    run.log_metrics({**means, **lrs, **speed}, step)
                    window = {}
                if step % p.sample_every == 0 or step == p.steps:
                    run.log_image(sample_sheet(recipe.sample_rows()), key="samples", step=step)
                if step % p.checkpoint_every == 0 or step == p.steps:
                    checkpoint(step, progress.rate)
                    last_good = step
        steps_done = p.steps - start_step
        # A run with nothing left to do reports the speed its checkpoint measured, not zero.
        rate = progress.rate if steps_done else state["steps_per_second"]
        summary = _write_outputs(recipe_name, recipe_class.losses, metrics_root, history, rate, p.batch_size, p.steps)
        if steps_done:
            for net_name in generator_names:
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


def _resumable(
    path: Path, wanted: dict, wanted_hash: str, code: dict[str, str], fresh_if_changed: bool, console
) -> Checkpoint | None:
    """The checkpoint to resume, or None to start fresh. Changed params refuse to resume unless
    `fresh_if_changed`; changed training code starts over with `fresh_if_changed` and resumes, saying so, without."""
    if not path.exists():
        return None
    state = load_checkpoint(path)
    if state["params_hash"] != wanted_hash:
        changed = ", ".join(_changed_keys(state["params"], wanted)) or "unknown"
        if not fresh_if_changed:
            raise UserError(
                f"{path} was made with other params (changed: {changed}); "
                "pass --fresh to start over, or restore the params to resume"
            )
        console.print(f"params changed since {path} ({changed}); starting fresh")
        return None
    files = changed_files(state.get("code", {}), code)
    if files:
        listed = ", ".join(files[:8]) + (f" and {len(files) - 8} more" if len(files) > 8 else "")
        if fresh_if_changed:
            console.print(f"training code changed since {path} ({listed}); starting fresh")
            return None
        console.print(f"training code changed since {path} ({listed}); resuming anyway (--fresh starts over)")
    return state


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
    recipe: str,
    loss_names: tuple[str, ...],
    root: Path,
    history: list[dict],
    steps_per_second: float,
    batch_size: int,
    steps: int,
) -> dict:
    last = history[-1] if history else {}
    summary = {
        "steps": steps,
        "steps_per_second": round(steps_per_second, 4),
        "images_per_second": round(steps_per_second * batch_size, 4),
        "losses": {k: round(v, 6) for k, v in last.items() if k != "step"},
    }
    write_json_atomic(root / f"{recipe}.train.json", summary)
    columns = [name for name in loss_names if any(name in row for row in history)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["step", *columns], lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_bytes_atomic(root / f"{recipe}.train_losses.csv", buffer.getvalue().encode())
    return summary
