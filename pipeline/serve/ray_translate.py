"""`translate --engine ray`: the same Engine and the same translation loop on Ray Data, for a cluster.

The driver plans the jobs exactly as the local engine does (translate.plan: skipped, refused and ignored files)
and opens the model once, so a bad model or option fails before any worker starts. Ray Data then streams the
(source, target) rows to an actor pool: each actor holds one Engine (one ONNX Runtime session; one GPU per actor
when the cluster has GPUs) and runs translate.translate_jobs on its batch: read and decode with the careful
decoder, translate (tiles included), encode and write atomically. Image bytes are read where they are decoded and
written where they are made, so no pixels cross the object store, and only a small summary per batch comes back:
memory follows the pipeline's few batches in flight, not the folder. On a cluster of several machines INPUT and
OUTPUT must be paths that every node mounts (NFS, a shared volume).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from transfigure.pipeline import threads
from transfigure.pipeline.errors import UserError
from transfigure.pipeline.export import model_card as card
from transfigure.pipeline.progress import Progress
from transfigure.pipeline.serve.engine import Engine
from transfigure.pipeline.serve.options import GPU_PROVIDERS, InferenceOptions, default_memory_budget
from transfigure.pipeline.serve.registry import MODEL_URI_PREFIX, download_model
from transfigure.pipeline.serve.translate import check_options, default_batch_size, finish_report, plan, translate_jobs

INSTALL_HINT = "--engine ray needs Ray: pip install 'transfigure[ray]'"
# Rows (file names) per actor call: enough to amortise a call, few enough to spread a folder over the actors.
ROWS_PER_CALL = 8


def translate_on_ray(
    input: Path,
    output: Path,
    model: str,
    options: InferenceOptions,
    address: str | None = None,
    fmt: str = "png",
    skip_existing: bool = False,
    workers: int = 2,
    progress: bool = True,
    report_path: Path | None = None,
    colorize: bool = False,
) -> dict:
    """translate_path's work and report on a Ray cluster (`address`, or a local one sized to this machine), plus
    "engine": "ray" and "actors". The driver checks the model and `options` on its CPU."""
    # Ray Data's INFO lines would interleave with the progress bar; its full logs stay under /tmp/ray.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    try:
        import ray
        import ray.data
    except ImportError:
        raise UserError(INSTALL_HINT) from None

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="transfigure-model-") as tmp:
        local = download_model(model, Path(tmp)) if str(model).startswith(MODEL_URI_PREFIX) else Path(model)
        # The options' usage errors here, and the model on the driver's CPU; GPUs are the actors' to load.
        options.check()
        checked = Engine(local, replace(options, providers=("cpu",), require_gpu=False, tensorrt_fp16=False))
        files = model_files(local)
    chosen_batch = check_options(checked, fmt, colorize)
    todo, report = plan(Path(input), Path(output), fmt, skip_existing)
    report.update(engine="ray", actors=0)
    ran = {"provider": checked.provider, "precision": checked.precision}
    if todo:
        started_here = not ray.is_initialized()
        if started_here:
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise UserError(f"cannot start or reach Ray at {address or 'a local cluster'}: {exc}") from None
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False  # the driver's own bar counts images
            resources = ray.cluster_resources()
            gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
            use_gpu = gpus > 0 and wants_gpu(options)
            if options.require_gpu and not use_gpu:
                raise UserError(f"--require-gpu: the Ray cluster has {gpus} GPUs, or the options rule them out")
            report["actors"] = min(len(todo), gpus if use_gpu else cpus)
            settings = {"workers": workers, "colorize": colorize, "batch_size": chosen_batch}
            if use_gpu and options.batch_size is None:
                settings["batch_size"] = default_batch_size("cuda")
            # Absolute, since workers elsewhere have other working folders; the report keeps the paths as given.
            rows = [{"source": os.path.abspath(source), "target": os.path.abspath(target)} for source, target in todo]
            given = {row["source"]: str(source) for row, (source, _) in zip(rows, todo, strict=True)}
            blocks = min(len(rows), max(report["actors"], math.ceil(len(rows) / ROWS_PER_CALL)))
            results = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
                Translator,
                fn_constructor_kwargs={"files": files, "options": options, "settings": settings},
                compute=ray.data.ActorPoolStrategy(size=report["actors"]),
                batch_size=ROWS_PER_CALL,
                batch_format="numpy",
                num_cpus=1,
                num_gpus=1 if use_gpu else 0,
            )
            try:
                ran = collect(results, report, given, progress) or ran
            except ray.exceptions.RayError as exc:
                # An actor refusing the options (a provider that does not load there) is a usage error.
                refused = re.search(r"UserError: (.+)", str(exc))
                if refused is None:
                    raise
                raise UserError(f"on a Ray actor: {refused.group(1)}") from None
        finally:
            if started_here:
                ray.shutdown()
    return finish_report(report, start, ran["provider"], ran["precision"], report_path)


def wants_gpu(options: InferenceOptions) -> bool:
    """Whether the options let the actors use a GPU: a GPU provider is allowed and the precision is not int8 or
    bf16 (CPU-only)."""
    allowed = options.providers or GPU_PROVIDERS
    return bool(set(GPU_PROVIDERS) & set(allowed)) and options.precision in ("auto", "fp32")


def collect(results, report: dict, given: dict[str, str], progress: bool) -> dict | None:
    """Streams the actors' summaries into `report` (`given`: each absolute source path -> the path as the user gave
    it), advancing the progress bar; what ran (provider, precision)."""
    from rich.console import Console

    ran, found = None, []
    with Progress(Console(stderr=True, quiet=not progress), "translating", len(given), unit="img") as bar:
        for row in results.iter_rows():
            report["translated"] += int(row["translated"])
            found += [{**item, "path": given[item["path"]]} for item in json.loads(row["rejected"])]
            report["tiling"] = row["tiling"] or report["tiling"]
            ran = {"provider": row["provider"], "precision": row["precision"]}
            bar.update(bar.done + int(row["jobs"]))
    # Actors finish in any order; the report lists their refusals by path, after the planner's.
    report["rejected"] += sorted(found, key=lambda item: item["path"])
    return ran


def model_files(model: Path) -> dict[str, bytes]:
    """The model, the companions beside it (int8, tiling) and the external-data files each of them names (MLflow
    stores a registered model's weights in one), by file name, the model first: what each actor writes into a
    folder of its own, so that workers need not see the driver's disk or the MLflow registry."""
    paths = [model] + [card.companion_path(model, kind) for kind in (card.INT8, card.STATISTICS, card.TILE)]
    paths = [path for path in paths if path.exists()]
    data = [path.parent / name for path in paths for name in external_data_files(path)]
    return {path.name: path.read_bytes() for path in [*paths, *data]}


def external_data_files(model: Path) -> list[str]:
    """The files (relative to the model's folder) that hold the model's external tensors."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    tensors = [*proto.graph.initializer, *(a.t for node in proto.graph.node for a in node.attribute if a.HasField("t"))]
    locations = [
        {entry.key: entry.value for entry in tensor.external_data}.get("location")
        for tensor in tensors
        if tensor.data_location == onnx.TensorProto.EXTERNAL
    ]
    return sorted({location for location in locations if location})


class Translator:
    """A Ray actor: one Engine over the model's files (model_files), translating a batch of (source, target) rows."""

    def __init__(self, files: dict[str, bytes], options: InferenceOptions, settings: dict):
        # Ray gave this actor one core (and a GPU, if any): one ONNX Runtime thread, one actor per core.
        threads.apply(1)
        if options.memory_budget is None:  # the machine's actors, one a core, share its default budget
            options = replace(options, memory_budget=default_memory_budget(sharing=len(threads.available_cpus())))
        self.folder = tempfile.TemporaryDirectory(prefix="transfigure-ray-model-")
        for name, data in files.items():
            (Path(self.folder.name) / name).write_bytes(data)
        self.engine = Engine(Path(self.folder.name) / next(iter(files)), options)
        self.engine.load_tiling()
        self.settings = settings

    def __call__(self, batch):
        jobs = [(Path(source), Path(target)) for source, target in zip(batch["source"], batch["target"], strict=True)]
        report = {"translated": 0, "rejected": [], "tiling": None}
        translate_jobs(self.engine, jobs, report, advance=lambda: None, **self.settings)
        return {
            "jobs": np.array([len(jobs)]),
            "translated": np.array([report["translated"]]),
            "rejected": np.array([json.dumps(report["rejected"])]),
            "tiling": np.array([report["tiling"] or ""]),
            "provider": np.array([self.engine.provider]),
            "precision": np.array([self.engine.precision]),
        }
