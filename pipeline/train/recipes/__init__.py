"""The recipe registry: every module in this folder defines one recipe (see base.py for the contract)."""

from __future__ import annotations

import importlib
import pkgutil

from transfigure.pipeline.errors import UserError
from transfigure.pipeline.params import Params
from transfigure.pipeline.schema import RecipeParams
from transfigure.pipeline.train.recipes.base import Recipe, registered

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


def generators_from_checkpoint(state) -> dict:
    """A checkpoint's exported generators by direction, rebuilt from its own params (EMA weights when saved)."""
    recipe = get(state["recipe"])
    p = recipe.Params.model_validate(state["params"][recipe.name])
    return recipe.generators(p, state["networks"], state["ema"], state["network_args"])
