"""Which precision the engine computes in on the CPU, and why: `auto` takes the model's int8 companion only where
the processor has int8 dot-product instructions and the companion passed its quality check at export.

Measured (docs/BENCHMARKS.md, "CPU precision"): ONNX Runtime's int8 kernels beat its float32 ones where VNNI or
AMX exists; without them (plain AVX2/AVX-512) int8 gains little or loses, so `auto` stays at float32 there.
"""

from __future__ import annotations

import platform
from pathlib import Path

from transfigure.pipeline import fidelity
from transfigure.pipeline.errors import UserError
from transfigure.pipeline.export import model_card as card

PRECISIONS = ("auto", "fp32", "int8", "bf16")
REDUCED = ("int8", "bf16")
# The instructions that make int8 convolutions fast: Intel AMX and VNNI (also AMD Zen 4), Arm's dot products.
INT8_INSTRUCTIONS = ("amx_int8", "avx512_vnni", "avx_vnni", "asimddp", "i8mm")
# bf16 only with AMX: with AVX-512 BF16 alone OpenVINO's bf16 measured slower than ONNX Runtime's float32.
BF16_INSTRUCTIONS = ("amx_bf16",)


def check(requested: str) -> None:
    if requested not in PRECISIONS:
        raise UserError(f"--precision {requested!r}: expected one of {', '.join(PRECISIONS)}")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The processor's feature flags as Linux lists them (x86 `flags`, Arm `Features`); empty elsewhere."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def int8_instructions(flags: frozenset[str]) -> list[str]:
    return [flag for flag in INT8_INSTRUCTIONS if flag in flags]


def bf16_instructions(flags: frozenset[str]) -> list[str]:
    return [flag for flag in BF16_INSTRUCTIONS if flag in flags]


def machine_summary(flags: frozenset[str], openvino: bool) -> str:
    """What `auto` picks on this machine, in one line (`doctor`)."""
    cpu = f"this {platform.machine()} CPU"
    int8, bf16 = int8_instructions(flags), bf16_instructions(flags)
    steps = [f"int8 where the model has a passing int8 companion ({', '.join(int8)} on {cpu})"] if int8 else []
    if bf16 and openvino:
        steps.append(f"bf16 through OpenVINO where it passes its first-use check ({', '.join(bf16)})")
    elif bf16:
        steps.append(f"not bf16: {', '.join(bf16)} is here but OpenVINO is not installed")
    if not steps:
        return f"precision auto: float32 ({cpu} has no VNNI/AMX int8 or AMX bf16 instructions)"
    return f"precision auto on the CPU: {'; else '.join(steps)}; else float32. On GPUs float32."


def decide(
    requested: str, flags: frozenset[str], model: card.ModelCard, companion: card.ModelCard | None
) -> tuple[str, str]:
    """(precision, reason) for the CPU, from the request, the CPU flags, the float32 model's card and the card of
    its int8 companion (None when there is none); bf16 is decided after it (`bf16_decision`), since its check
    needs the model running. Raises UserError only when int8 was asked for by name and cannot be had."""
    check(requested)
    if requested in ("fp32", "bf16"):
        return requested, "asked for"
    problem = _companion_problem(model, companion)
    if requested == "int8":
        if problem:
            raise UserError(f"--precision int8: {problem}")
        quality = companion.int8.quality
        return "int8", "asked for" + ("" if quality == fidelity.PASSED else f" (its quality check {quality})")
    found = int8_instructions(flags)
    if not found:
        return "fp32", "auto: this CPU has no int8 dot-product instructions (VNNI, AMX)"
    if problem:
        return "fp32", f"auto: {problem}"
    if companion.int8.quality != fidelity.PASSED:
        return "fp32", f"auto: the int8 model's quality check {companion.int8.quality}"
    return "int8", (
        f"auto: {', '.join(found)} and an int8 model within limits ({companion.int8.mean_levels} levels mean, "
        f"{companion.int8.psnr_db} dB against float32)"
    )


def bf16_worth_trying(requested: str, chosen: str, flags: frozenset[str], openvino: bool) -> bool:
    """bf16 by name, or `auto` that did not take int8 on a CPU with AMX bf16 and OpenVINO installed."""
    return requested == "bf16" or (
        requested == "auto" and chosen == "fp32" and bool(bf16_instructions(flags)) and openvino
    )


def bf16_decision(requested: str, check: str, computes_in: str) -> tuple[str, str]:
    """(precision, reason) once OpenVINO's bf16 output was compared with float32 (`check`, a fidelity verdict)."""
    measured = f"OpenVINO computing in {computes_in}, {check} against float32 on first use"
    if requested == "bf16":
        return "bf16", f"asked for ({measured})"
    if check != fidelity.PASSED:
        return "fp32", f"auto: bf16 {measured}"
    return "bf16", f"auto: amx_bf16 and {measured}"


def _companion_problem(model: card.ModelCard, companion: card.ModelCard | None) -> str | None:
    if companion is None:
        return "no int8 model beside it (`transfigure export` writes one; `transfigure quantize` makes one)"
    if companion.precision != card.INT8 or companion.int8 is None:
        return "the .int8.onnx beside it is not an int8 model of this pipeline"
    stale = model.differing(companion)
    if stale:
        return f"the int8 model beside it comes from another export ({', '.join(stale)} differ)"
    return None
