"""Data-parallel training under the real torchrun, two CPU processes over Gloo: the ranks stay bit-identical,
rank 0 alone writes, checkpoints move between one process and two, and a killed run resumes."""

import hashlib
import os
import subprocess
import time

import mlflow
import psutil
import pytest
import torch
from conftest import BIN, tiny

from transfigure.models.flows import channel_moments
from transfigure.pipeline import threads, tracking
from transfigure.pipeline.data.datasets import UnpairedDataset, batches
from transfigure.pipeline.params import load_params
from transfigure.pipeline.train import recipes
from transfigure.pipeline.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # servers, clusters or processes: minutes


def torchrun(*args: str) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(BIN / "transfigure"), *args]


def train_args(recipe: str, overrides: list[str]) -> list[str]:
    return ["train", recipe, *sum((["--set", o] for o in overrides), [])]


def environment(workdir) -> dict:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": mlflow_uri(workdir)}


def mlflow_uri(workdir) -> str:
    return f"sqlite:///{workdir / 'mlflow.db'}"


def run(command: list[str], workdir, timeout: float = 300) -> subprocess.CompletedProcess:
    env = environment(workdir)
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def saved_parameter_sha256(recipe: str, overrides: list[str], state: dict) -> dict[str, str]:
    """Each saved network's sha256 over its parameters' names and bytes, computed here from the checkpoint."""
    p = recipes.params_of(load_params("params.yaml", overrides), recipe)
    nets = recipes.get(recipe).build_networks(p, **state["network_args"])
    digests = {}
    for name, net in nets.items():
        net.load_state_dict(state["networks"][name])
        digest = hashlib.sha256()
        for key, value in net.named_parameters():
            digest.update(key.encode())
            digest.update(value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        digests[name] = digest.hexdigest()
    return digests


def assert_ranks_identical(recipe: str, overrides: list[str], state: dict) -> None:
    saved = saved_parameter_sha256(recipe, overrides, state)
    assert state["world_size"] == 2
    for name, per_rank in state["parameter_sha256"].items():
        assert len(per_rank) == 2, name
        assert per_rank[0] == per_rank[1], f"{name} differs between the ranks"
        assert per_rank[0] == saved[name], f"{name}: rank 0's digest is not of the saved weights"


@pytest.mark.slow
def test_cyclegan_on_two_processes_stays_in_sync_writes_once_and_continues_in_one(workdir):
    overrides = tiny("cyclegan", steps=4, every=2)
    first = run(torchrun(*train_args("cyclegan", overrides)), workdir)
    assert "world size 2 (gloo): batch_size 2 is per process, 4 images per step in all" in first.stdout
    assert first.stdout.count("cyclegan: 4 steps") == 1, "only rank 0 reports"

    folder = workdir / "runs/cyclegan"
    state = load_checkpoint(folder / "checkpoints/last.pt")
    assert state["step"] == 4
    assert_ranks_identical("cyclegan", overrides, state)
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["last.pt", "step_000002.pt", "step_000004.pt"]
    sheets = ["losses.png", "step_000002.png", "step_000004.png"]
    assert sorted(p.name for p in (folder / "samples").iterdir()) == sheets
    assert [row["step"] for row in state["history"]] == [2, 4]

    client = mlflow.MlflowClient(mlflow_uri(workdir))
    runs = client.search_runs([client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id])
    assert [r.info.run_id for r in runs] == [state["mlflow_run_id"]], "one MLflow run, rank 0's"
    assert [m.step for m in client.get_metric_history(state["mlflow_run_id"], "G")] == [2, 4]

    longer = tiny("cyclegan", steps=6, every=2)
    resumed = run([str(BIN / "transfigure"), *train_args("cyclegan", longer)], workdir)
    assert "continuing" in resumed.stdout and "from step 4" in resumed.stdout
    state = load_checkpoint(folder / "checkpoints/last.pt")
    assert (state["step"], state["world_size"]) == (6, 1)
    assert state["mlflow_run_id"] == runs[0].info.run_id


@pytest.mark.slow
def test_a_gradient_penalty_run_killed_under_torchrun_resumes_in_sync(workdir):
    """wgan-gp: the penalty's double backward goes through DDP; the run starts in one process, is extended on
    two, killed (every process at once, as when a machine goes down) and resumed on two."""
    steps = 12
    # One critic step per step: the penalty's path through DDP is the same, at a fifth of the time.
    gp = ["cyclegan.objective=wgan-gp", "cyclegan.n_critic=1"]
    overrides = [*tiny("cyclegan", steps=2, every=2), *gp]
    run([str(BIN / "transfigure"), *train_args("cyclegan", overrides)], workdir)

    overrides = [*tiny("cyclegan", steps=steps, every=2), *gp]
    checkpoints = workdir / "runs/cyclegan/checkpoints"
    process = subprocess.Popen(
        torchrun(*train_args("cyclegan", overrides)),
        cwd=workdir,
        env=environment(workdir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while not (checkpoints / "step_000004.pt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    # torchrun starts its workers in sessions of their own: each process is killed, as if the machine went down.
    for doomed in [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]:
        doomed.kill()
    process.wait()
    killed_at = load_checkpoint(checkpoints / "last.pt")["step"]
    assert 2 < killed_at < steps, "the run should be killed part-way"

    resumed = run(torchrun(*train_args("cyclegan", overrides)), workdir)
    assert f"resumed from step {killed_at}" in resumed.stdout
    state = load_checkpoint(checkpoints / "last.pt")
    assert state["step"] == steps
    assert_ranks_identical("cyclegan", overrides, state)
    leftovers = [p.name for p in checkpoints.iterdir() if p.name != "last.pt" and not p.name.startswith("step_")]
    assert not leftovers, "no temporary file survives the kill"


def test_ranks_draw_disjoint_shares_of_each_epoch(digits_root):
    dataset = UnpairedDataset(digits_root / "digits", "train")
    share = len(dataset) // 2

    def first_epoch(rank: int, world_size: int) -> list[bytes]:
        # From the epoch's first batch: a stream resumed mid-epoch runs on into the next epoch's shuffle.
        stream = batches(dataset, 1, seed=3, rank=rank, world_size=world_size)
        return [next(stream)["A"].numpy().tobytes() for _ in range(share)]

    rank_0, rank_1 = first_epoch(0, 2), first_epoch(1, 2)
    assert len(set(rank_0) | set(rank_1)) == len(set(rank_0)) + len(set(rank_1)), "no image on both ranks"
    assert first_epoch(0, 2)[:3] == rank_0[:3], "the same (seed, rank) gives the same stream"


def _moments_on_rank(rank: int, store_path: str, batches: torch.Tensor, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    moments = channel_moments(batches[rank])
    if rank == 0:
        torch.save(moments, out)
    torch.distributed.destroy_process_group()


def test_actnorm_starts_from_the_statistics_of_every_ranks_batch(tmp_path):
    """Two Gloo processes with different batches get the moments of both batches together (the known answer:
    the same statistics of the concatenation), so data-dependent initialisation agrees across ranks."""
    generator = torch.Generator().manual_seed(0)
    batches = torch.stack([torch.randn(2, 3, 4, 4, generator=generator) * (r + 1) + r for r in range(2)])
    out = tmp_path / "moments.pt"
    torch.multiprocessing.spawn(_moments_on_rank, args=(str(tmp_path / "store"), batches, str(out)), nprocs=2)
    together = torch.cat(list(batches))
    mean = together.mean((0, 2, 3), keepdim=True)
    expected = (
        mean,
        (together - mean).pow(2).mean((0, 2, 3), keepdim=True),
        (together - mean).pow(3).mean((0, 2, 3), keepdim=True),
    )
    for got, want in zip(torch.load(out), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(channel_moments(batches[0])[0], expected[0]), "one batch alone differs"


def test_threads_auto_shares_the_free_cores_among_torchrun_processes(monkeypatch):
    monkeypatch.setattr(threads, "free_cpus", lambda: 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert threads.resolve("auto") == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert threads.resolve("auto") == 1
    assert threads.resolve(3) == 3


def test_the_classifier_refuses_torchrun(workdir, run_cli):
    done = run_cli("train", "classifier", env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    assert done.returncode == 2
    assert "the digit classifier trains in one process" in done.stdout + done.stderr
