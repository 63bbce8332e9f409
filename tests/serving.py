"""The real server as a process, started with the exact command and environment of the Dockerfile's CMD."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath

import httpx

REPO = Path(__file__).resolve().parents[1]


def container_command() -> list[str]:
    """The Dockerfile's exec-form CMD."""
    match = re.search(r"^CMD (\[.*\])\s*$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    return json.loads(match.group(1))


def container_env(**build_args: str) -> dict[str, str]:
    """The ENV of the Dockerfile's last stage, as `KEY=value` pairs, for these build arguments (PATH is left to the
    caller). Its ARG defaults and ENV values are expanded by `sh`: they use only expansions that Docker's Dockerfile
    syntax 1.7 shares with the shell (`${A:-default}`, `${A##*/}`)."""
    stage = _last_stage()
    block = re.search(r"^ENV (.*?)(?<!\\)\n", stage, re.MULTILINE | re.DOTALL).group(1)
    pairs = re.findall(r"([A-Z_]+)=(\S+)", block.replace("\\\n", " "))
    arguments = [
        f"{name}={shlex.quote(build_args[name]) if name in build_args else default}"
        for name, default in re.findall(r"^ARG ([A-Z_]+)=(.*)$", stage, re.MULTILINE)
    ]
    prints = [f'printf "%s\\n" "{key}={value}"' for key, value in pairs if key != "PATH"]
    expanded = subprocess.run(["sh", "-c", "\n".join(arguments + prints)], capture_output=True, text=True, check=True)
    return dict(line.split("=", 1) for line in expanded.stdout.splitlines())


def bake_model(context: Path, models: Path, model_file: str) -> Path:
    """Runs the last stage's RUN that bakes MODEL_FILE (a path inside the build context) into /models, with
    `context` for the build context and `models` for /models; returns the file the image's MODEL_URI names."""
    run = re.search(r"^RUN --mount=type=bind,source=\.,target=/context \\\n(.*?[^\\])\n", _last_stage(), re.M | re.S)
    script = run.group(1).replace("/context", str(context)).replace("/models", str(models))
    subprocess.run(["sh", "-c", script], env={**os.environ, "MODEL_FILE": model_file}, check=True)
    return models / PurePosixPath(container_env(MODEL_FILE=model_file)["MODEL_URI"]).relative_to("/models")


def _last_stage() -> str:
    return (REPO / "Dockerfile").read_text().rsplit("\nFROM ", 1)[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`CMD` with the image's environment, on 127.0.0.1 and a free port, serving `model`; `bin_dir` holds the
    `transfigure` script (the test's virtual environment by default)."""

    def __init__(self, model: Path, bin_dir: Path | None = None, **settings: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        bin_dir = bin_dir or Path(sys.executable).parent
        env = {
            **os.environ,
            **container_env(),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "MODEL_URI": str(model),
            "TRANSFIGURE_HOST": "127.0.0.1",
            "TRANSFIGURE_PORT": str(self.port),
            **{f"TRANSFIGURE_{key.upper()}": str(value) for key, value in settings.items()},
        }
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"transfigure-serve-{self.port}.log"
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(container_command(), env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the server was not ready within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        """What the server printed so far (its access log among it)."""
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, as `docker stop` sends it; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self.log.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        if not self.log.closed:
            self.stop()
