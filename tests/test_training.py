import csv
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BIN, tiny
from rich.console import Console

from transfigure.models import objectives
from transfigure.pipeline.errors import TrainingDiverged, UserError
from transfigure.pipeline.params import ParamsError, load_params
from transfigure.pipeline.train import recipes
from transfigure.pipeline.train.checkpoint import load_checkpoint, save_checkpoint
from transfigure.pipeline.train.context import Context
from transfigure.pipeline.train.loop import lr_factor, train
from transfigure.pipeline.train.parts import ImagePool

QUIET = Console(file=open(os.devnull, "w"))  # noqa: SIM115 - lives for the whole test session


# Clipping and gradient penalties change a recipe's critic step (its optimizer, n_critic, a penalty on its own
# critic, conditional ones included), so they run with every recipe; the other objectives differ only in their
# loss formulas (oracle-tested in test_objectives.py): all of them with cyclegan, one with each other recipe.
CASES = [(recipe, objective) for recipe in recipes.names() for objective in ("wgan", "wgan-gp", "wgan-lp")]
CASES += [("cyclegan", objective) for objective in ("minimax", "nsgan", "lsgan", "hinge")]
CASES += [(recipe, "minimax") for recipe in recipes.names() if recipe != "cyclegan"]


@pytest.mark.parametrize("recipe, objective", CASES)
def test_every_recipe_trains_with_the_objectives_that_change_its_step(workdir, recipe, objective):
    # pix2pix's critic has batch norm, which a gradient penalty refuses (test_a_penalty_refuses_a_batch_norm_critic).
    norm = [f"{recipe}.discriminator.norm=instance"] if recipe.startswith("pix2pix") and "-" in objective else []
    params = load_params("params.yaml", [*tiny(recipe), f"{recipe}.objective={objective}", *norm])
    p = recipes.params_of(params, recipe)
    ctx = Context.create(p)
    model = recipes.get(recipe)(p, ctx, Path(params.data.root) / p.dataset)
    stream = iter(model.batches(params.seed, 0))
    used = []

    def next_batch():
        used.append(1)
        return ctx.to_device(next(stream))

    critic = model.state.nets["D" if "D" in model.state.nets else "D_A"]
    before = {k: v.detach().clone() for k, v in critic.state_dict().items()}
    losses = model.step(next_batch)
    assert losses and all(math.isfinite(v) for v in losses.values())
    # The objective's recommended number of critic steps per generator step is honoured.
    assert len(used) == objectives.get(objective).recommended["n_critic"]
    assert any(not torch.equal(before[k], v) for k, v in critic.state_dict().items())
    if objective == "wgan":
        clip = objectives.get("wgan").clip
        assert all(p.abs().max() <= clip + 1e-7 for p in critic.parameters())
    columns = list(model.sample_columns().values())
    assert all(column.shape == columns[0].shape for column in columns)


def test_train_writes_checkpoint_metrics_and_resumes(workdir):
    params = load_params("params.yaml", tiny("pix2pix", steps=4, every=2))
    summary = train("pix2pix", params, QUIET)
    state = load_checkpoint(workdir / "runs/pix2pix/checkpoints/last.pt")
    assert state["step"] == 4 and summary["steps"] == 4
    assert set(state) >= {
        "networks",
        "optimizers",
        "scaler",
        "pools",
        "rng",
        "params",
        "params_hash",
        "history",
        "code",
    }
    assert [row["step"] for row in state["history"]] == [2, 4]
    metrics = json.loads((workdir / "metrics/pix2pix.train.json").read_text())
    assert set(metrics["losses"]) == {"G", "G_adv", "L1", "CE", "D"} and metrics["steps_per_second"] > 0
    assert metrics["losses"]["CE"] == 0 and metrics["losses"]["L1"] > 0  # an RGB output has no cross-entropy
    assert 0 < metrics["data_wait"] < 1 and state["batches_drawn"] == 4
    # The CSV's columns are the recipe's declared losses, in its order.
    assert (workdir / "runs/pix2pix/losses.csv").read_text().splitlines()[0] == "step,G,G_adv,L1,CE,D"

    again = train("pix2pix", params, QUIET)  # nothing left to do: the measured speed is kept, not zeroed
    assert again["steps_per_second"] == round(4 / state["seconds"], 4) > 0

    other = load_params("params.yaml", [*tiny("pix2pix", steps=4, every=2), "pix2pix.lambda_L1=5"])
    with pytest.raises(UserError, match=r"other params \(changed: pix2pix.lambda_L1\).*--fresh"):
        train("pix2pix", other, QUIET)


