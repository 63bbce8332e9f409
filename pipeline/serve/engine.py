"""The inference engine: one ONNX Runtime session that translates uint8 RGB images of any size (or label maps:
a model of kind label_map gives (H, W) class indices, one with a label-map input takes them).

The `translate` CLI, the Ray path and the HTTP service all go through `Engine`. Images keep their size: each
batch is reflect-padded up to the model's multiple and cropped back. Large images can go through `translate`
with `tile`, one tile at a time, so memory follows the tile (pipeline/serve/tiling.py: instance-norm models
share a thumbnail's statistics across tiles, and those tiles run in float32 through the tile graph whatever the
precision; blended tiles run in the chosen precision).
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

from pipeline import fidelity, threads
from pipeline.errors import InferenceError, UserError
from pipeline.export import model_card as card
from pipeline.pixels import pad_to_multiple, parse_palette, to_model_range, to_pixels
from pipeline.serve import openvino_bf16, tiling
from pipeline.serve import precision as cpu_precision

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
GPU_PROVIDERS = ("tensorrt", "cuda")
_SHORT_NAMES = {full: short for short, full in PROVIDERS.items()}
MODEL_URI_PREFIX = "models:/"


class Engine:
    """An ONNX model of the image-translation contract, ready to translate (H, W, 3) uint8 RGB arrays.

    `providers`: short names in order of preference; None means every one this ONNX Runtime build offers, in
    the order tensorrt, cuda, cpu (the first that really loads wins). `require_gpu` raises UserError unless
    CUDA or TensorRT loaded. `fp16` asks TensorRT to build fp16 engines, cached under `tensorrt_cache`.
    `precision` (auto, fp32, int8, bf16) is the CPU's: `auto` runs the model's int8 companion, or OpenVINO in
    bf16, where precision.decide and the bf16 check allow it; `precision` and `precision_reason` say what runs
    and why. int8 and bf16 by name run on the CPU only.
    """

    def __init__(
        self,
        model_path: Path,
        providers: list[str] | None = None,
        require_gpu: bool = False,
        fp16: bool = False,
        tensorrt_cache: Path | None = None,
        precision: str = "auto",
    ):
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise UserError(f"model not found: {self.model_path}")
        auto = not providers
        names = requested_providers(providers, precision)
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
        if kind not in card.TRANSLATORS or "multiple" not in self.metadata:
            raise UserError(
                f"{self.model_path.name} is not an image-translation model of this pipeline "
                f"(kind {kind!r}, multiple {self.metadata.get('multiple')!r}); export it with `transfigure export`"
            )
        self.multiple = int(self.metadata["multiple"])
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise UserError(f"{self.model_path.name} must have one input and one output image")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        # Label maps: what goes in or comes out is (H, W) class indices, drawn in `palette` for people.
        self.labels_out = kind == card.LABEL_MAP
        self.labels_in = self.metadata.get(card.INPUT_TYPE) == card.LABEL_MAP
        self.classes = int(self.metadata["classes"]) if "classes" in self.metadata else None
        self.palette = parse_palette(self.metadata["palette"]) if "palette" in self.metadata else None
        self.precision, self.precision_reason = "fp32", f"on {self.provider}"
        self._openvino: openvino_bf16.OpenVinoBf16 | None = None
        self.tiling: str | None = None  # how large images are tiled, once load_tiling ran
        self._tiles: tiling.StatisticsTiles | None = None
        if self.labels_in or self.labels_out:
            if precision in cpu_precision.REDUCED:
                raise UserError(f"--precision {precision}: {self.model_path.name} is a label-map model, run in fp32")
            self.precision_reason = f"on {self.provider} (label maps run in float32)"
        elif self.provider == "cpu":
            self._choose_cpu_precision(precision)

    def _choose_cpu_precision(self, requested: str) -> None:
        """Swap in the int8 companion's session when precision.decide says so; its card is read from the session
        itself (the serving image has ONNX Runtime but not the onnx package)."""
        path = card.companion_path(self.model_path, card.INT8)
        flags = cpu_precision.cpu_flags()
        wanted = requested == card.INT8 or (requested == "auto" and cpu_precision.int8_instructions(flags))
        session = _session(path, [PROVIDERS["cpu"]], quiet=True, gpu=False) if wanted and path.is_file() else None
        companion = dict(session.get_modelmeta().custom_metadata_map) if session else None
        self.precision, self.precision_reason = cpu_precision.decide(requested, flags, self.metadata, companion)
        if self.precision == card.INT8:
            self.session = session
        elif cpu_precision.bf16_worth_trying(requested, self.precision, flags, openvino_bf16.installed()):
            self._try_bf16(requested)

    def _try_bf16(self, requested: str) -> None:
        """Compile the model in OpenVINO with bf16 and compare it with this float32 session on two photo-like
        images; `auto` keeps it only within fidelity's limits."""
        try:
            runner = openvino_bf16.OpenVinoBf16(self.model_path, threads.current())
        except UserError as exc:
            if requested == "bf16":
                raise
            self.precision_reason = f"auto: bf16 unavailable ({exc})"
            return
        side = self.multiple * -(-64 // self.multiple)
        images = [fidelity.photo_like(side, side + self.multiple, seed) for seed in (0, 1)]
        fp32 = [self.translate_batch([image])[0] for image in images]
        self._openvino = runner
        bf16 = [self.translate_batch([image])[0] for image in images]
        check = fidelity.verdict(fidelity.compare(fp32, bf16))
        self.precision, self.precision_reason = cpu_precision.bf16_decision(requested, check, runner.computes_in)
        if self.precision != "bf16":
            self._openvino = None

    def translate_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Translate (H, W, 3) uint8 images (label maps: (H, W) uint8 classes) that all have the same size; outputs
        have that size too, (H, W, 3) uint8 RGB or, from a label-map model, (H, W) uint8 classes."""
        out = self._forward(np.stack(images))
        return list(out.astype(np.uint8) if self.labels_out else to_pixels(out))

    def translate(
        self, image: np.ndarray, tile: int | None = None, batch_size: int = 4, thumbnail: int | None = None
    ) -> np.ndarray:
        """Translate one (H, W, 3) uint8 image; with `tile`, one larger than `tile` on a side goes in tiles of
        `tile` (rounded down to the model's multiple), `batch_size` at a time. An instance-norm model exported
        with its statistics and tile graphs normalizes every tile with the statistics of a thumbnail of the
        whole image (longer side `thumbnail`, default tiling.DEFAULT_THUMBNAIL), so tiles match the whole image;
        other models tile with blended overlaps (pipeline/serve/tiling.py). `tiling` says which was used."""
        height, width = image.shape[:2]
        if tile is None or max(height, width) <= tile:
            return self.translate_batch([image])[0]
        if self.load_tiling() is not None:
            longest = thumbnail or tiling.DEFAULT_THUMBNAIL
            return self._tiles.translate(image, tile, self.multiple, batch_size, longest, self._forward)
        return to_pixels(tiling.ramped_tiles(image, tile, self.multiple, batch_size, self._forward))

    def load_tiling(self) -> tiling.StatisticsTiles | None:
        """The statistics and tile graphs, loaded on the first tiled image (or by open_engine); None for others."""
        if self.tiling is None:
            if int(self.metadata.get("instance_norm_layers", "0")) == 0:
                self._tiles, self.tiling = None, "blended overlaps (no instance norm: tiles agree already)"
            else:
                providers = [PROVIDERS[name] for name in self.providers]
                opened = tiling.StatisticsTiles.beside(
                    self.model_path, self.metadata, lambda path: _session(path, providers, quiet=True, gpu=False)
                )
                self._tiles, reason = opened
                self.tiling = reason if self._tiles else f"blended overlaps, tiles normalized alone: {reason}"
        return self._tiles

    def _forward(self, batch: np.ndarray, run=None) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, H, W, 3) float32 in [-1, 1], through the model (or `run`) at a padded size;
        label maps in or out are (N, H, W) int64 classes."""
        height, width = batch.shape[1:3]
        if self.labels_in:
            if self.classes is not None and batch.size and int(batch.max()) >= self.classes:
                raise InferenceError(f"label value {int(batch.max())} is not below the model's {self.classes} classes")
            pad = ((0, 0), (0, -height % self.multiple), (0, -width % self.multiple))
            x = np.ascontiguousarray(np.pad(batch, pad, mode="edge").astype(np.int64))
        else:
            x = np.ascontiguousarray(to_model_range(pad_to_multiple(batch, self.multiple).transpose(0, 3, 1, 2)))
        try:
            if run is None:
                run = self._run_bound if self.provider in GPU_PROVIDERS else self._run
            y = run(x)
        except Exception as exc:  # ONNX Runtime raises one bare Exception subclass per status code
            raise InferenceError(f"inference failed on {width}x{height}: {str(exc).splitlines()[0]}") from exc
        if self.labels_out:
            return y[:, :height, :width]
        return y[:, :, :height, :width].transpose(0, 2, 3, 1)

    def _run(self, x: np.ndarray) -> np.ndarray:
        if self._openvino is not None:
            return self._openvino(x)
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def _run_bound(self, x: np.ndarray) -> np.ndarray:
        """CUDA and TensorRT: bind the input as a device copy and let ORT allocate the output on the device,
        so the run itself never stages through host buffers; one copy back at the end."""
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
        binding.bind_output(self.output_name, "cuda", 0)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


def requested_providers(providers: list[str] | None, precision: str) -> list[str]:
    """The providers to try, in order: as asked, or the best available; refuses unknown names and reduced
    precision on a GPU provider (a usage error, before any session loads)."""
    cpu_precision.check(precision)
    names = _available_names() if not providers else list(providers)
    if precision in cpu_precision.REDUCED:
        if providers and any(name in GPU_PROVIDERS for name in names):
            raise UserError(f"--precision {precision} runs on the CPU; leave out --providers, or use fp32 on a GPU")
        names = ["cpu"]
    unknown = [name for name in names if name not in PROVIDERS]
    if unknown:
        raise UserError(f"unknown provider {unknown[0]!r}; expected some of {', '.join(PROVIDERS)}")
    return names


def open_engine(model: str | Path, **options) -> Engine:
    """An Engine for a local .onnx file or a registered model `models:/NAME@ALIAS` (or `models:/NAME/VERSION`)."""
    if not str(model).startswith(MODEL_URI_PREFIX):
        return Engine(Path(model), **options)
    # ONNX Runtime reads the model and its external data into memory, so the download can go afterwards
    # (the tiling companions too, loaded here rather than on the first large image).
    with tempfile.TemporaryDirectory(prefix="transfigure-model-") as tmp:
        engine = Engine(download_model(str(model), Path(tmp)), **options)
        engine.load_tiling()
        return engine


def download_model(uri: str, dst: Path) -> Path:
    """Download the registered ONNX model `uri` from the MLflow registry into `dst`; return its .onnx file."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline import tracking

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
