"""Peak memory and seconds of `transfigure translate` and `transfigure serve` against image size (issue #33).

    python benchmarks/serving_memory.py [--sizes 1,4,16,36] [--models digits,resnet9] [--tools translate,serve]
        [--code DIR] [--cap-gib 8] [--timeout-s 300] [--json FILE] [--markdown FILE] [--work DIR]

For each model, size (megapixels of a square PNG photo-like image: smooth gradients plus noise) and tool, one
fresh process of the checkout at --code (default: this repository) runs with default flags:
- translate: `transfigure translate IMAGE OUT.png --model M`; seconds are the whole process's wall time.
- serve: `transfigure serve --model M --timeout-s 600 --max-body-bytes 2**30` on a free port, one POST
  /v1/translate of the PNG once /readyz answers; seconds are the request's. The two flags are the only ones
  changed: the default 30 s deadline and 20 MB body limit would refuse the large images before any work.
Peak RSS is the larger of the process tree's RSS sampled every 20 ms and the kernel's ru_maxrss of the main
process (os.wait4). A process past --cap-gib is killed (row: "killed past N GiB") and so is one running past
--timeout-s (row: "timed out after N s"), with the peak and seconds until then.

The models are made by the code under test, without training: `digits` is params.yaml's cyclegan generator
(arch, ngf, norm) exported with export_image_generator and a cyclegan model card (no int8 companion: that needs
the prepared digits, and `--precision auto` only takes int8 on CPUs with VNNI/AMX); `resnet9` is a random
resnet_9blocks (ngf 64, instance norm) saved in the reference layout and converted by `transfigure
import-checkpoint`. Both come with their tiling companions. Weights are random: time and memory do not depend on
them. Rows are written to --json and --markdown as they come, so partial results survive.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SAMPLE_S = 0.02
SERVE_FLAGS = ["--timeout-s", "600", "--max-body-bytes", str(2**30)]
# `transfigure` itself is the editable install of this repository; pipeline/cli.py has no __main__, so another
# checkout's CLI is started like the console script would, with that checkout first on sys.path.
CLI = "import sys; from transfigure.pipeline.cli import app; sys.argv[0] = 'transfigure'; app()"
WHICH_CODE = "import transfigure.models as m, transfigure.pipeline as p; print(p.__file__); print(m.__file__)"

MAKE_DIGITS = """
import sys, torch, yaml
from transfigure.models.generators import build_generator
from transfigure.pipeline.export.to_onnx import export_image_generator
g = yaml.safe_load(open("params.yaml"))["cyclegan"]["generator"]
torch.manual_seed(0)
net = build_generator(g["arch"], 3, 3, g["ngf"], g["norm"])
card = {"recipe": "cyclegan", "direction": "AtoB", "source_domain": "digits:A", "target_domain": "digits:B",
        "training_commit": "benchmark", "params_hash": "benchmark", "training_step": "0"}
export_image_generator(net, sys.argv[1], card)
print(f"{g['arch']} ngf {g['ngf']} {g['norm']}")
"""
SAVE_RESNET9 = """
import sys, torch
from transfigure.models.generators import build_generator
torch.manual_seed(0)
torch.save(build_generator("resnet_9blocks", 3, 3, 64, "instance").state_dict(), sys.argv[1])
"""


def code_env(code: Path) -> dict:
    """The environment that makes a child Python import `transfigure.pipeline` and `transfigure.models` from
    `code`: a folder whose `transfigure/` links to the checkout's folders, as the installed package maps them."""
    site = Path(tempfile.gettempdir()) / "serving_memory_site" / code.as_posix().strip("/").replace("/", "_")
    for name in ("models", "pipeline"):
        link = site / "transfigure" / name
        if not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(code / name, target_is_directory=True)
    return {**os.environ, "PYTHONPATH": str(site), "PYTHONUNBUFFERED": "1"}


