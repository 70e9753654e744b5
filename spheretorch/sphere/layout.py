r"""Where a tensor's spheres lie: every sphere parameter seen as ``(outer, size, inner)``.

A tensor of shape :math:`(n_0, \dots, n_{k-1})` whose spheres span the axes ``dims`` is, for
kernels and optimizers, a 3-D view ``(outer, size, inner)``: ``view[o, :, i]`` is one sphere of
dimension ``size - 1``. The kinds of sphere axes:

* an int ``d``: the slices along one axis (``SphereParameter(x, dim=d)``); ``outer`` is the
  product of the sizes before ``d``, ``inner`` of those after it;
* a tuple of adjacent axes, e.g. ``(1, 2, 3)`` for a conv weight whose every output filter is
  one sphere: the axes are flattened into ``size``;
* ``None``: the whole tensor is one sphere (``outer = inner = 1``).

This is the one place that turns sphere axes into that view; optimizers and kernels call
:func:`sphere_layout` and :meth:`SphereLayout.view` rather than reshaping on their own.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

__all__ = ["SphereDims", "SphereLayout", "canonical_sphere_dims", "sphere_layout"]

# sphere axes as users give them (one axis, adjacent axes, or the whole tensor)
SphereDims = int | tuple[int, ...] | None


def _axis(ndim: int, d: object, name: str) -> int:
    if isinstance(d, bool) or not hasattr(d, "__index__"):
        raise TypeError(f"{name} must be an int, a tuple of ints or None, got {d!r}")
    i = operator.index(d)
    if not -ndim <= i < ndim:
        raise ValueError(f"{name}={i} is out of range for a tensor with {ndim} dimensions")
    return i % ndim


def canonical_sphere_dims(ndim: int, dims: object, name: str = "dim") -> SphereDims:
    """``dims`` as non-negative axes: an int, an ascending tuple of >= 2 adjacent axes, or None.

    Accepts anything with ``__index__`` (NumPy ints, as torch does) for an axis; a one-element
    tuple becomes its int.

    Raises:
        TypeError: not an int, a tuple/list of ints or None (a bool is refused).
        ValueError: an axis out of range, repeated, or axes that are not adjacent.
    """
    if dims is None:
        return None
    if isinstance(dims, (tuple, list)):
        if not dims:
            raise ValueError(f"{name} must name at least one axis, got {tuple(dims)!r}")
        axes = sorted(_axis(ndim, d, name) for d in dims)
        if len(set(axes)) != len(axes):
            raise ValueError(f"{name} names an axis twice: {tuple(dims)!r}")
        if axes[-1] - axes[0] != len(axes) - 1:
            raise ValueError(f"{name} must be adjacent axes (e.g. (1, 2, 3)), got {tuple(dims)!r}")
        return axes[0] if len(axes) == 1 else tuple(axes)
    return _axis(ndim, dims, name)


@dataclass(frozen=True)
class SphereLayout:
    """A tensor as ``(outer, size, inner)``: ``view[o, :, i]`` is one sphere of ``size`` values."""

    outer: int
    size: int
    inner: int

    @property
    def count(self) -> int:
        """How many spheres (``outer * inner``)."""
        return self.outer * self.inner

    def view(self, t: Tensor) -> Tensor:
        """``t`` as a ``(outer, size, inner)`` view (no copy; raises where ``t``'s strides forbid
        one, e.g. a non-contiguous tensor whose sphere axes cannot be merged)."""
        return t.view(self.outer, self.size, self.inner)


def sphere_layout(shape: Sequence[int], dims: object) -> SphereLayout:
    """The :class:`SphereLayout` of a tensor of ``shape`` whose spheres span ``dims``."""
    shape = tuple(shape)
    canon = canonical_sphere_dims(len(shape), dims)
    if canon is None:
        return SphereLayout(1, math.prod(shape), 1)
    first, last = (canon, canon) if isinstance(canon, int) else (canon[0], canon[-1])
    return SphereLayout(
        math.prod(shape[:first]), math.prod(shape[first : last + 1]), math.prod(shape[last + 1 :])
    )
