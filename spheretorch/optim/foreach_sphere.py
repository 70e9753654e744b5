r"""The optimizers' manifold interface in multi-tensor (``_foreach``) form.

The single-tensor implementations call :func:`spheretorch.sphere.project`,
:func:`~spheretorch.sphere.retract`, :func:`~spheretorch.sphere.expmap` and
:func:`~spheretorch.sphere.transport` directly. The multi-tensor implementations need the
same four operations on a *list* of tensors sharing one sphere axis, written with in-place
``torch._foreach_*`` ops:

* :func:`project` / :func:`project_`: :math:`u - \langle x, u\rangle x` (Riemannian gradient,
  and vector transport by projection onto the new tangent space);
* :func:`normalize_`: :math:`x / \|x\|`; after ``x += u`` it completes the projective
  retraction :math:`R_x(u) = (x + u)/\|x + u\|`;
* :func:`expmap_`: :math:`x \leftarrow \exp_x(u)`, optionally transporting tangent vectors
  along the geodesic (parallel transport).

Everything the pointwise ops need per slice (inner products, norms) comes from a
:class:`RowReducer`. Reductions are the one thing ``_foreach`` has no op for: a reducer does
one call per large tensor and a single stacked call for each set of small tensors of one
shape, so 64 small parameters cost a handful of kernel calls, not 64.

:func:`buckets` orders the work for the CPU caches: on CPU the lists are cut into buckets of
about :data:`CPU_BUCKET_BYTES` and every op of a step runs bucket by bucket, so a bucket's
parameter, gradient and moments are read from memory once per step and then stay in cache
(running each op over the whole list streams everything from DRAM once per op, about 1.4x
slower for the benchmark set). On CUDA a bucket is the whole list. :func:`work_units` also
pulls out sets of small same-shaped tensors, which the optimizers update as one stacked
tensor.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..sphere import sinc
from .optimizer import is_dtensor

__all__ = [
    "CPU_BUCKET_BYTES",
    "RowReducer",
    "buckets",
    "expmap_",
    "normalize_",
    "project",
    "project_",
    "stack_into",
    "work_units",
]

#: tensors with at most this many elements are reduced together with same-shaped ones
STACK_MAX_NUMEL = 1 << 15
#: parameter bytes per bucket on CPU (a bucket's working set, ~4x this, stays in L2/L3)
CPU_BUCKET_BYTES = 1 << 20
#: same-shaped parameters with at most this many elements are updated as one stacked tensor
STACK_STEP_MAX_NUMEL = 4096


def buckets(tensors: Sequence[Tensor], budget: int | None = None) -> list[list[int]]:
    """Indices of ``tensors`` cut into consecutive buckets of about ``budget`` bytes on CPU
    (default :data:`CPU_BUCKET_BYTES`).

    A tensor larger than the budget is a bucket on its own; on any other device (or when
    compiling, where the compiler fuses the ops anyway) there is one bucket.
    """
    n = len(tensors)
    if n == 0:
        return []
    if tensors[0].device.type != "cpu" or torch.compiler.is_compiling():
        return [list(range(n))]
    if budget is None:
        budget = CPU_BUCKET_BYTES
    out: list[list[int]] = []
    cur: list[int] = []
    size = 0
    for i, t in enumerate(tensors):
        b = t.numel() * t.element_size()
        if cur and size + b > budget:
            out.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += b
    out.append(cur)
    return out


def work_units(
    tensors: Sequence[Tensor],
    keys: Sequence[Hashable] | None = None,
    budget: int | None = None,
) -> list[tuple[bool, list[int]]]:
    """Split ``tensors`` into units of work ``(stacked, indices)``.

    Small tensors (at most :data:`STACK_STEP_MAX_NUMEL` elements) of one shape and one key
    (e.g. the same step count) form *stacked* units: the optimizer stacks them into one
    tensor, runs the whole update on it with ordinary ops and copies the results back, so 64
    small parameters cost the same few kernel calls as one. Elementwise results are the same
    as updating them one by one. Everything else is cut into :func:`buckets` of ``budget``
    bytes (default :data:`CPU_BUCKET_BYTES`). While compiling
    there is one unstacked unit (the compiler fuses the ops itself); ``keys=None`` disables
    stacking.
    """
    n = len(tensors)
    if n == 0:
        return []
    if keys is None or torch.compiler.is_compiling():
        return [(False, b) for b in buckets(tensors, budget)]
    small: dict[tuple[Any, ...], list[int]] = {}
    rest = []
    for i, t in enumerate(tensors):
        if t.numel() <= STACK_STEP_MAX_NUMEL and not is_dtensor(t):
            small.setdefault((t.shape, t.device, t.dtype, keys[i]), []).append(i)
        else:
            rest.append(i)
    units: list[tuple[bool, list[int]]] = []
    for idx in small.values():
        if len(idx) == 1:
            rest.extend(idx)
            continue
        per = max(1, (CPU_BUCKET_BYTES // max(1, tensors[idx[0]].nbytes)))
        if tensors[idx[0]].device.type != "cpu":
            per = len(idx)
        units.extend((True, idx[k : k + per]) for k in range(0, len(idx), per))
    if rest:
        rest.sort()
        units.extend((False, [rest[j] for j in b]) for b in buckets(pick(tensors, rest), budget))
    if tensors[0].device.type == "cpu":
        # Last to first: the non-finite check has just read the gradients first to last, so
        # the last ones are still in cache.
        units.sort(key=lambda unit: -unit[1][-1])
    return units


def pick(seq: Sequence[Any], idx: Sequence[int]) -> list[Any]:
    return [seq[i] for i in idx]


def stack_into(tensors: Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """``torch.stack(tensors)``, converted to ``dtype`` if given."""
    st = torch.stack(list(tensors))
    return st if dtype is None or st.dtype == dtype else st.to(dtype)


class RowReducer:
    """Reductions along one sphere axis ``dim`` for lists of tensors shaped like ``like``.

    The plan (which tensors are reduced one by one, which are stacked) is made once from the
    shapes and reused for every reduction of a step. Results keep ``dim`` as size 1.
    """

    __slots__ = ("dim", "n", "singles", "stacks")

    def __init__(self, like: Sequence[Tensor], dim: int) -> None:
        self.dim = dim
        self.n = len(like)
        self.singles: list[int] = []
        self.stacks: list[list[int]] = []
        if self.n >= 2:
            first = like[0]
            if (
                first.numel() <= STACK_MAX_NUMEL
                and not is_dtensor(first)
                and all(t.shape == first.shape for t in like)
            ):
                self.stacks.append(list(range(self.n)))
                return
        by_shape: dict[torch.Size, list[int]] = {}
        for i, t in enumerate(like):
            if t.numel() <= STACK_MAX_NUMEL and not is_dtensor(t):
                by_shape.setdefault(t.shape, []).append(i)
            else:
                self.singles.append(i)
        for idx in by_shape.values():
            if len(idx) == 1:
                self.singles.extend(idx)
            else:
                self.stacks.append(idx)

    @staticmethod
    def _one(t: Tensor, d: int, what: str, dtype: torch.dtype | None) -> Tensor:
        if what == "sum":
            return t.sum(d, keepdim=True, dtype=dtype)
        if is_dtensor(t):
            # Along a sharded axis the result is a pending all-reduce (a Partial placement),
            # which in-place ops cannot resolve: out-of-place ops only.
            if what == "sqnorm":
                return (t * t).sum(d, keepdim=True, dtype=dtype)
            return torch.linalg.vector_norm(t, dim=d, keepdim=True, dtype=dtype)
        if t.stride(d) == 1:
            n = torch.linalg.vector_norm(t, dim=d, keepdim=True, dtype=dtype)
            return n.square_() if what == "sqnorm" else n
        # Along a strided axis torch's CPU vector_norm is ~10-30x slower than a product and
        # a sum (and, for long float32 columns, several ulp off).
        tc = t if dtype is None or t.dtype == dtype else t.to(dtype)
        if what == "exact_norm" and tc.dtype == torch.float32:
            # float64 accumulation: the norm is correctly rounded (up to rare ties)
            n = (tc * tc).sum(d, keepdim=True, dtype=torch.float64).sqrt_()
            return n.to(torch.float32)
        sq = (tc * tc).sum(d, keepdim=True)
        return sq if what == "sqnorm" else sq.sqrt_()

    def _reduce(
        self, ts: Sequence[Tensor], what: str, dtype: torch.dtype | None = None
    ) -> list[Tensor]:
        d = self.dim
        if len(self.stacks) == 1 and not self.singles:  # all small, one shape
            return list(self._one(torch.stack(list(ts)), d + 1, what, dtype).unbind(0))
        out: list[Tensor] = [None] * self.n  # type: ignore[list-item]
        for i in self.singles:
            out[i] = self._one(ts[i], d, what, dtype)
        for idx in self.stacks:
            red = self._one(torch.stack([ts[i] for i in idx]), d + 1, what, dtype)
            for i, r in zip(idx, red.unbind(0)):
                out[i] = r
        return out

    def sum(self, ts: Sequence[Tensor]) -> list[Tensor]:
        """:math:`\\sum_{\\text{dim}} t` for each ``t``."""
        return self._reduce(ts, "sum")

    def inner(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> list[Tensor]:
        r""":math:`\langle x, y\rangle` along ``dim`` for each pair."""
        return self._reduce(torch._foreach_mul(xs, ys), "sum")

    def norm(
        self, xs: Sequence[Tensor], dtype: torch.dtype | None = None, exact: bool = False
    ) -> list[Tensor]:
        r""":math:`\|x\|` along ``dim``, accumulated and returned in ``dtype`` if given.

        Along a contiguous axis this is torch's ``vector_norm`` (one fused reduction); along a
        strided one a product and a sum, with ``exact=True`` accumulated in float64 for
        float32 input (a correctly rounded norm, for renormalisations that must agree with an
        exact one to an ulp).
        """
        return self._reduce(xs, "exact_norm" if exact else "norm", dtype=dtype)

    def sqnorm(self, xs: Sequence[Tensor]) -> list[Tensor]:
        r""":math:`\|x\|^2` along ``dim``."""
        return self._reduce(xs, "sqnorm")


def project(xs: Sequence[Tensor], us: Sequence[Tensor], red: RowReducer) -> list[Tensor]:
    r"""New tensors :math:`u - \langle x, u\rangle x` (tangent projection at unit ``x``)."""
    return torch._foreach_addcmul(us, xs, red.inner(xs, us), value=-1)


def project_(xs: Sequence[Tensor], vs: Sequence[Tensor], red: RowReducer) -> None:
    r"""In place :math:`v \leftarrow v - \langle x, v\rangle x`: vector transport by projection
    onto the tangent space at the (new) point ``x``."""
    torch._foreach_addcmul_(vs, xs, red.inner(xs, vs), value=-1)


def normalize_(xs: Sequence[Tensor], red: RowReducer) -> None:
    r"""In place :math:`x \leftarrow x / \|x\|` along the reducer's axis."""
    torch._foreach_div_(xs, red.norm(xs))


