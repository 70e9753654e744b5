"""DTensor-aware pieces of the sphere math (FSDP2 shards parameters as DTensors).

Reductions along a sharded sphere axis are *pending* all-reduces on a DTensor; these helpers
complete them or lay out per-slice statistics without communication.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["global_value", "is_dtensor", "zeros_per_slice"]


def is_dtensor(t: Tensor) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (without importing distributed)."""
    return type(t).__name__ == "DTensor"


def global_value(t: Tensor) -> Tensor:
    """An ordinary tensor holding the value of ``t`` over all shards.

    A DTensor reduction may have a ``Partial`` placement (each rank holds its shard's part;
    ``bool()`` would read that, so ranks could disagree); ``full_tensor()`` all-reduces it.
    Plain tensors are returned unchanged.
    """
    return t.full_tensor() if is_dtensor(t) else t  # type: ignore[attr-defined]


def zeros_per_slice(p: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """Zeros of ``p``'s shape with size 1 along ``dim``: one number per slice of ``p``.

    For a DTensor the result is sharded like ``p`` along the other axes and **replicated**
    over any mesh dimension that shards ``dim`` (a slice spread across ranks has one
    statistic, kept by each of them). Made without communication.
    """
    if not is_dtensor(p):
        return torch.zeros_like(p.narrow(dim, 0, 1), dtype=dtype)
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor import zeros as dtensor_zeros

    placements = [
        Replicate() if isinstance(pl, Shard) and pl.dim == dim else pl
        for pl in p.placements  # type: ignore[attr-defined]
    ]
    shape = list(p.shape)
    shape[dim] = 1
    return dtensor_zeros(
        shape,
        dtype=dtype,
        device_mesh=p.device_mesh,  # type: ignore[attr-defined]
        placements=placements,
    )
