"""`translate`: a file or a folder of images through the inference engine, with I/O overlapped with inference.

Worker threads decode ahead and encode behind while the main thread runs the model (Pillow, zlib and ONNX
Runtime all release the GIL). Decoded images wait in buckets by size and go to the engine as a batch when a
bucket is full (the batch size, or what the memory budget allows), or when too many pixels are waiting, so memory
stays bounded on folders of any size; an image too large for the budget goes alone, in tiles (the engine's).
Outputs are written atomically, so an interrupted run leaves only complete files and `skip_existing` resumes it.
A label-map model's outputs are palette PNGs whose pixel indices are the classes (`colorize`: RGB in the palette's
colours, for people); a label-map input is read as class indices.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from transfigure.pipeline.errors import UserError
from transfigure.pipeline.files import write_json_atomic
from transfigure.pipeline.images import (
    BadImage,
    decode_labels,
    decode_rgb,
    list_images,
    write_image_atomic,
    write_labels_atomic,
)
from transfigure.pipeline.pixels import colorize as in_colours
from transfigure.pipeline.progress import Progress
from transfigure.pipeline.serve.engine import Engine, InferenceError

FORMATS = ("png", "jpg", "webp")
_OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Decoded pixels allowed to wait in size buckets; past this the fullest bucket runs as a partial batch.
_WAITING_PIXELS = 64 * 2**20
# Rejected files listed on the console one per line; past this many, the rest are counted (all are in --report).
_SCREENFUL = 20


def default_batch_size(provider: str) -> int:
    """8 on a GPU; 1 on the CPU, where one image already fills the cores and batching measured 8-11% slower
    (docs/BENCHMARKS.md, Inference)."""
    return 1 if provider == "cpu" else 8


def translate_path(
    input: Path,
    output: Path,
    engine: Engine,
    fmt: str = "png",
    skip_existing: bool = False,
    workers: int = 2,
    progress: bool = True,
    report_path: Path | None = None,
    colorize: bool = False,
) -> dict:
    """Translate INPUT (an image, or a folder searched recursively) into OUTPUT, keeping relative paths and stems.

    The batch size, tiles and pixel limit are the engine's options. For a single image, OUTPUT is the output file when
    it has an image suffix (which then sets the format), else a folder. Bad inputs are listed in the report with
    a reason and the rest go on; files that are not images are listed under "ignored", and a folder with no
    images at all is refused. Returns (and writes to `report_path`) {"translated", "skipped", "rejected":
    [{"path", "reason"}], "ignored", "seconds", "provider", "precision", "tiling" (None unless an image was tiled),
    "images_per_second"}.
    """
    batch_size = check_options(engine, fmt, colorize)
    start = time.perf_counter()
    todo, report = plan(Path(input), Path(output), fmt, skip_existing)

    from rich.console import Console

    with Progress(Console(stderr=True, quiet=not progress), "translating", len(todo), unit="img") as bar:
        translate_jobs(engine, todo, report, batch_size, workers, bar.advance, colorize)
    return finish_report(report, start, engine.provider, engine.precision, report_path)


def translate_jobs(
    engine: Engine,
    jobs: list[tuple[Path, Path]],
    report: dict,
    batch_size: int,
    workers: int,
    advance: Callable[[], None],
    colorize: bool = False,
) -> None:
    """Translates (source, target) jobs into `report` ("translated", "rejected", "tiling"), calling `advance` once
    per job done; the one loop under the local engine and each Ray actor (pipeline/serve/ray_translate.py)."""
    save = output_writer(engine, colorize)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        writes: deque[tuple[Path, Future]] = deque()
        ahead = 2 * batch_size + max(1, workers)

        def reject(source: Path, reason: str) -> None:
            report["rejected"].append({"path": str(source), "reason": reason})
            advance()

        def finish_write() -> None:
            source, future = writes.popleft()
            try:
                future.result()
                report["translated"] += 1
                advance()
            except OSError as exc:
                reject(source, f"cannot write output ({exc.strerror or exc})")

        def write(jobs_and_outputs: list[tuple[tuple[Path, Path], np.ndarray]]) -> None:
            for (source, target), image in jobs_and_outputs:
                writes.append((source, pool.submit(save, target, image)))
            while len(writes) > ahead:
                finish_write()

        def run(batch: list[tuple[tuple[Path, Path], np.ndarray]]) -> None:
            try:
                outputs = engine.translate_batch([image for _, image in batch])
            except InferenceError as exc:
                for (source, _), _ in batch:
                    reject(source, str(exc))
                return
            write(list(zip([job for job, _ in batch], outputs, strict=True)))

        buckets: dict[tuple[int, int], list] = {}
        max_pixels = engine.options.max_pixels
        for job, decoded in _decode_ahead(pool, jobs, ahead, max_pixels, input_reader(engine)):
            if isinstance(decoded, BadImage):
                reject(job[0], str(decoded))
                continue
            height, width = decoded.shape[:2]
            if engine.tiled(height, width):
                try:
                    write([(job, engine.translate(decoded))])
                    report["tiling"] = engine.tiling
                except InferenceError as exc:
                    reject(job[0], str(exc))
                continue
            bucket = buckets.setdefault((height, width), [])
            bucket.append((job, decoded))
            if len(bucket) >= min(batch_size, max(1, engine.memory_budget // engine.memory_needed(height, width))):
                run(buckets.pop((height, width)))
            elif sum(h * w * len(b) for (h, w), b in buckets.items()) > _WAITING_PIXELS:
                run(buckets.pop(max(buckets, key=lambda size: size[0] * size[1] * len(buckets[size]))))
        for batch in buckets.values():
            run(batch)
        while writes:
            finish_write()


def input_reader(engine: Engine) -> Callable[[Path, int], np.ndarray]:
    """How the engine's inputs are read: decoded to RGB, or for a label-map input to class indices (checked)."""
    if engine.labels_in:
        return lambda path, max_pixels: decode_labels(path, engine.classes, max_pixels)
    return decode_rgb