@pytest.mark.slow
def test_a_finished_run_extends_when_only_steps_grow_and_keeps_periodic_checkpoints(workdir):
    from rich.console import Console

    settings = [*tiny("pix2pix", steps=4, every=2), "pix2pix.keep_checkpoints=2"]
    train("pix2pix", load_params("params.yaml", settings), QUIET)
    first = load_checkpoint(workdir / "runs/pix2pix/checkpoints/last.pt")
    console = Console(record=True, width=200)
    longer = load_params("params.yaml", [*settings, "pix2pix.steps=6"])
    summary = train("pix2pix", longer, console)
    log = console.export_text()
    assert "steps changed from 4 to 6: continuing" in log and "recomputed for 6 steps (factor 0.667 at step 4)" in log
    state = load_checkpoint(workdir / "runs/pix2pix/checkpoints/last.pt")
    assert state["step"] == 6 and state["params"]["pix2pix"]["steps"] == 6
    assert [row["step"] for row in state["history"]] == [2, 4, 6], "the old history goes on"
    # The speed covers both segments: six steps over the time of both, not the last two steps alone.
    assert state["seconds"] > first["seconds"] and summary["steps_per_second"] == round(6 / state["seconds"], 4)
    kept = sorted(p.name for p in (workdir / "runs/pix2pix/checkpoints").glob("step_*.pt"))
    assert kept == ["step_000004.pt", "step_000006.pt"]
    assert load_checkpoint(workdir / "runs/pix2pix/checkpoints/step_000004.pt")["step"] == 4

    from transfigure.pipeline.evaluate.stage import evaluate_recipe
    from transfigure.pipeline.export.stage import export_recipe

    assert evaluate_recipe("pix2pix", longer, QUIET, step=4, features="pixels-16")["step"] == 4
    assert json.loads((workdir / "metrics/pix2pix.step_000004.json").read_text())["step"] == 4
    assert json.loads((workdir / "metrics/pix2pix.train.json").read_text())["steps"] == 6, "the final one stays"
    export_recipe("pix2pix", longer, QUIET, fp16=False, step=4)
    assert (workdir / "artifacts/pix2pix.step_000004/AtoB.onnx").exists() and not (
        workdir / "artifacts/pix2pix"
    ).exists()
    with pytest.raises(UserError, match="--step 3: no checkpoint of that step.*kept steps: 4, 6"):
        evaluate_recipe("pix2pix", longer, QUIET, step=3)


def test_an_experiments_export_gets_its_own_alias_next_to_latest(workdir, monkeypatch):
    from mlflow import MlflowClient

    from transfigure.pipeline.export.stage import export_recipe

    params = load_params("params.yaml", tiny("pix2pix", steps=2, every=2))
    train("pix2pix", params, QUIET)
    monkeypatch.setenv("DVC_EXP_NAME", "sunny-zebra")
    export_recipe("pix2pix", params, QUIET, fp16=False)
    version = MlflowClient().get_model_version_by_alias("transfigure-pix2pix-AtoB", "exp-sunny-zebra")
    assert str(version.version) == "1"


