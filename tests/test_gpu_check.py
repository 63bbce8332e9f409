"""The GPU check kit (benchmarks/gpu_check.sh) run end to end with --dry-run on the CPU, and the wheels it carries to
the device machine (benchmarks/gpu_wheels.sh; nothing here downloads)."""

import importlib.metadata
import json
import math
import os
import re
import subprocess

import pytest
from conftest import BIN, REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from transfigure.pipeline.train import recipes

# The module's tests share one dry run (about a minute and a half on two cores): one worker runs them all.
pytestmark = pytest.mark.xdist_group("test_gpu_check")

# What the issue asks the kit to measure, written out here so that a measurement missing from its plan fails.
RESIDENT = "fp32 one resident batch"  # the same steps without the data pipeline: the gap is data stall
TRAIN = [
    f"{recipe} b{batch} {variant}"
    for recipe in ("cyclegan", "pix2pix")
    for batch in (1, 4)
    for variant in ("fp32", "bf16 channels-last", "bf16 channels-last compiled", RESIDENT)
] + [
    f"{recipe} b{batch} {variant}"
    for recipe in ("cut", "fastcut")  # at the reference size beside cyclegan
    for batch in (1, 4)
    for variant in ("fp32", "bf16 channels-last", RESIDENT)
]
RECIPE_VARIANTS = ("fp32", RESIDENT, "auto", "fp16", "wgan-gp auto")
INFERENCE = [
    f"b{batch} {variant}"
    for batch in (1, 8, 32)
    for variant in (
        "eager fp32",
        "eager bf16 channels-last",
        "eager fp16 channels-last",
        "bf16 channels-last CUDA graph",
        "compiled bf16 channels-last",
        "compiled bf16 channels-last CUDA graphs",
    )
]
# The project's dependencies that the device machine's python3 already holds (the `device` tool's KINDS.md).
ON_DEVICE = {
    "torch",
    "torchvision",
    "opencv-python-headless",
    "matplotlib",
    "onnx",
    "onnxscript",
    "typer",
    "pillow",
    "numpy",
    "pyyaml",
    "scikit-learn",
    "scikit-image",
    "scipy",
    "torchmetrics",
    "rich",
}
WHEELS_SCRIPT = REPO / "benchmarks" / "gpu_wheels.sh"


@pytest.fixture(scope="session")  # session: the slow-first ordering splits this module
def dry_run(tmp_path_factory) -> tuple[str, dict, str]:
    """stdout, the JSON report and the Markdown table of one `gpu_check.sh --dry-run`, with the venv first on PATH."""
    out = tmp_path_factory.mktemp("gpu_check")
    env = {key: value for key, value in os.environ.items() if key != "PYTHON"}
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", OUT=str(out))
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def rows_of(report: dict) -> dict[tuple[str, str], dict]:
    return {(row["group"], row["name"]): row for row in report["results"]}


@pytest.mark.slow
def test_dry_run_measures_every_planned_step_against_its_baseline(dry_run):
    _, report, _ = dry_run
    rows = rows_of(report)
    expected = (
        {("train", name) for name in TRAIN}
        | {("recipes", f"{recipe} {variant}") for recipe in recipes.names() for variant in RECIPE_VARIANTS}
        | {("inference", name) for name in INFERENCE}
    )
    assert set(rows) == expected
    assert report["dry_run"] is True and report["device"] == "cpu"
    for key, row in rows.items():
        assert row["status"] == "ok", (key, row.get("error"))
        assert math.isfinite(row["images_per_second"]) and row["images_per_second"] > 0, key
        assert math.isfinite(row["vs_baseline"]) and row["vs_baseline"] > 0, key
        if row["name"] == row["baseline"]:
            assert row["vs_baseline"] == 1.0, key
        if key[0] != "inference":
            assert row["resident_batch"] == row["name"].endswith(RESIDENT), key
            assert 0 <= row["data_wait_fraction"] < 1 and (row["data_wait_fraction"] == 0 or not row["resident_batch"])


@pytest.mark.slow
def test_dry_run_trains_the_asked_networks_and_every_recipe_with_finite_losses(dry_run):
    _, report, _ = dry_run
    for (group, name), row in rows_of(report).items():
        if group == "inference":
            continue
        assert row["losses_finite"] is True, name
        assert row["losses"] and all(math.isfinite(value) for value in row["losses"].values()), name
        # The CPU runs everything in fp32; on the device the same rows say bf16 and fp16.
        assert row["precision"] == "fp32" and row["device"].startswith("cpu"), name
        if group == "train":
            assert row["size"] == 32 and row["batch_size"] == int(name.split()[1][1:]), name
            assert row["compile"] == name.endswith("compiled"), name
    recipe_rows = [name for group, name in rows_of(report) if group == "recipes"]
    assert {name.split()[0] for name in recipe_rows} == set(recipes.names())