def python(code: Path, *args: str, timeout: float = 600) -> str:
    """Run `python -c ...` in the checkout `code`; its stdout, or RuntimeError with its stderr's end."""
    done = subprocess.run(
        [sys.executable, "-c", *args], cwd=code, env=code_env(code), capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return done.stdout


def photo(megapixels: float, folder: Path) -> Path:
    """A square photo-like PNG (its side a multiple of 4): smooth colour gradients plus sensor-like noise, so it
    compresses like a photograph (~1-2 bytes a pixel), not like a flat image. Cached by size."""
    side = int(round((megapixels * 1e6) ** 0.5 / 4)) * 4
    path = folder / f"photo_{side}.png"
    if path.exists():
        return path
    rng = np.random.default_rng(0)
    image = np.empty((side, side, 3), np.uint8)
    x = np.linspace(0, 1, side, dtype=np.float32)
    for top in range(0, side, 512):  # in bands, so float32 temporaries stay small at 36 MP
        y = np.linspace(top / side, min(top + 512, side) / side, min(512, side - top), dtype=np.float32)[:, None]
        for c, (fx, fy, phase) in enumerate(((1.5, 0.7, 0.0), (0.8, 1.9, 1.0), (2.3, 1.1, 2.0))):
            smooth = 128 + 70 * np.sin(2 * np.pi * (fx * x + fy * y) + phase) + 40 * (x - y)
            noise = rng.normal(0, 4, smooth.shape).astype(np.float32)
            image[top : top + len(y), :, c] = np.clip(smooth + noise, 0, 255)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def make_models(code: Path, names: list[str], folder: Path) -> dict[str, Path]:
    """The ONNX models named (digits, resnet9), made by that checkout's own code. Made afresh on every call (about
    a minute): the export may change between two runs of the same checkout, and the engine loads what it wrote."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names:
        path = folder / f"{name}.onnx"
        if name == "digits":
            print(f"made digits: {python(code, MAKE_DIGITS, str(path)).strip()}", file=sys.stderr)
        elif name == "resnet9":
            pth = folder / "resnet9_random.pth"
            python(code, SAVE_RESNET9, str(pth))
            python(code, CLI, "import-checkpoint", str(pth), "--arch", "resnet_9blocks", "--out", str(path))
        else:
            raise SystemExit(f"--models: unknown model {name!r} (digits, resnet9)")
        paths[name] = path
    return paths


class Watch:
    """Samples the RSS of a process and its children every 20 ms; kills the group past `cap` bytes or after
    `timeout` seconds of the watched stretch. `peak` is the largest sample, `status` None while all is well."""

    def __init__(self, process: subprocess.Popen, cap: int, cap_text: str):
        self.process, self.cap, self.cap_text = process, cap, cap_text
        self.peak, self.status, self.returned = 0, None, None
        self.root = psutil.Process(process.pid)

    def rss(self) -> int:
        total = 0
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass  # it ended between the listing and the read
        return total

    def poll(self) -> bool:
        """One sample; False once the process has ended. Reaps it with wait4 to keep the kernel's ru_maxrss."""
        pid, status, usage = os.wait4(self.process.pid, os.WNOHANG)
        if pid:
            self.returned = (os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024)
            self.process.returncode = self.returned[0]
            return False
        try:
            self.peak = max(self.peak, self.rss())
        except psutil.NoSuchProcess:
            pass
        if self.peak > self.cap and self.status is None:
            self.status = f"killed past {self.cap_text}"
            self.kill()
        return True

    def until(self, done, timeout: float) -> float:
        """Sample until `done()` or the process ends or `timeout` seconds pass (then kill); the seconds."""
        start = time.perf_counter()
        while not done() and self.poll():
            if time.perf_counter() - start > timeout and self.status is None:
                self.status = f"timed out after {timeout:g} s"
                self.kill()
            time.sleep(SAMPLE_S)
        return time.perf_counter() - start

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def finish(self, grace: float = 30) -> tuple[int, int]:
        """Stop the process (SIGTERM, then SIGKILL after `grace` s); (exit code, kernel's peak RSS in bytes)."""
        if self.returned is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.perf_counter() + grace
            while self.poll():
                if time.perf_counter() > deadline:
                    self.kill()
                time.sleep(SAMPLE_S)
        return self.returned


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:160] if lines else ""