def test_training_writes_labelled_sample_sheets_and_loss_curves_and_shows_the_csv_means(workdir, capfd):
    from PIL import Image
    from rich.console import Console

    console = Console(record=True, width=300, force_terminal=False)
    train("cyclegan", load_params("params.yaml", tiny("cyclegan", steps=4, every=2)), console)
    samples = workdir / "runs/cyclegan/samples"
    assert sorted(p.name for p in samples.iterdir()) == ["losses.png", "step_000002.png", "step_000004.png"]
    sheet = np.asarray(Image.open(samples / "step_000004.png").convert("L"))
    # A header of six labels (real A ... rec B) above six columns of 64-px images (32-px digits, enlarged).
    assert sheet.shape[1] == 2 + 6 * (64 + 2) and (sheet[:14] < 128).sum() > 50
    assert Image.open(samples / "losses.png").format == "PNG"
    rows = list(csv.DictReader((workdir / "runs/cyclegan/losses.csv").open()))
    shown = [line for line in console.export_text().splitlines() if line.startswith("step 2/4")]
    assert shown and f"G={float(rows[0]['G']):.3f}" in shown[0] and f"D_A={float(rows[0]['D_A']):.3f}" in shown[0]
    assert "serving input example" not in capfd.readouterr().err, "MLflow's warning at the end of training"


def test_changed_training_code_resumes_with_a_note_or_starts_over_when_asked(workdir, monkeypatch):
    from transfigure.pipeline.train import loop

    lines = []
    console = Console(file=open(os.devnull, "w"))  # noqa: SIM115
    monkeypatch.setattr(console, "print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    params = load_params("params.yaml", tiny("pix2pix", steps=2, every=2))
    train("pix2pix", params, console)
    recorded = load_checkpoint(workdir / "runs/pix2pix/checkpoints/last.pt")["code"]
    assert "pipeline/train/recipes/pix2pix.py" in recorded and "models/objectives.py" in recorded
    assert "pipeline/train/recipes/cyclegan.py" not in recorded, "another recipe's module does not shape pix2pix"

    edited = {**recorded, "models/objectives.py": "0" * 64}
    monkeypatch.setattr(loop, "code_fingerprint", lambda recipe: edited)
    longer = load_params("params.yaml", tiny("pix2pix", steps=2, every=2))
    train("pix2pix", longer, console)
    assert any(
        "training code changed" in line and "models/objectives.py" in line and "resuming" in line for line in lines
    )
    assert load_checkpoint(workdir / "runs/pix2pix/checkpoints/last.pt")["code"] == recorded, "nothing to redo"

    lines.clear()
    train("pix2pix", longer, console, fresh_if_changed=True)
    assert any("training code changed" in line and "starting fresh" in line for line in lines)
    assert load_checkpoint(workdir / "runs/pix2pix/checkpoints/last.pt")["code"] == edited


def test_divergence_stops_with_the_loss_and_step_and_keeps_the_last_good_checkpoint(workdir, monkeypatch):
    pix2pix = recipes.get("pix2pix")
    original = pix2pix.step
    calls = []

    def diverging(self, next_batch):
        losses = original(self, next_batch)
        calls.append(1)
        return {**losses, "L1": float("nan")} if len(calls) == 3 else losses

    monkeypatch.setattr(pix2pix, "step", diverging)
    params = load_params("params.yaml", tiny("pix2pix", steps=6, every=2))
    with pytest.raises(TrainingDiverged, match=r"loss L1 became nan at step 3; the last good checkpoint \(step 2\)"):
        train("pix2pix", params, QUIET)
    assert load_checkpoint(workdir / "runs/pix2pix/checkpoints/last.pt")["step"] == 2


def test_ema_weights_are_saved_and_used_for_export(workdir):
    params = load_params("params.yaml", [*tiny("cdcgan", steps=3, every=3), "cdcgan.ema_decay=0.5"])
    train("cdcgan", params, QUIET)
    state = load_checkpoint(workdir / "runs/cdcgan/checkpoints/last.pt")
    ema_generator = recipes.load_trained(state).generators["generator"]
    p = recipes.params_of(params, "cdcgan")
    raw_generator = recipes.get("cdcgan").generators(p, state["networks"], {}, state["network_args"])["generator"]
    key = "net.0.weight"
    assert torch.equal(raw_generator.state_dict()[key], state["networks"]["G"][key])
    assert not torch.equal(ema_generator.state_dict()[key], raw_generator.state_dict()[key])


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_and_finishes_its_steps(workdir):
    steps = 20
    args = [str(BIN / "transfigure"), "train", "cyclegan", *sum((["--set", o] for o in tiny("cyclegan", steps, 5)), [])]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    ckpt = workdir / "runs/cyclegan/checkpoints/last.pt"
    process = subprocess.Popen(args, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = load_checkpoint(ckpt)["step"]
    assert 0 < killed_at < steps, "the run should be killed part-way"

    resumed = subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from step {killed_at}" in resumed.stdout
    state = load_checkpoint(ckpt)
    assert state["step"] == steps
    assert state["history"][-1]["step"] == steps
    leftovers = [p.name for p in ckpt.parent.iterdir() if p.name != "last.pt" and not p.name.startswith("step_")]
    assert not leftovers, "no temporary file survives the kill"


def test_an_interrupted_checkpoint_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)

    def broken_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint({"step": 2}, path)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_checkpoints_refuse_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "payload": Console}, path)
    with pytest.raises(UserError, match="not a readable Transfigure checkpoint"):
        load_checkpoint(path)


