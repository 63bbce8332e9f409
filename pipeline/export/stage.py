"""`export`: a checkpoint's generators as checked, parity-tested ONNX models, logged and registered in MLflow.
What to export comes from the recipe (`Recipe.exports`): a model that takes `z` is a sampler, described by its
`Export`; translators are exported by their kind (image_translation or label_map)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from transfigure.pipeline import tracking
from transfigure.pipeline.data import datasets
from transfigure.pipeline.errors import UserError
from transfigure.pipeline.export import model_card as card
from transfigure.pipeline.export.quantize import write_int8_companion
from transfigure.pipeline.export.to_onnx import (
    export_image_generator,
    export_label_map_generator,
    export_sampler,
)
from transfigure.pipeline.files import write_json_atomic
from transfigure.pipeline.params import Params
from transfigure.pipeline.schema import ExportParams, Int8Params
from transfigure.pipeline.train import recipes
from transfigure.pipeline.train.checkpoint import checkpoint_path


def export_trained(
    model: recipes.Trained, out_dir: Path, fp16: bool, export: ExportParams, data_root: Path | None
) -> dict[str, dict]:
    """Every generator of a checkpoint into out_dir/<direction>.onnx; translators also get their int8 companion
    when export.int8 is enabled, calibrated on the prepared dataset under `data_root` (skipped, saying why, when
    it is not there)."""
    exports = model.exports
    options = {"opset": export.opset, "atol": export.parity_atol}
    results = {}
    for direction, net in model.generators.items():
        spec = exports[direction]
        path = out_dir / f"{direction}.onnx"
        metadata = card.provenance(model.state, direction, spec.source, spec.target)
        if card.LATENT_INPUT in spec.inputs:
            sampler = (spec.kind, spec.inputs, spec.card_attributes)
            results[direction] = export_sampler(net, path, metadata, *sampler, **options)
        elif spec.kind == card.LABEL_MAP:
            results[direction] = export_label_map_generator(net, path, metadata, **options)
        else:
            results[direction] = export_image_generator(net, path, metadata, fp16=fp16, **options)
            if export.int8.enabled and results[direction]["input_type"] == card.LABEL_MAP:
                results[direction]["int8"] = {"skipped": "it takes label maps, not images to calibrate on"}
            elif export.int8.enabled:
                data_dir = Path(data_root) / model.params.dataset if data_root else None
                results[direction]["int8"] = _int8(path, data_dir, spec.source, export.int8)
    return results


def _int8(fp32_path: Path, data_dir: Path | None, domain: str, limits: Int8Params) -> dict:
    """The int8 companion, calibrated on the first training images of `domain` and checked on its test images."""
    manifest = data_dir / datasets.MANIFEST if data_dir else None
    if manifest is None or not manifest.is_file():
        return {"skipped": f"no prepared dataset at {data_dir} to calibrate on (`transfigure quantize` takes a folder)"}
    items = datasets.load_manifest(data_dir)
    train = sorted(datasets.entries(items, "train", domain), key=lambda e: e["path"])
    test = sorted(datasets.entries(items, "test", domain), key=lambda e: e["path"])
    calibration = train[: limits.calibration_images]
    check = (test or train[len(calibration) :])[: limits.check_images]
    if not calibration or not check:
        return {"skipped": f"{data_dir}: too few train{domain}/test{domain} images to calibrate and check on"}
    images = {e["path"]: datasets.read_rgb(data_dir / e["path"]) for e in calibration + check}
    return write_int8_companion(
        fp32_path,
        [images[e["path"]] for e in calibration],
        [images[e["path"]] for e in check],
        limits,
        f"{data_dir.name}:train{domain}",
    )


def _parity_text(result: dict) -> str:
    if "differing_pixels" in result:  # a label map: classes, not values
        return f"classes as PyTorch's at {result['pixels'] - result['differing_pixels']} of {result['pixels']} pixels"
    text = f"max abs error vs PyTorch {result['max_abs_error']:.2e}"
    if result.get("fp16"):
        text += f"; fp16 model {result['fp16']['max_abs_error']:.2e}"
    int8 = result.get("int8")
    if int8:
        text += (
            f"; int8 model {int8['skipped']}"
            if "skipped" in int8
            else (f"; int8 model {int8['mean_levels']:.2f} levels mean, {int8['psnr_db']:.1f} dB ({int8['quality']})")
        )
    return text


def export_recipe(
    recipe: str,
    params: Params,
    console,
    fp16: bool,
    step: int | None = None,
    runs_root: Path = Path("runs"),
    artifacts_root: Path = Path("artifacts"),
) -> dict:
    """last.pt into artifacts/RECIPE/, registered; or a kept checkpoint (`step`) into artifacts/RECIPE.step_N/,
    not registered, so `models:/...@latest` stays the finished run's model."""
    checkpoint = checkpoint_path(recipe, step, runs_root)
    model = recipes.load_trained(checkpoint)
    state = model.state
    register = params.export.register_models and step is None
    if register:
        tracking.check_reachable()  # before the work, not after it
    out_dir = artifacts_root / (recipe if step is None else f"{recipe}.step_{step:06d}")
    results = export_trained(model, out_dir, fp16, params.export, Path(params.data.root))
    for result in results.values():
        console.print(f"wrote {result['path']} ({_parity_text(result)})")
    write_json_atomic(out_dir / "export.json", results)
    if register:
        run_id = tracking.run_for_checkpoint(state, checkpoint, console)
        # `dvc exp run` names its experiment; each gets its own alias, and @latest moves to it like any new version.
        experiment = os.environ.get("DVC_EXP_NAME")
        alias = f"exp-{re.sub(r'[^A-Za-z0-9_-]', '-', experiment)}" if experiment else None
        for direction, result in results.items():
            name = f"transfigure-{recipe}-{direction}"
            int8 = result.get("int8", {}).get("path")
            extra = [Path(int8)] if int8 else []
            if result.get("tiles"):
                extra += [card.companion_path(Path(result["path"]), suffix) for suffix in (card.STATISTICS, card.TILE)]
            version = tracking.register_onnx(run_id, Path(result["path"]), name, alias, extra)
            also = f" and models:/{name}@{alias} (experiment {experiment}; @latest moved too)" if alias else ""
            console.print(f"registered models:/{name}@latest (version {version}){also}")
    return results


