"""The pipeline end to end, with tiny params. dvc.yaml names each recipe's real files; every recipe trains,
evaluates and exports, in one process or, cyclegan and pix2pix, through `dvc repro` on a fresh copy of the
repository: one recipe first (metrics and plots show only it), then every stage's outputs, a clean `dvc status`
and a second `dvc repro` that does nothing; a change to one recipe's loss makes only that recipe's training stale
and retrains it from scratch; a `dvc exp run -S` experiment keeps its metrics."""

import json
import os
import shutil
import subprocess

import onnx
import pytest
import yaml
from conftest import BIN, REPO, importable_checkout, made_once, tiny
from rich.console import Console

from transfigure.pipeline.evaluate.classifier import fit_classifier
from transfigure.pipeline.evaluate.stage import evaluate_recipe
from transfigure.pipeline.export import model_card as card
from transfigure.pipeline.export.stage import export_recipe
from transfigure.pipeline.params import apply_overrides, load_params
from transfigure.pipeline.train import recipes
from transfigure.pipeline.train.checkpoint import load_checkpoint
from transfigure.pipeline.train.loop import train

# What `dvc repro` runs by default (params.yaml's `recipes`); every recipe has its stages once it is listed.
DEFAULT_RECIPES = yaml.safe_load((REPO / "params.yaml").read_text())["recipes"]
# The recipes tested end to end below; pix2pix_labels has its own training test (tests/test_labels.py).
RECIPES = ["cyclegan", "cut", "pix2pix", "cdcgan", "alignflow", "flowgan"]
# Every recipe's stages come from the same three templates (`foreach`), so the copy that DVC runs carries two:
# one unpaired with tiling graphs, one paired without. The other recipes' stages run in one process each.
DVC_RECIPES = ["cyclegan", "pix2pix"]
# Fewer images to evaluate, calibrate and check int8 companions on: every file is still made and checked.
SMALL_EVALUATION = ["evaluate.n_samples_per_class=4", "export.int8.calibration_images=4", "export.int8.check_images=4"]
QUIET = Console(quiet=True)

# What each recipe's evaluation reports and which models its export writes.
EXPECTED = {
    "cyclegan": ({"AtoB", "BtoA", "cycle", "real_content_accuracy"}, {"AtoB.png", "BtoA.png"}, ["AtoB", "BtoA"]),
    "cut": ({"AtoB", "real_content_accuracy"}, {"AtoB.png"}, ["AtoB"]),
    "pix2pix": ({"AtoB"}, {"AtoB.png"}, ["AtoB"]),
    "cdcgan": ({"class_accuracy", "kid", "fid", "diversity"}, {"classes.png", "walk.png"}, ["generator"]),
    "alignflow": ({"AtoB", "BtoA", "cycle", "bits_per_dim"}, {"AtoB.png", "BtoA.png"}, ["AtoB", "BtoA"]),
    "flowgan": ({"kid", "fid", "bits_per_dim"}, {"samples.png"}, ["generator"]),
}


def test_dvc_yaml_runs_registered_recipes_on_files_that_exist():
    """A stage whose dependency is missing fails only when DVC reaches it: check every recipe's stages now."""
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    sections = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(DEFAULT_RECIPES) <= set(RECIPES) and set(EXPECTED) == set(RECIPES)
    assert all(pipeline["stages"][stage]["foreach"] == "${recipes}" for stage in ("train", "evaluate", "export"))
    for recipe in recipes.names():
        assert recipe in sections, f"params.yaml has no {recipe}: section"
        for stage in ("train", "evaluate", "export"):
            deps = [d.replace("${item}", recipe) for d in pipeline["stages"][stage]["do"]["deps"]]
            code = [d for d in deps if not d.startswith(("data/", "runs/"))]  # not earlier stages' outputs
            missing = [d for d in code if not (REPO / d).exists()]
            assert not missing and f"pipeline/train/recipes/{recipe}.py" in code, f"{stage}@{recipe}: {missing}"


@pytest.fixture(scope="session")
def digits_classifier(tmp_path_factory, digits_root):
    """runs/classifier of a 20-step classifier, fitted once per test run on the prepared digits."""

    def make(folder):
        params = load_params(REPO / "params.yaml", [f"data.root={digits_root}", "evaluate.classifier.steps=20"])
        fit_classifier(params, QUIET, folder / "classifier.pt", folder)

    return made_once(tmp_path_factory, "classifier", make)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [recipe for recipe in RECIPES if recipe not in DVC_RECIPES])
