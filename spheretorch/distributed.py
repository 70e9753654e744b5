r"""``torch.distributed`` support: process-group set-up, DDP, and an FSDP2 ``fully_shard`` that
keeps the sphere axis.

FSDP2 (:func:`torch.distributed.fsdp.fully_shard`) replaces every parameter by a ``DTensor``
``nn.Parameter`` sharded on dim 0 and drops custom parameter classes and attributes, so a
:class:`~spheretorch.SphereParameter` would silently become Euclidean. :func:`fully_shard` here
is a drop-in that re-attaches ``sphere_dim`` to the sharded parameters; the optimizers read it
with :func:`spheretorch.parameter.sphere_dim_of`. Normalising along a sharded axis (nGPT's
``dim=0`` output projections) is then a DTensor reduction, which all-reduces the partial norms
across ranks, so every row is normalised over its full length.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .parameter import sphere_dim_of

__all__ = [
    "DistributedContext",
    "all_reduce_mean",
    "cleanup",
    "fully_shard",
    "init_from_env",
    "is_main_process",
]


def fully_shard(module: nn.Module, **kwargs: Any) -> nn.Module:
    """:func:`torch.distributed.fsdp.fully_shard` that keeps each parameter's ``sphere_dim``.

    Same arguments and return value as torch's. Call it bottom-up (blocks first, then the
    root) exactly as with torch's; parameters already sharded by an inner call keep their
    attribute.
    """
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    dims = {name: sphere_dim_of(p) for name, p in module.named_parameters()}
    out = torch_fully_shard(module, **kwargs)
    for name, p in module.named_parameters():
        if dims.get(name) is not None:
            p.sphere_dim = dims[name]
    return out


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits: ``rank`` of ``world_size``, its ``device`` and ``backend``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: str | torch.device | None = None) -> DistributedContext:
    """Initialise the default process group from torchrun's environment variables.

    Uses ``nccl`` when the device is CUDA and ``gloo`` otherwise. Without ``WORLD_SIZE`` in the
    environment (not launched by torchrun) returns a single-process context and initialises
    nothing.
    """
    if "WORLD_SIZE" not in os.environ:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return DistributedContext(0, 1, 0, dev, None)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistributedContext(rank, world, local, dev, backend)


def is_main_process() -> bool:
    """True on rank 0 or when no process group is initialised."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over ranks (returns ``value`` unchanged without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def cleanup() -> None:
    """Destroy the default process group if one is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
