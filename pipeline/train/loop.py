"""The training loop every recipe shares: checkpoints and resume, the learning-rate schedule, EMA, the divergence
guard, logging to MLflow, the progress display and the files DVC tracks. A recipe (pipeline/train/recipes/) only
says how to build its networks and how one generator step with its critic steps goes.
"""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path

import torch
from rich.console import Console
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from transfigure.pipeline.charts import loss_curves
from transfigure.pipeline.data.datasets import loader_workers
from transfigure.pipeline.errors import TrainingDiverged, UserError
from transfigure.pipeline.files import write_bytes_atomic, write_json_atomic
from transfigure.pipeline.images import write_image_atomic
from transfigure.pipeline.params import Params, changed_keys, flatten, params_hash, training_params
from transfigure.pipeline.pixels import sample_sheet
from transfigure.pipeline.progress import Progress
from transfigure.pipeline.train import recipes
from transfigure.pipeline.train.checkpoint import (
    LAST,
    Checkpoint,
    checkpoint_dir,
    init_from_files,
    keep_step_copy,
    load_checkpoint,
    rng_state,
    samples_dir,
    save_checkpoint,
    set_rng_state,
)
from transfigure.pipeline.train.context import Context
from transfigure.pipeline.train.distributed import World
from transfigure.pipeline.train.feed import Feed, data_wait_warning
from transfigure.pipeline.train.fingerprint import changed_files, code_fingerprint


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
    """Trains one recipe to params' step count, resuming from the last checkpoint (or extending a finished run
    whose only change is a higher `steps`); returns the summary. Under torchrun every rank trains and rank 0
    alone writes and logs (pipeline/train/distributed.py); the other ranks return an empty summary."""
    from transfigure.pipeline import tracking

    world = World.from_environment()
    main = world.main
    if not main:
        console = Console(quiet=True)
    recipe_class = recipes.get(recipe_name)
    p = recipes.params_of(params, recipe_name)
    wanted = training_params(params, recipe_name, p)
    wanted_hash = params_hash(wanted)
    code = code_fingerprint(recipe_class)
    ckpt_path = checkpoint_dir(recipe_name, runs_root) / LAST
    state = None if fresh else _resumable(ckpt_path, wanted, wanted_hash, code, fresh_if_changed, console)

    torch.manual_seed(params.seed)
    ctx = Context.create(p, world)
    if world.parallel:
        console.print(
            f"world size {world.size} ({'nccl' if ctx.device.type == 'cuda' else 'gloo'}): batch_size "
            f"{p.batch_size} is per process, {p.batch_size * world.size} images per step in all"
        )
    recipe = recipe_class(p, ctx, Path(params.data.root) / p.dataset)
    ctx.settle_precision(recipe.nets, recipe.example_inputs)
    images_per_step = p.batch_size * world.size
    init_record = _initialize(recipe, p.init_from, state, console)
    generator_names = recipe_class.generator_names(p)
    ema = {
        name: AveragedModel(recipe.nets[name], multi_avg_fn=get_ema_multi_avg_fn(p.ema_decay), use_buffers=True)
        for name in (generator_names if p.ema_decay else ())
    }

    # Captured before a restore: saved optimizers carry the decayed rate of their step, not the base rate.
    base_lrs = {name: [g["lr"] for g in opt.param_groups] for name, opt in recipe.optimizers.items()}
    start_step, history, run_id, seconds_before, drawn_before, waited_before = 0, [], None, 0.0, 0, 0.0
    if state is not None:
        start_step, history, run_id = state["step"], state["history"], state.get("mlflow_run_id")
        # Checkpoints from before the total was recorded know only their last segment's speed.
        seconds_before = state.get("seconds", start_step / max(state["steps_per_second"], 1e-9))
        # Older checkpoints did not count their batches: their stream goes on from one batch per step.
        drawn_before = state.get("batches_drawn", start_step)
        waited_before = state.get("data_wait_seconds", 0.0)
        _restore(state, recipe, ema, ctx)
        console.print(f"resumed from step {start_step}")
    world.agree({"step": start_step, "params_hash": wanted_hash}, "where to resume")
    world.seed(params.seed, start_step)
    if start_step >= p.steps:
        console.print(f"{recipe_name}: already trained to step {start_step}; nothing to do")

    tags = {"git_commit": tracking.git_commit(), "params_hash": wanted_hash, "recipe": recipe_name}
    lineage = lambda: tracking.lineage(state, ckpt_path)  # noqa: E731 - hashed only when the run is missing
    hashes = {f"init_from_sha256.{name}": entry["sha256"] for name, entry in init_record.items()}
    run = None  # rank 0 logs the run
    if main:
        run = tracking.Run(recipe_name, {**flatten(wanted), **hashes}, tags, run_id=run_id, lineage=lineage)
    if run and run.replaced:
        console.print(f"MLflow run {run.replaced} is not in {tracking.tracking_uri()}; logging to new run {run.run_id}")
    samples = samples_dir(recipe_name, runs_root)
    if state is None and main:  # a fresh start: the folder DVC keeps between runs must not mix in an older run's sheets
        for old in (*samples.glob("step_*.png"), samples / "losses.png"):
            old.unlink(missing_ok=True)
    feed = Feed(iter(recipe.batches(params.seed, drawn_before)), ctx, drawn_before)

    segment_started = time.perf_counter()
    # Training time of the whole run, every segment, and how much of it waited for data.
    seconds = {"at_last_checkpoint": seconds_before, "waited": waited_before}

    def data_wait() -> float:
        """The share of this segment's time that the steps waited for their batches."""
        return feed.waited / max(time.perf_counter() - segment_started, 1e-9)

    def checkpoint(step: int, steps_per_second: float, digests: dict[str, list[str]]) -> None:
        seconds["at_last_checkpoint"] = seconds_before + time.perf_counter() - segment_started
        seconds["waited"] = waited_before + feed.waited
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
            "seconds": seconds["at_last_checkpoint"],
            "init_from": init_record,
            "world_size": world.size,
            "parameter_sha256": digests,
            "batches_drawn": feed.drawn,
            "data_wait_seconds": seconds["waited"],
        }
        save_checkpoint(state, ckpt_path)
        keep_step_copy(ckpt_path, step, p.keep_checkpoints)
        write_bytes_atomic(samples / "losses.png", loss_curves(history, recipe_class.losses, recipe_name))

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
                ctx.step = step
                losses = world.mean(recipe.step(feed))
                check_finite(losses, step, last_good)
                for net_name, averaged in ema.items():
                    averaged.update_parameters(recipe.nets[net_name])
                for key, value in losses.items():
                    window.setdefault(key, []).append(value)
                # The same means over the current log window that the CSV and MLflow record.
                means = {k: sum(v) / len(v) for k, v in window.items()}
                shown = " ".join(f"{k}={v:.3f}" for k, v in means.items())
                progress.update(step, f"{shown} data_wait={data_wait():.0%}")
                if step % p.log_every == 0 or step == p.steps:
                    history.append({"step": step, **means})
                    lrs = {f"lr_{k}": o.param_groups[0]["lr"] for k, o in recipe.optimizers.items()}
                    speed = {"steps_per_second": progress.rate, "images_per_second": progress.rate * images_per_step}
                    speed["data_wait"] = data_wait()
                    if main:
                        run.log_metrics({**means, **lrs, **speed}, step)
                    window = {}
                if main and (step % p.sample_every == 0 or step == p.steps):
                    sheet = sample_sheet(recipe.sample_columns())
                    write_image_atomic(samples / f"step_{step:06d}.png", sheet)
                    run.log_image(sheet, key="samples", step=step)
                if step % p.checkpoint_every == 0 or step == p.steps:
                    digests = world.parameter_digests(recipe.nets)  # every rank takes part
                    if main:
                        checkpoint(step, progress.rate, digests)
                        last_good = step
        if not main:
            return {}
        steps_done = p.steps - start_step
        # The whole run's speed, over every resumed segment; a run with nothing left to do keeps its checkpoint's.
        rate = p.steps / max(seconds["at_last_checkpoint"], 1e-9)
        waited = seconds["waited"] / max(seconds["at_last_checkpoint"], 1e-9)
        losses_csv = checkpoint_dir(recipe_name, runs_root).parent / "losses.csv"
        summary = _write_outputs(
            recipe_name, recipe_class.losses, metrics_root, losses_csv, history, (rate, images_per_step, waited)
        )
        warning = data_wait_warning(recipe_name, waited, loader_workers(p.num_workers, ctx.device.type == "cuda"))
        if steps_done and warning:
            console.print(warning)
        if steps_done:
            run.log_artifact(samples / "losses.png")
            for net_name in generator_names:
                module = ema[net_name].module if net_name in ema else recipe.nets[net_name]
                run.log_model(module.cpu().eval(), name=net_name, example=recipe.example_inputs[net_name])
                module.to(ctx.device)
        status = "FINISHED"
    finally:
        if run:
            run.end(status)
        world.close()
    losses_text = " ".join(f"{k}={v:.3f}" for k, v in summary["losses"].items())
    console.print(
        f"{recipe_name}: {p.steps} steps, {summary['steps_per_second']:.2f} steps/s, {losses_text}; "
        f"checkpoint {ckpt_path}, MLflow run {run.run_id}"
    )
    return summary


