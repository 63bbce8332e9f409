"""What the machine and its container allow, read from cgroup files laid out as the kernel writes them
(tests/fixtures/cgroup: v2 with a limit and without, v1 with and without, a process in a nested v2 cgroup), and
whether TensorRT's library loads."""

import ctypes.util
import os

import pytest
from conftest import REPO

from transfigure.pipeline import machine

CGROUPS = REPO / "tests/fixtures/cgroup"
MEMINFO = CGROUPS / "meminfo"  # MemTotal: 16318784 kB
MACHINE_BYTES = 16318784 * 1024
# 0::/, what a process in a container with its own cgroup namespace reads in /proc/self/cgroup
AT_ROOT = CGROUPS / "self-cgroup-root"


@pytest.mark.parametrize(
    ("layout", "memory", "cpus"),
    [
        ("v2-limited", 2**30, 2.5),  # memory.max 1073741824, cpu.max "250000 100000"
        ("v2-unlimited", MACHINE_BYTES, None),  # memory.max "max", cpu.max "max 100000"
        ("v1-limited", 2**29, 1.5),  # memory.limit_in_bytes 536870912, cfs quota 150000 over period 100000
        ("v1-unlimited", MACHINE_BYTES, None),  # memory.limit_in_bytes 9223372036854771712, cfs quota -1
    ],
)
def test_cgroup_limits_at_the_root_are_read_and_capped_by_the_machine(layout, memory, cpus):
    root = CGROUPS / layout
    assert machine.memory_limit(root, MEMINFO, AT_ROOT) == memory
    assert machine.cpu_quota(root, AT_ROOT) == cpus


def test_a_nested_cgroup_takes_the_tightest_limit_along_its_ancestors():
    # container1: memory max, 1 CPU; its pod: 2 GiB, 3 CPUs; the process is in container1 (0::/kubepods/pod1/...).
    root = CGROUPS / "v2-nested"
    assert machine.memory_limit(root, MEMINFO, root / "self-cgroup") == 2 * 2**30
    assert machine.cpu_quota(root, root / "self-cgroup") == 1.0
    # Seen from the root (no cgroup path), none of the nested limits applies.
    assert machine.memory_limit(root, MEMINFO, AT_ROOT) == MACHINE_BYTES
    assert machine.cpu_quota(root, AT_ROOT) is None


def test_without_cgroup_files_the_machine_memory_is_the_limit(tmp_path):
    assert machine.memory_limit(tmp_path, MEMINFO, AT_ROOT) == MACHINE_BYTES
    assert machine.cpu_quota(tmp_path, AT_ROOT) is None
    # Neither cgroups nor /proc/meminfo (macOS): the physical pages, as sysconf counts them.
    pages = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert machine.memory_limit(tmp_path, tmp_path / "meminfo", tmp_path / "cgroup") == pages


def test_tensorrt_is_present_only_where_its_library_loads():
    assert machine.tensorrt_present(("libnvinfer.so.999",)) is False
    libc = ctypes.util.find_library("c")
    assert machine.tensorrt_present(("libnvinfer.so.999", libc)) is True