def measure_translate(code: Path, model: Path, image: Path, work: Path, cap: int, cap_text: str, timeout: float):
    """One `transfigure translate IMAGE OUT --model M` process: (peak bytes, seconds, status, detail)."""
    out = work / "translated.png"
    out.unlink(missing_ok=True)
    log = work / "translate.log"
    with open(log, "w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-c", CLI, "translate", str(image), str(out), "--model", str(model)],
            cwd=code,
            env=code_env(code),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group, so a kill takes its children too
        )
        watch = Watch(process, cap, cap_text)
        seconds = watch.until(lambda: False, timeout)
        code_, kernel_peak = watch.finish()
    out.unlink(missing_ok=True)
    text = log.read_text(errors="replace")
    status = watch.status or ("ok" if code_ == 0 else f"exit {code_}: {last_line(text)}")
    return max(watch.peak, kernel_peak), seconds, status, last_line(text)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def measure_serve(code: Path, model: Path, image: Path, work: Path, cap: int, cap_text: str, timeout: float):
    """One `transfigure serve` process, one POST /v1/translate of `image` once it is ready: (peak bytes during
    the request, the request's seconds, status, detail with the RSS when ready)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = work / "serve.log"
    with open(log, "w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-c", CLI, "serve", "--model", str(model), "--port", str(port), *SERVE_FLAGS],
            cwd=code,
            env=code_env(code),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        watch = Watch(process, cap, cap_text)
        watch.until(lambda: get(f"{base}/readyz") == 200, 180)
        if watch.status or process.returncode is not None or get(f"{base}/readyz") != 200:
            watch.finish()
            return watch.peak, 0.0, f"server not ready: {watch.status or last_line(log.read_text())}", ""
        ready_rss = watch.rss()
        watch.peak = 0  # from here on: the request's peak
        answer: dict = {}

        def post() -> None:
            request = urllib.request.Request(
                f"{base}/v1/translate", data=image.read_bytes(), headers={"Content-Type": "image/png"}
            )
            try:
                with urllib.request.urlopen(request, timeout=900) as response:
                    answer.update(status=response.status, size=len(response.read()))
            except urllib.error.HTTPError as exc:
                answer.update(status=exc.code, text=exc.read().decode(errors="replace")[:160])
            except OSError as exc:
                answer.update(status=None, text=f"{type(exc).__name__}: {exc}"[:160])

        client = threading.Thread(target=post, daemon=True)
        client.start()
        seconds = watch.until(lambda: not client.is_alive(), timeout)
        died = process.returncode  # set by the watch when the server ended by itself
        exit_code, kernel_peak = watch.finish()  # the kernel's peak spans the warm-up too: a 64 px image
        client.join(10)
    detail = f"RSS when ready {ready_rss / 2**20:.0f} MiB"
    if watch.status:
        status = watch.status
    elif died is not None:
        status = f"server died (exit {exit_code}) during the request: {last_line(log.read_text(errors='replace'))}"
    elif answer.get("status") == 200:
        status = "ok"
    else:
        status = f"HTTP {answer.get('status')}: {answer.get('text', '')}"
    return max(watch.peak, kernel_peak), seconds, status, detail


def machine() -> dict:
    """The CPU model and cores, memory, the date: numbers mean little without them."""
    name = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return {
        "cpu": name,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def code_commit(code: Path) -> str:
    done = subprocess.run(["git", "-C", str(code), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"Code: {report['code']} ({report['commit']}); {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; "
        f"{m['date']}. Cap {report['cap_gib']:g} GiB, {report['timeout_s']:g} s a run; "
        f"serve with {' '.join(report['serve_flags'])}.",
        "",
        "| model | MP | tool | peak RSS MiB | seconds | status |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['model']} | {r['mp']:g} | {r['tool']} | {r['peak_mib']} | {r['seconds']} | {r['status']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,4,16,36", help="megapixels, comma-separated")
    parser.add_argument("--models", default="digits,resnet9")
    parser.add_argument("--tools", default="translate,serve")
    parser.add_argument("--code", type=Path, default=REPO, help="the checkout whose code runs")
    parser.add_argument("--cap-gib", type=float, default=8.0)
    parser.add_argument("--timeout-s", type=float, default=300.0, help="per run: the process, or serve's request")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/serving_memory"), help="images, models, outputs")
    args = parser.parse_args()

    code = args.code.resolve()
    which = python(code, WHICH_CODE).split()
    if not all(Path(path).resolve().is_relative_to(code) for path in which):
        raise SystemExit(f"--code {code}: the children import {which}, not that checkout")
    cap, cap_text = int(args.cap_gib * 2**30), f"{args.cap_gib:g} GiB"
    work = args.work / code.as_posix().strip("/").replace("/", "_")
    models = make_models(code, args.models.split(","), work / "models")
    report = {
        "code": str(code),
        "commit": code_commit(code),
        "imports": which,
        "machine": machine(),
        "cap_gib": args.cap_gib,
        "timeout_s": args.timeout_s,
        "serve_flags": SERVE_FLAGS,
        "rows": [],
    }
    measure = {"translate": measure_translate, "serve": measure_serve}
    print(markdown(report), end="", flush=True)
    for name, model in models.items():
        for mp in (float(size) for size in args.sizes.split(",")):
            image = photo(mp, args.work / "images")
            for tool in args.tools.split(","):
                load = os.getloadavg()[0]  # other work on the machine skews seconds (and `--threads auto`)
                peak, seconds, status, detail = measure[tool](code, model, image, work, cap, cap_text, args.timeout_s)
                row = {
                    "model": name,
                    "mp": mp,
                    "side": Image.open(image).width,
                    "png_mib": round(image.stat().st_size / 2**20, 1),
                    "tool": tool,
                    "peak_mib": round(peak / 2**20),
                    "seconds": round(seconds, 1),
                    "status": status,
                    "detail": detail,
                    "load_before": round(load, 2),
                }
                report["rows"].append(row)
                print(markdown({**report, "rows": [row]}).splitlines()[-1], flush=True)
                if args.json:
                    args.json.write_text(json.dumps(report, indent=1) + "\n")
                if args.markdown:
                    args.markdown.write_text(markdown(report))


if __name__ == "__main__":
    main()
