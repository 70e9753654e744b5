"""Argument checks and the one half-precision policy of the sphere functions.

``UPCAST_DTYPES`` is the only "compute these in float32" set in spheretorch: reductions and
angle functions of float16/bfloat16 tensors run in :func:`.compute_dtype` and are cast back.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor

from .layout import canonical_sphere_dims

__all__ = [
    "UPCAST_DTYPES",
    "check_floating",
    "check_same_shape",
    "check_sphere_dim",
    "check_sphere_dims",
    "compute_dtype",
    "upcast",
]

#: dtypes whose reductions (norms, inner products) and angles are computed in float32
UPCAST_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions are accumulated in: float32 for half/bfloat16, else ``dtype``."""
    return torch.float32 if dtype in UPCAST_DTYPES else dtype


def upcast(x: Tensor) -> Tensor:
    """``x`` in its :func:`compute_dtype` (no copy when it already is)."""
    return x.to(compute_dtype(x.dtype))


def check_floating(x: Tensor, name: str) -> None:
    """Raise ``TypeError`` unless ``x`` is a floating-point tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must have a floating-point dtype (float16, bfloat16, float32, float64), "
            f"got {x.dtype}"
        )


def check_sphere_dim(x: Tensor, dim: int, name: str = "dim", min_size: int = 1) -> int:
    """Return ``dim`` as a non-negative axis of ``x`` or raise a one-line error naming it.

    ``min_size``: the least size of the axis. 2 where a sphere is made or its geodesics are
    used: :math:`S^0` (size 1) is two isolated points, with no tangent directions.
    """
    # any integer with __index__ (NumPy ints, 0-d integer tensors), as torch accepts; bool
    # and float are refused even though bool has __index__: dim=True is a mistake
    try:
        if isinstance(dim, bool):
            raise TypeError
        dim = operator.index(dim)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(dim).__name__}") from None
    if x.dim() == 0:
        raise ValueError(
            f"a point on the sphere needs at least one axis; got a 0-d tensor ({name})"
        )
    if not -x.dim() <= dim < x.dim():
        raise ValueError(
            f"{name}={dim} is out of range for a tensor of shape {tuple(x.shape)} "
            f"(expected -{x.dim()} <= {name} < {x.dim()})"
        )
    dim %= x.dim()
    if x.shape[dim] < min_size:
        raise ValueError(
            f"the sphere axis {name}={dim} of a tensor of shape {tuple(x.shape)} has size "
            f"{x.shape[dim]}; a sphere needs at least {min_size} coordinates along it"
        )
    return dim


def check_sphere_dims(
    x: Tensor, dims: object, name: str = "dim", min_size: int = 1
) -> int | tuple[int, ...]:
    """Sphere axes of ``x`` as given by a user: an int (one axis, as :func:`check_sphere_dim`),
    a tuple of adjacent axes, or ``None`` (the whole tensor is one sphere).

    Returns a non-negative int where the sphere is one axis (an int, a one-element tuple, or
    ``None`` for a 1-D tensor) and otherwise the ascending tuple of >= 2 adjacent axes
    (``None``: every axis). ``min_size``: the least number of coordinates of one sphere.
    Errors are one line naming ``name`` (see :func:`.layout.canonical_sphere_dims`).
    """
    if not isinstance(dims, (tuple, list)) and dims is not None:
        return check_sphere_dim(x, dims, name, min_size)  # type: ignore[arg-type]
    if x.dim() == 0:
        raise ValueError(
            f"a point on the sphere needs at least one axis; got a 0-d tensor ({name})"
        )
    if dims is None:
        dims = tuple(range(x.dim()))
    elif any(isinstance(d, bool) or not hasattr(d, "__index__") for d in dims):
        raise TypeError(f"{name} must be an int, a tuple of adjacent ints or None, got {dims!r}")
    if not dims:
        raise ValueError(f"{name} must name at least one axis, got ()")
    canon = canonical_sphere_dims(x.dim(), tuple(dims), name)
    if isinstance(canon, int):
        return check_sphere_dim(x, canon, name, min_size)
    assert canon is not None
    size = math.prod(x.shape[d] for d in canon)
    if size < min_size:
        raise ValueError(
            f"the sphere axes {name}={canon} of a tensor of shape {tuple(x.shape)} hold "
            f"{size} coordinates; a sphere needs at least {min_size}"
        )
    return canon


def check_same_shape(a: Tensor, b: Tensor, names: str) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` have the same shape."""
    if a.shape != b.shape:
        raise ValueError(
            f"{names} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
