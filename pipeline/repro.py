"""`transfigure repro`: the whole `dvc repro`, saying where it is. DVC prints one line per stage as it reaches it
("Running stage 'X':" or "Stage 'X' didn't change, skipping"); this reads them and adds "stage k of n" and the
time left, from each stage's seconds on this machine's last run (or the reference machine's figures before one).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from transfigure.pipeline.files import write_json_atomic

# Seconds per stage on the reference machine (2-core AMD EPYC, idle, docs/BENCHMARKS.md "make run"), used until
# this machine has run a stage once; other stages count their kind's figure (the part before "@").
REFERENCE_SECONDS = {
    "prepare": 22,
    "classifier": 75,
    "train": 150,
    "train@cyclegan": 113,
    "train@pix2pix": 69,
    "train@cdcgan": 180,
    "evaluate": 12,
    "export": 20,
}
STARTED = re.compile(r"^Running stage '(?P<stage>[^']+)':")
SKIPPED = re.compile(r"^Stage '(?P<stage>[^']+)' didn't change, skipping")
# Where each stage's seconds of the last run are kept (DVC's own scratch folder, ignored by git).
HISTORY = Path(".dvc/tmp/transfigure-stage-seconds.json")


def stage_names(dvc: str) -> list[str] | str:
    """Every stage of the project's dvc.yaml, with params.yaml's recipe list expanded; DVC's error when it cannot
    read them (a broken dvc.yaml or params.yaml)."""
    listed = subprocess.run([dvc, "stage", "list", "--name-only"], capture_output=True, text=True)
    return listed.stdout.split() if listed.returncode == 0 else (listed.stderr or listed.stdout).strip()


class Estimate:
    """Seconds left for the stages not yet reached, from the last run's seconds (or the reference figures), scaled
    by how this run's finished stages compared with their estimates."""

    def __init__(self, stages: list[str], history: dict[str, float]):
        known = {**REFERENCE_SECONDS, **history}
        self.expected = {stage: known.get(stage, known.get(stage.partition("@")[0], 30)) for stage in stages}
        self.spent, self.planned = 0.0, 0.0

    def finished(self, stage: str, seconds: float) -> None:
        self.spent, self.planned = self.spent + seconds, self.planned + self.expected[stage]

    def left(self, stages: list[str]) -> float:
        # Within 4x either way of the estimates: one quick stage says little about the machine.
        speed = min(4.0, max(0.25, self.spent / self.planned)) if self.planned > 10 else 1.0
        return speed * sum(self.expected[stage] for stage in stages)


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def reproduce(dvc_args: list[str], dvc: str = "dvc", say: Callable[[str], None] = print) -> int:
    """Runs `dvc repro ARGS`, passing its output through with a progress line before each stage; returns its exit
    code. Each stage's seconds are kept for the next run's estimate and printed at the end."""
    stages = stage_names(dvc)
    if isinstance(stages, str):
        say(stages)
        return 1
    history = json.loads(HISTORY.read_text()) if HISTORY.exists() else {}
    estimate = Estimate(stages, history)
    seconds: dict[str, float] = {}
    current, since, begun = None, 0.0, time.perf_counter()

    def close(now: float) -> None:
        if current is not None:
            seconds[current] = now - since
            estimate.finished(current, seconds[current])

    process = subprocess.Popen([dvc, "repro", *dvc_args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reached: list[str] = []
    for line in process.stdout:
        found = STARTED.match(line) or SKIPPED.match(line)
        if found and found["stage"] in estimate.expected and found["stage"] not in reached:
            now = time.perf_counter()
            close(now)
            current, since = None, now
            reached.append(found["stage"])
            if STARTED.match(line):
                current = found["stage"]
                left = estimate.left([current, *(s for s in stages if s not in reached)])
                say(f"[stage {len(reached)} of {len(stages)}: {current}, about {minutes(left)} left in the pipeline]")
        sys.stdout.write(line)
        sys.stdout.flush()
    code = process.wait()
    if code == 0:
        close(time.perf_counter())
    if seconds:
        write_json_atomic(HISTORY, {**history, **{stage: round(s, 1) for stage, s in seconds.items()}})
        ran = ", ".join(f"{stage} {s:.0f}" for stage, s in seconds.items())
        say(f"[pipeline: {time.perf_counter() - begun:.0f} s; seconds per stage: {ran}]")
    return code
