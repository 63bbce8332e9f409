"""The inference commands of `transfigure`: translate, serve, quantize and sample (registered by pipeline/cli.py).
Imports of onnxruntime and the service stay inside the commands so --help is instant."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from transfigure.pipeline.cli_support import ParamsOption, PrecisionOption, SetOption, ThreadsOption, guard, load
from transfigure.pipeline.cli_support import console as _console
from transfigure.pipeline.images import DEFAULT_MAX_PIXELS
from transfigure.pipeline.serve.settings import ServeSettings, default_max_batch

# The engine's options (pipeline/serve/options.py), the same flag and environment variable on translate and serve.
ProvidersOption = Annotated[
    str | None,
    typer.Option(
        envvar="TRANSFIGURE_PROVIDERS",
        help="Comma-separated, in order: tensorrt,cuda,cpu (default: the best that loads).",
    ),
]
RequireGpuOption = Annotated[
    bool, typer.Option("--require-gpu", envvar="TRANSFIGURE_REQUIRE_GPU", help="Fail unless CUDA or TensorRT loaded.")
]
TensorrtFp16Option = Annotated[
    bool,
    typer.Option(
        "--tensorrt-fp16",
        envvar="TRANSFIGURE_TENSORRT_FP16",
        help="Let TensorRT build fp16 engines (the model file stays fp32).",
    ),
]
TensorrtCacheOption = Annotated[
    Path | None, typer.Option(envvar="TRANSFIGURE_TENSORRT_CACHE", help="TensorRT engine cache folder.")
]
TileOption = Annotated[
    int | None,
    typer.Option(
        envvar="TRANSFIGURE_TILE",
        help="Translate images larger than N px in tiles of N px (default: only images past the memory budget, "
        "in the largest tiles it allows).",
    ),
]
ThumbnailOption = Annotated[
    int | None,
    typer.Option(
        envvar="TRANSFIGURE_THUMBNAIL",
        help="Instance-norm tiles share the statistics of a thumbnail this long (px; default: as large as the "
        "memory budget allows, up to 2048).",
    ),
]
MemoryBudgetOption = Annotated[
    str | None,
    typer.Option(
        envvar="TRANSFIGURE_MEMORY_BUDGET",
        help="Bytes one translation may hold, e.g. 1G or 800M (default: a quarter of the container's memory "
        "limit or the machine's memory, at most 1.25G). Larger images go in tiles.",
    ),
]


def inference_options(
    providers: str | None,
    precision: str,
    tile: int | None,
    thumbnail: int | None,
    memory_budget: str | None,
    max_pixels: int,
    threads: str | None,
    batch_size: int | None,
    require_gpu: bool = False,
    tensorrt_fp16: bool = False,
    tensorrt_cache: Path | None = None,
):
    """The engine's options from a command's flags, checked; the thread setting takes effect here."""
    from transfigure.pipeline.serve.options import InferenceOptions, parse_bytes, parse_providers
    from transfigure.pipeline.threads import apply, parse

    options = InferenceOptions(
        providers=parse_providers(providers),
        require_gpu=require_gpu,
        tensorrt_fp16=tensorrt_fp16,
        tensorrt_cache=tensorrt_cache,
        precision=precision,
        tile=tile,
        thumbnail=thumbnail,
        memory_budget=parse_bytes(memory_budget),
        max_pixels=max_pixels,
        threads=threads if threads is not None else "auto",
        batch_size=batch_size,
    ).check()
    apply(parse(options.threads, "--threads"), torch=False)
    return options


def translate(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT", help="An image, or a folder searched recursively.")],
    output: Annotated[Path, typer.Argument(help="Output folder (or output file for a single image).")],
    model: Annotated[str, typer.Option(help="FILE.onnx or models:/NAME@ALIAS.")],
    batch_size: Annotated[
        int | None,
        typer.Option(
            envvar="TRANSFIGURE_BATCH_SIZE", help="Images of one size per batch (default: 1 on the CPU, 8 on a GPU)."
        ),
    ] = None,
    providers: ProvidersOption = None,
    require_gpu: RequireGpuOption = False,
    tensorrt_fp16: TensorrtFp16Option = False,
    tensorrt_cache: TensorrtCacheOption = None,
    precision: PrecisionOption = "auto",
    fmt: Annotated[str, typer.Option("--format", help="png | jpg | webp")] = "png",
    skip_existing: Annotated[bool, typer.Option("--skip-existing", help="Keep outputs that already exist.")] = False,
    tile: TileOption = None,
    thumbnail: ThumbnailOption = None,
    memory_budget: MemoryBudgetOption = None,
    max_pixels: Annotated[
        int, typer.Option(envvar="TRANSFIGURE_MAX_PIXELS", help="Refuse larger images (read from the header).")
    ] = DEFAULT_MAX_PIXELS,
    workers: Annotated[int, typer.Option(help="Decode/encode threads.")] = 2,
    report: Annotated[Path | None, typer.Option(help="Write the JSON report here.")] = None,
    colorize: Annotated[
        bool, typer.Option("--colorize", help="Label-map models: write RGB in the palette's colours, not indices.")
    ] = False,
    threads: ThreadsOption = None,
    engine_name: Annotated[
        str, typer.Option("--engine", help="local | ray (Ray Data over a cluster's actors; the `ray` extra).")
    ] = "local",
    ray_address: Annotated[
        str | None, typer.Option(help="The Ray cluster to join (default with --engine ray: a local one).")
    ] = None,
) -> None:
    """Translate an image or a folder with an ONNX model; exit 1 if some inputs were rejected."""

    def work() -> int:
        from transfigure.pipeline.errors import UserError
        from transfigure.pipeline.serve.engine import open_engine
        from transfigure.pipeline.serve.translate import check_writable, exit_code, rejections_text, translate_path

        if engine_name not in ("local", "ray"):
            raise UserError(f"--engine {engine_name!r}: expected local or ray")
        if ray_address and engine_name != "ray":
            raise UserError("--ray-address needs --engine ray")
        options = inference_options(
            providers, precision, tile, thumbnail, memory_budget, max_pixels, threads, batch_size,
            require_gpu, tensorrt_fp16, tensorrt_cache,
        )  # fmt: skip
        check_writable(output, report)
        common = {"fmt": fmt, "skip_existing": skip_existing, "workers": workers, "report_path": report}
        common["colorize"] = colorize
        if engine_name == "ray":
            from transfigure.pipeline.serve.ray_translate import translate_on_ray

            result = translate_on_ray(input_path, output, model, options, address=ray_address, **common)
        else:
            result = translate_path(input_path, output, open_engine(model, options), **common)
        console = _console()
        for line in rejections_text(result):
            console.print(line)
        console.print(
            f"translated {result['translated']}, skipped {result['skipped']}, "
            f"rejected {len(result['rejected'])} on {result['provider']} in {result['precision']}"
        )
        return exit_code(result)

    raise typer.Exit(guard(work))


def serve(
    model: Annotated[str, typer.Option(envvar="MODEL_URI", help="FILE.onnx or models:/NAME@ALIAS.")],
    host: Annotated[str, typer.Option(envvar="TRANSFIGURE_HOST", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="TRANSFIGURE_PORT")] = 8000,
    model_name: Annotated[
        str | None,
        typer.Option(envvar="TRANSFIGURE_MODEL_NAME", help="Name in both protocols (default: from --model)."),
    ] = None,
    max_batch: Annotated[
        int | None,
        typer.Option(envvar="TRANSFIGURE_MAX_BATCH", help="Images per engine run (default: 1 on the CPU, 8 on a GPU)."),
    ] = None,
    max_wait_ms: Annotated[
        float, typer.Option(envvar="TRANSFIGURE_MAX_WAIT_MS", help="How long an image waits for others of its size.")
    ] = ServeSettings.max_wait_ms,
    max_queue: Annotated[
        int, typer.Option(envvar="TRANSFIGURE_MAX_QUEUE", help="Images waiting or running; past this, 503.")
    ] = ServeSettings.max_queue,
    timeout_s: Annotated[
        float,
        typer.Option(envvar="TRANSFIGURE_TIMEOUT_S", help="Per-request deadline (504); the work stops there too."),
    ] = ServeSettings.timeout_s,
    max_body_bytes: Annotated[int, typer.Option(envvar="TRANSFIGURE_MAX_BODY_BYTES")] = ServeSettings.max_body_bytes,
    max_pixels: Annotated[
        int, typer.Option(envvar="TRANSFIGURE_MAX_PIXELS", help="Per image, from its header.")
    ] = ServeSettings.max_pixels,
    tile: TileOption = None,
    thumbnail: ThumbnailOption = None,
    memory_budget: MemoryBudgetOption = None,
    providers: ProvidersOption = None,
    require_gpu: RequireGpuOption = False,
    timeout_graceful_shutdown: Annotated[
        float, typer.Option(envvar="TRANSFIGURE_GRACEFUL_S", help="On SIGTERM, seconds to finish in-flight requests.")
    ] = ServeSettings.timeout_graceful_shutdown,
    precision: PrecisionOption = "auto",
    threads: ThreadsOption = None,
) -> None:
    """Serve the model over HTTP: /v1/translate, the Open Inference Protocol v2, a page at /, /metrics."""

    def work() -> None:
        from transfigure.pipeline.serve import memory, server
        from transfigure.pipeline.serve.engine import open_engine

        memory.share_one_heap()  # before ONNX Runtime's and the service's threads exist
        options = inference_options(
            providers, precision, tile, thumbnail, memory_budget, max_pixels, threads, max_batch, require_gpu
        )
        engine = open_engine(model, options)
        settings = ServeSettings(
            model_name=model_name or server.model_name(model),
            max_batch=max_batch or default_max_batch(engine.provider),
            max_wait_ms=max_wait_ms,
            max_queue=max_queue,
            timeout_s=timeout_s,
            max_body_bytes=max_body_bytes,
            max_pixels=max_pixels,
            timeout_graceful_shutdown=timeout_graceful_shutdown,
        )
        server.check(settings)
        _console().print(
            f"serving {settings.model_name} on http://{host}:{port} with {engine.provider} in {engine.precision} "
            f"({engine.precision_reason}), max batch {settings.max_batch}, max wait {max_wait_ms:g} ms, "
            f"memory budget {engine.memory_budget / 2**20:.0f} MiB ({engine.bytes_per_pixel} bytes a pixel, "
            f"{engine.memory_measured})"
        )
        server.run(engine, settings, host, port)

    guard(work)


def quantize(
    model: Annotated[Path, typer.Argument(help="A float32 image-translation model (.onnx) of this pipeline.")],
    images: Annotated[Path, typer.Option(help="Images of the model's source domain, to calibrate and check on.")],
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
) -> None:
    """Write MODEL.int8.onnx beside MODEL, checked against it (limits: params' export.int8); `export` does it itself."""

    def work() -> None:
        from transfigure.pipeline.export.quantize import quantize_with_folder, summary
        from transfigure.pipeline.schema import Int8Params

        limits = load(params, overrides, None).export.int8 if params.exists() or overrides else Int8Params()
        for line in summary(quantize_with_folder(model, images, limits)):
            _console().print(line)

    guard(work)


def sample(
    model: Annotated[Path, typer.Option(help="An exported generator.onnx (cdcgan or flowgan).")],
    out: Annotated[Path, typer.Option(help="Folder for the PNG files.")],
    label: Annotated[int | None, typer.Option(help="The class to sample (class-conditional models).")] = None,
    n: Annotated[int, typer.Option("--n", help="How many images.")] = 16,
    walk: Annotated[bool, typer.Option("--walk", help="A latent walk between two points instead.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the latent draws.")] = 0,
    temperature: Annotated[float, typer.Option(help="Scale of the latent draws (below 1: smoother).")] = 1.0,
) -> None:
    """Samples, or a latent walk, from an exported generator: of one class (cdcgan) or of a flow (flowgan)."""

    def work() -> None:
        from transfigure.pipeline.serve.sample import sample as draw

        paths = draw(model, label, n, out, walk=walk, seed=seed, temperature=temperature)
        _console().print(f"wrote {len(paths)} images to {out}")

    guard(work)