def _resumable(
    path: Path, wanted: dict, wanted_hash: str, code: dict[str, str], fresh_if_changed: bool, console
) -> Checkpoint | None:
    """The checkpoint to resume, or None to start fresh. A higher `steps` alone extends the run; other changed
    params refuse to resume unless `fresh_if_changed`; changed training code starts over with `fresh_if_changed`
    and resumes, saying so, without."""
    if not path.exists():
        return None
    state = load_checkpoint(path)
    recipe, steps_key = wanted["recipe"], f"{wanted['recipe']}.steps"
    changed = changed_keys(state["params"], wanted)
    if changed == [steps_key] and wanted[recipe]["steps"] > state["step"]:
        old, new = state["params"][recipe]["steps"], wanted[recipe]["steps"]
        factor = lr_factor(state["step"], new, wanted[recipe]["lr_decay"])
        console.print(
            f"steps changed from {old} to {new}: continuing {path} from step {state['step']}; the learning-rate "
            f"schedule is recomputed for {new} steps (factor {factor:.3g} at step {state['step']})"
        )
        state["params_hash"] = wanted_hash
    elif state["params_hash"] != wanted_hash:
        listed = ", ".join(changed) or "unknown"
        if not fresh_if_changed:
            raise UserError(
                f"{path} was made with other params (changed: {listed}); "
                "pass --fresh to start over, or restore the params to resume"
            )
        console.print(f"params changed since {path} ({listed}); starting fresh")
        return None
    files = changed_files(state.get("code", {}), code)
    if files:
        listed = ", ".join(files[:8]) + (f" and {len(files) - 8} more" if len(files) > 8 else "")
        if fresh_if_changed:
            console.print(f"training code changed since {path} ({listed}); starting fresh")
            return None
        console.print(f"training code changed since {path} ({listed}); resuming anyway (--fresh starts over)")
    return state


