import json

import numpy as np
from corpus import gradient, write_bad_corpus, write_good
from PIL import Image

from transfigure.pipeline.data import builtin
from transfigure.pipeline.data.prepare import prepare_dataset, prepare_folder
from transfigure.pipeline.schema import DatasetParams


def test_prepare_from_folder_skips_every_bad_file_and_keeps_every_good_one(tmp_path, run_cli):
    source = tmp_path / "horse2zebra"
    write_good(source / "trainA", 3)
    expected = write_bad_corpus(source / "trainB")
    write_good(source / "testA", 1)
    write_good(source / "testB", 1)

    result = run_cli(
        "prepare", "--from", str(source), "--layout", "unaligned", "--size", "32", "--out", str(tmp_path / "out")
    )

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rejected = {item["path"].split("/")[-1]: item["reason"] for item in report["rejected"]}
    assert set(rejected) == {name for name, kind in expected.items() if kind == "bad"}
    assert all(reason for reason in rejected.values())
    assert "pixels" in rejected["bomb.png"]
    assert report["prepared"] == 3 + 5 + 2
    for name in rejected:
        assert name in result.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    for entry in manifest["images"]:
        image = Image.open(tmp_path / "out" / entry["path"])
        assert image.mode == "RGB" and image.size == (32, 32) == (entry["width"], entry["height"])
        assert entry["split"] in ("train", "test") and entry["domain"] in ("A", "B") and len(entry["sha256"]) == 64


def test_sixteen_bit_and_transparent_images_are_converted_faithfully(tmp_path):
    source = tmp_path / "src"
    (source / "trainA").mkdir(parents=True)
    (source / "trainB").mkdir()
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(source / "trainA" / "white16.png")
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(source / "trainB" / "clear.png")
    spec = DatasetParams(source="folder", path=str(source), size=8, resize="none")
    prepare_folder(source, tmp_path / "out", spec, seed=0, log=lambda _: None)
    assert (np.asarray(Image.open(tmp_path / "out" / "trainA" / "white16.png")) == 255).all()
    assert (np.asarray(Image.open(tmp_path / "out" / "trainB" / "clear.png")) == 255).all()


def test_rerun_on_unchanged_input_reuses_the_work(tmp_path):
    source = tmp_path / "src"
    write_good(source / "trainA", 2)
    write_good(source / "trainB", 2)
    spec = DatasetParams(source="folder", path=str(source), size=32)
    logs: list[str] = []
    prepare_folder(source, tmp_path / "out", spec, seed=0, log=logs.append)
    first = (tmp_path / "out" / "manifest.json").stat().st_mtime_ns
    prepare_folder(source, tmp_path / "out", spec, seed=0, log=logs.append)
    assert "up to date" in logs[-1]
    assert (tmp_path / "out" / "manifest.json").stat().st_mtime_ns == first

    write_good(source / "trainB", 3)
    prepare_folder(source, tmp_path / "out", spec, seed=0, log=logs.append)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["prepared"] == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_aligned_side_by_side_images_are_split_into_pairs(tmp_path):
    source = tmp_path / "facades"
    (source / "train").mkdir(parents=True)
    left, right = gradient(16, 16, seed=1), gradient(16, 16, seed=2)
    Image.fromarray(np.concatenate([left, right], axis=1)).save(source / "train" / "1.png")
    Image.fromarray(gradient(17, 16)).save(source / "train" / "odd.png")
    spec = DatasetParams(source="folder", path=str(source), layout="aligned", size=16, resize="none")
    report = prepare_folder(source, tmp_path / "out", spec, seed=0, log=lambda _: None)
    assert report["prepared"] == 2
    assert {r["reason"].split(";")[0] for r in report["rejected"]} == {
        "an aligned image must be two halves side by side"
    }
    assert (np.asarray(Image.open(tmp_path / "out" / "trainA" / "1.png")) == left).all()
    assert (np.asarray(Image.open(tmp_path / "out" / "trainB" / "1.png")) == right).all()


