"""`evaluate`: a recipe's checkpoint scored by the recipe's own evaluation, and the comparison of two folders."""

from __future__ import annotations

from pathlib import Path

from pipeline import tracking
from pipeline.data.datasets import load_manifest
from pipeline.errors import UserError
from pipeline.evaluate import metrics
from pipeline.evaluate.classifier import CLASSIFIER, load_classifier
from pipeline.evaluate.measures import EvalInputs
from pipeline.files import write_json_atomic
from pipeline.params import Params, flatten
from pipeline.train import recipes
from pipeline.train.checkpoint import LAST, checkpoint_dir, load_checkpoint


def evaluate_recipe(
    recipe_name: str,
    params: Params,
    console,
    runs_root: Path = Path("runs"),
    metrics_root: Path = Path("metrics"),
    reports_root: Path = Path("reports"),
) -> dict:
    recipe = recipes.get(recipe_name)
    checkpoint = checkpoint_dir(recipe_name, runs_root) / LAST
    state = load_checkpoint(checkpoint)
    generators = recipes.generators_from_checkpoint(state)
    p = params.recipe(recipe_name)
    data_dir = Path(params.data.root) / p.dataset
    classifier = load_classifier(runs_root / "classifier" / CLASSIFIER.name)
    extractor = _extractor(classifier)
    reports = reports_root / recipe_name
    reports.mkdir(parents=True, exist_ok=True)
    inputs = EvalInputs(data_dir, load_manifest(data_dir), classifier, extractor, params.evaluate, params.seed, reports)
    result = recipe.evaluate(generators, p, inputs)
    result["features"] = extractor.name
    write_json_atomic(metrics_root / f"{recipe_name}.json", result)
    numbers = {f"eval.{k}": float(v) for k, v in flatten(result).items() if isinstance(v, int | float)}
    try:
        run_id = tracking.run_for_checkpoint(state, checkpoint, console)
        tracking.log_to_run(run_id, numbers, sorted(reports.glob("*.png")), "reports")
    except tracking.TrackingUnavailable as exc:
        console.print(f"warning: {exc}; the metrics are in {metrics_root / f'{recipe_name}.json'}, not in MLflow")
    summary = ", ".join(f"{k}={v:.4g}" for k, v in flatten(result).items() if isinstance(v, float))
    console.print(f"{recipe_name}: {summary}")
    return result


def _extractor(classifier):
    return metrics.ClassifierFeatures(classifier) if classifier is not None else metrics.PixelFeatures()


def compare(real: Path, fake: Path, features: str, weights: Path | None, sha256: str | None = None) -> dict:
    if features == "inception":
        if weights is None:
            raise UserError("--features inception needs --weights FILE (a local Inception-v3 state dict)")
        extractor = metrics.InceptionFeatures(weights, expected_sha256=sha256)
    elif features == "builtin":
        extractor = _extractor(load_classifier())
    else:
        raise UserError(f"--features: {features!r} is not builtin or inception")
    for folder in (real, fake):
        if not folder.is_dir():
            raise UserError(f"{folder}: no such folder")
    return metrics.compare_folders(real, fake, extractor)
