"""params.yaml through one schema: every knob of the pipeline, checked before anything runs.

The schema is the shared sections of pipeline/schema.py plus one section per recipe, named after the recipe's
module. Loading checks the shared sections and that every other section is a recipe's; a recipe's section is
checked against the recipe's own `Params` class when that recipe is used (`Params.recipe_section`, which the
recipe registry calls), so loading params imports no recipe (nor torch). An unknown key, a wrong type or an
impossible value stops the run with one line that names the key. `--set section.key=value` overrides go through
the same checks.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import pkgutil
from collections.abc import Callable
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import ConfigDict, PrivateAttr, ValidationError, model_validator

from transfigure.pipeline.errors import UserError
from transfigure.pipeline.files import json_hash
from transfigure.pipeline.schema import DataParams, EvaluateParams, ExportParams, PositiveInt, RecipeParams, Strict

Section = TypeVar("Section", bound=RecipeParams)


class ParamsError(UserError):
    """A user's params are wrong; the message is one line naming the key."""


def recipe_names() -> tuple[str, ...]:
    """The recipes: the modules of the recipes folder (each defines the recipe of its name), listed, not imported."""
    folder = importlib.util.find_spec("transfigure.pipeline.train.recipes").submodule_search_locations
    return tuple(sorted(module.name for module in pkgutil.iter_modules(folder) if module.name != "base"))


class Params(Strict):
    """The sections every pipeline has, and each recipe's section as written (checked when the recipe is used)."""

    model_config = ConfigDict(extra="allow")  # the recipes' sections: Strict's "unknown key" comes from the check

    seed: int = 0
    threads: PositiveInt | Literal["auto"] = "auto"  # CPU threads (pipeline/threads.py); --threads overrides
    recipes: list[str] = []  # what `dvc repro` runs: dvc.yaml's stages iterate over it
    data: DataParams
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    # Where the values came from, so that a recipe's section checked later names the file or the --set.
    _path: Path = PrivateAttr(Path("params.yaml"))
    _overrides: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _sections_are_recipes(self) -> Params:
        known = recipe_names()
        for name in self.recipes:
            if name not in known:
                raise ValueError(f"recipes: no recipe {name!r} (there are {', '.join(known)})")
        for key, section in (self.model_extra or {}).items():
            if key not in known:
                raise ValueError(f"{key}: unknown key")
            if not isinstance(section, dict):
                raise ValueError(f"{key}: a recipe's section must be a mapping of keys (got {section!r})")
        return self

    def recipe_section(self, name: str, schema: type[Section]) -> Section:
        """Recipe `name`'s section checked against its `schema` (defaults where params.yaml is silent); a
        ParamsError naming the key and where it came from."""
        source = functools.partial(_source, path=self._path, overrides=self._overrides)
        try:
            section = schema.model_validate((self.model_extra or {}).get(name, {}))
        except ValidationError as exc:
            raise ParamsError(describe(exc, source, prefix=name)) from None
        if section.dataset not in self.data.datasets:
            key = f"{name}.dataset"
            raise ParamsError(f"{source(key)}: {key}: no dataset {section.dataset!r} under data.datasets")
        return section


def describe(error: ValidationError, source: str | Callable[[str], str], prefix: str = "") -> str:
    """One line naming the first wrong key (under `prefix`) and what is wrong with it; `source` names where the
    values came from, or finds it from the key."""
    first = error.errors()[0]
    key = ".".join(str(part) for part in ([prefix] if prefix else []) + list(first["loc"]))
    source = source(key) if callable(source) else source
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
        params = Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(describe(exc, functools.partial(_source, path=path, overrides=overrides or []))) from None
    params._path, params._overrides = path, list(overrides or [])
    return params


def _source(key: str, path: Path, overrides: list[str]) -> str:
    """`--set KEY=VALUE` when the wrong key came from an override, else the params file."""
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


def training_params(params: Params, recipe: str, checked: RecipeParams) -> dict:
    """The params a training run depends on: the seed, the recipe's `checked` section and its dataset."""
    section = checked.model_dump(mode="json")
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