def test_aligned_two_folders_pair_by_name(tmp_path):
    source = tmp_path / "pairs"
    write_good(source / "A" / "train", 2)
    write_good(source / "B" / "train", 1)
    spec = DatasetParams(source="folder", path=str(source), layout="aligned", size=32)
    report = prepare_folder(source, tmp_path / "out", spec, seed=0, log=lambda _: None)
    assert report["prepared"] == 2
    assert [r["path"].split("/")[-1] for r in report["rejected"]] == ["img001.png"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {e["pair"] for e in manifest["images"]} == {"img000"}


def test_classes_layout_labels_each_folder_and_holds_out_a_test_split(tmp_path):
    source = tmp_path / "animals"
    write_good(source / "cat", 10)
    write_good(source / "dog", 10)
    spec = DatasetParams(source="folder", path=str(source), layout="classes", size=32, test_fraction=0.2)
    prepare_folder(source, tmp_path / "out", spec, seed=0, log=lambda _: None)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["classes"] == [0, 1]
    tests = [e for e in manifest["images"] if e["split"] == "test"]
    assert sorted(e["label"] for e in tests) == [0, 0, 1, 1]


def test_missing_layout_folder_is_a_clear_error(tmp_path, run_cli):
    (tmp_path / "src" / "trainA").mkdir(parents=True)
    result = run_cli("prepare", "--from", str(tmp_path / "src"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "trainB" in result.stderr and "Traceback" not in result.stderr


def test_builtin_digits_are_deterministic_paired_and_not_trivial(tmp_path):
    spec = DatasetParams(source="builtin", layout="unaligned", size=32)
    prepare_dataset("digits", spec, tmp_path, seed=3, log=lambda _: None)
    manifest = json.loads((tmp_path / "digits" / "manifest.json").read_text())
    by = {(e["split"], e["domain"]): e for e in manifest["images"]}
    assert set(by) == {("train", "A"), ("train", "B"), ("test", "A"), ("test", "B")}

    train_a = {e["source"] for e in manifest["images"] if e["split"] == "train" and e["domain"] == "A"}
    train_b = {e["source"] for e in manifest["images"] if e["split"] == "train" and e["domain"] == "B"}
    assert train_a and train_b and not train_a & train_b

    test_a = sorted(
        (e for e in manifest["images"] if e["split"] == "test" and e["domain"] == "A"), key=lambda e: e["path"]
    )
    test_b = sorted(
        (e for e in manifest["images"] if e["split"] == "test" and e["domain"] == "B"), key=lambda e: e["path"]
    )
    assert [e["source"] for e in test_a] == [e["source"] for e in test_b]
    assert all(e["label"] in range(10) for e in test_a + test_b)
    a = np.stack([np.asarray(Image.open(tmp_path / "digits" / e["path"])) for e in test_a])
    b = np.stack([np.asarray(Image.open(tmp_path / "digits" / e["path"])) for e in test_b])
    # B is a function of A's pixels alone.
    assert all((builtin.neon_from_paper(x) == y).all() for x, y in zip(a, b, strict=True))
    # Copying A is a terrible translation: PSNR against the true B is only a few dB.
    mse = ((a.astype(float) - b) ** 2).mean()
    assert 10 * np.log10(255**2 / mse) < 5
    # Paper is light and ink dark in A; B is dark with bright strokes.
    assert a.mean() > 180 and b.mean() < 90

    again = tmp_path / "again"
    prepare_dataset("digits", spec, again, seed=3, log=lambda _: None)
    assert (again / "digits" / "manifest.json").read_text() == (tmp_path / "digits" / "manifest.json").read_text()


def test_an_empty_domain_stops_prepare_with_exit_2_and_writes_nothing(tmp_path, run_cli):
    (tmp_path / "src" / "trainA").mkdir(parents=True)
    write_good(tmp_path / "src" / "trainB", 2)
    (tmp_path / "src" / "trainA" / "broken.png").write_bytes(b"")
    result = run_cli("prepare", "--from", str(tmp_path / "src"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stdout
    assert "no training images in trainA" in result.stderr and "1 files were rejected" in result.stderr
    assert "broken.png: empty file" in result.stdout and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
