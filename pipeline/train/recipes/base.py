"""The recipe contract. A recipe is one module in this folder with one `Recipe` subclass marked `@register`; it
owns everything particular to it, so nothing else in the pipeline names it:

- `name`, its params.yaml section class `Params` (a `RecipeParams`), the dataset `layout` it trains on and the
  loss names its `step` returns (the CSV columns and `dvc plots`);
- `build_networks(p, **network_args)`: plain construction, also used to rebuild a checkpoint's generators;
- `exports(p)`: direction -> `Export` (which network, which kind of ONNX model, from which domain to which);
- `__init__(p, ctx, data_dir)`: sets `p`, `ctx`, `dataset`, `nets`, `optimizers`, `pools`, `network_args` and
  `example_inputs`; `step(next_batch)`, `sample_columns()` (label -> images, one column of the sample sheet
  each) and `batches(seed, skip)` (seeded uint8 batches of `dataset`, `skip` in, unless a recipe says otherwise) are the
  training loop's calls;
- `evaluate(generators, p, inputs)`: the metrics dict; it writes its sample sheets to `inputs.reports`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from transfigure.pipeline.data.datasets import batches, loader_workers
from transfigure.pipeline.evaluate import measures
from transfigure.pipeline.schema import RecipeParams
from transfigure.pipeline.train.context import Context

Layout = Literal["unaligned", "aligned", "classes"]
_REGISTERED: dict[str, type[Recipe]] = {}


@dataclass(frozen=True)
class Export:
    """One exported model: the network it comes from, its model-card kind, its domains (A, B or noise), what the
    model takes (the card's input names, in the order of the network's forward: a translator's `image`, a
    sampler's `z` and, class-conditional, `label`) and which of the network's attributes its card records (a
    sampler's: `z_dim` and `n_classes`, or `latent_shape`, say what `z` and `label` are)."""

    network: str
    kind: Literal["image_translation", "label_map", "conditional_generation", "flow_sampling"]
    source: str
    target: str
    inputs: tuple[Literal["image", "z", "label"], ...] = ("image",)
    card_attributes: tuple[str, ...] = ()


class Recipe:
    name: ClassVar[str]
    Params: ClassVar[type[RecipeParams]]
    layout: ClassVar[Layout]
    losses: ClassVar[tuple[str, ...]]

    p: RecipeParams
    ctx: Context
    dataset: torch.utils.data.Dataset
    nets: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    pools: dict
    network_args: dict
    example_inputs: dict[str, dict[str, torch.Tensor]]

    @classmethod
    def build_networks(cls, p: RecipeParams, **network_args) -> dict[str, nn.Module]:
        raise NotImplementedError

    @classmethod
    def exports(cls, p: RecipeParams) -> dict[str, Export]:
        raise NotImplementedError

    @classmethod
    def generator_names(cls, p: RecipeParams) -> tuple[str, ...]:
        return tuple(dict.fromkeys(export.network for export in cls.exports(p).values()))

    @classmethod
    def evaluate(cls, generators: dict[str, nn.Module], p: RecipeParams, inputs: measures.EvalInputs) -> dict:
        raise NotImplementedError

    @classmethod
    def generators(cls, p: RecipeParams, networks: dict, ema: dict, network_args: dict) -> dict[str, nn.Module]:
        """The exported generators, by direction, in eval mode on the CPU, with EMA weights where saved."""
        nets = cls.build_networks(p, **network_args)
        out = {}
        for direction, export in cls.exports(p).items():
            net = nets[export.network]
            if export.network in ema:
                averaged = AveragedModel(net, use_buffers=True)
                averaged.load_state_dict(ema[export.network])
                net = averaged.module
            else:
                net.load_state_dict(networks[export.network])
            out[direction] = net.eval()
        return out

    def batches(self, seed: int, skip: int):
        """The endless, seeded stream of training batches from `self.dataset` after the `skip` a resumed run drew
        already, this rank's share under torchrun, loaded by `num_workers` processes."""
        world, cuda = self.ctx.world, self.ctx.device.type == "cuda"
        workers = loader_workers(self.p.num_workers, cuda)
        return batches(self.dataset, self.p.batch_size, seed, skip, workers, world.rank, world.size, pin_memory=cuda)

    def step(self, next_batch) -> dict[str, float]:
        raise NotImplementedError

    def sample_columns(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def register(recipe: type[Recipe]) -> type[Recipe]:
    """Class decorator: makes the recipe known to params, train, evaluate, export, bench and the CLI."""
    _REGISTERED[recipe.name] = recipe
    return recipe


def registered() -> dict[str, type[Recipe]]:
    return _REGISTERED
