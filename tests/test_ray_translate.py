"""`translate --engine ray`: the real CLI on a real local Ray cluster gives the local engine's outputs pixel for
pixel, reports bad files the same way, and a second run with --skip-existing does nothing."""

import json
import sys

import numpy as np
import pytest
from PIL import Image

from tests.corpus import gradient, write_bad_corpus, write_good
from transfigure.pipeline.errors import UserError
from transfigure.pipeline.serve.options import InferenceOptions
from transfigure.pipeline.serve.ray_translate import INSTALL_HINT, external_data_files, translate_on_ray

pytestmark = pytest.mark.slow  # servers, clusters or processes: minutes


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.slow
def test_the_ray_engine_matches_the_local_engine_and_resumes(run_cli, tmp_path, tiny_translator):
    model = tiny_translator(tmp_path / "g.onnx")
    src = tmp_path / "in"
    write_good(src, 5, size=(40, 36))
    write_good(src / "sub", 4, size=(37, 23), prefix="odd")
    Image.fromarray(gradient(150, 97)).save(src / "sub" / "large.png")  # past --tile: translated in tiles
    kinds = write_bad_corpus(src / "bad")
    (src / "notes.txt").write_text("not an image\n")

    reports = {}
    for engine in ("local", "ray"):
        done = run_cli(
            "translate", "in", f"out_{engine}", "--model", str(model), "--tile", "64",
            "--engine", engine, "--report", f"{engine}.json",
        )  # fmt: skip
        assert done.returncode == 1, done.stdout + done.stderr  # some inputs are bad
        assert "Traceback" not in done.stderr
        reports[engine] = json.loads((tmp_path / f"{engine}.json").read_text())
    local, ray = reports["local"], reports["ray"]
    assert ray["engine"] == "ray" and ray["actors"] >= 1
    for key in ("translated", "skipped", "ignored", "provider", "precision", "tiling"):
        assert ray[key] == local[key], key
    assert local["tiling"] is not None and local["translated"] == 10 + list(kinds.values()).count("good")
    by_path = lambda report: sorted((item["path"], item["reason"]) for item in report["rejected"])  # noqa: E731
    assert by_path(ray) == by_path(local) and len(by_path(local)) == list(kinds.values()).count("bad")

    outputs = sorted(p.relative_to(tmp_path / "out_local") for p in (tmp_path / "out_local").rglob("*.png"))
    assert outputs == sorted(p.relative_to(tmp_path / "out_ray") for p in (tmp_path / "out_ray").rglob("*.png"))
    for relative in outputs:
        assert np.array_equal(pixels(tmp_path / "out_ray" / relative), pixels(tmp_path / "out_local" / relative))

    # With the bad files gone, a second run has nothing left to do and starts no cluster.
    for path in (src / "bad").iterdir():
        if kinds[path.name] == "bad":
            path.unlink()
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out_ray").rglob("*.png")}
    again = run_cli("translate", "in", "out_ray", "--model", str(model), "--engine", "ray", "--skip-existing")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"translated 0, skipped {len(before)}, rejected 0" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before


@pytest.mark.slow
def test_a_registered_model_reaches_the_actors_with_its_external_data(run_cli, tmp_path, monkeypatch, tiny_translator):
    from transfigure.pipeline import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # the sqlite store's artifacts land in ./mlruns, where run_cli runs too
    model = tiny_translator(tmp_path / "g.onnx")
    with tracking._mlflow().start_run() as run:
        run_id = run.info.run_id
    tracking.register_onnx(run_id, model, "horse2zebra")
    stored = next((tmp_path / "mlruns").rglob("model.onnx"))
    assert external_data_files(stored), "MLflow keeps the weights beside the graph: the case this test is about"
    write_good(tmp_path / "in", 3, size=(40, 36))
    for engine in ("local", "ray"):
        done = run_cli("translate", "in", f"out_{engine}", "--model", "models:/horse2zebra@latest", "--engine", engine)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "translated 3, skipped 0, rejected 0" in done.stdout
    for path in (tmp_path / "out_local").iterdir():
        assert np.array_equal(pixels(tmp_path / "out_ray" / path.name), pixels(path))


def test_without_ray_the_engine_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where the extra is not installed
    write_good(tmp_path / "in", 1)
    with pytest.raises(UserError) as refused:
        translate_on_ray(tmp_path / "in", tmp_path / "out", str(tmp_path / "g.onnx"), InferenceOptions())
    assert str(refused.value) == INSTALL_HINT and "pip install 'transfigure[ray]'" in INSTALL_HINT


def test_usage_errors_stop_before_any_cluster_starts(run_cli, tmp_path, tiny_translator):
    tiny_translator(tmp_path / "g.onnx")
    write_good(tmp_path / "in", 1)
    done = run_cli("translate", "in", "out", "--model", "g.onnx", "--ray-address", "auto")
    assert done.returncode == 2 and "--ray-address needs --engine ray" in done.stdout + done.stderr
    done = run_cli("translate", "in", "out", "--model", "g.onnx", "--engine", "ray", "--providers", "cpux")
    assert done.returncode == 2 and "unknown provider 'cpux'" in done.stderr and "Traceback" not in done.stderr