@pytest.mark.slow
def test_dry_run_inference_variants_compute_the_eager_fp32_function(dry_run):
    _, report, _ = dry_run
    for (group, name), row in rows_of(report).items():
        if group != "inference":
            continue
        assert row["batch_size"] == int(name.split()[0][1:]) and row["images"] >= row["batch_size"], name
        assert row["compile"] == (name.split()[1] == "compiled"), name
        # All fp32 on the CPU: compiled and graph variants must give the eager output itself.
        assert row["max_abs_error"] < 1e-5, (name, row["max_abs_error"])


@pytest.mark.slow
def test_dry_run_prints_the_table_last(dry_run):
    stdout, report, markdown = dry_run
    lines = stdout.rstrip("\n").splitlines()
    table = lines[-(len(report["results"]) + 2) :]
    assert table[0] == "| group | measurement | status | images/s | vs baseline | peak MiB | check |"
    assert table[1] == "|---|---|---|---|---|---|---|"
    for line, row in zip(table[2:], report["results"], strict=True):
        assert line.startswith(f"| {row['group']} | {row['name']} | ok | {row['images_per_second']:.1f} | "), line
    assert markdown == "\n".join(table) + "\n"


def wheel_list() -> dict[str, str]:
    """gpu_wheels.sh --list: canonical name -> pinned version."""
    listed = subprocess.run(["bash", str(WHEELS_SCRIPT), "--list"], capture_output=True, text=True, check=True)
    pins = [line.split("==") for line in listed.stdout.split()]
    assert pins and all(len(pin) == 2 for pin in pins), listed.stdout
    return {canonicalize_name(name): version for name, version in pins}


def needs(distribution: str) -> set[str]:
    """What an installed distribution requires on the device's Python 3.12 (extras left out)."""
    found = set()
    for line in importlib.metadata.requires(distribution) or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"python_version": "3.12", "extra": ""}):
            found.add(canonicalize_name(requirement.name))
    return found


def test_wheel_list_holds_its_own_needs_and_meets_the_project_requirements():
    pins = wheel_list()
    for name in pins:
        assert needs(name) <= set(pins) | ON_DEVICE, (name, needs(name) - set(pins) - ON_DEVICE)
    project = [Requirement(line) for line in importlib.metadata.requires("transfigure")]
    for requirement in project:
        if canonicalize_name(requirement.name) in pins:
            assert requirement.specifier.contains(pins[canonicalize_name(requirement.name)]), requirement


@pytest.mark.slow
def test_the_kit_imports_only_what_the_device_has_or_the_wheels_carry(dry_run):
    _, report, _ = dry_run
    imported = {canonicalize_name(name) for name in report["distributions"]}
    pins = wheel_list()
    project = {canonicalize_name(Requirement(line).name) for line in importlib.metadata.requires("transfigure")}
    assert imported & (project - ON_DEVICE) <= set(pins)
    # Minimal: every carried wheel is imported by the run.
    assert set(pins) <= imported


def test_wheel_total_is_documented_and_small():
    documented = re.search(r"^documented_mib=([\d.]+)", WHEELS_SCRIPT.read_text(), re.M)
    assert documented, "gpu_wheels.sh documents its total as documented_mib=N"
    # Well under what one device call carries (64 MiB), which the working tree shares.
    assert 0 < float(documented.group(1)) <= 16


def test_fetched_wheels_are_the_list_at_the_documented_total():
    folder = REPO / ".whl"
    if not folder.is_dir():
        pytest.skip("no .whl/ here: benchmarks/gpu_wheels.sh fetches it")
    files = sorted(folder.glob("*.whl"))
    fetched = {canonicalize_name(path.name.split("-")[0]): path.name.split("-")[1] for path in files}
    assert len(files) == len(fetched) and fetched == wheel_list()
    documented = float(re.search(r"^documented_mib=([\d.]+)", WHEELS_SCRIPT.read_text(), re.M).group(1))
    assert abs(sum(path.stat().st_size for path in files) / 2**20 - documented) < 0.5
