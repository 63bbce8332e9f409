"""The CPU's reduced precision: int8 companions written and checked at export, and the engine's choice of them."""

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import BIN, make_engine

from tests.corpus import gradient, write_bad_corpus, write_good
from transfigure.pipeline import fidelity
from transfigure.pipeline.errors import UserError
from transfigure.pipeline.export import model_card as card
from transfigure.pipeline.export.quantize import write_int8_companion
from transfigure.pipeline.schema import Int8Params
from transfigure.pipeline.serve import openvino_bf16, precision

VNNI = frozenset({"fpu", "avx2", "avx512_vnni"})
ROOT = Path(__file__).resolve().parents[1]
NO_INT8 = frozenset({"fpu", "avx2", "avx512f"})
ANY_QUALITY = Int8Params(max_mean_levels=255, min_psnr_db=0.001)
NO_QUALITY_IS_ENOUGH = Int8Params(max_mean_levels=1e-9)


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    return [gradient(24, 20, seed=seed + index) for index in range(n)]


@pytest.fixture(scope="module")
def translator(tmp_path_factory, tiny_translator):
    """A tiny translator with an int8 companion that passes any limits."""
    path = tiny_translator(tmp_path_factory.mktemp("int8") / "AtoB.onnx")
    result = write_int8_companion(path, _images(6), _images(3, seed=50), ANY_QUALITY, "test:trainA")
    return path, result


def test_fidelity_has_known_answers():
    image = gradient(8, 6)
    assert fidelity.compare([image], [image]) == {"mean_levels": 0.0, "max_levels": 0.0, "psnr_db": 99.0}
    brighter = image.astype(np.int16)
    brighter[brighter < 255] += 1
    brighter[brighter == 255] -= 1
    measured = fidelity.compare([image], [brighter.astype(np.uint8)])
    assert measured["mean_levels"] == 1 and measured["max_levels"] == 1
    assert measured["psnr_db"] == pytest.approx(10 * math.log10(255**2))  # 48.13 dB: every pixel one level off


def test_verdict_names_the_limit_that_was_missed():
    assert fidelity.verdict({"mean_levels": 0.5, "psnr_db": 45.0}) == fidelity.PASSED
    assert fidelity.verdict({"mean_levels": 1.5, "psnr_db": 45.0}) == "failed: mean difference 1.50 levels > 1"
    assert fidelity.verdict({"mean_levels": 0.5, "psnr_db": 39.0}, 2, 40) == "failed: PSNR 39.0 dB < 40"


def test_cpu_flags_are_read_from_linux_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu avx2 avx512_vnni amx_int8\n\nprocessor\t: 1\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp i8mm\n")
    assert precision.int8_instructions(precision.cpu_flags(x86)) == ["amx_int8", "avx512_vnni"]
    assert precision.int8_instructions(precision.cpu_flags(arm)) == ["asimddp", "i8mm"]
    assert precision.cpu_flags(tmp_path / "absent") == frozenset()
    assert "float32" in precision.machine_summary(NO_INT8, False) and "avx512_vnni" in precision.machine_summary(
        VNNI, False
    )


