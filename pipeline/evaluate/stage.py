"""`evaluate`: a recipe's checkpoint scored by the recipe's own evaluation, on the data and with the settings the
checkpoint was trained with, and the comparison of two folders."""

from __future__ import annotations

from pathlib import Path

from transfigure.pipeline import tracking
from transfigure.pipeline.data.datasets import load_manifest
from transfigure.pipeline.errors import UserError
from transfigure.pipeline.evaluate import metrics
from transfigure.pipeline.evaluate.classifier import CLASSIFIER, load_classifier, trained_on_same_images
from transfigure.pipeline.evaluate.measures import EvalInputs
from transfigure.pipeline.files import write_json_atomic
from transfigure.pipeline.params import Params, changed_keys, flatten, training_params
from transfigure.pipeline.train import recipes
from transfigure.pipeline.train.checkpoint import checkpoint_path

# Below this many images per set, KID's subsets are tiny and its unbiased estimate swings around zero.
KID_MIN_IMAGES = 50


def evaluate_recipe(
    recipe_name: str,
    params: Params,
    console,
    *,
    step: int | None = None,
    on_dataset: str | None = None,
    features: str | None = None,
    runs_root: Path = Path("runs"),
    metrics_root: Path = Path("metrics"),
    reports_root: Path = Path("reports"),
) -> dict:
    """Scores last.pt (or the kept checkpoint of `step`). The recipe settings come from the checkpoint; params
    that contradict them are refused, naming the keys. `on_dataset` evaluates on another prepared dataset of
    params instead, into files of their own; `features` overrides `evaluate.features`."""
    recipes.get(recipe_name)  # an unknown name fails here, naming the recipes there are
    checkpoint = checkpoint_path(recipe_name, step, runs_root)
    model = recipes.load_trained(checkpoint)
    state, trained = model.state, model.state["params"]
    trained_on = model.params.dataset
    if on_dataset is None:
        wanted = training_params(params, recipe_name, recipes.params_of(params, recipe_name))
        _refuse_contradictions(checkpoint, trained, wanted, recipe_name)
        dataset_name, dataset_spec = trained_on, trained["dataset"]
    else:
        if on_dataset not in params.data.datasets:
            raise UserError(f"--on-dataset {on_dataset}: no such dataset under data.datasets")
        dataset_name, dataset_spec = on_dataset, params.data.datasets[on_dataset].model_dump(mode="json")
        console.print(f"evaluating {checkpoint} (trained on {trained_on!r}) on dataset {on_dataset!r}")
    suffix = (f".step_{state['step']:06d}" if step is not None else "") + (f".on-{on_dataset}" if on_dataset else "")
    data_dir = Path(params.data.root) / dataset_name
    settings = params.evaluate if features is None else params.evaluate.model_copy(update={"features": features})
    classifier, extractor, why = _features(settings, dataset_name, dataset_spec, runs_root)
    console.print(f"features: {extractor.name} ({why})")
    reports = reports_root / f"{recipe_name}{suffix}"
    reports.mkdir(parents=True, exist_ok=True)
    sizes: list[int] = []
    inputs = EvalInputs(
        data_dir, load_manifest(data_dir), classifier, extractor, settings, params.seed, reports, sizes.append
    )
    result = model.recipe.evaluate(model.generators, model.params, inputs)
    result |= {"features": extractor.name, "dataset": dataset_name, "step": state["step"]}
    if sizes and (warning := small_sample_warning(min(sizes))):
        console.print(warning)
    metrics_file = metrics_root / f"{recipe_name}{suffix}.json"
    write_json_atomic(metrics_file, result)
    prefix = f"eval_on_{on_dataset}." if on_dataset else "eval."
    numbers = {f"{prefix}{k}": float(v) for k, v in flatten(result).items() if isinstance(v, int | float)}
    try:
        run_id = tracking.run_for_checkpoint(state, checkpoint, console)
        tracking.log_to_run(run_id, numbers, sorted(reports.glob("*.png")), reports.name, step=state["step"])
    except tracking.TrackingUnavailable as exc:
        console.print(f"warning: {exc}; the metrics are in {metrics_file}, not in MLflow")
    summary = ", ".join(f"{k}={v:.4g}" for k, v in flatten(result).items() if isinstance(v, float))
    console.print(f"{recipe_name}: {summary}")
    return result


