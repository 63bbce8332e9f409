"""The HTTP service as a real process, started with the Dockerfile's CMD: correct images under concurrency, every
limit, the Open Inference Protocol through Triton's own client, operations endpoints, schemathesis against our
OpenAPI, and SIGTERM under load."""

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from conftest import METADATA
from fastapi.testclient import TestClient
from PIL import Image

from tests.corpus import gradient, png_declaring
from tests.serving import Server, container_command, container_env, free_port
from transfigure.pipeline.serve.engine import Engine
from transfigure.pipeline.serve.http import create_app
from transfigure.pipeline.serve.options import InferenceOptions
from transfigure.pipeline.serve.settings import ServeSettings
from transfigure.pipeline.serve.translate import translate_path

# One worker runs the whole module, so its module-scoped fixtures are made once (tests/README.md).
pytestmark = [pytest.mark.xdist_group("test_serve"), pytest.mark.slow]  # servers or processes: minutes

LIMITS = {"max_body_bytes": 300_000, "max_pixels": 200_000}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, tiny_translator) -> Path:
    return tiny_translator(tmp_path_factory.mktemp("model") / "horse2zebra.onnx")


@pytest.fixture(scope="module")
def engine(model_file) -> Engine:
    return Engine(model_file, InferenceOptions(providers=("cpu",)))


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


def test_concurrent_clients_get_what_translate_writes_for_the_same_files(server, engine, tmp_path):
    sizes = [(64, 48)] * 8 + [(40, 36)] * 4  # two sizes in flight at once
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, (width, height) in enumerate(sizes):
        Image.fromarray(gradient(width, height, seed=i)).save(inputs / f"{i:02d}.png")
    translate_path(inputs, tmp_path / "out", engine, progress=False)

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
    expected = Engine(model_file, InferenceOptions(providers=("cpu",), tile=64)).translate(photo)
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


def test_every_limit_is_a_json_error_and_the_server_stays_ready_and_correct(server, engine, tmp_path):
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
        (
            "smaller than the network",
            post_image(server.url, png_bytes(gradient(4, 4))),
            422,
            f"the image is 4x4; this model needs at least {engine.min_side} px on each side",
        ),
        ("empty", post_image(server.url, b""), 422, "empty"),
        (
            "a tensor smaller than the network",
            httpx.post(
                f"{server.url}/v2/models/horse2zebra/infer",
                json={"inputs": [{"name": "image", "shape": [1, 4, 4, 3], "datatype": "UINT8", "data": [0] * 48}]},
                timeout=60,
            ),
            422,
            f"the image is 4x4; this model needs at least {engine.min_side} px",
        ),
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
        assert "Traceback" not in response.text and "node" not in response.text.lower(), (name, response.text)
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    assert np.array_equal(decoded(post_image(server.url, good)), before)


def test_open_inference_protocol_round_trip_with_tritons_client(server, engine):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    name = "horse2zebra"  # the file's stem
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(name)
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata(name)
    assert meta["inputs"][0]["name"] == "image" and meta["outputs"][0]["datatype"] == "UINT8"

    images = np.stack([gradient(24, 20, seed=1), gradient(24, 20, seed=2)])
    expected = np.stack(engine.translate_batch(list(images)))
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
    translated = post_image(server.url, png_bytes(gradient(16, 16)))
    metrics = httpx.get(f"{server.url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in (
        'transfigure_requests_total{route="/v1/translate",status="200"}',
        "transfigure_request_duration_seconds_bucket",
        "transfigure_batch_size_bucket",
        "transfigure_queue_depth",
        "transfigure_queue_wait_seconds_bucket",
        "transfigure_compute_seconds_bucket",
        "transfigure_admitted_bytes",
        "transfigure_memory_budget_bytes",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "python_info",
        'transfigure_model_info{direction="AtoB",max_batch="8",name="horse2zebra",precision="fp32",'
        'provider="cpu",recipe="test"} 1.0',
    ):
        assert name in metrics.text, name
    compute = [line for line in metrics.text.splitlines() if line.startswith("transfigure_compute_seconds_count")]
    assert float(compute[0].split()[-1]) >= 2, "the warm-up and the translation"
    lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "transfigure.access"]
    assert {"time", "method", "path", "route", "status", "ms", "client", "request_id"} <= set(access[-1])
    request_id = translated.headers["x-request-id"]
    assert any(line["path"] == "/v1/translate" and line["request_id"] == request_id for line in access)


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


def test_a_request_past_its_deadline_stops_its_work_and_the_next_request_runs_at_once(model_file):
    with Server(model_file, timeout_s="1", providers="cpu") as strict:
        large = png_bytes(gradient(3072, 3072))  # about 10 s on any CPU, in tiles
        start = time.monotonic()
        late = post_image(strict.url, large)
        answered = time.monotonic()
        small = post_image(strict.url, png_bytes(gradient(32, 32)))
        waited = time.monotonic() - answered
        assert late.status_code == 504 and "within 1 s" in late.json()["error"]
        assert answered - start < 3 and small.status_code == 200
        assert waited < 3, f"the next request waited {waited:.1f} s: the timed-out work went on"
        assert httpx.get(f"{strict.url}/readyz").status_code == 200, "the warm-up has a deadline of its own"


