"""`evaluate RECIPE` as a new user meets it: the checkpoint's own data and settings, never contradicted silently;
KID/FID features chosen by a setting, not by which files happen to exist; small samples flagged."""

import json
import os

import pytest
from conftest import tiny
from corpus import write_good
from rich.console import Console

from transfigure.pipeline.data.prepare import prepare_dataset
from transfigure.pipeline.errors import UserError
from transfigure.pipeline.evaluate import stage
from transfigure.pipeline.evaluate.classifier import fit_classifier
from transfigure.pipeline.params import load_params, training_params
from transfigure.pipeline.train import recipes
from transfigure.pipeline.train.checkpoint import load_checkpoint
from transfigure.pipeline.train.loop import train

CLASSIFIER = ["evaluate.classifier.steps=5", "evaluate.n_samples_per_class=2"]


def quiet() -> Console:
    return Console(record=True, width=400)


@pytest.mark.slow
def test_the_checkpoints_data_and_features_are_used_and_contradicting_params_are_refused(workdir, tmp_path):
    settings = [*tiny("cyclegan", steps=2, every=2), *CLASSIFIER]
    params = load_params("params.yaml", settings)
    train("cyclegan", params, quiet())
    # auto on the built-in digits means the digit classifier: missing, it is an error, not a switch to pixels.
    with pytest.raises(UserError, match="need the digit classifier; `transfigure train classifier`"):
        stage.evaluate_recipe("cyclegan", params, quiet())
    fit_classifier(params, quiet())

    console = quiet()
    result = stage.evaluate_recipe("cyclegan", params, console)
    assert result["dataset"] == "digits" and result["features"] == "digits-classifier"
    assert "features: digits-classifier (auto: 'digits' is the classifier's digits)" in console.export_text()

    elsewhere = load_params("params.yaml", [*settings, "cyclegan.dataset=digits_paired"])
    with pytest.raises(UserError, match=r"other settings than params now give \(cyclegan\.dataset, dataset\.layout\)"):
        stage.evaluate_recipe("cyclegan", elsewhere, quiet())
    with pytest.raises(UserError, match=r"cyclegan\.lambda_A"):
        stage.evaluate_recipe("cyclegan", load_params("params.yaml", [*settings, "cyclegan.lambda_A=3"]), quiet())
    # A kept checkpoint may be of an earlier step than params' total.
    longer = load_params("params.yaml", [*settings, "cyclegan.steps=10"])
    checkpoint = workdir / "runs/cyclegan/checkpoints/last.pt"
    wanted = training_params(longer, "cyclegan", recipes.params_of(longer, "cyclegan"))
    stage._refuse_contradictions(checkpoint, load_checkpoint(checkpoint)["params"], wanted, "cyclegan")

    console = quiet()
    other = stage.evaluate_recipe("cyclegan", elsewhere, console, on_dataset="digits_paired")
    assert "trained on 'digits') on dataset 'digits_paired'" in console.export_text()
    assert other["dataset"] == "digits_paired" and "psnr" in other["AtoB"], "paired data: PSNR against the truth"
    written = json.loads((workdir / "metrics/cyclegan.on-digits_paired.json").read_text())
    assert written == other
    assert json.loads((workdir / "metrics/cyclegan.json").read_text())["dataset"] == "digits"

    # Two folders: the named features, the same numbers from any folder (this one has runs/classifier/).
    write_good(tmp_path / "real", 6, size=(32, 32))
    write_good(tmp_path / "fake", 6, size=(32, 32), prefix="img")
    here = stage.compare(tmp_path / "real", tmp_path / "fake", "pixels-16", None)
    os.chdir(tmp_path / "real")
    assert stage.compare(tmp_path / "real", tmp_path / "fake", "pixels-16", None) == here
    assert here["features"] == "pixels-16"
    with pytest.raises(UserError, match="needs --classifier FILE"):
        stage.compare(tmp_path / "real", tmp_path / "fake", "digits-classifier", None)
    classifier = workdir / "runs/classifier/classifier.pt"
    by_classifier = stage.compare(tmp_path / "real", tmp_path / "fake", "digits-classifier", None, None, classifier)
    assert by_classifier["features"] == "digits-classifier"


@pytest.mark.slow
def test_own_photos_are_scored_with_pixel_features_and_a_small_sample_warning(workdir, tmp_path):
    fit_classifier(load_params("params.yaml", CLASSIFIER), quiet())  # the digit classifier exists, and stays out
    photos = tmp_path / "photos"
    for split, n in (("train", 6), ("test", 6)):
        for domain in "AB":
            write_good(photos / f"{split}{domain}", n, size=(40, 36), prefix=f"{domain.lower()}")
    settings = [
        *tiny("cyclegan", steps=2, every=2),
        *CLASSIFIER,
        f"data.datasets.photos={{source: folder, path: {photos}, layout: unaligned, size: 32}}",
        "cyclegan.dataset=photos",
    ]
    params = load_params("params.yaml", settings)
    prepare_dataset("photos", params.data.datasets["photos"], workdir / "photos-prepared", 0, lambda _: 0)
    params = load_params("params.yaml", [*settings, f"data.root={workdir / 'photos-prepared'}"])
    train("cyclegan", params, quiet(), fresh=True)

    console = quiet()
    result = stage.evaluate_recipe("cyclegan", params, console)
    log = console.export_text()
    # The digit classifier exists in runs/classifier, and still does not score photos.
    assert result["features"] == "pixels-16" and "content_accuracy" not in result["AtoB"]
    assert "auto: 'photos' is not the built-in digits" in log
    assert "warning: KID from as few as 6 images per set" in log
    with pytest.raises(UserError, match="trained on other images than dataset 'photos'"):
        stage.evaluate_recipe("cyclegan", params, quiet(), features="digits-classifier")
