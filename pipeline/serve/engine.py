"""The inference engine: one ONNX Runtime session that translates uint8 RGB images of any size.

The `translate` CLI, the Ray path and the HTTP service all go through `Engine`. Images keep their size: each
batch is reflect-padded up to the model's multiple and cropped back. Large images can go through `translate`
with `tile`, in overlapping tiles blended with linear ramps, so memory stays bounded and no seams show.
Providers are asked for by short name (tensorrt, cuda, cpu); ONNX Runtime silently falls back to the CPU when
one fails to load, so `Engine.provider` is read back from the session, never assumed.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pipeline import threads
from pipeline.errors import UserError
from pipeline.export import model_card as card
from pipeline.pixels import to_model_range, to_pixels

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
GPU_PROVIDERS = ("tensorrt", "cuda")
_SHORT_NAMES = {full: short for short, full in PROVIDERS.items()}
MODEL_URI_PREFIX = "models:/"


class InferenceError(RuntimeError):
    """ONNX Runtime refused a batch (e.g. an image too small for the network's padding); other batches go on."""


class Engine:
    """An ONNX model of the image-translation contract, ready to translate (H, W, 3) uint8 RGB arrays.

    `providers`: short names in order of preference; None means every one this ONNX Runtime build offers, in
    the order tensorrt, cuda, cpu (the first that really loads wins). `require_gpu` raises UserError unless
    CUDA or TensorRT loaded. `fp16` asks TensorRT to build fp16 engines, cached under `tensorrt_cache`.
    """

    def __init__(
        self,
        model_path: Path,
        providers: list[str] | None = None,
        require_gpu: bool = False,
        fp16: bool = False,
        tensorrt_cache: Path | None = None,
    ):
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise UserError(f"model not found: {self.model_path}")
        auto = not providers
        names = _available_names() if auto else list(providers)
        unknown = [name for name in names if name not in PROVIDERS]
        if unknown:
            raise UserError(f"unknown provider {unknown[0]!r}; expected some of {', '.join(PROVIDERS)}")
        cache = Path(tensorrt_cache) if tensorrt_cache else _default_tensorrt_cache()
        entries = [_provider_entry(name, fp16, cache) for name in names]
        self.session = _session(self.model_path, entries, quiet=auto, gpu=any(n in GPU_PROVIDERS for n in names))
        self.providers = [_SHORT_NAMES.get(name, name) for name in self.session.get_providers()]
        self.provider = self.providers[0]
        loaded = ", ".join(self.providers)
        if self.provider not in names:
            raise UserError(f"none of the requested providers ({', '.join(names)}) loaded; loaded: {loaded}")
        if require_gpu and self.provider not in GPU_PROVIDERS:
            raise UserError(
                f"--require-gpu: no GPU provider loaded (tried {', '.join(names)}; loaded: {loaded}); "
                "`transfigure doctor` shows why"
            )
        if fp16 and self.provider != "tensorrt":
            raise UserError(
                f"--fp16 needs TensorRT, which did not load (loaded: {loaded}); "
                "for CUDA or the CPU, use the .fp16.onnx model written by `export --fp16`"
            )
        self.fp16 = fp16
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        kind = self.metadata.get("kind", card.IMAGE_TRANSLATION)
        if kind != card.IMAGE_TRANSLATION or "multiple" not in self.metadata:
            raise UserError(
                f"{self.model_path.name} is not an image-translation model of this pipeline "
                f"(kind {kind!r}, multiple {self.metadata.get('multiple')!r}); export it with `transfigure export`"
            )
        self.multiple = int(self.metadata["multiple"])
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise UserError(f"{self.model_path.name} must have one input and one output image")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name

    def translate_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Translate (H, W, 3) uint8 images that all have the same size; outputs have that size too."""
        return list(to_pixels(self._forward(np.stack(images))))

    def translate(self, image: np.ndarray, tile: int | None = None, batch_size: int = 4) -> np.ndarray:
        """Translate one (H, W, 3) uint8 image; with `tile`, one larger than `tile` on a side goes in tiles.

        Tiles are `tile` rounded down to the model's multiple, overlap by an eighth of that and are run
        `batch_size` at a time. Each output tile is weighted by a window that ramps linearly to near zero
        over the overlap, so neighbours cross-fade. A convolutional net is local, so tiles agree with the
        whole-image result away from their borders; with instance norm each tile is normalised by its own
        statistics, so tiled output differs slightly in tone from the whole-image output (the ramps hide seams).
        """
        height, width = image.shape[:2]
        if tile is None or max(height, width) <= tile:
            return self.translate_batch([image])[0]
        size = max(self.multiple, tile // self.multiple * self.multiple)
        overlap = max(1, size // 8)
        tile_h, tile_w = min(size, height), min(size, width)
        window = np.outer(_ramp(tile_h, overlap), _ramp(tile_w, overlap))[:, :, None]
        boxes = [(y, x) for y in _starts(height, tile_h, overlap) for x in _starts(width, tile_w, overlap)]
        total = np.zeros((height, width, 3), np.float32)
        weight = np.zeros((height, width, 1), np.float32)
        for first in range(0, len(boxes), batch_size):
            chunk = boxes[first : first + batch_size]
            outputs = self._forward(np.stack([image[y : y + tile_h, x : x + tile_w] for y, x in chunk]))
            for (y, x), output in zip(chunk, outputs, strict=True):
                total[y : y + tile_h, x : x + tile_w] += output * window
                weight[y : y + tile_h, x : x + tile_w] += window
        return to_pixels(total / weight)

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, H, W, 3) float32 in [-1, 1], through the model at a padded size."""
        _, height, width, _ = batch.shape
        pad_h, pad_w = -height % self.multiple, -width % self.multiple
        if pad_h or pad_w:
            batch = np.pad(batch, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="reflect")
        x = np.ascontiguousarray(to_model_range(batch.transpose(0, 3, 1, 2)))
        try:
            y = self._run_bound(x) if self.provider in GPU_PROVIDERS else self._run(x)
        except Exception as exc:  # ONNX Runtime raises one bare Exception subclass per status code
            raise InferenceError(f"inference failed on {width}x{height}: {str(exc).splitlines()[0]}") from exc
        return y[:, :, :height, :width].transpose(0, 2, 3, 1)

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def _run_bound(self, x: np.ndarray) -> np.ndarray:
        """CUDA and TensorRT: bind the input as a device copy and let ORT allocate the output on the device,
        so the run itself never stages through host buffers; one copy back at the end."""
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
        binding.bind_output(self.output_name, "cuda", 0)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


def open_engine(model: str | Path, **options) -> Engine:
    """An Engine for a local .onnx file or a registered model `models:/NAME@ALIAS` (or `models:/NAME/VERSION`)."""
    if not str(model).startswith(MODEL_URI_PREFIX):
        return Engine(Path(model), **options)
    # ONNX Runtime reads the model and its external data into memory, so the download can go afterwards.
    with tempfile.TemporaryDirectory(prefix="transfigure-model-") as tmp:
        return Engine(download_model(str(model), Path(tmp)), **options)


def download_model(uri: str, dst: Path) -> Path:
    """Download the registered ONNX model `uri` from the MLflow registry into `dst`; return its .onnx file."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import existing_store

    store = existing_store()
    mlflow.set_tracking_uri(store)
    # MLflow's download bar is a screenful of noise for one local copy; the translate bar follows anyway.
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except MlflowException as exc:
        raise UserError(f"cannot load {uri} from {store}: {exc.message.splitlines()[0]}") from exc
    found = sorted(local.rglob("*.onnx")) if local.is_dir() else [local]
    if len(found) != 1 or found[0].suffix != ".onnx":
        raise UserError(f"{uri} holds {len(found)} .onnx files; expected one ONNX model")
    return found[0]


def _available_names() -> list[str]:
    available = ort.get_available_providers()
    return [name for name, full in PROVIDERS.items() if full in available]


def _provider_entry(name: str, fp16: bool, cache: Path) -> str | tuple[str, dict]:
    if name != "tensorrt":
        return PROVIDERS[name]
    cache.mkdir(parents=True, exist_ok=True)
    options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache), "trt_fp16_enable": fp16}
    return PROVIDERS[name], options


def _default_tensorrt_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "transfigure" / "tensorrt"


def _session(path: Path, providers: list, quiet: bool, gpu: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT counts the machine's cores; a container may allow fewer, and another job may hold some (threads.py).
    options.intra_op_num_threads = threads.current()
    # ORT prints its provider fallbacks on stdout; they go to stderr, or nowhere when the choice was automatic
    # (a GPU provider failing on a CPU machine is expected then, and `provider` says what loaded).
    sink = io.StringIO() if quiet else sys.stderr
    if quiet:
        ort.set_default_logger_severity(4)
    try:
        with contextlib.redirect_stdout(sink):
            if gpu:
                # CUDA and cuDNN from NVIDIA's PyPI wheels (the serving image, no PyTorch to load them first).
                ort.preload_dlls()
            return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # a file that is not an ONNX model, or one ORT cannot run
        raise UserError(f"cannot load {path.name}: {str(exc).splitlines()[0]}") from exc
    finally:
        ort.set_default_logger_severity(2)


def _ramp(length: int, overlap: int) -> np.ndarray:
    """1 in the middle, falling linearly to 0.5/overlap at both ends: never 0, so every pixel has weight."""
    rise = np.minimum(1.0, (np.arange(length, dtype=np.float32) + 0.5) / overlap)
    return np.minimum(rise, rise[::-1])


def _starts(length: int, size: int, overlap: int) -> list[int]:
    """Tile origins covering [0, length) with tiles of `size` overlapping by at least `overlap`."""
    if length <= size:
        return [0]
    return [*range(0, length - size, size - overlap), length - size]
