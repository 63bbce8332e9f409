"""`translate_path`: folders and files through a real engine, bad inputs, formats, resuming, the report."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_engine
from PIL import Image

from tests.corpus import gradient, write_bad_corpus, write_good
from transfigure.pipeline.errors import UserError
from transfigure.pipeline.serve.translate import check_writable, exit_code, translate_path

# One worker runs the whole module, so its module-scoped fixtures are made once (tests/README.md).
pytestmark = pytest.mark.xdist_group("test_translate")

REPORT_KEYS = {
    "translated",
    "skipped",
    "rejected",
    "ignored",
    "seconds",
    "provider",
    "precision",
    "tiling",
    "images_per_second",
}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, tiny_translator) -> Path:
    return tiny_translator(tmp_path_factory.mktemp("model") / "g.onnx")


@pytest.fixture(scope="module")
def engine(model_file):
    return make_engine(model_file, providers=["cpu"])


def _outputs(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_folder_keeps_relative_paths_stems_and_sizes(engine, tmp_path):
    src = tmp_path / "in"
    write_good(src, 3, size=(40, 36))
    write_good(src / "sub" / "deeper", 2, size=(37, 23), prefix="odd")
    Image.fromarray(gradient(64, 48)).save(src / "sub" / "photo.v2.jpg")
    (src / "readme.txt").write_text("not an input\n")

    report = translate_path(src, tmp_path / "out", make_engine(engine.model_path, batch_size=2), progress=False)

    assert set(report) == REPORT_KEYS
    assert report["translated"] == 6 and report["skipped"] == 0 and report["rejected"] == []
    assert report["provider"] == "cpu" and exit_code(report) == 0 and report["tiling"] is None
    assert _outputs(tmp_path / "out") == [
        "img000.png",
        "img001.png",
        "img002.png",
        "sub/deeper/odd000.png",
        "sub/deeper/odd001.png",
        "sub/photo.v2.png",
    ]
    with Image.open(tmp_path / "out" / "sub" / "deeper" / "odd001.png") as img:
        assert img.size == (37, 23)
    expected = engine.translate(np.asarray(Image.open(src / "img001.png")))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "img001.png")), expected)


def test_bad_files_are_reported_and_the_rest_translated(engine, tmp_path):
    kinds = write_bad_corpus(tmp_path / "in")
    Image.fromarray(gradient(4, 4)).save(tmp_path / "in" / "tiny.png")  # too small for the network's padding
    report_path = tmp_path / "report.json"

    report = translate_path(tmp_path / "in", tmp_path / "out", engine, progress=False, report_path=report_path)

    reasons = {Path(item["path"]).name: item["reason"] for item in report["rejected"]}
    bad = {name for name, kind in kinds.items() if kind == "bad"}
    assert set(reasons) == bad | {"tiny.png"}
    assert reasons["empty.png"] == "empty file"
    assert "truncated" in reasons["truncated.jpg"]
    assert "not an image" in reasons["notes.jpg"]
    assert "bomb" in reasons["bomb.png"]
    assert reasons["tiny.png"] == "the image is 4x4; this model needs at least 8 px on each side"
    good = sorted(Path(name).stem + ".png" for name, kind in kinds.items() if kind == "good")
    assert report["translated"] == len(good) and _outputs(tmp_path / "out") == good
    assert json.loads(report_path.read_text()) == report
    assert exit_code(report) == 1


@pytest.mark.parametrize(("fmt", "pil_format"), [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP")])
def test_format_flag(engine, tmp_path, fmt, pil_format):
    write_good(tmp_path / "in", 2)
    report = translate_path(tmp_path / "in", tmp_path / "out", engine, fmt=fmt, progress=False)
    assert report["translated"] == 2
    for name in ("img000", "img001"):
        with Image.open(tmp_path / "out" / f"{name}.{fmt}") as img:
            assert img.format == pil_format and img.size == (40, 36)


def test_single_file_to_a_file_or_a_folder(engine, tmp_path):
    (source,) = write_good(tmp_path, 1, size=(30, 26))
    translate_path(source, tmp_path / "result.jpg", engine, progress=False)
    with Image.open(tmp_path / "result.jpg") as img:
        assert img.format == "JPEG" and img.size == (30, 26)
    translate_path(source, tmp_path / "outdir", engine, fmt="webp", progress=False)
    assert _outputs(tmp_path / "outdir") == ["img000.webp"]


def test_skip_existing_resumes_a_partial_run(engine, tmp_path):
    write_good(tmp_path / "in", 5)
    out = tmp_path / "out"
    assert translate_path(tmp_path / "in", out, engine, progress=False)["translated"] == 5
    # As if the run had been interrupted after three images: atomic writes leave only whole files behind.
    (out / "img001.png").unlink()
    (out / "img004.png").unlink()
    report = translate_path(tmp_path / "in", out, engine, skip_existing=True, progress=False)
    assert (report["translated"], report["skipped"], exit_code(report)) == (2, 3, 0)
    assert len(_outputs(out)) == 5 and not list(out.glob(".*"))


def test_clashing_output_names_are_refused_not_overwritten(engine, tmp_path):
    src = tmp_path / "in"
    write_good(src, 1)
    Image.fromarray(gradient(40, 36)).save(src / "img000.jpg")
    report = translate_path(src, tmp_path / "out", engine, progress=False)
    assert report["translated"] == 1
    assert [Path(r["path"]).name for r in report["rejected"]] == ["img000.png"]
    assert "same output name as" in report["rejected"][0]["reason"]


def test_output_inside_input_is_not_read_back(engine, tmp_path):
    write_good(tmp_path / "in", 2)
    for _ in range(2):
        report = translate_path(tmp_path / "in", tmp_path / "in" / "out", engine, progress=False)
        assert report["translated"] == 2


def test_large_images_go_in_tiles(model_file, tmp_path):
    tiling_engine = make_engine(model_file, providers=["cpu"], tile=64)
    Image.fromarray(gradient(150, 90)).save(tmp_path / "big.png")
    report = translate_path(tmp_path / "big.png", tmp_path / "out", tiling_engine, progress=False)
    assert report["translated"] == 1 and report["tiling"] == "thumbnail statistics"
    with Image.open(tmp_path / "out" / "big.png") as img:
        assert img.size == (150, 90)


def test_usage_errors(engine, tmp_path):
    write_good(tmp_path / "in", 1)
    with pytest.raises(UserError, match="png, jpg, webp"):
        translate_path(tmp_path / "in", tmp_path / "out", engine, fmt="gif", progress=False)
    with pytest.raises(UserError, match="input not found"):
        translate_path(tmp_path / "absent", tmp_path / "out", engine, progress=False)
    with pytest.raises(UserError, match="--batch-size must be at least 1, got 0"):
        make_engine(engine.model_path, batch_size=0)


def test_exit_code():
    assert exit_code({"translated": 3, "skipped": 2, "rejected": []}) == 0
    assert exit_code({"translated": 0, "skipped": 0, "rejected": []}) == 0
    assert exit_code({"translated": 3, "skipped": 0, "rejected": [{"path": "a", "reason": "empty file"}]}) == 1


def test_default_batch_is_one_image_on_the_cpu_and_eight_on_a_gpu(engine, tmp_path):
    from transfigure.pipeline.serve.translate import default_batch_size

    assert [default_batch_size(p) for p in ("cpu", "cuda", "tensorrt")] == [1, 8, 8]
    write_good(tmp_path / "in", 3, size=(40, 36))
    report = translate_path(tmp_path / "in", tmp_path / "out", engine, progress=False)
    assert report["translated"] == 3 and report["provider"] == "cpu"


def test_a_folder_without_images_is_refused_naming_what_it_holds(engine, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match=r"no images to translate.*notes\.txt"):
        translate_path(tmp_path / "in", tmp_path / "out", engine, progress=False)


def test_files_that_are_not_images_are_listed_as_ignored(engine, tmp_path):
    write_good(tmp_path / "in", 1)
    (tmp_path / "in" / "readme.txt").write_text("x")
    report = translate_path(tmp_path / "in", tmp_path / "out", engine, progress=False)
    assert report["translated"] == 1 and [Path(p).name for p in report["ignored"]] == ["readme.txt"]


def test_cli_refuses_bad_places_before_any_work_and_lists_rejections(model_file, tmp_path, run_cli):
    write_good(tmp_path / "in", 2)
    (tmp_path / "in" / "empty.png").write_bytes(b"")
    (tmp_path / "blocker").write_text("a file where a folder would have to be")

    unwritable = run_cli("translate", "in", "out", "--model", str(model_file), "--report", "blocker/r.json")
    assert unwritable.returncode == 2 and "blocker: cannot write here" in unwritable.stderr
    assert "Traceback" not in unwritable.stderr and not list((tmp_path / "out").rglob("*")), "nothing translated"
    with pytest.raises(UserError, match="blocker/out: cannot write here"):
        check_writable(tmp_path / "blocker" / "out")

    done = run_cli("translate", "in", "out", "--model", str(model_file))
    assert done.returncode == 1, done.stderr
    assert "rejected in/empty.png: empty file" in done.stdout and "translated 2," in done.stdout
