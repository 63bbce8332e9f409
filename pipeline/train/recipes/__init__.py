"""Recipes: how each kind of model is built and how one training step goes. The loop is pipeline/train/loop.py.

Each recipe module has `build_networks(params, **network_args)` (plain construction, also used to rebuild a
checkpoint's generators for evaluation and export), `EXPORTS` (direction -> generator name) and a `Recipe`
class with `nets`, `optimizers`, `pools`, `generator_names`, `network_args` (what build_networks needs beyond
params), `example_inputs` (per generator, for MLflow), `batches(seed, start_step)`, `step(next_batch)` and
`sample_rows()`.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from pipeline.errors import UserError


def module(recipe: str):
    from pipeline.train.recipes import alignflow, cdcgan, cyclegan, flowgan, pix2pix

    modules = {"cyclegan": cyclegan, "pix2pix": pix2pix, "cdcgan": cdcgan, "alignflow": alignflow, "flowgan": flowgan}
    if recipe not in modules:
        raise UserError(f"recipe {recipe!r} is not implemented yet (available: {', '.join(modules)})")
    return modules[recipe]


def build(recipe: str, params, ctx, data_dir: Path):
    return module(recipe).Recipe(params, ctx, data_dir)


def generators_from_checkpoint(state: dict, use_ema: bool = True) -> dict[str, nn.Module]:
    """The exported generators of a checkpoint, by direction, in eval mode on the CPU (EMA weights when saved)."""
    from pipeline.params import Params

    recipe = state["recipe"]
    section_type = type(Params.model_fields[recipe].default)
    p = section_type.model_validate(state["params"][recipe])
    mod = module(recipe)
    nets = mod.build_networks(p, **state["network_args"])
    out = {}
    for direction, name in mod.EXPORTS.items():
        net = nets[name]
        if use_ema and name in state["ema"]:
            weights = {k.removeprefix("module."): v for k, v in state["ema"][name].items() if k != "n_averaged"}
        else:
            weights = state["networks"][name]
        net.load_state_dict(weights)
        out[direction] = net.eval()
    return out