def test_learning_rate_is_constant_then_decays_linearly_to_zero():
    assert [lr_factor(s, 100, True) for s in (0, 50, 75, 99)] == [1.0, 1.0, 0.5, pytest.approx(0.02)]
    assert lr_factor(99, 100, False) == 1.0


def test_image_pool_returns_a_mix_of_new_and_stored_images():
    torch.manual_seed(0)
    pool = ImagePool(4)
    first = torch.zeros(4, 1, 2, 2)
    assert torch.equal(pool.query(first), first)
    mixed = pool.query(torch.ones(64, 1, 2, 2))
    assert 0 < (mixed.flatten(1).mean(1) == 0).sum() <= 4  # some stored zeros come back, each at most once
    assert torch.equal(ImagePool(0).query(first), first)


def test_cpu_refuses_mixed_precision(workdir):
    params = load_params("params.yaml", [*tiny("cdcgan"), "cdcgan.precision=bf16", "cdcgan.device=cpu"])
    with pytest.raises(UserError, match="needs a CUDA device"):
        Context.create(recipes.params_of(params, "cdcgan"))
    if not torch.cuda.is_available():
        params = load_params("params.yaml", [*tiny("cdcgan"), "cdcgan.device=cuda"])
        with pytest.raises(UserError, match="no CUDA device"):
            Context.create(recipes.params_of(params, "cdcgan"))


