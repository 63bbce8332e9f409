"""The recipe registry: every module in this folder defines one recipe (see base.py for the contract)."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from transfigure.pipeline.errors import UserError
from transfigure.pipeline.params import Params
from transfigure.pipeline.schema import RecipeParams
from transfigure.pipeline.train.checkpoint import Checkpoint, load_checkpoint
from transfigure.pipeline.train.recipes.base import Export, Recipe, registered

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def names() -> tuple[str, ...]:
    return tuple(registered())


def get(name: str) -> type[Recipe]:
    if name not in registered():
        raise UserError(f"unknown recipe {name!r} (choose from {', '.join(registered())})")
    return registered()[name]


def params_of(params: Params, name: str) -> RecipeParams:
    """Recipe `name`'s section of `params`, checked against the recipe's own `Params` class."""
    return params.recipe_section(name, get(name).Params)


@dataclass(frozen=True)
class Trained:
    """A checkpoint with its recipe's params validated once and its exported generators rebuilt, for evaluate and
    export alike."""

    state: Checkpoint
    recipe: type[Recipe]
    params: RecipeParams
    generators: dict[str, nn.Module]  # by direction, in eval mode on the CPU, EMA weights where saved

    @property
    def exports(self) -> dict[str, Export]:
        return self.recipe.exports(self.params)


def load_trained(checkpoint: Path | Checkpoint) -> Trained:
    """A checkpoint file (or its loaded state) as a `Trained`; UserError when no registered recipe wrote it."""
    state = load_checkpoint(checkpoint) if isinstance(checkpoint, Path) else checkpoint
    if state.get("recipe") not in registered():
        where = f"{checkpoint}: not" if isinstance(checkpoint, Path) else "not"
        raise UserError(f"{where} a generator checkpoint of any recipe ({', '.join(names())})")
    recipe = registered()[state["recipe"]]
    params = recipe.Params.model_validate(state["params"][recipe.name])
    generators = recipe.generators(params, state["networks"], state["ema"], state["network_args"])
    return Trained(state, recipe, params, generators)
