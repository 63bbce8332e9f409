"""Data-parallel training under torchrun: `torchrun --nproc_per_node=N $(which transfigure) train RECIPE`.

Each process trains on its own share of every epoch and DistributedDataParallel averages the gradients, so all
ranks hold the same weights after every update; only rank 0 writes checkpoints, samples, metrics and MLflow.
A plain process is a world of one, and then nothing here changes what training does.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from transfigure.pipeline.errors import UserError


@dataclass(frozen=True)
class World:
    """This process's place among torchrun's: `size` processes, this one `rank` (`local_rank` on its node)."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> World:
        """What torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK); a world of one without it."""
        env = os.environ
        return cls(int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")))

    @property
    def parallel(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0, the one process that writes files and logs."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """One GPU per process: this rank's, by its local rank."""
        if self.parallel and device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def connect(self, device: torch.device) -> None:
        """Joins the process group: NCCL between GPUs, Gloo between CPU processes."""
        if self.parallel and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def close(self) -> None:
        if self.parallel and dist.is_initialized():
            dist.destroy_process_group()

    def wrap(self, net: nn.Module) -> nn.Module:
        """A network of its own in DDP (one wrapper around a whole GAN would see the critic's parameters unused
        in the generator's step). Buffers are synchronised once, at the start, and not before every forward:
        instance norm has none, spectral norm's vectors follow the synchronised weights by the same power
        iteration, SyncBatchNorm (CUDA) keeps running statistics equal, and on the CPU batch norm's running
        statistics stay each rank's own (rank 0's are saved). It also lets rank 0 alone draw the sample sheets,
        since a forward without gradients then makes no collective call."""
        if not self.parallel:
            return net
        # device_ids left out: a module on one device (this rank's GPU, set in `device`, or the CPU) needs none.
        return DistributedDataParallel(net, forward_sync_buffers=False)

    def sync_batch_norm(self, net: nn.Module, device: torch.device) -> nn.Module:
        """Batch norm over every rank's batch (CUDA only: SyncBatchNorm has no CPU kernel)."""
        if self.parallel and device.type == "cuda":
            return nn.SyncBatchNorm.convert_sync_batchnorm(net)
        return net

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean of each loss over the ranks, so every rank logs, and stops on divergence, alike."""
        if not self.parallel or not values:
            return values
        backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        stacked = torch.tensor(list(values.values()), dtype=torch.float64, device=backend_device)
        dist.all_reduce(stacked)
        return dict(zip(values, (stacked / self.size).tolist(), strict=True))

    def parameter_digests(self, nets: dict[str, nn.Module]) -> dict[str, list[str]]:
        """Network -> the sha256 of its parameters on each rank, for the checkpoint: equal entries are the proof
        that the ranks are in sync, and unequal ones stop the run (every later step would train apart)."""
        local = {name: parameter_sha256(net) for name, net in nets.items()}
        every: list = [local]
        if self.parallel:
            every = [None] * self.size
            dist.all_gather_object(every, local)
        digests = {name: [ranks[name] for ranks in every] for name in nets}
        apart = [name for name, values in digests.items() if len(set(values)) > 1]
        if apart:
            raise RuntimeError(f"data-parallel ranks out of sync: the parameters of {', '.join(apart)} differ")
        return digests

    def agree(self, value, what: str) -> None:
        """Stops every rank with a clear error unless all of them hold the same `value` (e.g. where to resume)."""
        if not self.parallel:
            return
        every: list = [None] * self.size
        dist.all_gather_object(every, value)
        if any(other != every[0] for other in every):
            listed = ", ".join(f"rank {rank}: {other}" for rank, other in enumerate(every))
            raise UserError(f"the ranks disagree on {what} ({listed}); every node must see the same runs/ folder")

    def seed(self, seed: int, start_step: int) -> None:
        """Each rank its own random stream (dropout, image pools, penalty interpolates), fixed by (seed, step)."""
        if self.parallel:
            torch.manual_seed((seed * 1_000_003 + start_step) * 1_009 + self.rank)


class TwoWay:
    """A flow under DDP: its inverse also runs through the wrapper's forward, so the reducer expects gradients
    from whichever direction built the loss."""

    def __init__(self, forward: Callable):
        self._forward = forward

    def __call__(self, x: torch.Tensor):
        return self._forward(x)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return self._forward(z, inverse=True)


class BothDirections(nn.Module):
    """The module DDP wraps for a flow: forward(x) or, with inverse=True, the flow's inverse."""

    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow

    def forward(self, x: torch.Tensor, inverse: bool = False):
        return self.flow.inverse(x) if inverse else self.flow(x)


def parameter_sha256(net: nn.Module) -> str:
    """sha256 over each parameter's name and bytes, in order."""
    digest = hashlib.sha256()
    for name, parameter in net.named_parameters():
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
