"""`transfigure repro`: the real `dvc repro` on a three-stage project, with "stage k of n" and the time left."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from tests.conftest import BIN
from transfigure.pipeline import repro

pytestmark = pytest.mark.slow  # servers, clusters or processes: minutes

DVC_YAML = """
stages:
  first:
    cmd: python -c "open('one.txt', 'w').write('1')"
    outs: [one.txt]
  second:
    foreach: ${parts}
    do:
      cmd: python -c "import time; time.sleep(1); open('${item}.txt', 'w').write(open('one.txt').read())"
      deps: [one.txt]
      outs: ["${item}.txt"]
"""


def test_repro_says_which_stage_of_how_many_and_how_long_is_left(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "params.yaml").write_text("parts: [a, b]\n")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    said: list[str] = []

    assert repro.reproduce([], str(BIN / "dvc"), said.append) == 0
    assert (tmp_path / "b.txt").read_text() == "1"
    # The stage list comes from params.yaml's `parts` through the foreach; unknown stages count 30 s each.
    assert said[0] == "[stage 1 of 3: first, about 2 min left in the pipeline]", said  # 3 x 30 s
    # `first` took far less than its 30 s: the rest is scaled down, by 4 at most.
    assert said[1] == "[stage 2 of 3: second@a, about 15 s left in the pipeline]", said
    assert said[2].startswith("[stage 3 of 3: second@b, about ")
    kept = json.loads((tmp_path / repro.HISTORY).read_text())
    assert set(kept) == {"first", "second@a", "second@b"} and kept["second@a"] >= 1.0
    assert re.fullmatch(r"\[pipeline: \d+ s; seconds per stage: first \d+, second@a \d+, second@b \d+\]", said[-1])

    # Nothing to do: no stage line, and the next estimate comes from this machine's own seconds.
    said.clear()
    assert repro.reproduce([], str(BIN / "dvc"), said.append) == 0
    assert said == []
    assert repro.reproduce(["--force"], str(BIN / "dvc"), said.append) == 0  # DVC's options pass through
    left = round(kept["first"] + kept["second@a"] + kept["second@b"])
    assert said[0] == f"[stage 1 of 3: first, about {left} s left in the pipeline]", (said, kept)

    # A broken dvc.yaml: DVC's own words, no traceback.
    said.clear()
    (tmp_path / "dvc.yaml").write_text(DVC_YAML.replace("${parts}", "${nothing}"))
    assert repro.reproduce([], str(BIN / "dvc"), said.append) == 1
    assert len(said) == 1 and "nothing" in said[0] and "Traceback" not in said[0], said

    # A failing stage: dvc's exit code comes back.
    (tmp_path / "dvc.yaml").write_text(DVC_YAML.replace("open('one.txt', 'w')", "open('missing/one.txt', 'w')"))
    assert repro.reproduce([], str(BIN / "dvc"), said.append) != 0
