"""Process group, the batch-sharding rule, and wrapping a model for DDP or FSDP2."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..parameter import sphere_dim_of

__all__ = [
    "MODES",
    "DistributedContext",
    "Mode",
    "all_reduce_mean",
    "cleanup",
    "fully_shard",
    "init_from_env",
    "is_main_process",
    "local_batch",
    "shard_rows",
    "unwrap",
    "wrap",
]

Mode = Literal["none", "ddp", "fsdp"]
MODES: tuple[str, ...] = ("none", "ddp", "fsdp")


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _initialized():
        dist.barrier()


# ---------------------------------------------------------------------------- process group


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


def _context() -> DistributedContext:
    """The context of an already initialised process group (CPU unless it is nccl)."""
    backend = dist.get_backend()
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    dev = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
    return DistributedContext(rank, world, local, dev, backend)


def is_main_process() -> bool:
    """True on rank 0 or when no process group is initialised."""
    return not _initialized() or dist.get_rank() == 0


def all_reduce_mean(value: Tensor) -> Tensor:
    """Mean of ``value`` over ranks (returns ``value`` unchanged without a process group)."""
    if not _initialized():
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def cleanup() -> None:
    """Destroy the default process group if one is initialised."""
    if _initialized():
        dist.destroy_process_group()


def shard_rows(n: int, rank: int, world_size: int) -> slice:
    """The one sharding rule for batches: rank ``r`` of ``N`` takes rows ``r::N`` of ``n``
    (as ``torch.utils.data.DistributedSampler`` does).

    Raises ``ValueError`` unless ``n`` is a multiple of ``N``: with unequal shares the average
    of the per-rank mean losses (what DDP and FSDP2 differentiate) would not be the
    full-batch mean.
    """
    if n % world_size:
        raise ValueError(
            f"batch size {n} is not divisible by the world size {world_size}: every rank "
            f"needs an equal share"
        )
    return slice(rank, None, world_size)


def local_batch(batch: Tensor, ctx: DistributedContext) -> Tensor:
    """This rank's share of ``batch`` along dim 0 (rows ``rank::world_size``, see
    :func:`shard_rows`)."""
    if not isinstance(batch, Tensor) or batch.dim() == 0:
        raise ValueError("batch must be a tensor with a batch axis (dim 0)")
    return batch[shard_rows(batch.shape[0], ctx.rank, ctx.world_size)]


# ---------------------------------------------------------------------------- wrapping


def fully_shard(module: nn.Module, **kwargs: Any) -> nn.Module:
    """:func:`torch.distributed.fsdp.fully_shard` that keeps each parameter's ``sphere_dim``
    (and ``sphere_radius``).

    Same arguments and return value as torch's. Call it bottom-up (blocks first, then the
    root) exactly as with torch's; parameters already sharded by an inner call keep their
    attribute.
    """
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    dims = {name: sphere_dim_of(p) for name, p in module.named_parameters()}
    radii = {name: getattr(p, "sphere_radius", None) for name, p in module.named_parameters()}
    out = torch_fully_shard(module, **kwargs)
    for name, p in module.named_parameters():
        if dims.get(name) is not None:
            p.sphere_dim = dims[name]
            if radii.get(name) is not None:  # spheres of other radii (dim=None) keep theirs
                p.sphere_radius = radii[name]
    return out


def _shard_units(model: nn.Module) -> list[nn.Module]:
    """Default FSDP2 units: the entries of a ``blocks`` ``ModuleList`` (the transformer
    layers of spheretorch's models); the root module always forms the last unit."""
    blocks = getattr(model, "blocks", None)
    return list(blocks) if isinstance(blocks, nn.ModuleList) else []


def wrap(
    model: nn.Module,
    mode: Mode,
    ctx: DistributedContext | None = None,
    *,
    units: Iterable[nn.Module] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Prepare ``model`` for data-parallel training; build the optimizer afterwards.

    Args:
        model: the module, weights initialised, on ``ctx.device``.
        mode: ``"ddp"`` (:class:`torch.nn.parallel.DistributedDataParallel`), ``"fsdp"``
            (FSDP2 via :func:`fully_shard`: each of ``units`` first, then ``model``) or
            ``"none"`` (returned unchanged).
        ctx: from :func:`init_from_env`; ``None`` reads the initialised process group.
        units: FSDP2 sub-modules sharded as separate units (each all-gathered only while it
            runs); default: the entries of ``model.blocks`` if that is an ``nn.ModuleList``.
        **kwargs: passed to ``DistributedDataParallel`` or to ``fully_shard`` (for example
            ``mp_policy``, ``reshard_after_forward``, ``shard_placement_fn``, ``mesh``).

    Returns:
        The DDP wrapper (``mode="ddp"``; :func:`unwrap` gives the model back) or ``model``
        itself, sharded in place (``mode="fsdp"``).

    Raises:
        ValueError: unknown ``mode``. RuntimeError: no process group initialised.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    if mode == "none":
        return model
    if not _initialized():
        raise RuntimeError(
            f"wrap(mode={mode!r}) needs an initialised process group: launch with torchrun "
            f"and call spheretorch.distributed.init_from_env() first"
        )
    if ctx is None:
        ctx = _context()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [ctx.device] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, **kwargs)
    if "mesh" not in kwargs:
        from torch.distributed.device_mesh import init_device_mesh

        kwargs["mesh"] = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for unit in _shard_units(model) if units is None else units:
        fully_shard(unit, **kwargs)
    return fully_shard(model, **kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (``model.module``), else ``model`` itself."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model