def expmap_(
    xs: Sequence[Tensor],
    us: Sequence[Tensor],
    red: RowReducer,
    transported: Sequence[Tensor] | None = None,
) -> None:
    r"""In place :math:`x \leftarrow \exp_x(u) = \cos\|u\|\,x + \mathrm{sinc}\|u\|\,u`, then
    re-normalised; ``transported`` tangent vectors :math:`v` at ``x`` are moved to the new
    point by parallel transport along the geodesic:

    .. math:: \Gamma(v) = v - \langle u, v\rangle\Big(\tfrac12\mathrm{sinc}^2\tfrac{\|u\|}{2}\,u
              + \mathrm{sinc}\|u\|\,x\Big)

    (:math:`\tfrac12\mathrm{sinc}^2(n/2) = (1-\cos n)/n^2`), which needs no division by
    :math:`\|u\|` and is exact at :math:`u = 0`. ``us`` is left unchanged.
    """
    n = red.norm(us)
    cos_n = torch._foreach_cos(n)
    sinc_n = [sinc(t) for t in n]
    if transported is not None:
        k = red.inner(us, transported)
        half = [sinc(t * 0.5) for t in n]
        torch._foreach_mul_(half, half)
        torch._foreach_mul_(half, k)  # <u, v> (1 - cos n) / n^2 * 2
        torch._foreach_addcmul_(transported, us, half, value=-0.5)
        torch._foreach_mul_(k, sinc_n)
        torch._foreach_addcmul_(transported, xs, k, value=-1)
    torch._foreach_mul_(xs, cos_n)
    torch._foreach_addcmul_(xs, us, sinc_n)
    normalize_(xs, red)
