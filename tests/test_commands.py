"""The smaller commands, run as a user runs them: export --checkpoint, sample, evaluate --real/--fake, bench train."""

import json

import numpy as np
import onnx
import pytest
from conftest import tiny
from corpus import write_good
from PIL import Image

from transfigure.pipeline.params import load_params
from transfigure.pipeline.train.loop import train


@pytest.mark.slow
def test_exported_cdcgan_samples_the_asked_class_and_walks(workdir, run_cli):
    from rich.console import Console

    train("cdcgan", load_params("params.yaml", tiny("cdcgan", steps=2, every=2)), Console(quiet=True))
    checkpoint = workdir / "runs/cdcgan/checkpoints/last.pt"
    result = run_cli("export", "--checkpoint", str(checkpoint), "--out", str(workdir / "gen.onnx"), cwd=workdir)
    assert result.returncode == 0, result.stderr
    model = onnx.load(workdir / "gen.onnx")
    assert [i.name for i in model.graph.input] == ["z", "label"]
    assert {p.key: p.value for p in model.metadata_props}["n_classes"] == "10"
    assert not [p for p in workdir.iterdir() if p.name.startswith(".")]

    sample_three = ["sample", "--model", str(workdir / "gen.onnx"), "--label", "3"]
    result = run_cli(*sample_three, "--n", "5", "--out", str(workdir / "samples"), cwd=workdir)
    assert result.returncode == 0, result.stderr
    images = sorted((workdir / "samples").glob("sample_3_*.png"))
    assert len(images) == 5 and Image.open(images[0]).size == (32, 32)

    result = run_cli(*sample_three, "--n", "4", "--walk", "--out", str(workdir / "walk"), cwd=workdir)
    walk = [np.asarray(Image.open(p), dtype=float) for p in sorted((workdir / "walk").glob("*.png"))]
    assert len(walk) == 4
    # A walk moves step by step: neighbours are closer than the two ends.
    assert np.abs(walk[0] - walk[1]).mean() <= np.abs(walk[0] - walk[3]).mean()

    bad = run_cli("sample", "--model", str(workdir / "gen.onnx"), "--label", "12", "--out", str(workdir / "x"))
    assert bad.returncode == 2 and "0..9" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_exported_flowgan_sampler_draws_images_and_takes_no_label(workdir, run_cli):
    from rich.console import Console

    train("flowgan", load_params("params.yaml", tiny("flowgan", steps=2, every=2)), Console(quiet=True))
    checkpoint = workdir / "runs/flowgan/checkpoints/last.pt"
    result = run_cli("export", "--checkpoint", str(checkpoint), "--out", str(workdir / "flow.onnx"), cwd=workdir)
    assert result.returncode == 0, result.stderr
    out = workdir / "flow_samples"
    result = run_cli("sample", "--model", str(workdir / "flow.onnx"), "--n", "3", "--out", str(out), cwd=workdir)
    assert result.returncode == 0, result.stderr
    images = [np.asarray(Image.open(p)) for p in sorted(out.glob("sample_*.png"))]
    assert len(images) == 3 and images[0].shape == (32, 32, 3) and not np.array_equal(images[0], images[1])
    cooler = run_cli(
        "sample",
        "--model",
        str(workdir / "flow.onnx"),
        "--n",
        "3",
        "--temperature",
        "0.5",
        "--out",
        str(workdir / "cool"),
    )
    assert cooler.returncode == 0, cooler.stderr
    # The same latent draws at half the temperature: different pictures, nearer to the flow's mean.
    assert not np.array_equal(np.asarray(Image.open(workdir / "cool/sample_0000.png")), images[0])

    labelled = run_cli("sample", "--model", str(workdir / "flow.onnx"), "--label", "1", "--out", str(workdir / "y"))
    assert labelled.returncode == 2 and "unconditional" in labelled.stderr and "Traceback" not in labelled.stderr


def test_export_of_a_missing_checkpoint_is_a_clear_error(run_cli, tmp_path):
    result = run_cli("export", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x.onnx"))
    assert result.returncode == 2 and "nope.pt" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_evaluate_compares_two_folders_and_pairs_by_name(tmp_path, run_cli):
    write_good(tmp_path / "real", 6, size=(32, 32))
    write_good(tmp_path / "fake", 6, size=(32, 32))
    result = run_cli("evaluate", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {"kid", "kid_std", "fid", "psnr", "ssim", "features", "n_real", "n_fake"} <= set(report)
    assert report["psnr"] == float("inf") and report["ssim"] == 1.0 and report["n_real"] == 6
    assert report["features"]

    missing = run_cli("evaluate", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "none"))
    assert missing.returncode == 2 and "none" in missing.stderr


def test_bench_train_reports_images_per_second(workdir, run_cli):
    result = run_cli(
        "bench",
        "train",
        "--recipe",
        "pix2pix",
        "--size",
        "32",
        "--steps",
        "2",
        "--precision",
        "fp32",
        "--json",
        *sum((["--set", o] for o in tiny("pix2pix")), []),
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["recipe"] == "pix2pix" and report["precision"] == "fp32" and report["images_per_second"] > 0


def test_bench_train_refuses_half_precision_without_a_gpu(workdir, run_cli):
    result = run_cli(
        "bench", "train", "--recipe", "cdcgan", "--precision", "bf16", "--set", "cdcgan.device=cpu", cwd=workdir
    )
    assert result.returncode == 2
    assert "precision: 'bf16' needs a CUDA device" in result.stderr and "Traceback" not in result.stderr


def test_translate_cli_exit_codes_and_report(tmp_path, run_cli, tiny_translator):
    from corpus import write_bad_corpus

    tiny_translator(tmp_path / "m.onnx")
    write_good(tmp_path / "good", 3, size=(36, 20))
    result = run_cli(
        "translate",
        str(tmp_path / "good"),
        str(tmp_path / "out"),
        "--model",
        str(tmp_path / "m.onnx"),
        "--report",
        str(tmp_path / "r.json"),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "r.json").read_text())["translated"] == 3
    assert Image.open(tmp_path / "out" / "img000.png").size == (36, 20)

    write_bad_corpus(tmp_path / "mixed")
    result = run_cli(
        "translate",
        str(tmp_path / "mixed"),
        str(tmp_path / "out2"),
        "--model",
        str(tmp_path / "m.onnx"),
        "--report",
        str(tmp_path / "r2.json"),
    )
    report = json.loads((tmp_path / "r2.json").read_text())
    assert result.returncode == 1 and report["translated"] == 5 and len(report["rejected"]) == 4
    assert "Traceback" not in result.stderr

    missing = run_cli("translate", str(tmp_path / "good"), str(tmp_path / "o"), "--model", str(tmp_path / "no.onnx"))
    assert missing.returncode == 2 and "no.onnx" in missing.stderr
