"""`bench serve`: requests/s and latency of the HTTP service at several client counts, `--max-batch 1` against
`--max-batch N` side by side.

One run exports a generator (random init, or given weights), starts one `transfigure serve` process per
max-batch setting, and drives them from this process with HTTP clients on threads (httpx, one connection per
client), each sending PNG photos as fast as it gets answers. Settings alternate at each client count and the
best of `repeats` counts, so load from other jobs on a shared machine hits both alike. The clients share the
machine with the server, as a sidecar or a gateway on the same node would.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from transfigure.pipeline.bench.inference import METADATA, _machine, _time_engine, _write_photos


def run(
    arch: str = "resnet_9blocks",
    size: int = 128,
    clients: tuple[int, ...] = (1, 8, 32),
    max_batches: tuple[int, ...] = (1, 8),
    requests_per_client: int = 6,
    max_wait_ms: float = 5.0,
    weights: Path | None = None,
    repeats: int = 2,
) -> dict:
    """{"results": [{"clients", "max_batch", "mean_batch" (images per engine run), "requests", "requests_per_second",
    "p50_ms", "p99_ms", "vs_max_batch_1"}], "engine": [images/s of the engine alone by batch size, in this
    process], "arch", "size", "machine", "load_average", "date"}. The engine rows say whether batching can pay
    at all on this machine."""
    import httpx
    import torch

    from transfigure.models.generators import build_generator
    from transfigure.pipeline.export.to_onnx import export_image_generator

    torch.manual_seed(0)
    net = build_generator(arch)
    if weights is not None:
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))

    with tempfile.TemporaryDirectory(prefix="transfigure-bench-serve-") as tmp:
        model = Path(tmp) / "model.onnx"
        export_image_generator(net.eval(), model, METADATA)
        images = _write_photos(Path(tmp) / "photos", 16, size)
        photos = [path.read_bytes() for path in sorted((Path(tmp) / "photos").glob("*.png"))]
        engine = _time_engine(model, "cpu", False, max_batches, images, 1.0)
        logs = {batch: Path(tmp) / f"serve-{batch}.log" for batch in max_batches}
        servers = {batch: _start(model, batch, max_wait_ms, logs[batch]) for batch in max_batches}  # start together
        try:
            for batch, (process, url) in servers.items():
                _wait_ready(httpx, process, url, logs[batch])
            best: dict[tuple[int, int], dict] = {}
            for _ in range(repeats):
                for count in clients:
                    for batch, (_, url) in servers.items():
                        before = _batches(httpx, url)
                        cell = _drive(httpx, url, photos, count, requests_per_client)
                        after = _batches(httpx, url)
                        cell["mean_batch"] = round((after[0] - before[0]) / max(1, after[1] - before[1]), 2)
                        key = (count, batch)
                        if key not in best or cell["requests_per_second"] > best[key]["requests_per_second"]:
                            best[key] = cell
        finally:
            for process, _ in servers.values():
                process.terminate()
            for process, _ in servers.values():
                process.wait(30)
    rows = []
    for (count, batch), cell in sorted(best.items()):
        baseline = best.get((count, min(max_batches)), cell)["requests_per_second"]
        ratio = round(cell["requests_per_second"] / baseline, 3)
        rows.append({"clients": count, "max_batch": batch, **cell, "vs_max_batch_1": ratio})
    return {
        "results": rows,
        "engine": [{"batch_size": r["batch_size"], "images_per_second": r["images_per_second"]} for r in engine],
        "arch": arch,
        "size": size,
        "max_wait_ms": max_wait_ms,
        "machine": _machine(None),
        "load_average": round(os.getloadavg()[0], 2),
        "date": datetime.date.today().isoformat(),
    }


def markdown_table(result: dict) -> str:
    lines = [
        "| clients | max batch | mean batch run | requests/s | p50 ms | p99 ms | vs max batch 1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["results"]:
        lines.append(
            f"| {row['clients']} | {row['max_batch']} | {row['mean_batch']:.1f} | {row['requests_per_second']:.2f} "
            f"| {row['p50_ms']:.0f} "
            f"| {row['p99_ms']:.0f} | {row['vs_max_batch_1']:.2f}x |"
        )
    engine = ", ".join(f"batch {r['batch_size']}: {r['images_per_second']:.2f}" for r in result["engine"])
    return "\n".join([*lines, "", f"engine alone, images/s: {engine}"])


def _start(model: Path, max_batch: int, max_wait_ms: float, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = ["transfigure", "serve", "--model", str(model), "--port", str(port), "--max-batch", str(max_batch)]
    command += ["--max-wait-ms", str(max_wait_ms), "--max-queue", "256"]
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT), f"http://127.0.0.1:{port}"


def _wait_ready(httpx, process: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"`{' '.join(process.args)}` did not become ready:\n{log.read_text()[-2000:]}")


def _batches(httpx, url: str) -> tuple[float, float]:
    """(images, engine runs) so far, from the server's transfigure_batch_size histogram."""
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(("transfigure_batch_size_sum", "transfigure_batch_size_count")):
            name, value = line.split()
            values[name] = float(value)
    return values["transfigure_batch_size_sum"], values["transfigure_batch_size_count"]


def _drive(httpx, url: str, photos: list[bytes], clients: int, per_client: int) -> dict:
    """`clients` threads each send `per_client` requests back to back; latencies and the overall rate."""
    latencies: list[float] = []
    lock = threading.Lock()
    start_line = threading.Barrier(clients + 1)

    def client(index: int) -> None:
        with httpx.Client(timeout=300, headers={"Content-Type": "image/png"}) as session:
            session.post(f"{url}/v1/translate", content=photos[index % len(photos)]).raise_for_status()  # connect
            start_line.wait()
            for i in range(per_client):
                sent = time.perf_counter()
                session.post(f"{url}/v1/translate", content=photos[(index + i) % len(photos)]).raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - sent)

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, i) for i in range(clients)]
        start_line.wait()
        began = time.perf_counter()
        for future in futures:
            future.result()
        seconds = time.perf_counter() - began
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "seconds": round(seconds, 3),
        "requests_per_second": round(len(latencies) / seconds, 3),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
    }
