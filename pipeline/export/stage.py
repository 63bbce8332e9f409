"""`export`: a checkpoint's generators as checked, parity-tested ONNX models, logged and registered in MLflow.
What to export comes from the recipe (`Recipe.exports`); how depends only on the model card's kind."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline import tracking
from pipeline.errors import UserError
from pipeline.export import model_card as card
from pipeline.export.to_onnx import export_conditional_generator, export_flow_sampler, export_image_generator
from pipeline.files import write_json_atomic
from pipeline.params import Params
from pipeline.schema import ExportParams
from pipeline.train import recipes
from pipeline.train.checkpoint import checkpoint_path, load_checkpoint


def export_state(state, out_dir: Path, fp16: bool, opset: int, atol: float) -> dict[str, dict]:
    recipe = recipes.get(state["recipe"])
    exports = recipe.exports(recipe.Params.model_validate(state["params"][recipe.name]))
    results = {}
    for direction, net in recipes.generators_from_checkpoint(state).items():
        export = exports[direction]
        path = out_dir / f"{direction}.onnx"
        metadata = card.provenance(state, direction, export.source, export.target)
        if export.kind == card.IMAGE_TRANSLATION:
            results[direction] = export_image_generator(net, path, metadata, opset=opset, fp16=fp16, atol=atol)
        elif export.kind == card.CONDITIONAL_GENERATION:
            results[direction] = export_conditional_generator(net, path, metadata, opset=opset, atol=atol)
        else:
            results[direction] = export_flow_sampler(net, path, metadata, opset=opset, atol=atol)
    return results


def _parity_text(result: dict) -> str:
    text = f"max abs error vs PyTorch {result['max_abs_error']:.2e}"
    if result.get("fp16"):
        text += f"; fp16 model {result['fp16']['max_abs_error']:.2e}"
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
    state = load_checkpoint(checkpoint)
    register = params.export.register_models and step is None
    if register:
        tracking.check_reachable()  # before the work, not after it
    out_dir = artifacts_root / (recipe if step is None else f"{recipe}.step_{step:06d}")
    results = export_state(state, out_dir, fp16, params.export.opset, params.export.parity_atol)
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
            version = tracking.register_onnx(run_id, Path(result["path"]), name, alias)
            also = f" and models:/{name}@{alias} (experiment {experiment}; @latest moved too)" if alias else ""
            console.print(f"registered models:/{name}@latest (version {version}){also}")
    return results


def export_checkpoint(checkpoint: Path, out: Path, fp16: bool, console, export: ExportParams = ExportParams()) -> dict:
    """One checkpoint file to one .onnx file; a recipe with several generators writes <stem>.<direction>.onnx."""
    state = load_checkpoint(checkpoint)
    if state.get("recipe") not in recipes.names():
        raise UserError(f"{checkpoint}: not a generator checkpoint of any recipe ({', '.join(recipes.names())})")
    if out.suffix != ".onnx":
        raise UserError(f"--out {out}: must end in .onnx")
    tmp_dir = out.parent / f".{out.stem}.export"
    results = export_state(state, tmp_dir, fp16, export.opset, export.parity_atol)
    final = {}
    for direction, result in results.items():
        target = out if len(results) == 1 else out.with_name(f"{out.stem}.{direction}.onnx")
        Path(result["path"]).replace(target)
        fp16_path = Path(result["path"]).with_suffix(".fp16.onnx")
        if fp16_path.exists():
            fp16_path.replace(target.with_suffix(".fp16.onnx"))
        final[direction] = {**result, "path": str(target)}
        console.print(f"wrote {target} ({_parity_text(result)})")
    tmp_dir.rmdir()
    return final
