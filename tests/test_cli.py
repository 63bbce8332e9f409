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
        "import sys; from typer.testing import CliRunner; from pipeline.cli import app; "
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
    result = run_cli("doctor")
    assert result.returncode == 0, result.stderr
    assert "CPUExecutionProvider: ok" in result.stdout
