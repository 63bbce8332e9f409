"""The CPU threads of the pipeline's work: one setting, `threads` in params or `--threads` on a command.

`auto` uses the cores this process may run on (its affinity mask, which containers and taskset narrow) that are
free when the command starts (under half busy over a short sample of /proc/stat), and no more than the container's
CPU quota rounded up (a pod limited to 2 CPUs on a 64-core node sees 64 cores but is throttled past 2 busy
threads), at least one, shared evenly by the processes that torchrun starts on the machine. On a busy
machine a thread that waits for a core another job holds stalls every other thread at each OpenMP barrier:
two threads on two cores with one core taken ran 2.5-3.2x slower than one thread, and up to 47x under
heavier contention (docs/BENCHMARKS.md, Threads). A number is used as given.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time

from transfigure.pipeline import machine
from transfigure.pipeline.errors import UserError

_applied: int | None = None


def available_cpus() -> list[int]:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def free_cpus(sample_seconds: float = 0.1) -> int:
    """How many of the available CPUs were less than half busy over `sample_seconds` (all of them when the
    kernel's counters cannot be read)."""
    cpus = available_cpus()
    before = _cpu_times()
    if before is None:
        return len(cpus)
    time.sleep(sample_seconds)
    after = _cpu_times()
    free = 0
    for cpu in cpus:
        if cpu not in before or cpu not in after:
            free += 1
            continue
        total = sum(after[cpu]) - sum(before[cpu])
        idle = (after[cpu][3] + after[cpu][4]) - (before[cpu][3] + before[cpu][4])  # idle + iowait
        free += total <= 0 or idle / total > 0.5
    return max(1, free)


def _cpu_times() -> dict[int, list[int]] | None:
    try:
        lines = open("/proc/stat").read().splitlines()
    except OSError:
        return None
    times = {}
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            times[int(name[3:])] = [int(v) for v in fields[:8]]
    return times


def parse(setting: str | int, source: str) -> int | str:
    """`auto` or a positive count, from params or the command line (`source` names which, for the error)."""
    if setting == "auto":
        return "auto"
    try:
        count = int(setting)
    except (TypeError, ValueError):
        count = 0
    if count < 1:
        raise UserError(f"{source}: expected auto or a number of threads of at least 1, got {setting!r}")
    return count


def resolve(setting: int | str) -> int:
    if setting != "auto":
        return int(setting)
    quota = machine.cpu_quota()
    usable = free_cpus() if quota is None else min(free_cpus(), math.ceil(quota))
    # torchrun's processes on this machine (LOCAL_WORLD_SIZE) share its free cores.
    return max(1, usable // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def apply(setting: int | str, torch: bool = True) -> int:
    """Sets PyTorch's intra-op threads (ONNX Runtime sessions read `current()`); returns the count. `torch`
    False leaves PyTorch unimported: translate and serve run ONNX Runtime alone, and importing torch costs
    hundreds of MB of resident memory."""
    global _applied
    _applied = resolve(setting)
    if torch and importlib.util.find_spec("torch") is not None:  # the serving image has ONNX Runtime only
        import torch

        torch.set_num_threads(_applied)
    return _applied


def current() -> int:
    """The applied thread count, or what `auto` gives now when no command applied one (a library caller)."""
    return _applied if _applied is not None else resolve("auto")


def describe() -> list[str]:
    """What `doctor` prints about threads."""
    cpus = available_cpus()
    quota = machine.cpu_quota()
    lines = [
        f"cpus: {len(cpus)} available to this process (affinity {cpus[0]}-{cpus[-1]}), {os.cpu_count()} in the machine",
        f"threads auto: {resolve('auto')} (the available cores that are free now, within the CPU quota)",
    ]
    if quota is not None:
        lines.append(f"cpu quota: {quota:g} CPUs from the container's cgroup, so auto uses at most {math.ceil(quota)}")
    for name in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS"):
        if name in os.environ:
            lines.append(f"{name}={os.environ[name]} (from the environment)")
    return lines
