import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def run_cli(tmp_path):
    """Runs the real `transfigure` console script in a folder; returns the CompletedProcess."""

    def run(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600):
        full_env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
            **(env or {}),
        }
        return subprocess.run(
            [str(BIN / "transfigure"), *args],
            cwd=cwd or tmp_path,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run