def small_sample_warning(n_images: int) -> str | None:
    if n_images >= KID_MIN_IMAGES:
        return None
    return (
        f"warning: KID from as few as {n_images} images per set: its unbiased estimate can come out negative and "
        "its ± is wide; compare runs only at equal sample sizes (README, Evaluation)"
    )


def _refuse_contradictions(checkpoint: Path, trained: dict, wanted: dict, recipe: str) -> None:
    """Params must describe the model in the checkpoint; `steps` may differ (a kept or unfinished checkpoint), and
    a setting newer than the checkpoint may stand at its empty default."""
    newer_default = {k for k, v in flatten(wanted).items() if k not in flatten(trained) and v in ({}, None)}
    changed = [k for k in changed_keys(trained, wanted) if k != f"{recipe}.steps" and k not in newer_default]
    if changed:
        listed = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise UserError(
            f"{checkpoint} was trained with other settings than params now give ({listed}); evaluation uses the "
            "checkpoint's: restore those params (or retrain), or pass --on-dataset NAME to score it on another dataset"
        )


def _features(settings, dataset_name: str, dataset_spec: dict, runs_root: Path):
    """(classifier or None, feature extractor, why): chosen by `settings.features`, never by which files exist;
    the digit classifier only on the images it was trained on."""
    choice = settings.features
    if choice == "inception-v3":
        weights = metrics.InceptionFeatures(settings.inception_weights, expected_sha256=settings.inception_sha256)
        return None, weights, "evaluate.features"
    digits = dataset_spec.get("source") == "builtin" and dataset_spec.get("builtin", "digits") == "digits"
    if choice == "pixels-16" or (choice == "auto" and not digits):
        why = "evaluate.features" if choice != "auto" else f"auto: {dataset_name!r} is not the built-in digits"
        return None, metrics.PixelFeatures(), why
    path = runs_root / "classifier" / CLASSIFIER.name
    if not path.exists():
        raise UserError(
            f"{path}: features {choice} on the built-in digits need the digit classifier; "
            "`transfigure train classifier` (or evaluate.features: pixels-16)"
        )
    classifier, classifier_dataset = load_classifier(path)
    if not trained_on_same_images(classifier_dataset, dataset_spec):
        raise UserError(
            f"{path} was trained on other images than dataset {dataset_name!r}; its features mean nothing there "
            "(evaluate.features: pixels-16 or inception-v3)"
        )
    why = "evaluate.features" if choice != "auto" else f"auto: {dataset_name!r} is the classifier's digits"
    return classifier, metrics.ClassifierFeatures(classifier), why


def compare(
    real: Path,
    fake: Path,
    features: str,
    weights: Path | None,
    sha256: str | None = None,
    classifier: Path | None = None,
) -> dict:
    if features == "inception-v3":
        if weights is None:
            raise UserError("--features inception-v3 needs --weights FILE (a local Inception-v3 state dict)")
        extractor = metrics.InceptionFeatures(weights, expected_sha256=sha256)
    elif features == "digits-classifier":
        if classifier is None:
            raise UserError("--features digits-classifier needs --classifier FILE (runs/classifier/classifier.pt)")
        extractor = metrics.ClassifierFeatures(load_classifier(classifier)[0])
    elif features == "pixels-16":
        extractor = metrics.PixelFeatures()
    else:
        raise UserError(f"--features: {features!r} is not pixels-16, digits-classifier or inception-v3")
    for folder in (real, fake):
        if not folder.is_dir():
            raise UserError(f"{folder}: no such folder")
    return metrics.compare_folders(real, fake, extractor)
