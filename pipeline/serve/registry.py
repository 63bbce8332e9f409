"""Registered models: `models:/NAME@ALIAS` (or `models:/NAME/VERSION`) from the MLflow registry, downloaded with
their companions beside them, as the engine expects them."""

from __future__ import annotations

from pathlib import Path

from transfigure.pipeline.errors import UserError
from transfigure.pipeline.export import model_card as card

MODEL_URI_PREFIX = "models:/"


def download_model(uri: str, dst: Path) -> Path:
    """Download the registered ONNX model `uri` from the MLflow registry into `dst`; return its .onnx file."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from transfigure.pipeline import tracking

    store = tracking.existing_store()
    mlflow.set_tracking_uri(store)
    tracking.disable_progress_bars()
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except MlflowException as exc:
        raise UserError(f"cannot load {uri} from {store}: {exc.message.splitlines()[0]}") from exc
    found = sorted(local.rglob("*.onnx")) if local.is_dir() else [local]
    suffixes = (card.INT8, card.STATISTICS, card.TILE)
    companions = {path: next((s for s in suffixes if path.name.endswith(f".{s}.onnx")), None) for path in found}
    models = [path for path, suffix in companions.items() if suffix is None]
    if len(models) != 1 or models[0].suffix != ".onnx":
        raise UserError(f"{uri} holds {len(models)} .onnx models; expected one ONNX model")
    for path, suffix in companions.items():
        if suffix:  # logged as MLflow extra files; the engine looks for them beside the model
            path.replace(card.companion_path(models[0], suffix))
    return models[0]
