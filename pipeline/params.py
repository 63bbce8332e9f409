"""params.yaml through one schema: every knob of the pipeline, checked before anything runs.

The schema is the shared sections of pipeline/schema.py plus one section per registered recipe, each recipe's
own `Params` class under its name. An unknown key, a wrong type or an impossible value stops the run with one
line that names the key. `--set section.key=value` overrides go through the same checks.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import ValidationError, create_model, model_validator

from transfigure.pipeline.errors import UserError
from transfigure.pipeline.files import json_hash
from transfigure.pipeline.schema import DataParams, EvaluateParams, ExportParams, PositiveInt, RecipeParams, Strict
from transfigure.pipeline.train import recipes


class ParamsError(UserError):
    """A user's params are wrong; the message is one line naming the key."""


class Params(Strict):
    """The sections every pipeline has; `schema()` adds one per recipe."""

    seed: int = 0
    threads: PositiveInt | Literal["auto"] = "auto"  # CPU threads (pipeline/threads.py); --threads overrides
    recipes: list[str] = []  # what `dvc repro` runs: dvc.yaml's stages iterate over it
    data: DataParams
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()

    @model_validator(mode="after")
    def _datasets_exist(self) -> Params:
        for name in self.recipes:
            if name not in recipes.names():
                raise ValueError(f"recipes: no recipe {name!r} (there are {', '.join(recipes.names())})")
        for name in recipes.names():
            dataset = getattr(self, name).dataset
            if dataset not in self.data.datasets:
                raise ValueError(f"{name}.dataset: no dataset {dataset!r} under data.datasets")
        return self

    def recipe(self, name: str) -> RecipeParams:
        return getattr(self, recipes.get(name).name)


def schema() -> type[Params]:
    """The whole schema for the recipes registered now (a test may register one more)."""
    return _schema(recipes.names())


@cache
def _schema(names: tuple[str, ...]) -> type[Params]:
    sections = {name: (recipes.get(name).Params, recipes.get(name).Params()) for name in names}
    return create_model("Params", __base__=Params, **sections)


def describe(error: ValidationError, source: str) -> str:
    """One line naming the first wrong key and what is wrong with it."""
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], dict):
        message += f" (got {first['input']!r})"
    extra = f" (and {len(error.errors()) - 1} more)" if len(error.errors()) > 1 else ""
    return f"{source}: {key}: {message}{extra}" if key else f"{source}: {message}{extra}"


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Applies `section.key=value` strings; values are parsed as YAML scalars (`3`, `1e-4`, `true`, `[1, 2]`)."""
    raw = json.loads(json.dumps(raw))
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise ParamsError(f"--set {override!r}: expected section.key=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ParamsError(f"--set {override!r}: {part} is not a section")
            node = child
        node[leaf] = yaml.safe_load(text)
    return raw


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Reads, overrides and validates params; raises ParamsError with a one-line message."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such file (run from the repository root or pass --params)") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}:{_yaml_position(exc)} not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    try:
        return schema().model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(describe(exc, _source(exc, path, overrides or []))) from None


def _source(error: ValidationError, path: Path, overrides: list[str]) -> str:
    """`--set KEY=VALUE` when the first wrong key came from an override, else the params file."""
    key = ".".join(str(part) for part in error.errors()[0]["loc"])
    for override in reversed(overrides):
        name = override.partition("=")[0]
        if key == name or key.startswith(f"{name}.") or name.startswith(f"{key}."):
            return f"--set {override}"
    return str(path)


def _yaml_position(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f"{mark.line + 1}:{mark.column + 1}:" if mark is not None else ""


def _yaml_problem(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None)
    return problem or str(exc).splitlines()[0]


# Keys that change what is logged or how fast, not what is learned; they may differ on resume.
_RUNTIME_KEYS = {"checkpoint_every", "keep_checkpoints", "sample_every", "log_every", "num_workers", "compile"}


def training_params(params: Params, recipe: str) -> dict:
    """The params a training run depends on: the seed, the recipe's section and its dataset."""
    section = params.recipe(recipe).model_dump(mode="json")
    return {
        "seed": params.seed,
        "recipe": recipe,
        recipe: {k: v for k, v in section.items() if k not in _RUNTIME_KEYS},
        "dataset": params.data.datasets[section["dataset"]].model_dump(mode="json"),
    }


def params_hash(data: dict) -> str:
    return json_hash(data)[:16]


def flatten(data: dict, prefix: str = "") -> dict[str, object]:
    """{'a': {'b': 1}} -> {'a.b': 1}, for MLflow params."""
    flat: dict[str, object] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def changed_keys(old: dict, new: dict) -> list[str]:
    """The flattened keys whose values differ between two params dicts (either may lack a key)."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
