"""MLflow: where runs go, and the few calls the pipeline makes. mlflow is imported lazily (it is slow to import)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

EXPERIMENT = "transfigure"


def repo_root() -> Path:
    """The repository root, also from inside a DVC experiment's temporary copy (.dvc/tmp/exps/...)."""
    cwd = Path.cwd().resolve()
    text = str(cwd)
    marker = f"{os.sep}.dvc{os.sep}tmp{os.sep}exps{os.sep}"
    if marker in text:
        return Path(text.split(marker)[0])
    return cwd


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _mlflow():
    import logging

    import mlflow

    # Alembic and MLflow's own INFO lines bury the training log on every start.
    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri())
    if not os.environ.get("MLFLOW_TRACKING_URI") and mlflow.get_experiment_by_name(EXPERIMENT) is None:
        # Artifacts next to mlflow.db, not in ./mlruns of whichever copy (a DVC experiment's) ran first.
        mlflow.create_experiment(EXPERIMENT, artifact_location=(repo_root() / "mlruns").as_uri())
    mlflow.set_experiment(EXPERIMENT)
    return mlflow


class Run:
    """One MLflow run for one training of one recipe; resumes the same run id after a restart."""

    def __init__(self, recipe: str, params_flat: dict, tags: dict, run_id: str | None = None):
        self.mlflow = _mlflow()
        if run_id is not None and self._exists(run_id):
            self.active = self.mlflow.start_run(run_id=run_id)
        else:
            self.active = self.mlflow.start_run(run_name=recipe, tags=tags)
            # MLflow limits a batch to 100 params.
            items = [(k, str(v)) for k, v in params_flat.items()]
            for start in range(0, len(items), 100):
                self.mlflow.log_params(dict(items[start : start + 100]))
        self.run_id = self.active.info.run_id

    def _exists(self, run_id: str) -> bool:
        try:
            self.mlflow.get_run(run_id)
            return True
        except Exception:  # a run from another tracking store: start a new one
            return False

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def log_image(self, image, key: str, step: int) -> None:
        self.mlflow.log_image(image, key=key, step=step)

    def log_model(self, module, name: str, example: dict) -> None:
        """As a torch.export (pt2) program traced on `example` (input name -> tensor): no pickled code."""
        import mlflow.pytorch
        import torch
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        arrays = {key: t.detach().cpu().numpy() for key, t in example.items()}
        # An explicit signature: MLflow cannot derive one for several inputs, and -1 keeps the batch dynamic.
        signature = ModelSignature(
            inputs=Schema([TensorSpec(a.dtype, (-1, *a.shape[1:]), key) for key, a in arrays.items()])
        )
        # Explicit requirements: inferring them imports and inspects the whole environment (slow).
        requirements = [f"torch=={torch.__version__.split('+')[0]}"]
        mlflow.pytorch.log_model(
            module,
            name=name,
            pip_requirements=requirements,
            serialization_format="pt2",
            signature=signature,
            input_example=tuple(arrays.values()) if len(arrays) > 1 else next(iter(arrays.values())),
        )

    def end(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


def log_to_run(
    run_id: str,
    metrics: dict[str, float] | None = None,
    artifacts: list[Path] | None = None,
    artifact_path: str | None = None,
) -> None:
    """Adds results (evaluation metrics, sheets) to an existing training run."""
    mlflow = _mlflow()
    with mlflow.start_run(run_id=run_id):
        if metrics:
            mlflow.log_metrics(metrics)
        for path in artifacts or []:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)


def register_onnx(run_id: str, path: Path, name: str) -> str:
    """Logs an ONNX file to the run and registers it as a new version of `name`.

    MLflow reserves the alias `latest`: `models:/NAME/latest` (and our `models:/NAME@latest`) is always the
    newest version, so no alias is set here.
    """
    import onnx

    mlflow = _mlflow()
    from mlflow import onnx as mlflow_onnx

    with mlflow.start_run(run_id=run_id):
        info = mlflow_onnx.log_model(
            onnx.load(str(path)), name=path.stem, registered_model_name=name, pip_requirements=["onnxruntime"]
        )
    return str(info.registered_model_version)
