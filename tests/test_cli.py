import subprocess
import sys

import pytest

COMMANDS = [
    ["prepare"],
    ["train"],
    ["evaluate"],
    ["export"],
    ["translate"],
    ["import-checkpoint"],
    ["sample"],
    ["doctor"],
    ["bench", "train"],
    ["bench", "inference"],
    ["bench", "objectives"],
]


def test_help_does_not_import_the_heavy_libraries():
    code = (
        "import sys; from typer.testing import CliRunner; from transfigure.pipeline.cli import app; "
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
        "heavy = [m for m in ('torch', 'mlflow', 'onnxruntime', 'dvc') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(run_cli, command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0
    assert "Usage" in result.stdout


def test_doctor_lists_the_cpu_provider_as_loading(run_cli):
    from importlib import metadata

    result = run_cli("doctor")
    assert result.returncode == 0, result.stderr
    assert "CPUExecutionProvider: ok" in result.stdout
    assert "\x1b[" not in result.stdout, "plain text, also for ONNX Runtime's coloured errors"
    installed = [d for d in ("onnxruntime-gpu", "onnxruntime") if _installed(metadata, d)]
    assert f"onnxruntime: {metadata.version(installed[0])} ({installed[0]})" in result.stdout
    assert "threads auto: " in result.stdout and "available to this process" in result.stdout


def _installed(metadata, distribution: str) -> bool:
    try:
        metadata.version(distribution)
        return True
    except metadata.PackageNotFoundError:
        return False


def test_translate_and_export_fp16_flags_have_distinct_names():
    from typer.testing import CliRunner

    from transfigure.pipeline.cli import app

    translate_help = CliRunner().invoke(app, ["translate", "--help"], env={"COLUMNS": "200"}).output
    export_help = CliRunner().invoke(app, ["export", "--help"], env={"COLUMNS": "200"}).output
    assert "--tensorrt-fp16" in translate_help and "--fp16 " not in translate_help
    assert "--fp16" in export_help
