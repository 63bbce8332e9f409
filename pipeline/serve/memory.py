"""What a forward pass costs in memory, measured once per model on this machine, and the tiles and thumbnail that a
memory budget allows (the engine tiles any image whose whole forward pass would not fit).

The cost is measured, not derived from the graph: what ONNX Runtime holds at its peak depends on its kernels and
memory planner. Linux keeps a process's peak resident memory (VmHWM) and resets it on request, so one run of a
probe image gives the peak above the resident memory before it (docs/TILING.md, "Memory").
"""

from __future__ import annotations

import ctypes
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Probes are small, and allocators round; a margin keeps the estimate above what larger images measured.
SAFETY = 1.25
# Where the peak cannot be measured (not Linux, or a GPU provider): a reference resnet_9blocks (64 filters)
# measured about 1,540 bytes per pixel on the CPU, the largest of the pipeline's translators.
FALLBACK_BYTES_PER_PIXEL = 2048
# Past 2048 px the thumbnail's statistics differ from the whole image's by little (docs/TILING.md) and cost time.
THUMBNAIL_CAP = 2048
# At most this many tiles per run, as before budgets: more gains nothing once a tile fills the cores.
TILES_PER_RUN = 4
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_M_ARENA_MAX = -8  # glibc's malloc.h


@dataclass(frozen=True)
class TilePlan:
    """How one large image goes through the model: cores of `tile` px, `tiles_per_run` at a time, instance-norm
    statistics from a thumbnail `thumbnail` px long; `peak_bytes` is the forward passes' estimated peak."""

    tile: int
    tiles_per_run: int
    thumbnail: int
    peak_bytes: int


def measurable() -> bool:
    """Whether this process can reset and read its peak resident memory (Linux)."""
    try:
        _CLEAR_REFS.write_text("5")
        return _resident("VmHWM") > 0
    except OSError:
        return False


def peak_growth(work: Callable[[], object]) -> int:
    """Bytes by which the process's peak resident memory rose above its resident memory while `work()` ran."""
    _trim()
    before = _resident("VmRSS")
    _CLEAR_REFS.write_text("5")  # the peak starts again from the resident memory now
    work()
    return max(0, _resident("VmHWM") - before)


def bytes_per_pixel(run_at: Callable[[int], object], sides: tuple[int, ...]) -> int:
    """The largest peak growth per input pixel of `run_at(side)` (a side x side image) over `sides`, with SAFETY."""
    measured = max(peak_growth(lambda side=side: run_at(side)) / (side * side) for side in sides)
    return math.ceil(measured * SAFETY)


def plan_tiles(
    height: int,
    width: int,
    forward_budget: int,
    bytes_per_pixel: int,
    multiple: int,
    smallest: int,
    context: int,
    tile: int | None = None,
    thumbnail: int | None = None,
    thumbnail_bytes_per_pixel: int | None = None,
) -> TilePlan:
    """The tiles for an image of `height` x `width`: `tile` when given, else the largest core whose crop (with
    `context` px around it; 0 for blended tiles, which keep a float32 band of one row of tiles) fits
    `forward_budget`; the thumbnail as given or as large as the budget allows at `thumbnail_bytes_per_pixel`
    (the statistics pass's; default the tiles'), up to THUMBNAIL_CAP."""
    thumbnail_bytes_per_pixel = thumbnail_bytes_per_pixel or bytes_per_pixel

    def crop_bytes(core: int) -> int:
        side = min(core + 2 * context, max(height, width))
        band = 0 if context else min(core, height) * width * 16  # ramped tiles' sums and weights
        return side * side * bytes_per_pixel + band

    if tile is None:
        tile = max(smallest, multiple * (max(height, width) // multiple))
        while tile > max(smallest, multiple) and crop_bytes(tile) > forward_budget:
            tile -= multiple
    tile = max(multiple, tile // multiple * multiple)
    tiles_per_run = max(1, min(TILES_PER_RUN, forward_budget // max(1, crop_bytes(tile))))
    if thumbnail is None:
        aspect = max(height, width) / min(height, width)
        thumbnail = int(math.sqrt(forward_budget / thumbnail_bytes_per_pixel * aspect))
        thumbnail = max(smallest, min(THUMBNAIL_CAP, thumbnail, max(height, width)))
    longest = min(thumbnail, max(height, width))
    thumbnail_bytes = longest * longest * min(height, width) // max(height, width) * thumbnail_bytes_per_pixel
    return TilePlan(tile, tiles_per_run, thumbnail, max(tiles_per_run * crop_bytes(tile), thumbnail_bytes))


def share_one_heap() -> None:
    """Make every thread allocate from glibc's main heap, which malloc_trim gives back: with a heap per thread,
    the service's inference thread kept about 250 MB more than the same translation on the main thread
    (docs/BENCHMARKS.md, "Memory at real sizes"). Call before other threads start; a no-op elsewhere."""
    try:
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, 1)
    except (OSError, AttributeError):  # not glibc
        pass


def _resident(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def _trim() -> None:
    """Give memory that was freed back to the kernel first (glibc keeps it), so the next peak is the work's own."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
