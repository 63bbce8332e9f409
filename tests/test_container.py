"""The container without a Docker engine: hadolint passes on the Dockerfile, and a virtual environment built the
way the Dockerfile builds the image (the same hashed lock, the package without its training dependencies) runs
the image's CMD and serves, and a model baked by the Dockerfile's own RUN keeps its name and its companions."""

import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from conftest import REPO
from PIL import Image

from tests.corpus import gradient
from tests.serving import Server, bake_model, container_command
from transfigure.pipeline.pixels import to_model_range, to_pixels

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
    # Each variant's runtime and the CUDA its NVIDIA wheels are built for (gpu-cu12: drivers older than CUDA 13's).
    variants = (("gpu", "onnxruntime-gpu", "nvidia-cudnn-cu13"), ("gpu-cu12", "onnxruntime-gpu", "nvidia-cudnn-cu12"))
    for variant, runtime, cuda in (*variants, ("cpu", "onnxruntime", None)):
        lock = (REPO / f"requirements/serve-{variant}.txt").read_text()
        pinned = dict(re.findall(r"^([a-z0-9][a-z0-9._-]*)==(\S+)", lock, re.MULTILINE))
        assert set(wanted) | {runtime} <= set(pinned), (variant, set(wanted) - set(pinned))
        assert {name for name in pinned if name.startswith("nvidia-cudnn")} == ({cuda} if cuda else set()), variant
        assert "torch" not in pinned and "mlflow" not in pinned, "no training stack in the image"
        assert lock.count("--hash=sha256:") >= len(pinned)
    assert "for variant in gpu gpu-cu12 cpu;" in (REPO / "Makefile").read_text(), "make lock remakes every variant"
    dockerignore = (REPO / ".dockerignore").read_text().split()
    for copied in re.findall(r"^COPY (?!--from)(\S+)", (REPO / "Dockerfile").read_text(), re.MULTILINE):
        assert copied.split("/")[0] not in dockerignore, f"{copied} is copied but ignored"


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory) -> Path:
    """A virtual environment built the way the Dockerfile's build stage builds /opt/venv, for the CPU variant
    (the same commands with VARIANT=cpu); its bin folder."""
    tmp_path = tmp_path_factory.mktemp("image")
    venv = tmp_path / "image-venv"

    def run(*command: str) -> None:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

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
    return venv / "bin"


# One worker runs both tests of the image's environment, so it is built once (about a minute).
@pytest.mark.slow
@pytest.mark.xdist_group("image_venv")
def test_a_venv_built_like_the_image_serves_with_the_containers_command(image_venv, tmp_path, tiny_translator):
    model = tiny_translator(tmp_path / "model.onnx")
    with Server(model, bin_dir=image_venv) as server:
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


@pytest.mark.slow
@pytest.mark.xdist_group("image_venv")
def test_a_baked_model_keeps_its_name_its_int8_model_and_its_tiling_graphs(image_venv, tmp_path, tiny_translator):
    # The build context as `make run` leaves it: AtoB with its companions, and another model beside it.
    exported = tmp_path / "context/artifacts/cyclegan"
    model = tiny_translator(exported / "AtoB.onnx")  # with AtoB.statistics.onnx and AtoB.tile.onnx
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for i in range(4):
        Image.fromarray(gradient(64, 48, seed=i)).save(calibration / f"{i}.png")
    quantized = subprocess.run(
        [str(BIN / "transfigure"), "quantize", str(model), "--images", str(calibration)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert quantized.returncode == 0, quantized.stdout + quantized.stderr
    shutil.copy(model, exported / "BtoA.onnx")

    baked = bake_model(tmp_path / "context", tmp_path / "models", "artifacts/cyclegan/AtoB.onnx")
    assert baked == tmp_path / "models/AtoB.onnx"
    names = sorted(path.name for path in (tmp_path / "models").iterdir())
    assert names == ["AtoB.int8.onnx", "AtoB.onnx", "AtoB.statistics.onnx", "AtoB.tile.onnx"]

    photo = gradient(96, 64)
    with Server(baked, bin_dir=image_venv, precision="int8", tile="32") as server:
        assert httpx.get(f"{server.url}/v2/models/AtoB").status_code == 200
        served = httpx.get(f"{server.url}/v1/models").json()
        assert (served["name"], served["precision"]) == ("AtoB", "int8")
        response = httpx.post(
            f"{server.url}/v1/translate", content=_png(photo), headers={"Content-Type": "image/png"}, timeout=60
        )
        assert response.status_code == 200
        tiled = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")).astype(int)
        assert server.stop() == 0
    # Tiles normalized with the whole image's statistics (the float32 tiling graphs) give the float32 model's
    # translation of the whole image (0 levels apart when measured); tiles normalized alone, as without the
    # graphs, were up to 184 levels apart.
    batch = to_model_range(photo.transpose(2, 0, 1)[None])
    (whole,) = ort.InferenceSession(str(model)).run(["translated"], {"image": batch})
    assert np.abs(tiled - to_pixels(whole)[0].transpose(1, 2, 0).astype(int)).max() <= 1


def _png(image: np.ndarray | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(gradient(48, 32) if image is None else image).save(buffer, format="PNG")
    return buffer.getvalue()