def _initialize(recipe, files: dict[str, str], state: Checkpoint | None, console) -> dict:
    """Fine-tuning: the networks of a fresh run start from `init_from`; a resumed run keeps its own weights."""
    if not files:
        return {}
    if state is not None:
        console.print("init_from is ignored: resuming from the checkpoint, whose weights already began from it")
        return state.get("init_from", {})
    record = init_from_files(recipe.nets, files)
    for name, entry in record.items():
        console.print(f"{name}: initialised from {entry['path']} (sha256 {entry['sha256'][:16]})")
    return record


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


def _write_outputs(
    recipe: str,
    loss_names: tuple[str, ...],
    root: Path,
    losses_csv: Path,
    history: list[dict],
    speed: tuple[float, int, float],
) -> dict:
    """metrics/RECIPE.train.json and the CSV; `speed` is (steps/s, images per step, the share that waited for data)."""
    steps_per_second, images_per_step, data_wait = speed
    last = history[-1] if history else {}
    summary = {
        "steps": last.get("step", 0),
        "steps_per_second": round(steps_per_second, 4),
        "images_per_second": round(steps_per_second * images_per_step, 4),
        "data_wait": round(data_wait, 4),
        "losses": {k: round(v, 6) for k, v in last.items() if k != "step"},
    }
    write_json_atomic(root / f"{recipe}.train.json", summary)
    columns = [name for name in loss_names if any(name in row for row in history)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["step", *columns], lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_bytes_atomic(losses_csv, buffer.getvalue().encode())
    return summary
