import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Seeded runs repeat exactly on one machine; tests/README.md says how to run the suite under other CPU kernels.
torch.use_deterministic_algorithms(True, warn_only=True)
if os.environ.get("TRANSFIGURE_TEST_MKLDNN") == "0":
    torch.backends.mkldnn.enabled = False
# Several pytest workers on two cores: a second PyTorch thread per worker would wait for another worker's core at
# every barrier (docs/BENCHMARKS.md, Threads). Subprocesses pick their own count (threads: auto).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items):
    """The slow end-to-end tests first: `make test` hands each to its own worker at once (tests/README.md)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    """Under `--dist loadgroup` each xdist_group must run on one worker, which xdist marks in the test's id: a
    group without the mark would repeat its module's expensive fixtures on every worker (pyproject.toml's pin)."""
    if not session.config.getoption("loadgroup", default=False):
        return
    lost = [item.nodeid for item in session.items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if lost:
        raise pytest.UsageError(f"xdist lost the group of {len(lost)} tests, e.g. {lost[0]}: check pytest's version")


# What export needs to know about a model made in a test.
METADATA = {
    "recipe": "test",
    "direction": "AtoB",
    "source_domain": "A",
    "target_domain": "B",
    "training_commit": "x",
    "params_hash": "y",
}
BIN = Path(sys.executable).parent


def importable_checkout(checkout: Path, folder: Path) -> Path:
    """`folder`, made so that with it on PYTHONPATH `transfigure.models` and `transfigure.pipeline` are
    `checkout`'s folders (as the installed package maps them), ahead of the editable install."""
    (folder / "transfigure").mkdir(parents=True, exist_ok=True)
    for name in ("models", "pipeline"):
        (folder / "transfigure" / name).symlink_to(checkout / name, target_is_directory=True)
    return folder


def make_engine(path: Path, **fields):
    """An Engine with these InferenceOptions fields (`providers` as a list, as a command line gives them)."""
    from transfigure.pipeline.serve.engine import Engine
    from transfigure.pipeline.serve.options import InferenceOptions

    if "providers" in fields:
        fields["providers"] = tuple(fields["providers"])
    return Engine(path, InferenceOptions(**fields))


def made_once(tmp_path_factory, name: str, make) -> Path:
    """`make(folder)` run once for the whole test run, in a folder all pytest workers share (a file lock keeps
    the others waiting until it is done); the folder."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the run's base folder, above each worker's own
    folder = shared / name
    with FileLock(str(folder) + ".lock"):
        if not (folder / ".done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            (folder / ".done").touch()
    return folder


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty MLflow store with its schema in place: creating one runs every migration (about 3 s), so it is
    made once and tests start from a copy."""
    from mlflow import MlflowClient

    def make(folder: Path) -> None:
        MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()

    return made_once(tmp_path_factory, "mlflow-template", make) / "mlflow.db"


def tiny_translator_network() -> torch.nn.Module:
    """The network `tiny_translator` exports: a small seeded ResNet generator (instance norm), in eval mode."""
    from transfigure.models.generators import build_generator

    torch.manual_seed(0)
    return build_generator("resnet_2blocks", ngf=8).eval()


@pytest.fixture(scope="session")
def tiny_translator(tmp_path_factory):
    """`tiny_translator(path)` puts `tiny_translator_network()` as an ONNX translator (with its tiling graphs) at
    `path` and returns it: the same files every call, exported once per test run (an export takes seconds)."""
    from transfigure.pipeline.export.to_onnx import export_image_generator

    def make(folder: Path) -> None:
        export_image_generator(tiny_translator_network(), folder / "model.onnx", METADATA)

    exported = made_once(tmp_path_factory, "tiny-translator", make)

    def place(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        for source in exported.glob("model*.onnx"):  # model.onnx, model.statistics.onnx, model.tile.onnx
            shutil.copyfile(source, path.with_name(path.stem + source.name.removeprefix("model")))
        return path

    return place


@pytest.fixture
def run_cli(tmp_path, mlflow_template):
    """Runs the real `transfigure` console script in a folder; returns the CompletedProcess."""
    if not (tmp_path / "mlflow.db").exists():
        shutil.copyfile(mlflow_template, tmp_path / "mlflow.db")

    def run(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600):
        full_env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
            **(env or {}),
        }
        return subprocess.run(
            [str(BIN / "transfigure"), *args],
            cwd=cwd or tmp_path,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


def tiny_networks(recipe: str) -> list[str]:
    """The recipe's own `tiny` overrides (recipes/base.py): networks small enough to run every path in seconds."""
    from transfigure.pipeline.train import recipes

    return [f"{recipe}.{setting}" for setting in recipes.get(recipe).tiny]


def tiny(recipe: str, steps: int = 4, every: int = 2) -> list[str]:
    """Tiny networks and few steps, with a log, sample sheet and checkpoint every `every`."""
    return [
        *tiny_networks(recipe),
        f"{recipe}.steps={steps}",
        f"{recipe}.checkpoint_every={every}",
        f"{recipe}.sample_every={every}",
        f"{recipe}.log_every={every}",
    ]


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """The built-in datasets, prepared once per test run (tests only read them)."""
    from transfigure.pipeline.data.prepare import prepare_dataset
    from transfigure.pipeline.params import load_params

    def make(root: Path) -> None:
        params = load_params(REPO / "params.yaml")
        for name, spec in params.data.datasets.items():
            prepare_dataset(name, spec, root, params.seed, log=lambda _: None)

    return made_once(tmp_path_factory, "prepared", make)


@pytest.fixture
def workdir(tmp_path, digits_root, monkeypatch, mlflow_template) -> Path:
    """A folder with the repository's params.yaml pointing at the prepared data, and MLflow in sqlite there."""
    import yaml

    if not (tmp_path / "mlflow.db").exists():
        shutil.copyfile(mlflow_template, tmp_path / "mlflow.db")

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["root"] = str(digits_root)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path
