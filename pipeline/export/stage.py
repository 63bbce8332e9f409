"""`export`: a checkpoint's generators as checked, parity-tested ONNX models, logged and registered in MLflow."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import UserError
from pipeline.images import write_json_atomic
from pipeline.params import ExportParams, Params
from pipeline.train.checkpoint import LAST, checkpoint_dir, load_checkpoint

DOMAINS = {"AtoB": ("A", "B"), "BtoA": ("B", "A")}


def _metadata(state: dict, direction: str) -> dict[str, str]:
    recipe = state["recipe"]
    dataset = state["params"][recipe]["dataset"]
    source, target = DOMAINS.get(direction, ("noise", state["params"][recipe].get("domain", "B")))
    return {
        "recipe": recipe,
        "direction": direction,
        "source_domain": f"{dataset}:{source}",
        "target_domain": f"{dataset}:{target}",
        "training_commit": state.get("git_commit", "unknown"),
        "params_hash": state["params_hash"],
        "training_step": str(state["step"]),
    }


def export_state(state: dict, out_dir: Path, fp16: bool, opset: int, atol: float) -> dict[str, dict]:
    from pipeline.export.to_onnx import export_conditional_generator, export_flow_sampler, export_image_generator
    from pipeline.train.recipes import generators_from_checkpoint

    results = {}
    for direction, net in generators_from_checkpoint(state).items():
        path = out_dir / f"{direction}.onnx"
        metadata = _metadata(state, direction)
        if direction == "generator" and state["recipe"] == "flowgan":
            results[direction] = export_flow_sampler(net, path, metadata, opset=opset, atol=atol)
        elif direction == "generator":
            results[direction] = export_conditional_generator(net, path, metadata, opset=opset, atol=atol)
        else:
            results[direction] = export_image_generator(net, path, metadata, opset=opset, fp16=fp16, atol=atol)
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
    runs_root: Path = Path("runs"),
    artifacts_root: Path = Path("artifacts"),
) -> dict:
    state = load_checkpoint(checkpoint_dir(recipe, runs_root) / LAST)
    out_dir = artifacts_root / recipe
    results = export_state(state, out_dir, fp16, params.export.opset, params.export.parity_atol)
    for result in results.values():
        console.print(f"wrote {result['path']} ({_parity_text(result)})")
    write_json_atomic(out_dir / "export.json", results)
    if params.export.register_models and state.get("mlflow_run_id"):
        from pipeline import tracking

        for direction, result in results.items():
            name = f"transfigure-{recipe}-{direction}"
            version = tracking.register_onnx(state["mlflow_run_id"], Path(result["path"]), name)
            console.print(f"registered models:/{name}@latest (version {version})")
    return results


def export_checkpoint(checkpoint: Path, out: Path, fp16: bool, console, export: ExportParams = ExportParams()) -> dict:
    """One checkpoint file to one .onnx file; a recipe with several generators writes <stem>.<direction>.onnx."""
    state = load_checkpoint(checkpoint)
    if "recipe" not in state or state["recipe"] == "classifier":
        raise UserError(f"{checkpoint}: not a generator checkpoint")
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
