"""The HTTP service as a real process, started with the Dockerfile's CMD: correct images under concurrency, every
limit, the Open Inference Protocol through Triton's own client, operations endpoints, schemathesis against our
OpenAPI, and SIGTERM under load."""

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import METADATA, export_tiny_translator
from PIL import Image

from pipeline.serve.engine import Engine
from pipeline.serve.translate import translate_path
from tests.corpus import gradient, png_declaring
from tests.serving import Server

# One worker runs the whole module, so its module-scoped fixtures are made once (tests/README.md).
pytestmark = pytest.mark.xdist_group("test_serve")

LIMITS = {"max_body_bytes": 300_000, "max_pixels": 200_000}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return export_tiny_translator(tmp_path_factory.mktemp("model") / "horse2zebra.onnx")


@pytest.fixture(scope="module")
def server(model_file):
    # A long wait, so that concurrent requests of this test meet in batches even on a loaded machine.
    with Server(model_file, max_batch="8", max_wait_ms="100", tile="64", **LIMITS) as running:
        yield running


def png_bytes(array: np.ndarray, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=format)
    return buffer.getvalue()


def post_image(url: str, data: bytes, content_type: str = "image/png", **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/v1/translate", content=data, headers={"Content-Type": content_type}, timeout=60, **kwargs)


def decoded(response: httpx.Response) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def test_concurrent_clients_get_what_translate_writes_for_the_same_files(server, model_file, tmp_path):
    sizes = [(64, 48)] * 8 + [(40, 36)] * 4  # two sizes in flight at once
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, (width, height) in enumerate(sizes):
        Image.fromarray(gradient(width, height, seed=i)).save(inputs / f"{i:02d}.png")
    translate_path(inputs, tmp_path / "out", Engine(model_file, providers=["cpu"]), progress=False)

    start = threading.Barrier(len(sizes))

    def client(i: int) -> httpx.Response:
        data = (inputs / f"{i:02d}.png").read_bytes()
        start.wait()
        return post_image(server.url, data)

    with ThreadPoolExecutor(len(sizes)) as pool:
        responses = list(pool.map(client, range(len(sizes))))
    for i, response in enumerate(responses):
        assert response.status_code == 200 and response.headers["content-type"] == "image/png", response.text
        expected = np.asarray(Image.open(tmp_path / "out" / f"{i:02d}.png"))
        assert np.array_equal(decoded(response), expected), f"request {i}"
    metrics = httpx.get(f"{server.url}/metrics").text
    counts = [line.split()[-1] for line in metrics.splitlines() if line.startswith("transfigure_batch_size_count")]
    runs = float(counts[0])
    assert runs < len(sizes) + 1, "concurrent requests of one size shared engine runs (+1: the warm-up)"


def test_images_larger_than_the_tile_go_in_tiles_as_translate_does(server, model_file):
    photo = gradient(100, 80, seed=3)
    response = post_image(server.url, png_bytes(photo))
    expected = Engine(model_file, providers=["cpu"]).translate(photo, tile=64)
    assert response.status_code == 200 and np.array_equal(decoded(response), expected)


def test_multipart_and_output_formats(server):
    data = png_bytes(gradient(30, 20))
    multipart = httpx.post(f"{server.url}/v1/translate", files={"image": ("cat.png", data, "image/png")}, timeout=60)
    assert multipart.status_code == 200 and decoded(multipart).shape == (20, 30, 3)
    assert post_image(server.url, data, params={"format": "jpeg"}).headers["content-type"] == "image/jpeg"
    by_accept = httpx.post(
        f"{server.url}/v1/translate",
        content=png_bytes(gradient(30, 20), "WEBP"),
        headers={"Content-Type": "image/webp", "Accept": "image/webp, */*;q=0.1"},
        timeout=60,
    )
    assert by_accept.headers["content-type"] == "image/webp" and decoded(by_accept).shape == (20, 30, 3)
    assert float(by_accept.headers["x-transfigure-seconds"]) > 0


def streamed(data: bytes, chunk: int = 65536):
    for start in range(0, len(data), chunk):
        yield data[start : start + chunk]


def test_every_limit_is_a_json_error_and_the_server_stays_ready_and_correct(server, tmp_path):
    good = png_bytes(gradient(40, 36))
    before = decoded(post_image(server.url, good))
    too_long = os.urandom(LIMITS["max_body_bytes"] + 1)
    bomb = png_declaring(tmp_path / "bomb.png", 1000, 1000).read_bytes()  # 1 MP in 70 bytes
    huge = png_declaring(tmp_path / "huge.png", 100_000, 100_000).read_bytes()  # past Pillow's own limit too
    cases = [
        ("declared body too large", post_image(server.url, too_long), 413, "exceeds the limit"),
        ("streamed body too large", post_image(server.url, streamed(too_long)), 413, "exceeds the limit"),
        ("pixels from the header", post_image(server.url, bomb), 413, "1000x1000"),
        ("a header past Pillow's limit", post_image(server.url, huge), 413, "decompression bomb"),
        ("a type we do not take", post_image(server.url, b"GIF89a", "image/gif"), 415, "image/gif"),
        ("no content type", post_image(server.url, good, ""), 415, "not accepted"),
        ("not an image", post_image(server.url, os.urandom(2000)), 422, "not an image"),
        ("truncated", post_image(server.url, good[: len(good) // 2]), 422, "truncated"),
        ("an accepted type, another format", post_image(server.url, png_bytes(gradient(8, 8), "BMP")), 422, "PNG"),
        ("smaller than the network", post_image(server.url, png_bytes(gradient(2, 2))), 422, "at least 4 px"),
        ("empty", post_image(server.url, b""), 422, "empty"),
        (
            "multipart without the field",
            httpx.post(f"{server.url}/v1/translate", files={"photo": ("a.png", good)}, timeout=60),
            422,
            "'image'",
        ),
        (
            "multipart part of another type",
            httpx.post(f"{server.url}/v1/translate", files={"image": ("a.txt", b"hi", "text/plain")}, timeout=60),
            415,
            "text/plain",
        ),
        ("an unknown output format", post_image(server.url, good, params={"format": "gif"}), 422, "format"),
    ]
    for name, response, status, words in cases:
        assert response.status_code == status, (name, response.status_code, response.text)
        assert words in response.json()["error"], (name, response.text)
        assert "Traceback" not in response.text
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    assert np.array_equal(decoded(post_image(server.url, good)), before)


def test_open_inference_protocol_round_trip_with_tritons_client(server, model_file):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    name = "horse2zebra"  # the file's stem
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(name)
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata(name)
    assert meta["inputs"][0]["name"] == "image" and meta["outputs"][0]["datatype"] == "UINT8"

    images = np.stack([gradient(24, 20, seed=1), gradient(24, 20, seed=2)])
    expected = np.stack(Engine(model_file, providers=["cpu"]).translate_batch(list(images)))
    for binary in (True, False):
        tensor = triton.InferInput("image", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images, binary_data=binary)
        result = client.infer(
            name, [tensor], outputs=[triton.InferRequestedOutput("translated", binary_data=binary)], request_id="7"
        )
        assert np.array_equal(result.as_numpy("translated"), expected) and result.get_response()["id"] == "7"

    with pytest.raises(InferenceServerException, match="no model named"):
        client.infer("zebra2horse", [tensor])
    wrong = triton.InferInput("image", [1, 20, 24, 3], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 20, 24, 3), np.float32))
    with pytest.raises(InferenceServerException, match="UINT8"):
        client.infer(name, [wrong])
    bad = httpx.post(f"{server.url}/v2/models/{name}/infer", content=b"{not json", timeout=30)
    assert bad.status_code == 400 and "not JSON" in bad.json()["error"]


def test_operations_endpoints_and_the_access_log(server):
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "alive"}
    ready = httpx.get(f"{server.url}/readyz").json()
    assert ready["status"] == "ready" and ready["provider"] == "cpu"
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["name"] == "horse2zebra" and models["card"]["recipe"] == METADATA["recipe"]
    # No int8 model beside this one, so the CPU's choice is float32, and the answer says why.
    assert models["precision"] == "fp32" and models["precision_reason"].startswith(("auto: no int8", "auto: this CPU"))
    post_image(server.url, png_bytes(gradient(16, 16)))
    metrics = httpx.get(f"{server.url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in (
        'transfigure_requests_total{route="/v1/translate",status="200"}',
        "transfigure_request_duration_seconds_bucket",
        "transfigure_batch_size_bucket",
        "transfigure_queue_depth",
        'transfigure_model_info{direction="AtoB",max_batch="8",name="horse2zebra",precision="fp32",'
        'provider="cpu",recipe="test"} 1.0',
    ):
        assert name in metrics.text, name
    lines = [json.loads(line) for line in server.output().splitlines() if line.startswith('{"time"')]
    assert {"method", "path", "route", "status", "ms", "client"} <= set(lines[-1])
    assert any(line["path"] == "/v1/translate" and line["status"] == 200 for line in lines)


def test_schemathesis_finds_no_server_error(server, tmp_path):
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    result = subprocess.run(
        [cli, "run", f"{server.url}/openapi.json", "--checks", "not_a_server_error", "--max-examples", "10"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "", "NO_COLOR": "1"},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_a_full_queue_answers_503_with_retry_after(model_file):
    with Server(model_file, max_batch="1", max_queue="1") as busy:
        data = png_bytes(gradient(256, 256))
        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(lambda _: post_image(busy.url, data), range(12)))
        codes = sorted(r.status_code for r in responses)
        assert set(codes) == {200, 503}, codes
        refused = next(r for r in responses if r.status_code == 503)
        assert refused.headers["retry-after"] == "1" and "busy" in refused.json()["error"]


def test_a_request_past_its_deadline_answers_504_and_the_server_goes_on(model_file):
    with Server(model_file, timeout_s="0.05", providers="cpu") as strict:  # 50 ms: a megapixel takes longer on any CPU
        late = post_image(strict.url, png_bytes(gradient(1024, 1024)))
        assert late.status_code == 504 and "within 0.05 s" in late.json()["error"]
        assert httpx.get(f"{strict.url}/readyz").status_code == 200, "the warm-up has a deadline of its own"


def test_sigterm_during_load_finishes_every_accepted_request_and_exits_0(model_file):
    busy = Server(model_file, max_batch="1")
    data = png_bytes(gradient(256, 256))
    outcomes: list = []

    def client(_):
        try:
            response = post_image(busy.url, data)
            outcomes.append((response.status_code, len(response.content), time.monotonic()))
        except httpx.ConnectError:
            outcomes.append(("refused", 0, time.monotonic()))

    with ThreadPoolExecutor(16) as pool:
        for i in range(16):
            pool.submit(client, i)
        time.sleep(0.3)
        signalled = time.monotonic()
        assert busy.stop() == 0, busy.output()[-3000:]
    answered = [o for o in outcomes if o[0] == 200]
    assert all(o[0] in (200, "refused") for o in outcomes), outcomes
    assert any(t > signalled for _, _, t in answered), "some requests were still running at SIGTERM"
    assert "Traceback" not in busy.output()


def test_bench_serve_reports_both_settings_side_by_side(run_cli):
    args = ["--arch", "resnet_1blocks", "--size", "32", "--clients", "2", "--requests-per-client", "2"]
    result = run_cli("bench", "serve", *args, "--repeats", "1", "--json", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    cells = {(row["clients"], row["max_batch"]): row for row in report["results"]}
    assert set(cells) == {(2, 1), (2, 8)}
    assert all(
        row["requests"] == clients * 2 and row["p99_ms"] >= row["p50_ms"] > 0 for (clients, _), row in cells.items()
    )
    assert cells[(2, 1)]["vs_max_batch_1"] == 1.0 and [row["batch_size"] for row in report["engine"]] == [1, 8]


def test_settings_that_cannot_serve_are_one_line_naming_each_flag(model_file, run_cli):
    result = run_cli("serve", "--model", str(model_file), "--max-queue", "0", "--timeout-s", "0", timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--max-queue must be at least 1; --timeout-s must be more than 0" in result.stderr, result.stderr
