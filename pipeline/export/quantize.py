"""The int8 companion of an exported translator: ONNX Runtime static quantization (QDQ), calibrated on the
recipe's own training images, then checked against the float32 model on held-out images.

Why this form (docs/BENCHMARKS.md, "CPU precision"): QDQ keeps one runtime, and ONNX Runtime runs it with its
VNNI and AMX int8 kernels. Weights are quantized per output channel, activations per tensor (uint8, MinMax
over the calibration images). Only Conv and ConvTranspose are quantized, and not the first and last convolution:
with 3 channels in or out they were slower in int8 and carried most of the error.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from transfigure.pipeline import fidelity
from transfigure.pipeline.errors import UserError
from transfigure.pipeline.export import model_card as card
from transfigure.pipeline.files import write_bytes_atomic
from transfigure.pipeline.images import BadImage, decode_rgb, list_images
from transfigure.pipeline.pixels import pad_to_multiple, to_model_range, to_pixels
from transfigure.pipeline.schema import Int8Params


def write_int8_companion(
    fp32_path: Path,
    calibration: list[np.ndarray],
    check: list[np.ndarray],
    limits: Int8Params,
    calibration_source: str,
) -> dict:
    """Quantize the float32 model at `fp32_path` into card.companion_path(fp32_path, "int8"), written atomically.

    `calibration` and `check` are (H, W, 3) uint8 images. The card of the int8 model is the float32 model's with
    precision int8 and the quality measured on `check`; a model over the limits is still written (a user may ask
    for it by name) but `auto` will not use it. Returns {"path", "quality", "mean_levels", "max_levels", "psnr_db",
    "calibration"}.
    """
    fp32_path = Path(fp32_path)
    out_path = card.companion_path(fp32_path, card.INT8)
    fp32 = onnx.load_model(str(fp32_path))
    fp32_card = card.ModelCard.of_proto(fp32)
    input_name, multiple = fp32_card.inputs[0], fp32_card.multiple
    int8 = quantize_qdq(fp32_path, [{input_name: _batch(image, multiple)} for image in calibration])

    measured = fidelity.compare(
        *(_run(model.SerializeToString(), input_name, multiple, check) for model in (fp32, int8))
    )
    result = fidelity.verdict(measured, limits.max_mean_levels, limits.min_psnr_db)
    description = f"{len(calibration)} images of {calibration_source}"
    check_card = card.Int8Check(
        calibration=description,
        mean_levels=f"{measured['mean_levels']:.4f}",
        max_levels=f"{measured['max_levels']:.0f}",
        psnr_db=f"{measured['psnr_db']:.2f}",
        quality=result,
    )
    del int8.metadata_props[:]
    onnx.helper.set_model_props(int8, replace(fp32_card, precision=card.INT8, int8=check_card).to_metadata())
    write_bytes_atomic(out_path, int8.SerializeToString())
    return {"path": str(out_path), "quality": result, **measured, "calibration": description}


def quantize_qdq(fp32_path: Path, feeds: list[dict], exclude_end_convolutions: bool = True) -> onnx.ModelProto:
    """The QDQ int8 model of `fp32_path`, calibrated on `feeds` (input name -> batch), as described above;
    `exclude_end_convolutions=False` quantizes those too (what the exclusion is measured against)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self._feeds: Iterator[dict] = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self._feeds, None)

    with tempfile.TemporaryDirectory(prefix="transfigure-int8-") as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        # ONNX shape inference only: the symbolic one gives up on U-Net skips and flows (their concatenations).
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        convolutions = [node.name for node in onnx.load_model(str(prepared)).graph.node if node.op_type == "Conv"]
        ends = [convolutions[0], convolutions[-1]] if exclude_end_convolutions and len(convolutions) > 2 else []
        # The quantizer logs on the root logger at WARNING for tensors it leaves alone; the check is what counts.
        root = logging.getLogger()
        level, root.level = root.level, logging.ERROR
        try:
            quantize_static(
                str(prepared),
                str(quantized),
                Feeds(),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["Conv", "ConvTranspose"],
                nodes_to_exclude=ends,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
        finally:
            root.level = level
        return onnx.load_model(str(quantized))


def quantize_with_folder(fp32_path: Path, folder: Path, limits: Int8Params) -> dict:
    """write_int8_companion with images from `folder` (searched recursively, sorted): the first
    `calibration_images` readable ones calibrate and the next `check_images` check (a quarter of them when the
    folder has fewer). Unreadable files are skipped and listed under "rejected"."""
    fp32_card = card.ModelCard.read(fp32_path)
    if fp32_card.kind != card.IMAGE_TRANSLATION or fp32_card.precision != "float32":
        raise UserError(f"{fp32_path}: not a float32 image-translation model of this pipeline")
    if fp32_card.labels_in:
        raise UserError(f"{fp32_path}: takes label maps; int8 calibration needs a model of images")
    if not Path(folder).is_dir():
        raise UserError(f"--images {folder}: not a folder")
    wanted = limits.calibration_images + limits.check_images
    decoded, rejected = [], []
    for path in list_images(folder):
        if len(decoded) == wanted:
            break
        try:
            decoded.append(decode_rgb(path))
        except BadImage as exc:
            rejected.append({"path": str(path), "reason": str(exc)})
    if len(decoded) < 2:
        raise UserError(f"{folder}: {len(decoded)} readable images; at least 2 are needed (calibrate and check)")
    n_check = limits.check_images if len(decoded) == wanted else max(1, len(decoded) // 4)
    result = write_int8_companion(fp32_path, decoded[:-n_check], decoded[-n_check:], limits, str(folder))
    return {**result, "rejected": rejected}


def summary(result: dict) -> list[str]:
    """quantize_with_folder's result as the lines `transfigure quantize` prints."""
    skipped = [f"skipped {item['path']}: {item['reason']}" for item in result["rejected"]]
    return [
        *skipped,
        f"wrote {result['path']}: {result['mean_levels']:.2f} levels mean, {result['max_levels']:.0f} max, "
        f"{result['psnr_db']:.1f} dB against float32 ({result['quality']}; calibrated on {result['calibration']})",
    ]


def _batch(image: np.ndarray, multiple: int) -> np.ndarray:
    """One (H, W, 3) uint8 image as the model takes it, reflect-padded to its multiple as the engine does."""
    return np.ascontiguousarray(to_model_range(pad_to_multiple(image, multiple).transpose(2, 0, 1)[None]))


def _run(model: bytes, input_name: str, multiple: int, images: list[np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return [to_pixels(session.run(None, {input_name: _batch(image, multiple)})[0][0]) for image in images]
