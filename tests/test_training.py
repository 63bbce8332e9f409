import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import BIN, tiny
from rich.console import Console

from models import objectives
from pipeline.errors import UserError
from pipeline.params import load_params
from pipeline.train import recipes
from pipeline.train.checkpoint import load_checkpoint, save_checkpoint
from pipeline.train.context import Context
from pipeline.train.loop import TrainingDiverged, lr_factor, train
from pipeline.train.parts import ImagePool

QUIET = Console(file=open(os.devnull, "w"))  # noqa: SIM115 - lives for the whole test session


@pytest.mark.parametrize("recipe", recipes.names())
@pytest.mark.parametrize("objective", objectives.names())
def test_every_recipe_trains_with_every_objective(workdir, recipe, objective):
    params = load_params("params.yaml", [*tiny(recipe), f"{recipe}.objective={objective}"])
    p = params.recipe(recipe)
    ctx = Context.create(p)
    model = recipes.get(recipe)(p, ctx, Path(params.data.root) / p.dataset)
    stream = iter(model.batches(params.seed, 0))
    used = []

    def next_batch():
        used.append(1)
        return ctx.to_device(next(stream))

    before = {k: v.detach().clone() for k, v in model.nets["D" if "D" in model.nets else "D_A"].state_dict().items()}
    losses = model.step(next_batch)
    assert losses and all(math.isfinite(v) for v in losses.values())
    # The objective's recommended number of critic steps per generator step is honoured.
    assert len(used) == objectives.get(objective).recommended["n_critic"]
    critic = model.nets["D" if "D" in model.nets else "D_A"]
    assert any(not torch.equal(before[k], v) for k, v in critic.state_dict().items())
    if objective == "wgan":
        clip = objectives.get("wgan").clip
        assert all(p.abs().max() <= clip + 1e-7 for p in critic.parameters())
    assert all(row.shape[1:] == model.sample_rows()[0].shape[1:] for row in model.sample_rows())


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
    assert set(metrics["losses"]) == {"G", "G_adv", "L1", "D"} and metrics["steps_per_second"] > 0
    # The CSV's columns are the recipe's declared losses, in its order: what dvc plots reads.
    assert (workdir / "metrics/pix2pix.train_losses.csv").read_text().splitlines()[0] == "step,G,G_adv,L1,D"

    again = train("pix2pix", params, QUIET)  # nothing left to do: the measured speed is kept, not zeroed
    assert again["steps_per_second"] == round(state["steps_per_second"], 4) > 0

    longer = load_params("params.yaml", tiny("pix2pix", steps=6, every=2))
    with pytest.raises(UserError, match=r"other params \(changed: pix2pix.steps\).*--fresh"):
        train("pix2pix", longer, QUIET)
    train("pix2pix", longer, QUIET, fresh=True)
    assert load_checkpoint(workdir / "runs/pix2pix/checkpoints/last.pt")["step"] == 6


def test_changed_training_code_resumes_with_a_note_or_starts_over_when_asked(workdir, monkeypatch):
    from pipeline.train import loop

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
    ema_generator = recipes.generators_from_checkpoint(state)["generator"]
    p = params.recipe("cdcgan")
    raw_generator = recipes.get("cdcgan").generators(p, state["networks"], {}, state["network_args"])["generator"]
    key = "net.0.weight"
    assert torch.equal(raw_generator.state_dict()[key], state["networks"]["G"][key])
    assert not torch.equal(ema_generator.state_dict()[key], raw_generator.state_dict()[key])


def test_a_run_killed_with_sigkill_resumes_and_finishes_its_steps(workdir):
    steps = 40
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
    assert not [p for p in ckpt.parent.iterdir() if p.name != "last.pt"]


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
        Context.create(params.cdcgan)
    if not torch.cuda.is_available():
        params = load_params("params.yaml", [*tiny("cdcgan"), "cdcgan.device=cuda"])
        with pytest.raises(UserError, match="no CUDA device"):
            Context.create(params.cdcgan)


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
