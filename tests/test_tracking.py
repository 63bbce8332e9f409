"""MLflow lineage across machines: a checkpoint whose run is not in this tracking store (copied by `dvc pull` or
by hand) logs to a new run that records where it came from, and a tracking server that does not answer is one
clear line, never a traceback."""

import shutil

import pytest
from conftest import tiny
from mlflow.tracking import MlflowClient
from rich.console import Console

from tests.serving import free_port
from transfigure.pipeline.files import sha256_of_file
from transfigure.pipeline.params import load_params
from transfigure.pipeline.train.checkpoint import load_checkpoint
from transfigure.pipeline.train.loop import train

pytestmark = pytest.mark.slow  # servers, clusters or processes: minutes

TINY = tiny("cyclegan", steps=2, every=2)
SETS = [arg for override in TINY for arg in ("--set", override)]
EVALUATE = ["evaluate", "cyclegan", *SETS, "--features", "pixels-16"]  # no digit classifier in these folders


def trained_cyclegan(workdir):
    train("cyclegan", load_params("params.yaml", TINY), Console(quiet=True))
    return workdir / "runs/cyclegan/checkpoints/last.pt"


def test_a_checkpoint_from_another_store_logs_to_a_new_run_that_names_its_origin(
    workdir, run_cli, tmp_path, mlflow_template
):
    checkpoint = trained_cyclegan(workdir)
    original = load_checkpoint(checkpoint)["mlflow_run_id"]
    clone = tmp_path / "clone"  # a teammate's clone: params and the DVC outputs, but not our mlflow.db
    (clone / "runs/cyclegan").mkdir(parents=True)
    shutil.copy(workdir / "params.yaml", clone / "params.yaml")
    shutil.copytree(checkpoint.parent, clone / "runs/cyclegan/checkpoints")
    shutil.copyfile(mlflow_template, clone / "mlflow.db")  # the clone's own store, empty (migrations take seconds)
    own_store = {"MLFLOW_TRACKING_URI": ""}  # unset: the clone's own mlflow.db

    evaluated = run_cli(*EVALUATE, cwd=clone, env=own_store)
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"MLflow run {original}" in evaluated.stdout and "is not in" in evaluated.stdout
    client = MlflowClient(f"sqlite:///{clone / 'mlflow.db'}")
    (run,) = client.search_runs(
        [client.get_experiment_by_name("transfigure").experiment_id],
        f"tags.`transfigure.original_run_id` = '{original}'",
    )
    assert run.data.tags["transfigure.checkpoint_sha256"] == sha256_of_file(checkpoint)
    assert run.data.tags["transfigure.checkpoint_commit"] == load_checkpoint(checkpoint)["git_commit"]
    assert "eval.AtoB.kid" in run.data.metrics

    exported = run_cli("export", "cyclegan", cwd=clone, env=own_store)
    assert exported.returncode == 0, exported.stderr
    versions = client.search_model_versions("name = 'transfigure-cyclegan-AtoB'")
    assert (
        len(versions) == 1 and client.get_run(versions[0].run_id).data.tags["transfigure.original_run_id"] == original
    )

    resumed = run_cli("train", "cyclegan", *SETS, cwd=clone, env=own_store)
    assert resumed.returncode == 0, resumed.stderr
    assert f"MLflow run {original} is not in" in resumed.stdout and "Traceback" not in resumed.stderr


def test_a_tracking_server_that_does_not_answer_is_one_line_naming_it(workdir, run_cli):
    trained_cyclegan(workdir)
    uri = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    away = {"MLFLOW_TRACKING_URI": uri}

    for command in (["train", "cyclegan", "--fresh", *SETS], ["export", "cyclegan"]):
        result = run_cli(*command, cwd=workdir, env=away, timeout=120)
        assert result.returncode == 2, result.stdout + result.stderr
        assert uri in result.stderr and "cannot be reached" in result.stderr and "Traceback" not in result.stderr
    assert not (workdir / "artifacts").exists(), "export checks the server before doing its work"

    evaluated = run_cli(*EVALUATE, cwd=workdir, env=away, timeout=120)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "warning" in evaluated.stdout and uri in evaluated.stdout
    assert (workdir / "metrics/cyclegan.json").exists()