def export_checkpoint(
    checkpoint: Path,
    out: Path,
    fp16: bool,
    console,
    params: Params | None = None,
) -> dict:
    """One checkpoint file to one .onnx file; a recipe with several generators writes <stem>.<direction>.onnx
    (and their .fp16.onnx and .int8.onnx companions beside them). Without params: the export defaults, and no
    prepared data to calibrate int8 models on."""
    export = params.export if params else ExportParams()
    data_root = Path(params.data.root) if params else None
    model = recipes.load_trained(checkpoint)
    if out.suffix != ".onnx":
        raise UserError(f"--out {out}: must end in .onnx")
    tmp_dir = out.parent / f".{out.stem}.export"
    results = export_trained(model, tmp_dir, fp16, export, data_root)
    final = {}
    for direction, result in results.items():
        target = out if len(results) == 1 else out.with_name(f"{out.stem}.{direction}.onnx")
        Path(result["path"]).replace(target)
        for suffix in ("fp16", card.INT8, card.STATISTICS, card.TILE):
            companion = card.companion_path(Path(result["path"]), suffix)
            if companion.exists():
                companion.replace(card.companion_path(target, suffix))
        if "path" in result.get("int8", {}):
            result["int8"]["path"] = str(card.companion_path(target, card.INT8))
        final[direction] = {**result, "path": str(target)}
        console.print(f"wrote {target} ({_parity_text(result)})")
    tmp_dir.rmdir()
    return final
