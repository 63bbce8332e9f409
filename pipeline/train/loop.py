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

from transfigure.pipeline import tracking
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
from transfigure.pipeline.train.parts import eval_mode
from transfigure.pipeline.train.recipes.base import TrainingState


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
    world = World.from_environment()
    if not world.main:
        console = Console(quiet=True)
    run = _TrainingRun(recipe_name, params, console, world, runs_root)
    run.start(fresh, fresh_if_changed)
    status = "FAILED"
    try:
        run.train_steps()
        if not world.main:
            return {}
        summary = run.finish(metrics_root)
        status = "FINISHED"
    finally:
        if run.tracked:
            run.tracked.end(status)
        world.close()
    losses_text = " ".join(f"{k}={v:.3f}" for k, v in summary["losses"].items())
    console.print(
        f"{recipe_name}: {run.p.steps} steps, {summary['steps_per_second']:.2f} steps/s, {losses_text}; "
        f"checkpoint {run.ckpt_path}, MLflow run {run.tracked.run_id}"
    )
    return summary


class _TrainingRun:
    """One training run of one recipe in this process: set up (or resumed), trained step by step, then summed up."""

    def __init__(self, recipe_name: str, params: Params, console, world: World, runs_root: Path):
        self.recipe_name, self.params, self.console, self.world = recipe_name, params, console, world
        self.recipe_class = recipes.get(recipe_name)
        self.p = recipes.params_of(params, recipe_name)
        self.wanted = training_params(params, recipe_name, self.p)
        self.wanted_hash = params_hash(self.wanted)
        self.code = code_fingerprint(self.recipe_class)
        self.ckpt_path = checkpoint_dir(recipe_name, runs_root) / LAST
        self.samples = samples_dir(recipe_name, runs_root)
        self.tracked = None  # the MLflow run, which rank 0 logs to
        self.start_step, self.history, self.window = 0, [], {}
        # Training time of the whole run, every segment, at the last checkpoint, and how much of it waited for data.
        self.seconds_before, self.waited_before = 0.0, 0.0
        self.seconds, self.waited = 0.0, 0.0

    def start(self, fresh: bool, fresh_if_changed: bool) -> None:
        """The recipe set up, the checkpoint (if any) restored, the MLflow run opened and the batches flowing."""
        p, world, console = self.p, self.world, self.console
        if world.main:  # a tracking server that does not answer stops the run before anything is built
            tracking.check_reachable()
        resumed = None
        if not fresh:
            resumed = _resumable(self.ckpt_path, self.wanted, self.wanted_hash, self.code, fresh_if_changed, console)
        self._set_up(resumed)
        # Captured before a restore: saved optimizers carry the decayed rate of their step, not the base rate.
        self.base_lrs = {name: [g["lr"] for g in opt.param_groups] for name, opt in self.state.optimizers.items()}
        drawn_before, run_id = 0, None
        if resumed is not None:
            self.start_step, self.history, run_id = resumed["step"], resumed["history"], resumed.get("mlflow_run_id")
            # Checkpoints from before the total was recorded know only their last segment's speed.
            self.seconds_before = resumed.get("seconds", self.start_step / max(resumed["steps_per_second"], 1e-9))
            # Older checkpoints did not count their batches: their stream goes on from one batch per step.
            drawn_before = resumed.get("batches_drawn", self.start_step)
            self.waited_before = resumed.get("data_wait_seconds", 0.0)
            _restore(resumed, self.state, self.ema, self.ctx)
            console.print(f"resumed from step {self.start_step}")
        self.seconds, self.waited = self.seconds_before, self.waited_before
        world.agree({"step": self.start_step, "params_hash": self.wanted_hash}, "where to resume")
        world.seed(self.params.seed, self.start_step)
        if self.start_step >= p.steps:
            console.print(f"{self.recipe_name}: already trained to step {self.start_step}; nothing to do")
        self._open_tracking(resumed, run_id)
        self.feed = Feed(iter(self.recipe.batches(self.params.seed, drawn_before)), self.ctx, drawn_before)
        self.segment_started = time.perf_counter()
        self.last_good = self.start_step or None

    def _set_up(self, resumed: Checkpoint | None) -> None:
        """The context, the recipe's training state, `init_from`'s weights for a fresh run and the EMA copies."""
        p, world = self.p, self.world
        torch.manual_seed(self.params.seed)
        self.ctx = Context.create(p, world)
        if world.parallel:
            self.console.print(
                f"world size {world.size} ({'nccl' if self.ctx.device.type == 'cuda' else 'gloo'}): batch_size "
                f"{p.batch_size} is per process, {p.batch_size * world.size} images per step in all"
            )
        self.recipe = self.recipe_class(p, self.ctx, Path(self.params.data.root) / p.dataset)
        self.state = self.recipe.state
        self.ctx.settle_precision(self.state.nets, self.state.example_inputs)
        self.images_per_step = p.batch_size * world.size
        self.init_record = _initialize(self.state, p.init_from, resumed, self.console)
        self.generator_names = self.recipe_class.generator_names(p)
        self.ema = {
            name: AveragedModel(self.state.nets[name], multi_avg_fn=get_ema_multi_avg_fn(p.ema_decay), use_buffers=True)
            for name in (self.generator_names if p.ema_decay else ())
        }

    def _open_tracking(self, resumed: Checkpoint | None, run_id: str | None) -> None:
        """The MLflow run (rank 0), and for a fresh start a samples folder without an older run's sheets."""
        self.tags = {"git_commit": tracking.git_commit(), "params_hash": self.wanted_hash, "recipe": self.recipe_name}
        if not self.world.main:
            return
        lineage = lambda: tracking.lineage(resumed, self.ckpt_path)  # noqa: E731 - hashed only when the run is missing
        hashes = {f"init_from_sha256.{name}": entry["sha256"] for name, entry in self.init_record.items()}
        flat = {**flatten(self.wanted), **hashes}
        self.tracked = tracking.Run(self.recipe_name, flat, self.tags, run_id=run_id, lineage=lineage)
        if self.tracked.replaced:
            self.console.print(
                f"MLflow run {self.tracked.replaced} is not in {tracking.tracking_uri()}; "
                f"logging to new run {self.tracked.run_id}"
            )
        if resumed is None:  # the folder DVC keeps between runs must not mix in an older run's sheets
            for old in (*self.samples.glob("step_*.png"), self.samples / "losses.png"):
                old.unlink(missing_ok=True)

    def data_wait(self) -> float:
        """The share of this segment's time that the steps waited for their batches."""
        return self.feed.waited / max(time.perf_counter() - self.segment_started, 1e-9)

    def train_steps(self) -> None:
        p = self.p
        with Progress(self.console, "step", p.steps, self.start_step, log_every=p.log_every) as progress:
            for step in range(self.start_step + 1, p.steps + 1):
                self._step(step, progress)
                if step % p.log_every == 0 or step == p.steps:
                    self._log(step, progress.rate)
                if self.world.main and (step % p.sample_every == 0 or step == p.steps):
                    self._sample(step)
                if step % p.checkpoint_every == 0 or step == p.steps:
                    digests = self.world.parameter_digests(self.state.nets)  # every rank takes part
                    if self.world.main:
                        self._checkpoint(step, progress.rate, digests)
                        self.last_good = step

    def _step(self, step: int, progress: Progress) -> None:
        """One step of the recipe at this step's learning rate, its losses checked, averaged and shown."""
        factor = lr_factor(step - 1, self.p.steps, self.p.lr_decay)
        for name, opt in self.state.optimizers.items():
            for group, base in zip(opt.param_groups, self.base_lrs[name], strict=True):
                group["lr"] = base * factor
        self.ctx.step = step
        losses = self.world.mean(self.recipe.step(self.feed))
        check_finite(losses, step, self.last_good)
        for net_name, averaged in self.ema.items():
            averaged.update_parameters(self.state.nets[net_name])
        for key, value in losses.items():
            self.window.setdefault(key, []).append(value)
        shown = " ".join(f"{k}={v:.3f}" for k, v in self._window_means().items())
        progress.update(step, f"{shown} data_wait={self.data_wait():.0%}")

    def _window_means(self) -> dict[str, float]:
        """The same means over the current log window that the CSV and MLflow record."""
        return {k: sum(v) / len(v) for k, v in self.window.items()}

    def _log(self, step: int, rate: float) -> None:
        means = self._window_means()
        self.history.append({"step": step, **means})
        lrs = {f"lr_{k}": o.param_groups[0]["lr"] for k, o in self.state.optimizers.items()}
        speed = {"steps_per_second": rate, "images_per_second": rate * self.images_per_step}
        speed["data_wait"] = self.data_wait()
        if self.world.main:
            self.tracked.log_metrics({**means, **lrs, **speed}, step)
        self.window = {}

    def _sample(self, step: int) -> None:
        with eval_mode(self.state.nets.values()):
            sheet = sample_sheet(self.recipe.sample_columns())
        write_image_atomic(self.samples / f"step_{step:06d}.png", sheet)
        self.tracked.log_image(sheet, key="samples", step=step)

    def _checkpoint(self, step: int, steps_per_second: float, digests: dict[str, list[str]]) -> None:
        self.seconds = self.seconds_before + time.perf_counter() - self.segment_started
        self.waited = self.waited_before + self.feed.waited
        state, ctx = self.state, self.ctx
        checkpoint: Checkpoint = {
            "recipe": self.recipe_name,
            "step": step,
            "params": self.wanted,
            "params_hash": self.wanted_hash,
            "code": self.code,
            "networks": {k: v.state_dict() for k, v in state.nets.items()},
            "ema": {k: v.state_dict() for k, v in self.ema.items()},
            "optimizers": {k: v.state_dict() for k, v in state.optimizers.items()},
            "scaler": ctx.scaler.state_dict() if ctx.scaler else None,
            "pools": {k: v.state() for k, v in state.pools.items()},
            "rng": rng_state(),
            "history": self.history,
            "mlflow_run_id": self.tracked.run_id,
            "network_args": state.network_args,
            "git_commit": self.tags["git_commit"],
            "steps_per_second": steps_per_second,
            "seconds": self.seconds,
            "init_from": self.init_record,
            "world_size": self.world.size,
            "parameter_sha256": digests,
            "batches_drawn": self.feed.drawn,
            "data_wait_seconds": self.waited,
        }
        save_checkpoint(checkpoint, self.ckpt_path)
        keep_step_copy(self.ckpt_path, step, self.p.keep_checkpoints)
        curves = loss_curves(self.history, self.recipe_class.losses, self.recipe_name)
        write_bytes_atomic(self.samples / "losses.png", curves)

    def finish(self, metrics_root: Path) -> dict:
        """The metrics and CSV DVC tracks, the data-wait warning, and for new steps the curves and the generators
        (EMA weights where kept) logged to MLflow; the summary."""
        p, name = self.p, self.recipe_name
        steps_done = p.steps - self.start_step
        # The whole run's speed, over every resumed segment; a run with nothing left to do keeps its checkpoint's.
        rate = p.steps / max(self.seconds, 1e-9)
        waited = self.waited / max(self.seconds, 1e-9)
        losses_csv = self.ckpt_path.parent.parent / "losses.csv"
        speed = (rate, self.images_per_step, waited)
        summary = _write_outputs(name, self.recipe_class.losses, metrics_root, losses_csv, self.history, speed)
        warning = data_wait_warning(name, waited, loader_workers(p.num_workers, self.ctx.device.type == "cuda"))
        if steps_done:
            if warning:
                self.console.print(warning)
            self.tracked.log_artifact(self.samples / "losses.png")
            for net_name in self.generator_names:
                module = self.ema[net_name].module if net_name in self.ema else self.state.nets[net_name]
                example = self.state.example_inputs[net_name]
                self.tracked.log_model(module.cpu().eval(), name=net_name, example=example)
                module.to(self.ctx.device)
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


def _initialize(training: TrainingState, files: dict[str, str], state: Checkpoint | None, console) -> dict:
    """Fine-tuning: the networks of a fresh run start from `init_from`; a resumed run keeps its own weights."""
    if not files:
        return {}
    if state is not None:
        console.print("init_from is ignored: resuming from the checkpoint, whose weights already began from it")
        return state.get("init_from", {})
    record = init_from_files(training.nets, files)
    for name, entry in record.items():
        console.print(f"{name}: initialised from {entry['path']} (sha256 {entry['sha256'][:16]})")
    return record


def _restore(state: dict, training: TrainingState, ema: dict, ctx: Context) -> None:
    for name, net in training.nets.items():
        net.load_state_dict(state["networks"][name])
    for name, opt in training.optimizers.items():
        opt.load_state_dict(state["optimizers"][name])
    for name, averaged in ema.items():
        averaged.load_state_dict(state["ema"][name])
    for name, pool in training.pools.items():
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
