"""What this machine and its container allow this process: memory and CPUs (the cgroup limits that
`os.cpu_count()` and /proc/meminfo do not show) and whether TensorRT's runtime library loads.

Standard library only: the serving image, which has no PyTorch or NumPy, imports this. The paths are arguments so
that tests read fixture files; a limit is the tightest one along the process's cgroup and its ancestors (a pod's
limit binds its containers), read from cgroup v2 files where there are any, else from cgroup v1's.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path, PurePosixPath

CGROUP_ROOT = Path("/sys/fs/cgroup")
MEMINFO = Path("/proc/meminfo")
SELF_CGROUP = Path("/proc/self/cgroup")
# Where neither /proc/meminfo nor sysconf says (Windows): a common laptop's memory.
ASSUMED_MEMORY = 8 * 2**30
# The sonames ONNX Runtime's TensorRT provider links against (TensorRT 10; 8 for older ORT releases).
TENSORRT_LIBRARIES = ("libnvinfer.so.10", "libnvinfer.so.8", "nvinfer_10.dll")


def memory_limit(cgroup_root: Path = CGROUP_ROOT, meminfo: Path = MEMINFO, self_cgroup: Path = SELF_CGROUP) -> int:
    """Bytes this process may use: the smaller of its cgroup's memory limit (v2 `memory.max`, v1
    `memory.limit_in_bytes`) and the machine's memory."""
    limits = _read_along(cgroup_root, _own_cgroup(self_cgroup, ""), "memory.max")
    if not limits:
        limits = _read_along(cgroup_root / "memory", _own_cgroup(self_cgroup, "memory"), "memory.limit_in_bytes")
    # v2 writes no limit as "max"; v1 as about 2**63, which the machine's memory undercuts.
    return min([_machine_memory(meminfo), *(int(value) for value in limits if value != "max")])


def cpu_quota(cgroup_root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> float | None:
    """The CPUs this process's cgroup may use per unit of time (v2 `cpu.max`, v1 `cpu.cfs_quota_us` over
    `cpu.cfs_period_us`), e.g. 2.0 for a pod limited to 2 CPUs; None when there is no quota."""
    quotas = []
    settings = _read_along(cgroup_root, _own_cgroup(self_cgroup, ""), "cpu.max")
    if settings:
        quotas = [int(quota) / int(period) for quota, period in map(str.split, settings) if quota != "max"]
    else:
        for folder in _folders(cgroup_root / "cpu", _own_cgroup(self_cgroup, "cpu")):
            quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
            if quota is not None and period is not None and int(quota) > 0:  # -1: no quota
                quotas.append(int(quota) / int(period))
    return min(quotas, default=None)


def tensorrt_present(libraries: tuple[str, ...] = TENSORRT_LIBRARIES) -> bool:
    """Whether TensorRT's runtime library loads, from the loader's path or the `tensorrt_libs` wheel's folder
    (`pip install tensorrt`): ONNX Runtime's TensorRT provider cannot start without it."""
    spec = importlib.util.find_spec("tensorrt_libs")
    folders = [Path(folder) for folder in (spec.submodule_search_locations or [])] if spec else []
    for name in libraries:
        for candidate in (name, *(str(folder / name) for folder in folders)):
            try:
                ctypes.CDLL(candidate)
                return True
            except OSError:
                continue
    return False


def _own_cgroup(self_cgroup: Path, controller: str) -> str:
    """This process's cgroup path in the v2 tree (`controller` "") or in a v1 controller's ("memory", "cpu")."""
    for line in (_read(self_cgroup) or "").splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    return "/"


def _folders(root: Path, own: str) -> list[Path]:
    """The cgroup `own` and its ancestors under `root`; outside a cgroup namespace the container sees only its
    own cgroup at `root`, which the last one (`root` itself) then is."""
    path = PurePosixPath(own)
    return [root / str(folder).lstrip("/") for folder in (path, *path.parents)]


def _read_along(root: Path, own: str, name: str) -> list[str]:
    return [value for folder in _folders(root, own) if (value := _read(folder / name)) is not None]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _machine_memory(meminfo: Path) -> int:
    for line in (_read(meminfo) or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024  # in kB
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return ASSUMED_MEMORY