def smooth_photo(width: int, height: int) -> np.ndarray:
    """A large photo-like gradient that PNG packs small (the issue's 36-megapixel photo was 119 KB)."""
    x = np.linspace(0, 255, width).astype(np.uint8)[None, :]
    y = np.linspace(0, 255, height).astype(np.uint8)[:, None]
    return np.stack(np.broadcast_arrays(x, y, (x // 2 + y // 2)), axis=-1)


class PeakRss:
    """The peak resident memory of a process, sampled every 20 ms while the block runs."""

    def __init__(self, pid: int):
        import psutil

        self.process, self.peak, self._done = psutil.Process(pid), 0, threading.Event()

    def __enter__(self) -> "PeakRss":
        def sample() -> None:
            while not self._done.wait(0.02):
                self.peak = max(self.peak, self.process.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


@pytest.mark.slow
def test_a_36_megapixel_photo_with_default_memory_flags_answers_and_four_at_once_stay_under_2_5_gib(tmp_path):
    from transfigure.models.generators import build_generator
    from transfigure.pipeline.export.to_onnx import export_image_generator

    # The cheapest instance-norm translator, so four 36 MP photos take a minute on two cores, not five; the
    # engine sizes its tiles by what this model measures, as it does for any other (docs/BENCHMARKS.md has both).
    model_file = tmp_path / "cheap.onnx"
    export_image_generator(build_generator("resnet_1blocks", ngf=2), model_file, METADATA)
    photo = png_bytes(smooth_photo(6000, 6000))
    assert len(photo) < ServeSettings.max_body_bytes
    # Memory flags at their defaults (budget 1.25 GiB on this machine); the deadline long enough for a loaded CI.
    with Server(model_file, timeout_s="900") as running:
        with PeakRss(running.process.pid) as rss, ThreadPoolExecutor(4) as clients:
            post = lambda _: httpx.post(  # noqa: E731
                f"{running.url}/v1/translate", content=photo, headers={"Content-Type": "image/png"}, timeout=900
            )
            responses = list(clients.map(post, range(4)))
        assert [r.status_code for r in responses] == [200] * 4, [r.text[:200] for r in responses]
        with Image.open(io.BytesIO(responses[0].content)) as translated:
            assert translated.size == (6000, 6000)
        # Each 36 MP request is estimated at the whole budget, so they run one after another; the old engine went
        # past 8 GiB on one of them (docs/BENCHMARKS.md, Serving).
        assert rss.peak < 2.5 * 2**30, f"peak RSS {rss.peak / 2**30:.2f} GiB"
        print(f"peak RSS {rss.peak / 2**30:.2f} GiB")


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


def test_docs_is_a_page_of_our_own_that_loads_nothing_from_elsewhere(server):
    docs = httpx.get(f"{server.url}/docs")
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    assert re.search(r"https?://", docs.text) is None, "no CDN: the page works offline"
    assert 'href="/openapi.json"' in docs.text
    assert "/v1/translate" in docs.text and "/v2/models/{name}/infer" in docs.text and "/readyz" in docs.text
    assert httpx.get(f"{server.url}/redoc").status_code == 404, "ReDoc loads from a CDN too"


def test_urllib_sending_a_30_mb_body_before_reading_gets_our_json_answer(server):
    body = bytes(30 * 2**20)
    cases = [
        ("image/png", body, 413, "exceeds the limit"),  # refused by its Content-Length
        ("image/png", streamed(body), 413, "exceeds the limit"),  # chunked: refused while it is read
        ("image/gif", body, 415, "image/gif"),  # refused before its body is read at all
    ]
    for content_type, data, status, words in cases:
        request = urllib.request.Request(f"{server.url}/v1/translate", data, {"Content-Type": content_type})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert refused.value.code == status and words in json.loads(refused.value.read())["error"]


def test_request_ids_are_echoed_or_made_and_logged_with_the_trace_id(server):
    given = httpx.get(f"{server.url}/healthz", headers={"X-Request-ID": "checkout-7f3a"})
    made = httpx.get(f"{server.url}/healthz")
    odd = httpx.get(f"{server.url}/healthz", headers={"X-Request-ID": 'a "quoted" id'})
    refused = post_image(server.url, b"")
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    traced = httpx.post(
        f"{server.url}/v1/translate",
        content=png_bytes(gradient(16, 16)),
        headers={"Content-Type": "image/png", "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
        timeout=60,
    )
    assert given.headers["x-request-id"] == "checkout-7f3a"
    for response in (made, odd, refused, traced):
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"]), response.headers
    assert len({made.headers["x-request-id"], odd.headers["x-request-id"], traced.headers["x-request-id"]}) == 3
    access = [json.loads(line) for line in server.output().splitlines() if '"transfigure.access"' in line]
    by_id = {line["request_id"]: line for line in access}
    assert by_id[traced.headers["x-request-id"]]["trace_id"] == trace_id
    assert by_id["checkout-7f3a"]["path"] == "/healthz" and "trace_id" not in by_id["checkout-7f3a"]
    assert by_id[refused.headers["x-request-id"]]["status"] == 422


def test_every_line_the_server_writes_on_stderr_is_one_json_object(model_file, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        **container_env(),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MODEL_URI": str(model_file),
        "TRANSFIGURE_HOST": "127.0.0.1",
        "TRANSFIGURE_PORT": str(port),
    }
    stderr = tmp_path / "stderr"
    with open(stderr, "w") as sink:
        process = subprocess.Popen(container_command(), env=env, stdout=subprocess.DEVNULL, stderr=sink)
        try:
            ready = wait_ready(url, lambda: process.poll() is None)
            statuses = [post_image(url, data).status_code for data in (png_bytes(gradient(16, 16)), b"", b"x")]
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
    lines = stderr.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # each line parses, or this fails naming it
    messages = " | ".join(record["message"] for record in records)
    assert ready and statuses == [200, 422, 422] and process.returncode == 0
    assert "Uvicorn running on" in messages and "Application startup complete" in messages, messages
    assert "Shutting down" in messages and sum(r["logger"] == "transfigure.access" for r in records) >= 3


def wait_ready(url: str, running, timeout: float = 60) -> bool:
    """Whether the server at `url` said ready within `timeout` while `running()`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and running():
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    return False


class Uncancellable:
    """The module's engine, except that images of `side` px first take `seconds` deaf to their deadline, as one
    long ONNX Runtime node would (the engine sees its terminate flag only between nodes); and its own budget."""

    def __init__(self, engine: Engine, side: int, seconds: float, memory_budget: int):
        self.engine, self.side, self.seconds, self.memory_budget = engine, side, seconds, memory_budget

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def translate_batch(self, images: list[np.ndarray], deadline: float | None = None) -> list[np.ndarray]:
        if images[0].shape[0] == self.side:
            time.sleep(self.seconds)
        return self.engine.translate_batch(images, deadline)


@contextlib.contextmanager
def in_process(engine, **settings):
    """`create_app` on a real uvicorn in a thread of this process, around an engine the test shapes; its URL."""
    port = free_port()
    app = create_app(engine, ServeSettings("horse2zebra", max_batch=1, **settings))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_ready(url, thread.is_alive), "the in-process server did not start"
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


def test_an_inference_stuck_past_the_timeout_fails_readyz_and_holds_its_memory_until_it_ends(engine):
    budget = engine.memory_needed(96, 96) + engine.memory_needed(64, 64) // 2  # one 96x96 image, not two
    slow = Uncancellable(engine, side=96, seconds=3, memory_budget=budget)
    with in_process(slow, timeout_s=1.5) as url, ThreadPoolExecutor(3) as pool:
        first = pool.submit(post_image, url, png_bytes(gradient(96, 96, seed=1)))
        time.sleep(0.2)
        second = pool.submit(post_image, url, png_bytes(gradient(96, 96, seed=2)))  # no memory before its deadline
        time.sleep(1.8)  # the first had its 504 at 1.5 s; its run goes on until 3 s
        stuck, alive = httpx.get(f"{url}/readyz"), httpx.get(f"{url}/healthz")
        stuck_v2 = httpx.get(f"{url}/v2/health/ready")
        third = pool.submit(post_image, url, png_bytes(gradient(64, 64)))  # admitted once that run has ended
        first, second, third = first.result(), second.result(), third.result()
        ready_again = httpx.get(f"{url}/readyz")
        metrics = httpx.get(f"{url}/metrics").text
    assert first.status_code == 504 and third.status_code == 200, (first.text, third.text)
    assert second.status_code == 503 and second.headers["retry-after"] == "1", second.text
    assert "busy" in second.json()["error"] and "MiB" in second.json()["error"]
    assert stuck.status_code == 503 and "past the timeout of 1.5 s" in stuck.json()["reason"], stuck.text
    assert stuck_v2.status_code == 503 and stuck_v2.json()["ready"] is False
    assert alive.status_code == 200 and ready_again.status_code == 200, ready_again.text
    assert "transfigure_admitted_bytes 0.0" in metrics


def test_healthz_fails_only_once_the_inference_worker_is_gone(engine):
    app = create_app(engine, ServeSettings("horse2zebra", max_batch=1))
    with TestClient(app) as client:
        alive = client.get("/healthz")
        client.portal.call(app.state.inference.batcher.stop)
        dead, dead_v2 = client.get("/healthz"), client.get("/v2/health/live")
    assert alive.status_code == 200 and alive.json() == {"status": "alive"}
    assert dead.status_code == 503 and dead.json() == {"status": "dead", "reason": "the inference worker stopped"}
    assert dead_v2.status_code == 503 and dead_v2.json()["live"] is False