@pytest.mark.slow
def test_mlflow_server_receives_params_metric_histories_and_images(workdir, tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import urllib.request

        uri = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(0.5)
        os.environ["MLFLOW_TRACKING_URI"] = uri
        params = load_params("params.yaml", tiny("cdcgan", steps=4, every=2))
        train("cdcgan", params, QUIET)

        from mlflow import MlflowClient

        client = MlflowClient(uri)
        run = client.search_runs([client.get_experiment_by_name("transfigure").experiment_id])[0]
        assert run.info.run_name == "cdcgan" and run.data.params["cdcgan.objective"] == "hinge"
        assert (
            run.data.tags["params_hash"] == load_checkpoint(workdir / "runs/cdcgan/checkpoints/last.pt")["params_hash"]
        )
        assert [m.step for m in client.get_metric_history(run.info.run_id, "G")] == [2, 4]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "images")}
        assert any("samples" in path for path in artifacts)
        assert "losses.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
        assert client.search_logged_models([run.info.experiment_id])
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_resumed_run_continues_the_learning_rate_schedule_not_a_decayed_copy(workdir, monkeypatch):
    pix2pix = recipes.get("pix2pix")
    original = pix2pix.step
    calls = []

    def interrupted(self, next_batch):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return original(self, next_batch)

    params = load_params("params.yaml", tiny("pix2pix", steps=8, every=2))
    monkeypatch.setattr(pix2pix, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train("pix2pix", params, QUIET)
    monkeypatch.setattr(pix2pix, "step", original)
    train("pix2pix", params, QUIET)
    state = load_checkpoint(workdir / "runs/pix2pix/checkpoints/last.pt")
    base = objectives.get("lsgan").recommended["lr"]
    for name in ("G", "D"):
        assert state["optimizers"][name]["param_groups"][0]["lr"] == pytest.approx(base * lr_factor(7, 8, True))


def test_unpaired_recipes_flip_by_default_as_the_reference_does():
    assert recipes.get("cyclegan").Params().augment.flip and recipes.get("alignflow").Params().augment.flip
    assert not recipes.get("pix2pix").Params().augment.flip


def test_a_penalty_refuses_a_batch_norm_critic_before_training(workdir):
    def checked(recipe, overrides):  # as `train` checks its recipe's section before anything starts
        return recipes.params_of(load_params("params.yaml", overrides), recipe)

    with pytest.raises(
        ParamsError, match=r"pix2pix: discriminator.norm: .*wgan-gp.*set discriminator.norm to instance"
    ):
        checked("pix2pix", ["pix2pix.objective=wgan-gp"])  # pix2pix's default critic has batch norm
    with pytest.raises(ParamsError, match=r"d_norm: .*wgan-lp.*set d_norm to spectral or none"):
        checked("cdcgan", ["cdcgan.objective=wgan-lp", "cdcgan.d_norm=batch"])
    checked("pix2pix", ["pix2pix.objective=wgan-gp", "pix2pix.discriminator.norm=instance"])
    checked("pix2pix", ["pix2pix.objective=hinge"])  # no penalty: batch norm is fine


@pytest.mark.slow
def test_a_resumed_run_trains_on_the_same_batches_as_one_that_went_through(workdir, monkeypatch):
    """Steps 3 and 4 of a run resumed from its step-2 checkpoint (with 2 loader processes) see the images of an
    uninterrupted run's steps 3 and 4 (with none), and end with the same weights."""
    import hashlib

    from transfigure.pipeline.train import feed

    seen: list[str] = []
    handed_out = feed.Feed.__call__

    def recording(self):
        batch = handed_out(self)
        seen.append(hashlib.sha256(b"".join(v.cpu().numpy().tobytes() for v in batch.values())).hexdigest())
        return batch

    monkeypatch.setattr(feed.Feed, "__call__", recording)
    settings = [*tiny("cyclegan", steps=4, every=2), "cyclegan.augment.flip=true"]
    train("cyclegan", load_params("params.yaml", [*settings, "cyclegan.num_workers=0"]), QUIET)
    through, seen[:] = list(seen), []
    checkpoints = workdir / "runs/cyclegan/checkpoints"
    finished = load_checkpoint(checkpoints / "last.pt")
    (checkpoints / "step_000002.pt").replace(checkpoints / "last.pt")
    train("cyclegan", load_params("params.yaml", [*settings, "cyclegan.num_workers=2"]), QUIET)
    assert len(through) == 4 and seen == through[2:]
    resumed = load_checkpoint(checkpoints / "last.pt")
    for name, weights in finished["networks"].items():
        assert all(torch.equal(weights[k], v) for k, v in resumed["networks"][name].items()), name


def test_precision_auto_keeps_fp32_for_networks_too_small_for_autocast_to_pay(workdir):
    from transfigure.models.generators import build_generator
    from transfigure.pipeline.train.context import AUTOCAST_MIN_GFLOP_PER_IMAGE, generator_gflop_per_image

    params = load_params("params.yaml", tiny("cdcgan"))
    p = recipes.params_of(params, "cdcgan")
    ctx = Context.create(p)
    model = recipes.get("cdcgan")(p, ctx, Path(params.data.root) / p.dataset)
    ctx.precision = "bf16"  # what auto gives on a GPU before the networks are known
    ctx.settle_precision(model.state.nets, model.state.example_inputs)
    assert ctx.precision == "fp32"
    # The reference CycleGAN generator at 256x256 (counted on the meta device: shapes only) passes the threshold.
    reference = {"G": build_generator("resnet_9blocks", ngf=64).to("meta")}
    example = {"G": {"image": torch.zeros(2, 3, 256, 256, device="meta")}}
    assert generator_gflop_per_image(reference, example) > AUTOCAST_MIN_GFLOP_PER_IMAGE
    ctx.precision = "bf16"
    ctx.settle_precision(reference, example)
    assert ctx.precision == "bf16"