def test_every_recipe_of_the_pipeline_trains_evaluates_and_exports(recipe, workdir, digits_classifier):
    shutil.copytree(digits_classifier, workdir / "runs/classifier")
    params = load_params("params.yaml", [*SMALL_EVALUATION, *tiny(recipe, steps=4, every=2)])
    train(recipe, params, QUIET)
    assert json.loads((workdir / f"metrics/{recipe}.train.json").read_text())["steps"] == 4
    assert (workdir / f"runs/{recipe}/losses.csv").read_text().startswith("step,")
    assert (workdir / f"runs/{recipe}/samples/losses.png").exists()

    metrics = evaluate_recipe(recipe, params, QUIET)
    keys, reports, models = EXPECTED[recipe]
    assert keys <= set(metrics) and ("BtoA" in metrics) == ("BtoA" in keys), metrics
    assert json.loads((workdir / f"metrics/{recipe}.json").read_text()) == json.loads(json.dumps(metrics))
    assert {p.name for p in (workdir / f"reports/{recipe}").iterdir()} == reports
    for direction in ("AtoB", "BtoA"):
        if direction in metrics:  # unpaired: content kept, judged by the classifier
            assert isinstance(metrics[direction]["content_accuracy"], float)
            assert isinstance(metrics[direction]["kid"], float) and isinstance(metrics[direction]["fid"], float)
    if "cycle" in metrics:
        assert set(metrics["cycle"]) == {"l1_A", "l1_B"}
    if recipe == "alignflow":  # invertible: the cycle is exact up to rounding, trained or not
        assert set(metrics["bits_per_dim"]) == {"A", "B"} and metrics["cycle"]["l1_A"] < 0.05

    export_recipe(recipe, params, QUIET, fp16=False)
    assert sorted(p.stem for p in (workdir / f"artifacts/{recipe}").glob("*.onnx") if "." not in p.stem) == models
    for name in models:
        check_exported(workdir / f"artifacts/{recipe}/{name}.onnx", recipe)


def check_exported(path, recipe):
    """The model card names the recipe; translators have their int8 companion, instance norm its tile graphs."""
    metadata = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert metadata["recipe"] == recipe and metadata["params_hash"]
    int8 = card.companion_path(path, card.INT8)
    # Translators get an int8 companion calibrated on their training images; samplers do not.
    assert int8.exists() == (metadata["kind"] == card.IMAGE_TRANSLATION), int8
    if int8.exists():
        companion = card.ModelCard.read(int8).to_metadata()
        assert companion["params_hash"] == metadata["params_hash"] and companion[card.INT8_QUALITY]
        assert " images of digits" in companion[card.INT8_CALIBRATION]
    # Instance-norm translators (cyclegan) also get their tiling graphs; batch norm (pix2pix) needs none.
    tiles = card.companion_path(path, card.TILE)
    assert tiles.exists() == (int(metadata.get("instance_norm_layers", "0")) > 0), tiles
    if recipe in ("cyclegan", "pix2pix"):
        assert tiles.exists() == (recipe == "cyclegan")


def fresh_copy(target, pipeline_recipes=None):
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    # Metrics of the developer's own runs are not ignored (DVC experiments keep them in git), but not the copy's.
    for name in filter(lambda name: name and not name.startswith("metrics/"), files):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    params = yaml.safe_load((target / "params.yaml").read_text())
    if pipeline_recipes is not None:
        params["recipes"] = pipeline_recipes
    # A benchmark's dataset, and pix2pix_labels' (not in the copy's pipeline: params check a section when used).
    del params["data"]["datasets"]["photos"], params["data"]["datasets"]["digits_labels"]
    overrides = ["evaluate.classifier.steps=20", *SMALL_EVALUATION]
    params = apply_overrides(params, overrides + [o for recipe in RECIPES for o in tiny(recipe, steps=4, every=2)])
    (target / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=target, check=True)
    subprocess.run([*git, "add", "-A"], cwd=target, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=target, check=True)


