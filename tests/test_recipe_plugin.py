"""A recipe is one module: a throw-away recipe module (tests/fixtures/recipe/) put into a copy of the checkout,
with its section in params.yaml, trains, evaluates, exports and serves through the ordinary commands, found by the
registry's own discovery, with nothing else in the pipeline naming it. The contract refuses a recipe missing a
part when it is registered or set up, and the README's Recipes table names registered recipes only."""

import io
import re
import shutil
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import REPO, importable_checkout, make_engine
from PIL import Image
from torch import nn

from tests.corpus import gradient
from tests.serving import Server
from transfigure.pipeline.train import recipes
from transfigure.pipeline.train.checkpoint import load_checkpoint
from transfigure.pipeline.train.recipes.base import Export, Recipe, TrainingState, register

RECIPE_MODULE = REPO / "tests/fixtures/recipe/tinypaired.py"
PNG = {"Content-Type": "image/png"}


def checkout_with_recipe(module: Path, folder: Path) -> Path:
    """A copy of models/ and pipeline/ with `module` added to its recipes; the folder to put on PYTHONPATH."""
    checkout = folder / "checkout"
    for name in ("models", "pipeline"):
        shutil.copytree(REPO / name, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(module, checkout / "pipeline/train/recipes" / module.name)
    return importable_checkout(checkout, folder / "site")


@pytest.mark.slow
def test_a_new_recipe_module_trains_evaluates_exports_and_serves_through_the_ordinary_commands(workdir, run_cli):
    env = {"PYTHONPATH": str(checkout_with_recipe(RECIPE_MODULE, workdir / "copy"))}
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["tinypaired"] = {"lambda_L1": 5}
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))

    refused = run_cli("train", "tinypaired", "--set", "tinypaired.stepz=3", env=env)
    assert refused.returncode == 2 and "tinypaired.stepz: unknown key" in refused.stderr, refused.stderr

    trained = run_cli("train", "tinypaired", env=env)
    assert trained.returncode == 0, trained.stderr
    state = load_checkpoint(workdir / "runs/tinypaired/checkpoints/last.pt")
    assert state["step"] == 3 and state["params"]["tinypaired"]["lambda_L1"] == 5.0  # its section is read
    assert (workdir / "runs/tinypaired/losses.csv").read_text().startswith("step,G,L1,D\n")
    assert (workdir / "runs/tinypaired/samples/step_000003.png").exists()

    evaluated = run_cli("evaluate", "tinypaired", "--features", "pixels-16", env=env)
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = yaml.safe_load((workdir / "metrics/tinypaired.json").read_text())
    assert {"psnr", "ssim", "kid", "fid"} <= set(metrics["AtoB"])
    assert (workdir / "reports/tinypaired/AtoB.png").exists()

    exported = run_cli("export", "tinypaired", env=env)
    assert exported.returncode == 0, exported.stderr
    engine = make_engine(workdir / "artifacts/tinypaired/AtoB.onnx", providers=["cpu"])
    assert engine.card.recipe == "tinypaired" and engine.card.source_domain == "digits_paired:A"
    # Served by the ordinary service (the container's command), which needs nothing of the recipe's code.
    buffer = io.BytesIO()
    Image.fromarray(gradient(36, 28)).save(buffer, format="PNG")
    with Server(workdir / "artifacts/tinypaired/AtoB.onnx") as running:
        answer = httpx.post(f"{running.url}/v1/translate", content=buffer.getvalue(), headers=PNG, timeout=60)
    assert answer.status_code == 200, answer.text[:300]
    with Image.open(io.BytesIO(answer.content)) as translated:
        assert translated.size == (36, 28) and translated.mode == "RGB"


class Forgetful(Recipe):
    """Builds a generator but gives the loop no example input to log it with."""

    name, Params, losses = "forgetful", None, ("G",)

    @classmethod
    def build_networks(cls, p) -> dict[str, nn.Module]:
        return {"G": nn.Identity()}

    @classmethod
    def exports(cls, p) -> dict[str, Export]:
        return {"AtoB": Export("G", "image_translation", "A", "B")}

    @classmethod
    def evaluate(cls, generators, p, inputs) -> dict:
        return {}

    def set_up(self, data_dir: Path) -> TrainingState:
        nets = self.build_networks(self.p)
        return TrainingState([], nets, {"G": None}, example_inputs={})

    def step(self, next_batch) -> dict[str, float]:
        return {}

    def sample_columns(self) -> dict:
        return {}


def test_a_recipe_missing_a_part_is_refused_when_set_up_or_registered():
    with pytest.raises(TypeError, match=r"recipe 'forgetful': set_up's TrainingState lacks example_inputs\['G'\]"):
        Forgetful(None, None, Path("."))

    class Unfinished(Recipe):
        name, Params, losses = "unfinished", None, ()

    with pytest.raises(TypeError, match="Unfinished does not define build_networks, evaluate, exports, sample_colu"):
        register(Unfinished)
    assert "unfinished" not in recipes.names()


def test_the_readme_documents_registered_recipes_and_every_one_make_run_trains():
    # The list of recipes is the registry's (`--help`); the table documents them, so it names no recipe that is
    # gone and misses none that `make run` trains. A new recipe needs no README edit to train, only to be documented.
    readme = (REPO / "README.md").read_text()
    in_table = re.findall(r"^\| `(\w+)` \| (yes|no) \|", readme, re.MULTILINE)
    assert {name for name, _ in in_table} <= set(recipes.names())
    default = yaml.safe_load((REPO / "params.yaml").read_text())["recipes"]
    assert sorted(name for name, in_make_run in in_table if in_make_run == "yes") == sorted(default)
