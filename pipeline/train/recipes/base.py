"""The recipe contract. A recipe is one module in this folder with one `Recipe` subclass marked `@register`; it
owns everything particular to it, so nothing else in the pipeline names it:

- `name`, its params.yaml section class `Params` (a `RecipeParams`) and the loss names its `step` returns (the CSV
  columns and `dvc plots`); `layout`, the dataset layout it trains on, only where not "unaligned"; `tiny`, the
  overrides of its section that make its networks small enough for the tests to run every code path in seconds;
- `build_networks(p, **network_args)`: plain construction, also used to rebuild a checkpoint's generators;
- `exports(p)`: direction -> `Export` (which network, which kind of ONNX model, from which domain to which);
- `set_up(data_dir)`: builds what its `step` uses (on the recipe) and returns the `TrainingState` that the loop
  trains, checkpoints and logs, checked once here; `step(next_batch)` and `sample_columns()` (label -> images,
  one column of the sample sheet each; the loop puts the networks in eval mode around it) are the loop's calls,
  and `batches(seed, skip)` (seeded uint8 batches of the dataset, `skip` in) unless a recipe says otherwise;
- `evaluate(generators, p, inputs)`: the metrics dict; it writes its sample sheets to `inputs.reports`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
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


@dataclass
class TrainingState:
    """What the loop trains, checkpoints and logs: the training set, the networks by name, their optimizers, the
    image pools, the arguments `build_networks` needs beyond params (kept in the checkpoint) and, per exported
    network, the example inputs MLflow logs it with."""

    dataset: torch.utils.data.Dataset
    nets: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    example_inputs: dict[str, dict[str, torch.Tensor]]
    pools: dict = field(default_factory=dict)
    network_args: dict = field(default_factory=dict)


class Recipe(abc.ABC):
    name: ClassVar[str]
    Params: ClassVar[type[RecipeParams]]
    layout: ClassVar[Layout] = "unaligned"
    losses: ClassVar[tuple[str, ...]]
    tiny: ClassVar[tuple[str, ...]] = ()

    def __init__(self, p: RecipeParams, ctx: Context, data_dir: Path):
        self.p, self.ctx = p, ctx
        self.state = self._checked(self.set_up(data_dir))

    @classmethod
    @abc.abstractmethod
    def build_networks(cls, p: RecipeParams, **network_args) -> dict[str, nn.Module]: ...

    @classmethod
    @abc.abstractmethod
    def exports(cls, p: RecipeParams) -> dict[str, Export]: ...

    @classmethod
    @abc.abstractmethod
    def evaluate(cls, generators: dict[str, nn.Module], p: RecipeParams, inputs: measures.EvalInputs) -> dict: ...

    @abc.abstractmethod
    def set_up(self, data_dir: Path) -> TrainingState: ...

    @abc.abstractmethod
    def step(self, next_batch) -> dict[str, float]: ...

    @abc.abstractmethod
    def sample_columns(self) -> dict[str, torch.Tensor]: ...

    @classmethod
    def generator_names(cls, p: RecipeParams) -> tuple[str, ...]:
        return tuple(dict.fromkeys(export.network for export in cls.exports(p).values()))

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
        """The endless, seeded stream of training batches from the dataset after the `skip` a resumed run drew
        already, this rank's share under torchrun, loaded by `num_workers` processes."""
        world, cuda = self.ctx.world, self.ctx.device.type == "cuda"
        workers = loader_workers(self.p.num_workers, cuda)
        dataset = self.state.dataset
        return batches(dataset, self.p.batch_size, seed, skip, workers, world.rank, world.size, pin_memory=cuda)

    def _checked(self, state: TrainingState) -> TrainingState:
        """`set_up`'s result, refused at once where the loop would fail later: at a checkpoint or at the end."""
        if not isinstance(state, TrainingState):
            raise TypeError(f"recipe {self.name!r}: set_up returned {type(state).__name__}, not a TrainingState")
        generators = self.generator_names(self.p)
        missing = [f"nets[{n!r}]" for n in generators if n not in state.nets]
        missing += [f"example_inputs[{n!r}]" for n in generators if n not in state.example_inputs]
        missing += [] if state.optimizers else ["optimizers"]
        missing += [f"pools[{n!r}] (a state() and a load())" for n, pool in state.pools.items() if not _is_pool(pool)]
        if missing:
            raise TypeError(f"recipe {self.name!r}: set_up's TrainingState lacks {', '.join(missing)}")
        return state


def _is_pool(pool) -> bool:
    return callable(getattr(pool, "state", None)) and callable(getattr(pool, "load", None))


def register(recipe: type[Recipe]) -> type[Recipe]:
    """Class decorator: makes the recipe known to params, train, evaluate, export, bench and the CLI."""
    missing = [name for name in ("name", "Params", "losses") if not hasattr(recipe, name)]
    if missing or recipe.__abstractmethods__:
        lacks = ", ".join([*missing, *sorted(recipe.__abstractmethods__)])
        raise TypeError(f"recipe class {recipe.__qualname__} does not define {lacks}")
    _REGISTERED[recipe.name] = recipe
    return recipe


def registered() -> dict[str, type[Recipe]]:
    return _REGISTERED
