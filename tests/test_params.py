import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from transfigure.pipeline.params import ParamsError, load_params, params_hash, recipe_names, training_params
from transfigure.pipeline.train import recipes

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, data: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def repo_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def load_checked(path: Path, overrides: list[str] | None = None):
    """Params with every recipe's section checked, as each is when its recipe is used."""
    params = load_params(path, overrides)
    for recipe in recipes.names():
        recipes.params_of(params, recipe)
    return params


def test_the_repository_params_are_valid_and_name_every_recipe():
    params, raw = load_params(REPO / "params.yaml"), repo_params()
    for recipe in recipes.names():
        section = recipes.params_of(params, recipe)
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
        load_checked(write(tmp_path, data))
    message = str(error.value)
    assert "\n" not in message
    assert f": {key}: " in message or f"{key}:" in message
    assert words in message


def test_overrides_are_typed_and_checked_like_the_file(tmp_path):
    path = write(tmp_path, repo_params())
    params = load_params(
        path, ["cyclegan.steps=7", "cyclegan.lr=1e-3", "cyclegan.betas=[0.0, 0.9]", "cyclegan.generator.ngf=8"]
    )
    cyclegan = recipes.params_of(params, "cyclegan")
    assert (cyclegan.steps, cyclegan.lr, cyclegan.betas, cyclegan.generator.ngf) == (7, 1e-3, (0.0, 0.9), 8)
    # What `dvc exp run -S 'recipes=[cyclegan,cut]'` writes into params.yaml.
    assert load_params(path, ["recipes=[cyclegan,cut]"]).recipes == ["cyclegan", "cut"]
    with pytest.raises(ParamsError, match="cyclegan.steps"):
        load_checked(path, ["cyclegan.steps=-1"])
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
        load_checked(path, ["cyclegan.steps=abc"])
    with pytest.raises(ParamsError, match=r"^--set cyclegan\.generator=3: cyclegan\.generator"):
        load_checked(path, ["cyclegan.generator=3"])
    with pytest.raises(ParamsError, match=r"^--set cdcgan\.dataset=nope: cdcgan\.dataset: no dataset 'nope'"):
        load_checked(path, ["cdcgan.dataset=nope"])
    broken = repo_params()
    broken["cyclegan"]["steps"] = "many"
    with pytest.raises(ParamsError, match=r"params\.yaml: cyclegan\.steps"):
        load_checked(write(tmp_path, broken), ["cyclegan.lr=1e-3"])


def test_threads_is_auto_or_a_positive_count(tmp_path):
    path = write(tmp_path, repo_params())
    assert load_params(path).threads == "auto" and load_params(path, ["threads=1"]).threads == 1
    with pytest.raises(ParamsError, match="threads"):
        load_params(path, ["threads=many"])


def test_training_hash_ignores_logging_knobs_but_not_what_is_learned(tmp_path):
    path = write(tmp_path, repo_params())

    def trained_hash(overrides):
        params = load_params(path, overrides)
        return params_hash(training_params(params, "cyclegan", recipes.params_of(params, "cyclegan")))

    base = trained_hash([])
    assert base == trained_hash(["cyclegan.log_every=7"])
    assert base != trained_hash(["cyclegan.lambda_A=3"]) and base != trained_hash(["seed=1"])


def test_cli_reports_a_bad_override_without_traceback(run_cli):
    result = run_cli("train", "cyclegan", "--params", str(REPO / "params.yaml"), "--set", "cyclegan.steps=abc")
    assert result.returncode == 2
    assert "cyclegan.steps" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_flowgan_accepts_the_mle_objective_as_pure_maximum_likelihood(tmp_path):
    params = load_params(write(tmp_path, repo_params()), ["flowgan.objective=mle"])
    assert recipes.params_of(params, "flowgan").mle_only is True
    with pytest.raises(ParamsError, match="cyclegan.objective"):
        load_checked(write(tmp_path, repo_params()), ["cyclegan.objective=mle"])


def test_loading_params_imports_no_recipe_and_checks_a_section_only_when_its_recipe_is_used(tmp_path):
    # `prepare`, `doctor` and `quantize --params` read params: they must not pay for torch and every recipe.
    code = (
        "import sys; from transfigure.pipeline.params import load_params; load_params(sys.argv[1]); "
        "loaded = [m for m in ('torch', 'transfigure.pipeline.train.recipes') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code, str(REPO / "params.yaml")], check=True, timeout=60)
    data = repo_params()
    data["cut"]["stepz"] = 3  # a recipe nobody uses now
    params = load_params(write(tmp_path, data))
    assert recipes.params_of(params, "cyclegan").steps == data["cyclegan"]["steps"]
    with pytest.raises(ParamsError, match=r"params\.yaml: cut\.stepz: unknown key"):
        recipes.params_of(params, "cut")
    data["cut"] = [1, 2]
    with pytest.raises(ParamsError, match="cut: a recipe's section must be a mapping"):
        load_params(write(tmp_path, data))


def test_every_recipe_module_defines_the_recipe_of_its_name():
    # params knows the recipes by their modules' names without importing them; the registry by `name`.
    assert recipes.names() == recipe_names()
