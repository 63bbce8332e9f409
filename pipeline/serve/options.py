"""The inference options: one typed object that `translate`, `translate --engine ray` and `serve` build from their
flags and environment variables and give to the one Engine. `check` refuses what no model could run; the Engine
checks the rest against its model (the tile against the model's multiple, label maps whole). No heavy imports:
`transfigure --help` builds these flags.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from transfigure.pipeline import machine, threads
from transfigure.pipeline.errors import UserError
from transfigure.pipeline.images import DEFAULT_MAX_PIXELS
from transfigure.pipeline.serve.precision import PRECISIONS, REDUCED

# ONNX Runtime's execution providers by their short names, in the order `auto` tries them.
PROVIDERS = ("tensorrt", "cuda", "cpu")
GPU_PROVIDERS = ("tensorrt", "cuda")
# The default budget: a quarter of what the container (or machine) allows leaves room for the images of the
# requests waiting beside the one that runs; at most 1.25 GiB, so that a server, its request bodies and encoded
# answers beside the translation, stays under 2 GiB for any image (docs/BENCHMARKS.md, "Memory at real sizes").
BUDGET_SHARE = 4
BUDGET_CAP = 5 * 2**28
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


@dataclass(frozen=True)
class InferenceOptions:
    """How the engine runs a model. `providers`: short names in order of preference (None: the best that loads);
    `precision`: the CPU's auto, fp32, int8 or bf16; `tile`: translate images larger than this in tiles of it
    (None: only those whose forward pass would pass the memory budget, in tiles the budget allows); `thumbnail`:
    the longer side of the thumbnail whose statistics instance-norm tiles share (None: as large as the budget
    allows); `memory_budget`: bytes one translation may hold at its peak (None: default_memory_budget());
    `max_pixels`: larger images are refused from their header; `threads`: auto or a count; `batch_size`: images
    of one size per run (None: 1 on the CPU, 8 on a GPU)."""

    providers: tuple[str, ...] | None = None
    require_gpu: bool = False
    tensorrt_fp16: bool = False
    tensorrt_cache: Path | None = None
    precision: str = "auto"
    tile: int | None = None
    thumbnail: int | None = None
    memory_budget: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    threads: str | int = "auto"
    batch_size: int | None = None

    def check(self) -> InferenceOptions:
        """Itself, when every option is one some model can run; else a UserError naming each wrong flag."""
        wrong = []
        if self.precision not in PRECISIONS:
            wrong.append(f"--precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        unknown = [name for name in self.providers or () if name not in PROVIDERS]
        if unknown:
            wrong.append(f"--providers: unknown provider {unknown[0]!r}; expected some of {', '.join(PROVIDERS)}")
        elif self.providers is not None and not self.providers:
            wrong.append("--providers: name at least one of " + ", ".join(PROVIDERS))
        if self.precision in REDUCED and self.providers and set(self.providers) & set(GPU_PROVIDERS):
            wrong.append(f"--precision {self.precision} runs on the CPU; leave out --providers, or use fp32 on a GPU")
        if self.tensorrt_fp16 and self.providers and "tensorrt" not in self.providers:
            wrong.append("--tensorrt-fp16 needs the tensorrt provider")
        for flag, value in (("--tile", self.tile), ("--thumbnail", self.thumbnail), ("--batch-size", self.batch_size)):
            if value is not None and value < 1:
                wrong.append(f"{flag} must be at least 1, got {value}")
        if self.thumbnail is not None and self.tile is not None and self.thumbnail < self.tile:
            wrong.append(f"--thumbnail {self.thumbnail}: must be at least the tile's size ({self.tile})")
        if self.memory_budget is not None and self.memory_budget < 2**20:
            wrong.append(f"--memory-budget {self.memory_budget} bytes: at least 1M")
        if self.max_pixels < 1:
            wrong.append(f"--max-pixels must be at least 1, got {self.max_pixels}")
        try:
            threads.parse(self.threads, "--threads")
        except UserError as exc:
            wrong.append(str(exc))
        if wrong:
            raise UserError("; ".join(wrong))
        return self

    @property
    def budget(self) -> int:
        """The memory budget in bytes: as given, or default_memory_budget()."""
        return self.memory_budget if self.memory_budget is not None else default_memory_budget()


def default_memory_budget(sharing: int = 1) -> int:
    """A quarter of the container's memory limit (or of the machine's memory), shared by `sharing` engines that
    run at once (Ray's actors on one machine), at most 1.25 GiB each."""
    return min(BUDGET_CAP, machine.memory_limit() // BUDGET_SHARE // max(1, sharing))


def parse_providers(text: str | None) -> tuple[str, ...] | None:
    """`tensorrt,cuda,cpu` as given on the command line (or in TRANSFIGURE_PROVIDERS); None when absent."""
    if text is None:
        return None
    return tuple(name.strip() for name in text.split(",") if name.strip())


def parse_bytes(text: str | None, flag: str = "--memory-budget") -> int | None:
    """`1500000000`, `1500M`, `2G` or `2GiB` (powers of 1024) as bytes; None when absent."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if match is None:
        raise UserError(f"{flag} {text!r}: expected bytes, or a number with K, M, G or T (e.g. 2G)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])
