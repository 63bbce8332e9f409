"""The thread setting: `auto` counts the free cores, so a core another job holds is not waited for."""

import functools
import os
import subprocess
import sys

import pytest
import torch
from conftest import BIN, REPO

from transfigure.pipeline import machine, threads
from transfigure.pipeline.cli_support import load
from transfigure.pipeline.errors import UserError

CGROUPS = REPO / "tests/fixtures/cgroup"  # laid out as the kernel writes them; tests/test_machine.py reads them all
QUOTA_2_5 = CGROUPS / "v2-limited"  # cpu.max "250000 100000"
NO_QUOTA = CGROUPS / "v2-unlimited"  # cpu.max "max 100000"
AT_ROOT = CGROUPS / "self-cgroup-root"


def test_auto_leaves_out_a_core_that_a_busy_process_holds():
    cpus = threads.available_cpus()
    if len(cpus) < 2:
        pytest.skip("needs two CPUs to take one of them")
    busy = subprocess.Popen(
        [sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpus[0]}}})\nwhile True: pass"]
    )
    try:
        assert threads.free_cpus(sample_seconds=0.5) <= len(cpus) - 1
    finally:
        busy.kill()


def test_a_count_from_the_command_line_wins_over_params_and_is_applied(workdir):
    before = torch.get_num_threads()
    try:
        assert load(workdir / "params.yaml", ["threads=2"], "1").threads == 2
        assert torch.get_num_threads() == 1 and threads.current() == 1
        load(workdir / "params.yaml", ["threads=1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(UserError, match="--threads: expected auto or a number of threads"):
        threads.parse("0", "--threads")


def test_threads_auto_is_capped_by_the_cpu_quota(monkeypatch):
    # A 64-core node whose cores are all free, in a pod limited to 2.5 CPUs (v2-limited): 3 threads, not 64.
    monkeypatch.setattr(threads, "free_cpus", lambda: 64)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    read_quota = machine.cpu_quota
    monkeypatch.setattr(machine, "cpu_quota", functools.partial(read_quota, QUOTA_2_5, AT_ROOT))
    assert threads.resolve("auto") == 3
    described = threads.describe()
    assert "cpu quota: 2.5 CPUs from the container's cgroup, so auto uses at most 3" in described
    assert any(line.startswith("threads auto: 3 (") for line in described)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's two processes share the quota's threads
    assert threads.resolve("auto") == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    # Without a quota, the free cores alone.
    monkeypatch.setattr(machine, "cpu_quota", functools.partial(read_quota, NO_QUOTA, AT_ROOT))
    assert threads.resolve("auto") == 64
    assert not any(line.startswith("cpu quota") for line in threads.describe())


def test_serve_reads_the_thread_setting_from_transfigure_threads(tmp_path):
    # A bad count from the environment is refused by name before any model loads: the variable reached --threads.
    result = subprocess.run(
        [str(BIN / "transfigure"), "serve", "--model", str(tmp_path / "absent.onnx")],
        env={**os.environ, "TRANSFIGURE_THREADS": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--threads: expected auto or a number of threads of at least 1, got '0'" in result.stderr
