"""The inference engine: one ONNX Runtime session that translates uint8 RGB images of any size (or label maps:
a model of kind label_map gives (H, W) class indices, one with a label-map input takes them).

The `translate` CLI, the Ray path and the HTTP service all go through `Engine`, configured by one
`InferenceOptions`. Images keep their size: each batch is reflect-padded up to the model's multiple and cropped
back. Memory is bounded by design: the engine measures at load what its forward pass costs per pixel
(pipeline/serve/memory.py) and translates any image whose whole pass would exceed the memory budget tile by tile,
in the largest tiles the budget allows, or in `tile`s when asked (pipeline/serve/tiling.py: instance-norm models
share a thumbnail's statistics across tiles, and those tiles run in float32 through the tile graph whatever the
precision; blended tiles run in the chosen precision). A deadline stops a translation between tiles, and inside
a run through ONNX Runtime's terminate flag (`Cancelled`).
Providers are asked for by short name (tensorrt, cuda, cpu); ONNX Runtime silently falls back to the CPU when
one fails to load, so `Engine.provider` is read back from the session, never assumed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from transfigure.pipeline import fidelity, machine, threads
from transfigure.pipeline.errors import InferenceError, UserError
from transfigure.pipeline.export import model_card as card
from transfigure.pipeline.pixels import pad_to_multiple, parse_palette, to_model_range, to_pixels
from transfigure.pipeline.serve import memory, openvino_bf16, options, tiling
from transfigure.pipeline.serve import precision as cpu_precision
from transfigure.pipeline.serve.options import GPU_PROVIDERS, InferenceOptions
from transfigure.pipeline.serve.registry import MODEL_URI_PREFIX, download_model

_FULL_NAMES = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
PROVIDERS = dict(zip(options.PROVIDERS, _FULL_NAMES, strict=True))
_SHORT_NAMES = {full: short for short, full in PROVIDERS.items()}
# The probe image whose peak memory sets the cost per pixel: large enough that fixed costs are small beside it
# (per pixel within 8% of 384x384's), small enough that resnet_9blocks probes its three graphs in seconds.
MEMORY_PROBE_SIDES = (320,)
log = logging.getLogger("transfigure.engine")


class Cancelled(Exception):
    """A translation stopped at its deadline (between tiles, or inside a run); nobody waits for its result."""


class Engine:
    """An ONNX model of the image-translation contract, ready to translate (H, W, 3) uint8 RGB arrays of any size.

    `options` (InferenceOptions, checked here) say which providers to try (None: every one this ONNX Runtime
    build offers, tensorrt only where its libraries are present, then cuda, cpu; the first that really loads
    wins), the CPU's precision (`auto` runs the model's int8 companion, or OpenVINO in bf16, where
    precision.decide and the bf16 check allow it; `precision` and `precision_reason` say what runs and why),
    tiles, thumbnail and the memory budget. `bytes_per_pixel` is what a forward pass (of the model, or of a
    tile through the tile graph) holds per input pixel, `thumbnail_bytes_per_pixel` the statistics graph's
    (`memory_measured` says how they were found); `min_side` the smallest side the model accepts; `card` the
    model's card.
    """

    def __init__(self, model_path: Path, options: InferenceOptions | None = None):
        self.options = (options or InferenceOptions()).check()
        providers, precision, fp16 = self.options.providers, self.options.precision, self.options.tensorrt_fp16
        require_gpu, tensorrt_cache = self.options.require_gpu, self.options.tensorrt_cache
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise UserError(f"model not found: {self.model_path}")
        auto = not providers
        names = requested_providers(self.options)
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
        self.card = _card_of(self.session)
        kind = self.card.kind or card.IMAGE_TRANSLATION
        if kind not in card.TRANSLATORS or self.card.multiple is None:
            raise UserError(
                f"{self.model_path.name} is not an image-translation model of this pipeline "
                f"(kind {kind!r}, multiple {self.card.multiple!r}); export it with `transfigure export`"
            )
        self.multiple = self.card.multiple
        self.min_side = self.multiple  # until _smallest_side has probed the model
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise UserError(f"{self.model_path.name} must have one input and one output image")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        # Label maps: what goes in or comes out is (H, W) class indices, drawn in `palette` for people.
        self.labels_out, self.labels_in, self.classes = self.card.labels_out, self.card.labels_in, self.card.classes
        self.palette = parse_palette(self.card.palette) if self.card.palette is not None else None
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
        if self.options.tile is not None and (self.labels_in or self.labels_out):
            raise UserError("--tile: label-map models translate whole images")
        if self.options.tile is not None and self.options.tile < self.multiple:
            raise UserError(f"--tile {self.options.tile} is smaller than the model's multiple ({self.multiple})")
        self.memory_budget = self.options.budget
        self.min_side = self._smallest_side()
        self.bytes_per_pixel, self.thumbnail_bytes_per_pixel, self.memory_measured = self._measure_memory()

    def _choose_cpu_precision(self, requested: str) -> None:
        """Swap in the int8 companion's session when precision.decide says so; its card is read from the session
        itself (the serving image has ONNX Runtime but not the onnx package)."""
        path = card.companion_path(self.model_path, card.INT8)
        flags = cpu_precision.cpu_flags()
        wanted = requested == card.INT8 or (requested == "auto" and cpu_precision.int8_instructions(flags))
        session = _session(path, [PROVIDERS["cpu"]], quiet=True, gpu=False) if wanted and path.is_file() else None
        companion = _card_of(session) if session else None
        self.precision, self.precision_reason = cpu_precision.decide(requested, flags, self.card, companion)
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

    def translate_batch(self, images: list[np.ndarray], deadline: float | None = None) -> list[np.ndarray]:
        """Translate (H, W, 3) uint8 images (label maps: (H, W) uint8 classes) that all have the same size in one
        run; outputs have that size too, (H, W, 3) uint8 RGB or, from a label-map model, (H, W) uint8 classes.
        Raises Cancelled past `deadline` (a time.monotonic() value)."""
        out = self._forward(np.stack(images), deadline=deadline)
        return list(out.astype(np.uint8) if self.labels_out else to_pixels(out))

    def translate(self, image: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """Translate one image of any size: whole, or tile by tile when `tiled` says so (instance-norm models
        exported with their statistics and tile graphs share the statistics of a thumbnail of the whole image, so
        tiles match it; other models blend overlapping tiles; `tiling` says which ran). Raises Cancelled past
        `deadline`."""
        height, width = image.shape[:2]
        plan = self.plan(height, width)
        if plan is None:
            return self.translate_batch([image], deadline)[0]

        def run_session(session, feed: dict, what: str) -> np.ndarray:
            return self._run_session(session, feed, what, deadline)

        if self._tiles is not None:
            forward = self._forward
            args = (plan.tile, self.multiple, plan.tiles_per_run, plan.thumbnail, self.min_side, forward, run_session)
            return self._tiles.translate(image, *args)
        forward = lambda batch: self._forward(batch, deadline=deadline)  # noqa: E731
        return tiling.ramped_tiles(image, plan.tile, self.multiple, plan.tiles_per_run, forward)

    def tiled(self, height: int, width: int) -> bool:
        """Whether an image of this size goes in tiles: larger than `--tile`, or without it, past the budget."""
        return self.plan(height, width) is not None

    def plan(self, height: int, width: int) -> memory.TilePlan | None:
        """The tiles for an image of this size, or None when it goes whole (label maps always do)."""
        if self.labels_in or self.labels_out:
            return None
        tile = self.options.tile
        if tile is None and self._io_bytes(height, width) + height * width * self.bytes_per_pixel <= self.memory_budget:
            return None
        if tile is not None and max(height, width) <= tile:
            return None
        context = self._tiles.context if self.load_tiling() is not None else 0
        forward_budget = max(0, self.memory_budget - self._io_bytes(height, width))
        return memory.plan_tiles(
            height, width, forward_budget, self.bytes_per_pixel, self.multiple, self.min_side, context,
            tile=tile, thumbnail=self.options.thumbnail, thumbnail_bytes_per_pixel=self.thumbnail_bytes_per_pixel,
        )  # fmt: skip

    def memory_needed(self, height: int, width: int, count: int = 1) -> int:
        """Estimated peak bytes of translating `count` images of this size in one run (or one tiled image),
        the input and output arrays included."""
        plan = self.plan(height, width)
        forward = count * height * width * self.bytes_per_pixel if plan is None else plan.peak_bytes
        return count * self._io_bytes(height, width) + forward

    def _io_bytes(self, height: int, width: int) -> int:
        """The decoded input and the output of one image: 3 bytes a pixel each, 1 for a label map."""
        return height * width * ((1 if self.labels_in else 3) + (1 if self.labels_out else 3))

    def load_tiling(self) -> tiling.StatisticsTiles | None:
        """The statistics and tile graphs, loaded on the first tiled image (or by open_engine); None for others."""
        if self.tiling is None:
            if not self.card.instance_norm_layers:
                self._tiles, self.tiling = None, "blended overlaps (no instance norm: tiles agree already)"
            else:
                providers = [PROVIDERS[name] for name in self.providers]
                opened = tiling.StatisticsTiles.beside(
                    self.model_path, self.card, lambda path: _session(path, providers, quiet=True, gpu=False)
                )
                self._tiles, reason = opened
                self.tiling = reason if self._tiles else f"blended overlaps, tiles normalized alone: {reason}"
        return self._tiles

    def _forward(self, batch: np.ndarray, run=None, deadline: float | None = None) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, H, W, 3) float32 in [-1, 1], through the model (or `run`) at a padded size;
        label maps in or out are (N, H, W) int64 classes."""
        height, width = batch.shape[1:3]
        if min(height, width) < self.min_side:
            raise InferenceError(
                f"the image is {width}x{height}; this model needs at least {self.min_side} px on each side"
            )
        if self.labels_in:
            if self.classes is not None and batch.size and int(batch.max()) >= self.classes:
                raise InferenceError(f"label value {int(batch.max())} is not below the model's {self.classes} classes")
            pad = ((0, 0), (0, -height % self.multiple), (0, -width % self.multiple))
            x = np.ascontiguousarray(np.pad(batch, pad, mode="edge").astype(np.int64))
        else:
            x = np.ascontiguousarray(to_model_range(pad_to_multiple(batch, self.multiple).transpose(0, 3, 1, 2)))
        what = f"{len(batch)} image{'s' if len(batch) > 1 else ''} of {width}x{height}"
        if run is not None:
            y = run(x)
        elif self._openvino is not None:
            _terminate_at(deadline, None)
            y = self._openvino(x)
        else:
            y = self._run_session(self.session, {self.input_name: x}, what, deadline)
        if self.labels_out:
            return y[:, :height, :width]
        return y[:, :, :height, :width].transpose(0, 2, 3, 1)

    def _run_session(self, session, feed: dict, what: str, deadline: float | None) -> np.ndarray:
        """The session's first output; Cancelled once `deadline` passes (ONNX Runtime checks the terminate flag
        between nodes), and failures in our words (ONNX Runtime's text, naming graph nodes, goes to the log)."""
        run_options = ort.RunOptions()
        timer = _terminate_at(deadline, run_options)
        try:
            if self.provider in GPU_PROVIDERS and session is self.session:
                return self._run_bound(feed, run_options)
            return session.run(None, feed, run_options)[0]
        except Exception as exc:  # ONNX Runtime raises one bare Exception subclass per status code
            if run_options.terminate:
                raise Cancelled(f"stopped at the deadline while computing {what}") from None
            detail = str(exc).splitlines()[0]
            log.warning("ONNX Runtime failed on %s: %s", what, detail)
            memory_words = ("alloc", "memory")
            reason = "out of memory" if any(word in detail.lower() for word in memory_words) else "the model failed"
            raise InferenceError(f"{reason} on {what}") from None
        finally:
            if timer is not None:
                timer.cancel()

    def _run_bound(self, feed: dict, run_options: ort.RunOptions) -> np.ndarray:
        """CUDA and TensorRT: bind the input as a device copy and let ORT allocate the output on the device,
        so the run itself never stages through host buffers; one copy back at the end."""
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, ort.OrtValue.ortvalue_from_numpy(feed[self.input_name], "cuda", 0))
        binding.bind_output(self.output_name, "cuda", 0)
        self.session.run_with_iobinding(binding, run_options)
        return binding.copy_outputs_to_cpu()[0]

    def _smallest_side(self) -> int:
        """The smallest square the model runs on (reflection padding needs a few pixels at the coarsest level),
        found by trying multiples of the model's multiple; without it a tiny image fails deep in the graph."""
        for side in range(self.multiple, 64 * self.multiple + 1, self.multiple):
            x = np.zeros((1, side, side), np.int64) if self.labels_in else np.zeros((1, 3, side, side), np.float32)
            try:
                self._openvino(x) if self._openvino is not None else self.session.run(None, {self.input_name: x})
                return side
            except Exception:  # ONNX Runtime raises one bare Exception subclass per status code
                continue
        raise UserError(f"{self.model_path.name} runs on no square image up to {64 * self.multiple} px")

    def _measure_memory(self) -> tuple[int, int, str]:
        """Bytes per input pixel of a whole or tile forward pass and of the thumbnail's statistics pass, measured
        on the CPU (memory.bytes_per_pixel); the statistics graph keeps every layer's input for its statistics
        and measured twice the model's (resnet_9blocks: 3,900 against 1,900)."""
        if self.provider != "cpu" or not memory.measurable():
            where = "a GPU provider" if self.provider != "cpu" else "this system"
            assumed = memory.FALLBACK_BYTES_PER_PIXEL
            return assumed, 2 * assumed, f"not measured on {where}: assumed"
        sides = tuple(max(self.min_side, self.multiple * -(-side // self.multiple)) for side in MEMORY_PROBE_SIDES)

        def run_at(side: int) -> None:
            self._forward(np.zeros((1, side, side) if self.labels_in else (1, side, side, 3), np.uint8))

        whole = memory.bytes_per_pixel(run_at, sides)
        how = f"measured at load on {sides[-1]}x{sides[-1]}"
        tiles = None if self.labels_in or self.labels_out else self.load_tiling()
        if tiles is None:
            return whole, whole, how
        statistics = tiles.probe_statistics(sides[0])
        tile = memory.bytes_per_pixel(lambda side: tiles.probe_tile(side, statistics), sides)
        thumbnail = memory.bytes_per_pixel(tiles.probe_statistics, sides)
        return max(whole, tile), thumbnail, how


def _terminate_at(deadline: float | None, run_options: ort.RunOptions | None) -> threading.Timer | None:
    """Cancelled now when `deadline` has passed; else a timer that sets the run's terminate flag at the deadline."""
    if deadline is None:
        return None
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise Cancelled("the deadline passed before the run")
    if run_options is None:
        return None
    timer = threading.Timer(remaining, setattr, (run_options, "terminate", True))
    timer.daemon = True
    timer.start()
    return timer


def requested_providers(options: InferenceOptions) -> list[str]:
    """The providers to try, in order: as asked, or the best available; the CPU alone for int8 and bf16."""
    if options.precision in cpu_precision.REDUCED:
        return ["cpu"]
    return list(options.providers) if options.providers else _available_names()


def open_engine(model: str | Path, options: InferenceOptions | None = None) -> Engine:
    """An Engine for a local .onnx file or a registered model `models:/NAME@ALIAS` (or `models:/NAME/VERSION`)."""
    if not str(model).startswith(MODEL_URI_PREFIX):
        return Engine(Path(model), options)
    # ONNX Runtime reads the model and its external data into memory, so the download can go afterwards
    # (the tiling companions too, loaded here rather than on the first large image).
    with tempfile.TemporaryDirectory(prefix="transfigure-model-") as tmp:
        engine = Engine(download_model(str(model), Path(tmp)), options)
        engine.load_tiling()
        return engine


def _available_names() -> list[str]:
    """The providers this ONNX Runtime build offers; TensorRT's only where its libraries are present (the build
    lists it regardless, and trying it without them costs a failed load and a page of errors)."""
    available = ort.get_available_providers()
    names = [name for name, full in PROVIDERS.items() if full in available]
    return [name for name in names if name != "tensorrt" or machine.tensorrt_present()]


def _provider_entry(name: str, fp16: bool, cache: Path) -> str | tuple[str, dict]:
    if name != "tensorrt":
        return PROVIDERS[name]
    cache.mkdir(parents=True, exist_ok=True)
    options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache), "trt_fp16_enable": fp16}
    return PROVIDERS[name], options


def _default_tensorrt_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "transfigure" / "tensorrt"


def _card_of(session: ort.InferenceSession) -> card.ModelCard:
    """A session's model card, read from ONNX Runtime (the serving image has it, not the onnx package)."""
    return card.ModelCard.from_metadata(session.get_modelmeta().custom_metadata_map)


def _session(path: Path, providers: list, quiet: bool, gpu: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT counts the machine's cores; a container may allow fewer, and another job may hold some (threads.py).
    options.intra_op_num_threads = threads.current()
    # Without the arena, memory goes back after each run: a large image's peak must not stay held (memory.py).
    options.enable_cpu_mem_arena = False
    # A failed run comes back as an exception, which the engine words and logs; ORT's own line names graph nodes.
    options.log_severity_level = 4
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
