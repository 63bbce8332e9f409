"""MLflow: where runs go, and the few calls the pipeline makes. mlflow is imported lazily (it is slow to import)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from urllib.parse import urlparse

from transfigure.pipeline.errors import UserError

EXPERIMENT = "transfigure"
STORE = "mlflow.db"
# Tags a run gets when the run its checkpoint names is not in this store (copied by `dvc pull` or by hand).
LINEAGE_TAGS = ("transfigure.original_run_id", "transfigure.checkpoint_sha256", "transfigure.checkpoint_commit")


class TrackingUnavailable(UserError):
    """The tracking server named by MLFLOW_TRACKING_URI does not answer."""


def repo_root() -> Path:
    """The repository root, also from inside a DVC experiment's temporary copy (.dvc/tmp/exps/...)."""
    cwd = Path.cwd().resolve()
    text = str(cwd)
    marker = f"{os.sep}.dvc{os.sep}tmp{os.sep}exps{os.sep}"
    if marker in text:
        return Path(text.split(marker)[0])
    return cwd


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / STORE}"


def existing_store() -> str:
    """The store to read registered models from: MLFLOW_TRACKING_URI, else the nearest mlflow.db in this folder or
    a parent (the project's). Never creates one: opening a missing sqlite file would leave an empty database."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    for folder in (repo_root(), *repo_root().parents):
        if (folder / STORE).is_file():
            return f"sqlite:///{folder / STORE}"
    raise UserError(
        f"no MLflow store: no {STORE} in {repo_root()} or its parents and MLFLOW_TRACKING_URI is not set; "
        "run from the project folder, set MLFLOW_TRACKING_URI, or pass a .onnx file"
    )


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def check_reachable(uri: str | None = None, timeout: float = 3.0) -> None:
    """Raise TrackingUnavailable, naming the URI, unless an http(s) tracking server accepts a connection; MLflow
    itself would retry for minutes and then end in a traceback. File and database stores need no check."""
    uri = uri or tracking_uri()
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} cannot be reached ({exc.strerror or exc}); start it, "
            "or unset MLFLOW_TRACKING_URI to log to mlflow.db here"
        ) from None


def disable_progress_bars() -> None:
    """MLflow's download bar is a screenful of noise for local copies (registering extra files, loading models)."""
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"


def _mlflow():
    import logging

    import mlflow

    check_reachable()

    # Alembic and MLflow's own INFO lines bury the training log on every start.
    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    disable_progress_bars()
    mlflow.set_tracking_uri(tracking_uri())
    if not os.environ.get("MLFLOW_TRACKING_URI") and mlflow.get_experiment_by_name(EXPERIMENT) is None:
        # Artifacts next to mlflow.db, not in ./mlruns of whichever copy (a DVC experiment's) ran first.
        mlflow.create_experiment(EXPERIMENT, artifact_location=(repo_root() / "mlruns").as_uri())
    mlflow.set_experiment(EXPERIMENT)
    return mlflow


class Run:
    """One MLflow run for one training of one recipe; resumes the same run id after a restart. A run id that
    this store does not have (a checkpoint from elsewhere) gets a new run tagged with what `lineage()` returns."""

    def __init__(self, recipe: str, params_flat: dict, tags: dict, run_id: str | None = None, lineage=None):
        self.mlflow = _mlflow()
        self.replaced = run_id if run_id is not None and not _exists(self.mlflow, run_id) else None
        if run_id is not None and not self.replaced:
            self.active = self.mlflow.start_run(run_id=run_id)
        else:
            extra = lineage() if self.replaced and lineage else {}
            self.active = self.mlflow.start_run(run_name=recipe, tags={**tags, **extra})
            # MLflow limits a batch to 100 params.
            items = [(k, str(v)) for k, v in params_flat.items()]
            for start in range(0, len(items), 100):
                self.mlflow.log_params(dict(items[start : start + 100]))
        self.run_id = self.active.info.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def log_image(self, image, key: str, step: int) -> None:
        self.mlflow.log_image(image, key=key, step=step)

    def log_artifact(self, path: Path) -> None:
        self.mlflow.log_artifact(str(path))

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
            # Else MLflow loads each program back at every training end to serve it the example, which it cannot do
            # for a multi-input one anyway; the signature is explicit.
            validate_serving_input=False,
        )

    def end(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


def _exists(mlflow, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        mlflow.get_run(run_id)
        return True
    except MlflowException:  # a run from another tracking store
        return False


def lineage(state, checkpoint: Path) -> dict[str, str]:
    """The tags that tie a new run to the checkpoint's original one: its run id, file hash and commit."""
    from transfigure.pipeline.files import sha256_of_file

    values = (state.get("mlflow_run_id") or "none", sha256_of_file(checkpoint), state.get("git_commit", "unknown"))
    return dict(zip(LINEAGE_TAGS, values, strict=True))


def run_for_checkpoint(state, checkpoint: Path, console) -> str:
    """The id of the run to log a checkpoint's results to: its own run when this store has it, else a new run
    in the same experiment, tagged with the original run id, the checkpoint's sha256 and commit (said in one line)."""
    mlflow = _mlflow()
    run_id = state.get("mlflow_run_id")
    if run_id and _exists(mlflow, run_id):
        return run_id
    tags = {"recipe": state["recipe"], **lineage(state, checkpoint)}
    with mlflow.start_run(run_name=state["recipe"], tags=tags) as run:
        new_id = run.info.run_id
    missing = (
        f"MLflow run {run_id} of {checkpoint} is not in {tracking_uri()}" if run_id else f"{checkpoint} has no run"
    )
    console.print(f"{missing}; logging to new run {new_id}, tagged with the original run id and the file's sha256")
    return new_id


def log_to_run(
    run_id: str,
    metrics: dict[str, float] | None = None,
    artifacts: list[Path] | None = None,
    artifact_path: str | None = None,
    step: int | None = None,
) -> None:
    """Adds results (evaluation metrics at the checkpoint's step, sheets) to an existing training run."""
    mlflow = _mlflow()
    with mlflow.start_run(run_id=run_id):
        if metrics:
            mlflow.log_metrics(metrics, step=step)
        for path in artifacts or []:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)


def register_onnx(run_id: str, path: Path, name: str, alias: str | None = None, extra: list[Path] = ()) -> str:
    """Logs an ONNX file (and `extra` files beside it, such as its int8 companion) to the run and registers it as a
    new version of `name`, with `alias` if given.

    MLflow reserves the alias `latest`: `models:/NAME/latest` (and our `models:/NAME@latest`) is always the
    newest version, so it is never set here.
    """
    import onnx

    mlflow = _mlflow()
    from mlflow import onnx as mlflow_onnx

    with mlflow.start_run(run_id=run_id):
        info = mlflow_onnx.log_model(
            onnx.load(str(path)),
            name=path.stem,
            registered_model_name=name,
            pip_requirements=["onnxruntime"],
            extra_files=[str(file) for file in extra] or None,
        )
    version = str(info.registered_model_version)
    if alias:
        mlflow.MlflowClient().set_registered_model_alias(name, alias, version)
    return version
