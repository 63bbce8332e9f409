"""What a recipe gets from the training loop: the device, the precision, the objective and how to update."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from transfigure.models import objectives
from transfigure.pipeline.data.datasets import as_model_input
from transfigure.pipeline.errors import UserError
from transfigure.pipeline.schema import RecipeParams
from transfigure.pipeline.train.distributed import BothDirections, TwoWay, World


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("device: 'cuda' was asked for but no CUDA device is available")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


# `precision: auto` takes reduced precision only for a generator of at least this many FLOPs per image (a forward
# pass, FLOPs = 2 x multiply-adds). Measured on an H200 (docs/BENCHMARKS.md, #34): bf16 + channels-last paid for
# cyclegan's resnet_9blocks at 256x256 (99 GFLOP: 1.12-1.20x) and cost pix2pix's unet_256 (12 GFLOP: 0.91-0.97x)
# and the digits recipes below 0.2 GFLOP (cdcgan 0.83x, flowgan 0.86x, pix2pix_labels 0.88x): autocast's casts and
# layout changes outweigh the faster convolutions until the convolutions dominate the step.
AUTOCAST_MIN_GFLOP_PER_IMAGE = 32.0


def generator_gflop_per_image(nets: dict[str, nn.Module], example_inputs: dict[str, dict]) -> float:
    """The largest forward pass among the networks that `example_inputs` feeds, in GFLOP per image; counted on a
    copy, so data-dependent initialisation (a flow's actnorm) stays for the first training batch."""
    from torch.utils.flop_counter import FlopCounterMode

    largest = 0.0
    for name, inputs in example_inputs.items():
        images = next(iter(inputs.values())).shape[0]
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            copy.deepcopy(nets[name]).eval()(*inputs.values())
        largest = max(largest, counter.get_total_flops() / images / 1e9)
    return largest


def resolve_precision(choice: str, device: torch.device) -> str:
    if choice == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if choice != "fp32" and device.type != "cuda":
        raise UserError(f"precision: {choice!r} needs a CUDA device; use fp32 or auto on CPU")
    return choice


@dataclass
class Context:
    """What a recipe needs from the loop: where to run, how to update, which objective."""

    params: RecipeParams
    device: torch.device
    precision: str
    objective: objectives.Objective
    n_critic: int
    world: World = World()
    scaler: torch.amp.GradScaler | None = None
    forwards: dict[int, Callable] = field(default_factory=dict)
    step: int = 0  # the step being trained (1 to params.steps), set by the loop: for a recipe's own schedules

    @classmethod
    def create(cls, p: RecipeParams, world: World = World()) -> Context:
        """The context of one training process; under torchrun it also joins the process group."""
        device = world.device(resolve_device(p.device))
        world.connect(device)
        precision = resolve_precision(p.precision, device)
        objective = objectives.get(p.objective, **p.objective_params)
        n_critic = p.n_critic or objective.recommended["n_critic"]
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        return cls(p, device, precision, objective, n_critic, world, scaler)

    def settle_precision(self, nets: dict[str, nn.Module], example_inputs: dict[str, dict]) -> None:
        """`precision: auto` on a GPU keeps fp32 for networks too small for autocast to pay (the rule above)."""
        if self.params.precision != "auto" or self.precision == "fp32":
            return
        if generator_gflop_per_image(nets, example_inputs) < AUTOCAST_MIN_GFLOP_PER_IMAGE:
            self.precision, self.scaler = "fp32", None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def prepare(self, net: nn.Module) -> nn.Module:
        net = self.world.sync_batch_norm(net.to(self.device), self.device)
        if self.device.type == "cuda" and self.params.channels_last:
            net = net.to(memory_format=torch.channels_last)
        return net

    def forward(self, net: nn.Module) -> Callable:
        """The network's forward, in DDP under torchrun and compiled when asked; the module itself stays plain
        for its state dict."""
        if id(net) not in self.forwards:
            wrapped = self.world.wrap(net)
            self.forwards[id(net)] = torch.compile(wrapped) if self.params.compile else wrapped
        return self.forwards[id(net)]

    def invertible(self, flow: nn.Module):
        """A flow's two directions (`flow(x)` and `flow.inverse(z)`), both through DDP under torchrun."""
        if not self.world.parallel:
            return flow
        return TwoWay(self.world.wrap(BothDirections(flow)))

    def optimizer(self, parameters) -> torch.optim.Optimizer:
        p, rec = self.params, self.objective.recommended
        kind = p.optimizer or rec["optimizer"]
        lr = p.lr or rec["lr"]
        if kind == "rmsprop":
            return torch.optim.RMSprop(parameters, lr=lr)
        betas = tuple(p.betas or rec.get("betas", (0.5, 0.999)))
        return torch.optim.Adam(parameters, lr=lr, betas=betas, fused=self.device.type == "cuda")

    def update(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()

    def update_critics(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, *critics: nn.Module) -> None:
        """One critic update, then the objective's constraint on each critic (weight clipping for wgan)."""
        self.update(loss, optimizer)
        for critic in critics:
            self.objective.after_critic_step(critic)

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A batch on the device as model input: uint8 images travel as bytes and become float there."""
        moved = as_model_input({key: value.to(self.device, non_blocking=True) for key, value in batch.items()})
        if self.device.type != "cuda" or not self.params.channels_last:
            return moved
        return {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in moved.items()}