def output_writer(engine: Engine, colorize: bool) -> Callable[[Path, np.ndarray], None]:
    """How the engine's outputs are written: images, or label maps as palette PNGs (RGB with `colorize`)."""
    if not engine.labels_out:
        return write_image_atomic
    if colorize:
        return lambda target, labels: write_image_atomic(target, in_colours(labels, engine.palette))
    return lambda target, labels: write_labels_atomic(target, labels, engine.palette)


def check_options(engine: Engine, fmt: str, colorize: bool = False) -> int:
    """Refuses output options that do not fit the model, before any work; the batch size to use."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if colorize and not engine.labels_out:
        raise UserError("--colorize: the model gives images, not label maps")
    if engine.labels_out and not colorize and fmt != "png":
        raise UserError(f"--format {fmt}: label maps are written as PNG, whose indices are the classes (or --colorize)")
    return engine.options.batch_size or default_batch_size(engine.provider)


def plan(input: Path, output: Path, fmt: str, skip_existing: bool) -> tuple[list[tuple[Path, Path]], dict]:
    """The (source, target) jobs still to do, and the report as it starts: skipped, rejected and ignored files."""
    jobs, rejected, ignored = _plan(input, output, fmt)
    todo = [job for job in jobs if not (skip_existing and job[1].exists())]
    report = {"translated": 0, "skipped": len(jobs) - len(todo), "rejected": rejected, "ignored": ignored}
    report["tiling"] = None  # how large images were tiled, once one was
    return todo, report


def finish_report(report: dict, start: float, provider: str, precision: str, report_path: Path | None) -> dict:
    """The report with its timing and what ran, written to `report_path` when given."""
    seconds = time.perf_counter() - start
    report.update(
        seconds=round(seconds, 3),
        provider=provider,
        precision=precision,
        images_per_second=round(report["translated"] / seconds, 3) if seconds > 0 else 0.0,
    )
    if report_path is not None:
        write_json_atomic(report_path, report)
    return report


def check_writable(output: Path, report_path: Path | None = None) -> None:
    """Refuses, before any work, an output folder (or a report's folder) that cannot be created or written."""
    folders = [output.parent if output.suffix.lower() in _OUTPUT_SUFFIXES else output]
    if report_path is not None:
        if report_path.is_dir():
            raise UserError(f"--report {report_path}: is a folder; name a .json file")
        folders.append(report_path.parent)
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle, probe = tempfile.mkstemp(dir=folder, prefix=".write-test.")
            os.close(handle)
            os.unlink(probe)
        except OSError as exc:
            raise UserError(f"{folder}: cannot write here ({exc.strerror or exc})") from None


def rejections_text(report: dict) -> list[str]:
    """Each rejected file with its reason, a screenful at most, and the files that were not images."""
    lines = [f"rejected {item['path']}: {item['reason']}" for item in report["rejected"][:_SCREENFUL]]
    if len(report["rejected"]) > _SCREENFUL:
        lines.append(f"... and {len(report['rejected']) - _SCREENFUL} more (all listed with --report FILE)")
    if report.get("ignored"):
        shown = ", ".join(str(path) for path in report["ignored"][:5])
        more = f" and {len(report['ignored']) - 5} more" if len(report["ignored"]) > 5 else ""
        lines.append(f"ignored {len(report['ignored'])} files that are not images: {shown}{more}")
    return lines


def exit_code(report: dict) -> int:
    """The CLI's exit status: 0 when every input was translated or skipped, 1 when some were rejected.
    (Usage errors raise UserError before any work and exit 2.)"""
    return 1 if report["rejected"] else 0


def _plan(input: Path, output: Path, fmt: str) -> tuple[list[tuple[Path, Path]], list[dict], list[str]]:
    """(source, target) pairs, the sources refused because another one already claimed their target, and the
    files that are not images."""
    if input.is_file():
        target = output if output.suffix.lower() in _OUTPUT_SUFFIXES else output / f"{input.stem}.{fmt}"
        return [(input, target)], [], []
    if not input.is_dir():
        raise UserError(f"input not found: {input}")
    # An output folder inside the input folder must not feed a later run's outputs back in as inputs.
    out_root = output.resolve()
    others: list[Path] = []
    sources = [path for path in list_images(input, others) if not path.resolve().is_relative_to(out_root)]
    ignored = [str(path) for path in others if not path.resolve().is_relative_to(out_root)]
    if not sources:
        listed = f"; not images: {', '.join(ignored[:5])}" + (" ..." if len(ignored) > 5 else "") if ignored else ""
        raise UserError(f"{input}: no images to translate (.png, .jpg, .jpeg, .webp, ...){listed}")
    jobs, rejected, claimed = [], [], {}
    for source in sources:
        target = output / source.relative_to(input).with_suffix(f".{fmt}")
        if target in claimed:
            # photo.jpg and photo.png would both become photo.<fmt>: the second is refused, not overwritten.
            rejected.append({"path": str(source), "reason": f"same output name as {claimed[target]}"})
            continue
        claimed[target] = source
        jobs.append((source, target))
    return jobs, rejected, ignored


def _decode_ahead(
    pool: ThreadPoolExecutor, jobs: list[tuple[Path, Path]], ahead: int, max_pixels: int, read: Callable
) -> Iterator[tuple[tuple[Path, Path], np.ndarray | BadImage]]:
    """Decoded images (or the BadImage that refused them) in order, with at most `ahead` decodes in flight."""
    pending: deque[tuple[tuple[Path, Path], Future]] = deque()

    def result(job: tuple[Path, Path], future: Future) -> tuple[tuple[Path, Path], np.ndarray | BadImage]:
        try:
            return job, future.result()
        except BadImage as exc:
            return job, exc

    for job in jobs:
        pending.append((job, pool.submit(read, job[0], max_pixels)))
        if len(pending) > ahead:
            yield result(*pending.popleft())
    while pending:
        yield result(*pending.popleft())
