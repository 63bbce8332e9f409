"""The thread setting: `auto` counts the free cores, so a core another job holds is not waited for."""

import subprocess
import sys

import pytest
import torch

from pipeline import threads
from pipeline.cli_support import load
from pipeline.errors import UserError


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
