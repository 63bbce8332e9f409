from pathlib import Path

import pytest
import yaml

from transfigure.pipeline.params import ParamsError, load_params, params_hash, training_params
from transfigure.pipeline.train import recipes

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, data: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def repo_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_the_repository_params_are_valid_and_name_every_recipe():
    params, raw = load_params(REPO / "params.yaml"), repo_params()
    for recipe in recipes.names():
        section = params.recipe(recipe)
        assert section.dataset in params.data.datasets
        # Each recipe's section is written out in params.yaml, and the schema reads what the file says.
        for key in ("steps", "batch_size", "objective", "checkpoint_every", "sample_every"):
            assert getattr(section, key) == raw[recipe][key]


@pytest.mark.parametrize(
    ("edit", "key", "words"),
    [
        (lambda p: p["cyclegan"].update(stepz=3), "cyclegan.stepz", "unknown key"),
        (lambda p: p["cyclegan"].update(steps="many"), "cyclegan.steps", "integer"),
        (lambda p: p["cyclegan"].update(batch_size=0), "cyclegan.batch_size", "greater than 0"),
        (lambda p: p["pix2pix"].update(objective="wgan-xx"), "pix2pix.objective", "wgan-gp"),
        (lambda p: p["cyclegan"]["generator"].update(arch="resnet_big"), "cyclegan.generator.arch", "unknown"),
        (lambda p: p["data"]["datasets"]["digits"].update(size=30), "data.datasets.digits.size", "multiple of 4"),
        (lambda p: p["cdcgan"].update(dataset="nope"), "cdcgan.dataset", "no dataset 'nope'"),
        (lambda p: p.update(extra={}), "extra", "unknown key"),
        (lambda p: p.update(recipes=["cyclegan", "cyclegam"]), "recipes", "no recipe 'cyclegam'"),
    ],
)
def test_a_bad_param_stops_with_one_line_naming_the_key(tmp_path, edit, key, words):
    data = repo_params()
    edit(data)
    with pytest.raises(ParamsError) as error:
        load_params(write(tmp_path, data))
    message = str(error.value)
    assert "\n" not in message
    assert f": {key}: " in message or f"{key}:" in message
    assert words in message


def test_overrides_are_typed_and_checked_like_the_file(tmp_path):
    path = write(tmp_path, repo_params())
    params = load_params(
        path, ["cyclegan.steps=7", "cyclegan.lr=1e-3", "cyclegan.betas=[0.0, 0.9]", "cyclegan.generator.ngf=8"]
    )
    assert (params.cyclegan.steps, params.cyclegan.lr, params.cyclegan.betas) == (7, 1e-3, (0.0, 0.9))
    assert params.cyclegan.generator.ngf == 8
    # What `dvc exp run -S 'recipes=[cyclegan,cut]'` writes into params.yaml.
    assert load_params(path, ["recipes=[cyclegan,cut]"]).recipes == ["cyclegan", "cut"]
    with pytest.raises(ParamsError, match="cyclegan.steps"):
        load_params(path, ["cyclegan.steps=-1"])
    with pytest.raises(ParamsError, match="expected section.key=value"):
        load_params(path, ["cyclegan.steps"])


def test_missing_or_broken_file_is_a_clear_error(tmp_path):
    with pytest.raises(ParamsError, match="no such file"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("seed: 0\ndata:\n  root: [unclosed\n  x: 1\n")
    with pytest.raises(ParamsError, match=r"bad\.yaml:4:\d+: not valid YAML"):
        load_params(tmp_path / "bad.yaml")


def test_a_wrong_override_is_named_as_the_override_not_as_the_file(tmp_path):
    path = write(tmp_path, repo_params())
    with pytest.raises(ParamsError, match=r"^--set cyclegan\.steps=abc: cyclegan\.steps: "):
        load_params(path, ["cyclegan.steps=abc"])
    with pytest.raises(ParamsError, match=r"^--set cyclegan\.generator=3: cyclegan\.generator"):
        load_params(path, ["cyclegan.generator=3"])
    broken = repo_params()
    broken["cyclegan"]["steps"] = "many"
    with pytest.raises(ParamsError, match=r"params\.yaml: cyclegan\.steps"):
        load_params(write(tmp_path, broken), ["cyclegan.lr=1e-3"])


def test_threads_is_auto_or_a_positive_count(tmp_path):
    path = write(tmp_path, repo_params())
    assert load_params(path).threads == "auto" and load_params(path, ["threads=1"]).threads == 1
    with pytest.raises(ParamsError, match="threads"):
        load_params(path, ["threads=many"])


def test_training_hash_ignores_logging_knobs_but_not_what_is_learned(tmp_path):
    path = write(tmp_path, repo_params())
    base = params_hash(training_params(load_params(path), "cyclegan"))
    assert base == params_hash(training_params(load_params(path, ["cyclegan.log_every=7"]), "cyclegan"))
    assert base != params_hash(training_params(load_params(path, ["cyclegan.lambda_A=3"]), "cyclegan"))
    assert base != params_hash(training_params(load_params(path, ["seed=1"]), "cyclegan"))


def test_cli_reports_a_bad_override_without_traceback(run_cli):
    result = run_cli("train", "cyclegan", "--params", str(REPO / "params.yaml"), "--set", "cyclegan.steps=abc")
    assert result.returncode == 2
    assert "cyclegan.steps" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_flowgan_accepts_the_mle_objective_as_pure_maximum_likelihood(tmp_path):
    params = load_params(write(tmp_path, repo_params()), ["flowgan.objective=mle"])
    assert params.flowgan.mle_only is True
    with pytest.raises(ParamsError, match="cyclegan.objective"):
        load_params(write(tmp_path, repo_params()), ["cyclegan.objective=mle"])
