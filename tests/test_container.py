"""The container without a Docker engine: hadolint passes on the Dockerfile, and a virtual environment built the
way the Dockerfile builds the image (the same hashed lock, the package without its training dependencies) runs
the image's CMD and serves."""

import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import REPO, export_tiny_translator
from PIL import Image

from tests.corpus import gradient
from tests.serving import Server, container_command

BIN = Path(sys.executable).parent


def test_hadolint_finds_no_error_and_the_image_runs_as_a_user_with_a_healthcheck():
    result = subprocess.run(
        [str(BIN / "hadolint"), "--failure-threshold", "error", "Dockerfile"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    dockerfile = (REPO / "Dockerfile").read_text()
    runtime = dockerfile.rsplit("\nFROM ", 1)[1]
    assert re.search(r"^USER (?!root|0\b)\S+", runtime, re.MULTILINE), "the server does not run as root"
    assert "HEALTHCHECK" in runtime and "/healthz" in runtime
    assert container_command()[:2] == ["transfigure", "serve"], "exec form, so SIGTERM reaches the server"


def test_the_lock_files_pin_every_serving_requirement_with_hashes():
    wanted = [
        re.split(r"[<>=\[ ;]", line)[0].lower()
        for line in (REPO / "requirements/serve.in").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    for variant, runtime in (("gpu", "onnxruntime-gpu"), ("cpu", "onnxruntime")):
        lock = (REPO / f"requirements/serve-{variant}.txt").read_text()
        pinned = dict(re.findall(r"^([a-z0-9][a-z0-9._-]*)==(\S+)", lock, re.MULTILINE))
        assert set(wanted) | {runtime} <= set(pinned), (variant, set(wanted) - set(pinned))
        assert "torch" not in pinned and "mlflow" not in pinned, "no training stack in the image"
        assert lock.count("--hash=sha256:") >= len(pinned)
    dockerignore = (REPO / ".dockerignore").read_text().split()
    for copied in re.findall(r"^COPY (?!--from)(\S+)", (REPO / "Dockerfile").read_text(), re.MULTILINE):
        assert copied.split("/")[0] not in dockerignore, f"{copied} is copied but ignored"


@pytest.mark.slow
def test_a_venv_built_like_the_image_serves_with_the_containers_command(tmp_path):
    venv = tmp_path / "image-venv"

    def run(*command: str) -> None:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # The Dockerfile's build stage, step by step, for the CPU variant (the same commands with VARIANT=cpu).
    run(sys.executable, "-m", "venv", str(venv))
    run(str(venv / "bin/pip"), "install", "-q", "--require-hashes", "--no-deps", "-r", "requirements/serve-cpu.txt")
    source = tmp_path / "src"  # what the Dockerfile copies, so nothing outside it can leak into the wheel
    for folder in ("models", "pipeline"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    run(str(venv / "bin/pip"), "wheel", "-q", "--no-deps", "--wheel-dir", str(tmp_path / "wheels"), str(source))
    (wheel,) = (tmp_path / "wheels").glob("transfigure-*.whl")
    run(str(venv / "bin/pip"), "install", "-q", "--no-deps", str(wheel))
    absent = subprocess.run([str(venv / "bin/python"), "-c", "import torch"], capture_output=True)
    assert absent.returncode != 0, "PyTorch is not part of the serving image"

    model = export_tiny_translator(tmp_path / "model.onnx")
    with Server(model, bin_dir=venv / "bin") as server:
        assert httpx.get(f"{server.url}/readyz").json()["provider"] == "cpu"
        page = httpx.get(server.url)
        assert page.status_code == 200 and "<title>Transfigure</title>" in page.text, "the page ships in the wheel"
        response = httpx.post(
            f"{server.url}/v1/translate",
            content=_png(),
            headers={"Content-Type": "image/png"},
            timeout=60,
        )
        assert response.status_code == 200 and response.content.startswith(b"\x89PNG")
        assert server.stop() == 0


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(gradient(48, 32)).save(buffer, format="PNG")
    return buffer.getvalue()