def test_the_companion_repeats_the_card_and_records_its_quality(translator):
    path, result = translator
    fp32 = card.ModelCard.read(path).to_metadata()
    int8 = card.ModelCard.read(card.companion_path(path, card.INT8)).to_metadata()
    assert {key: int8[key] for key in fp32 if key != "precision"} == {k: v for k, v in fp32.items() if k != "precision"}
    assert int8["precision"] == "int8" and int8[card.INT8_QUALITY] == fidelity.PASSED
    assert int8[card.INT8_CALIBRATION] == "6 images of test:trainA"
    assert float(int8[card.INT8_MEAN_LEVELS]) == pytest.approx(result["mean_levels"], abs=1e-4)
    ops = {node.op_type for node in onnx.load(str(card.companion_path(path, card.INT8))).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_int8_by_name_runs_the_companion_close_to_fp32(translator):
    path, result = translator
    image = gradient(28, 22, seed=99)
    fp32 = make_engine(path, precision="fp32")
    int8 = make_engine(path, precision="int8")
    assert (fp32.precision, int8.precision) == ("fp32", "int8") and int8.provider == "cpu"
    a, b = fp32.translate(image), int8.translate(image)
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert a.shape == b.shape == image.shape
    # Quantization changes the output, but by a few levels, not by a different picture.
    assert 0 < diff.mean() < 8, diff.mean()


def test_auto_takes_int8_only_with_the_instructions_and_a_passing_companion(
    translator, tmp_path, monkeypatch, tiny_translator
):
    path, _ = translator
    monkeypatch.setattr(precision, "cpu_flags", lambda: VNNI)
    engine = make_engine(path, providers=["cpu"])
    assert engine.precision == "int8" and "avx512_vnni" in engine.precision_reason
    monkeypatch.setattr(precision, "cpu_flags", lambda: NO_INT8)
    engine = make_engine(path, providers=["cpu"])
    assert engine.precision == "fp32" and "no int8 dot-product instructions" in engine.precision_reason

    monkeypatch.setattr(precision, "cpu_flags", lambda: VNNI)
    strict = tiny_translator(tmp_path / "strict.onnx")
    write_int8_companion(strict, _images(4), _images(2, seed=50), NO_QUALITY_IS_ENOUGH, "test:trainA")
    engine = make_engine(strict, providers=["cpu"])
    assert engine.precision == "fp32" and "quality check failed: mean difference" in engine.precision_reason
    assert make_engine(strict, precision="int8").precision_reason.startswith("asked for (its quality check failed")


def test_a_companion_from_another_export_is_never_used(translator, tmp_path, monkeypatch):
    path, _ = translator
    monkeypatch.setattr(precision, "cpu_flags", lambda: VNNI)
    moved = tmp_path / "AtoB.onnx"
    moved.write_bytes(path.read_bytes())
    model = onnx.load(str(path))
    for prop in model.metadata_props:
        if prop.key == "params_hash":
            prop.value = "retrained"
    card.companion_path(moved, card.INT8).write_bytes(card.companion_path(path, card.INT8).read_bytes())
    moved.write_bytes(model.SerializeToString())
    engine = make_engine(moved, providers=["cpu"])
    assert engine.precision == "fp32" and "another export (params_hash differ)" in engine.precision_reason
    with pytest.raises(UserError, match="--precision int8: the int8 model beside it comes from another export"):
        make_engine(moved, precision="int8")


def test_int8_without_a_companion_or_on_a_gpu_provider_and_unknown_precisions_are_refused(tmp_path, tiny_translator):
    bare = tiny_translator(tmp_path / "bare.onnx")
    with pytest.raises(UserError, match="no int8 model beside it .*transfigure quantize"):
        make_engine(bare, precision="int8")
    with pytest.raises(UserError, match="runs on the CPU"):
        make_engine(bare, providers=["cuda", "cpu"], precision="int8")
    with pytest.raises(UserError, match="--precision 'fp8': expected one of auto, fp32, int8"):
        make_engine(bare, precision="fp8")


@pytest.mark.slow
def test_quantize_command_skips_bad_files_and_translate_then_runs_int8(tmp_path, tiny_translator):
    model = tiny_translator(tmp_path / "model.onnx")
    folder = tmp_path / "photos"
    write_good(folder, 5, size=(24, 20))
    write_bad_corpus(folder)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    done = subprocess.run(
        [
            BIN / "transfigure",
            "quantize",
            model,
            "--images",
            folder,
            "--set",
            "export.int8.max_mean_levels=255",
            "--set",
            "export.int8.min_psnr_db=0.1",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "skipped" in done.stdout and "wrote" in done.stdout and "(passed; calibrated on" in done.stdout
    report = tmp_path / "report.json"
    done = subprocess.run(
        [BIN / "transfigure", "translate", folder, tmp_path / "out", "--model", model, "--report", report],
        capture_output=True,
        text=True,
        env={**os.environ, "TRANSFIGURE_PRECISION": "int8"},
    )
    assert json.loads(report.read_text())["precision"] == "int8" and "in int8" in done.stdout, done.stderr
    done = subprocess.run(
        [BIN / "transfigure", "quantize", model, "--images", tmp_path / "nowhere"], capture_output=True, text=True
    )
    assert done.returncode != 0 and "--images" in done.stderr + done.stdout and "Traceback" not in done.stderr


def test_bf16_decisions_follow_the_first_use_check():
    assert precision.bf16_decision("auto", fidelity.PASSED, "bf16")[0] == "bf16"
    chosen, reason = precision.bf16_decision("auto", "failed: PSNR 30.0 dB < 40", "bf16")
    assert chosen == "fp32" and "failed: PSNR 30.0 dB < 40 against float32 on first use" in reason
    assert precision.bf16_decision("bf16", "failed: PSNR 30.0 dB < 40", "f32")[0] == "bf16"
    amx = frozenset({"amx_bf16", "amx_tile"})
    assert precision.bf16_worth_trying("auto", "fp32", amx, openvino=True)
    assert not precision.bf16_worth_trying("auto", "int8", amx, openvino=True)
    assert not precision.bf16_worth_trying("auto", "fp32", frozenset({"avx512_bf16"}), openvino=True)
    assert not precision.bf16_worth_trying("auto", "fp32", amx, openvino=False)
    assert "OpenVINO is not installed" in precision.machine_summary(amx, openvino=False)


@pytest.mark.skipif(not openvino_bf16.installed(), reason="OpenVINO (the openvino extra) is not installed")
def test_bf16_by_name_runs_openvino_close_to_fp32_and_auto_tries_it_only_with_amx(translator, monkeypatch):
    path, _ = translator
    image = gradient(28, 22, seed=7)
    fp32 = make_engine(path, precision="fp32").translate(image)
    engine = make_engine(path, precision="bf16")
    assert engine.precision == "bf16" and "OpenVINO computing in" in engine.precision_reason
    bf16 = engine.translate(image)
    assert bf16.shape == image.shape and np.abs(bf16.astype(np.int16) - fp32).mean() < 2
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    assert "first use" in make_engine(path, providers=["cpu"]).precision_reason
    with pytest.raises(UserError, match="--precision bf16 runs on the CPU"):
        make_engine(path, providers=["cuda"], precision="bf16")