def copy_with_dvc(tmp_path):
    """A fresh copy of the repository (its pipeline with DVC_RECIPES) and a `dvc` that runs there with the copy's
    code; fails on a non-zero exit."""
    repo = tmp_path / "repo"
    repo.mkdir()
    fresh_copy(repo, DVC_RECIPES)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    # The stages run the copy's code (not the installed checkout's), so an edit in the copy is what they see.
    env["PYTHONPATH"] = str(importable_checkout(repo, tmp_path / "site"))

    def dvc(*args):
        result = subprocess.run(
            [str(BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=900
        )
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        return result.stdout

    return repo, dvc


# One test on one copy: its stages run in sequence, and a second copy would prepare and train everything again.
@pytest.mark.slow
def test_dvc_repro_runs_every_stage_then_only_what_a_code_change_makes_stale_and_experiments_keep_metrics(
    tmp_path,
):
    repo, dvc = copy_with_dvc(tmp_path)
    dvc("repro", "evaluate@cyclegan")
    shown = next(iter(json.loads(dvc("metrics", "show", "--json")).values()))["data"]  # the workspace's
    expected = {"metrics/classifier.json", "metrics/cyclegan.train.json", "metrics/cyclegan.json"}
    assert set(shown) == expected, "recipes never trained are not listed"
    assert all("error" not in entry for entry in shown.values()), shown
    plots = json.loads(dvc("plots", "show", "--json"))["data"]
    pictures = [name for name, entries in plots.items() if entries]
    assert pictures and all(name.startswith(("runs/cyclegan/samples/", "reports/cyclegan/")) for name in pictures)
    assert {entry["type"] for name in pictures for entry in plots[name]} == {"image"}
    assert "runs/cyclegan/samples/losses.png" in pictures and "reports/cyclegan/AtoB.png" in pictures

    dvc("repro")

    assert json.loads((repo / "data/prepared/digits/report.json").read_text())["rejected"] == []
    assert json.loads((repo / "metrics/classifier.json").read_text())["test_accuracy"]["B"] > 0
    for recipe in DVC_RECIPES:  # what the in-process test checks of the other recipes
        assert (repo / f"runs/{recipe}/checkpoints/last.pt").exists()
        assert json.loads((repo / f"metrics/{recipe}.train.json").read_text())["steps"] == 4
        assert (repo / f"runs/{recipe}/losses.csv").read_text().startswith("step,")
        assert (repo / f"runs/{recipe}/samples/losses.png").exists()
        keys, reports, models = EXPECTED[recipe]
        metrics = json.loads((repo / f"metrics/{recipe}.json").read_text())
        assert keys <= set(metrics) and ("BtoA" in metrics) == ("BtoA" in keys), metrics
        assert {p.name for p in (repo / f"reports/{recipe}").iterdir()} == reports
        exported = sorted(p.stem for p in (repo / f"artifacts/{recipe}").glob("*.onnx") if "." not in p.stem)
        assert exported == models
        for name in models:
            check_exported(repo / f"artifacts/{recipe}/{name}.onnx", recipe)
    cyclegan = json.loads((repo / "metrics/cyclegan.json").read_text())
    for key in ("psnr", "ssim", "psnr_identity", "content_accuracy", "kid", "fid"):
        assert isinstance(cyclegan["AtoB"][key], float) and isinstance(cyclegan["BtoA"][key], float)
    assert set(cyclegan["cycle"]) == {"l1_A", "l1_B"}
    assert (repo / "mlflow.db").exists()
    assert any((repo / "mlruns").rglob("*.png")), "sample grids are logged next to mlflow.db"

    assert "up to date" in dvc("status")
    second = dvc("repro")
    assert "Running stage" not in second
    # The stages are those of params.yaml's recipes (the copy's DVC_RECIPES).
    listed = {name for name in dvc("stage", "list", "--name-only").split() if name.startswith("train@")}
    assert listed == {f"train@{recipe}" for recipe in DVC_RECIPES}
    shown = dvc("metrics", "show")
    assert all(f"metrics/{recipe}.json" in shown for recipe in DVC_RECIPES), shown

    # A fix to pix2pix's loss (here: the same L1 written the other way round) must not leave old weights in place.
    module = repo / "pipeline/train/recipes/pix2pix.py"
    source = module.read_text()
    assert "F.l1_loss(fake_B, real_B)" in source
    module.write_text(source.replace("F.l1_loss(fake_B, real_B)", "F.l1_loss(real_B, fake_B)"))
    trained = ["cyclegan", "pix2pix"]
    before = {recipe: load_checkpoint(repo / f"runs/{recipe}/checkpoints/last.pt")["code"] for recipe in trained}
    stale = {name for name in json.loads(dvc("status", "--json")) if name.startswith("train@")}
    assert "train@pix2pix" in stale and "train@cyclegan" not in stale, "cyclegan's code did not change"
    # Training is what the fingerprint guards (`--fresh-if-changed`); evaluate and export simply rerun after it.
    third = dvc("repro", "train@pix2pix")
    assert "training code changed" in third and "pipeline/train/recipes/pix2pix.py" in third, third[-3000:]
    after = {recipe: load_checkpoint(repo / f"runs/{recipe}/checkpoints/last.pt")["code"] for recipe in trained}
    assert [recipe for recipe in trained if after[recipe] != before[recipe]] == ["pix2pix"]

    # Experiments: each keeps its own metrics (metrics/ is in git), and a higher `steps` extends the run.
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)  # metrics/ and dvc.lock, as a user commits them
    subprocess.run([*git, "commit", "-qm", "after repro"], cwd=repo, check=True)
    # The list of recipes is a param like any other: this experiment narrows it to cyclegan.
    out = dvc("exp", "run", "-S", "cyclegan.steps=6", "-S", "recipes=[cyclegan]", "train@cyclegan")
    assert "steps changed from 4 to 6: continuing" in out, out[-2000:]
    assert yaml.safe_load((repo / "params.yaml").read_text())["recipes"] == ["cyclegan"]
    assert "train@pix2pix" not in dvc("stage", "list", "--name-only").split()
    table = json.loads(dvc("exp", "show", "--json"))
    experiments = [e["revs"][0]["data"] for row in table for e in (row.get("experiments") or [])]
    assert [e["metrics"]["metrics/cyclegan.train.json"]["data"]["steps"] for e in experiments] == [6], table
    diff = json.loads(dvc("metrics", "diff", "--json"))
    assert diff["metrics/cyclegan.train.json"]["steps"] == {"old": 4, "new": 6, "diff": 2}
