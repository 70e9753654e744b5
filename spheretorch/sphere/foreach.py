r"""The sphere operations on *lists* of tensors sharing one sphere axis, with ``_foreach`` ops.

The optimizers' multi-tensor paths use these: :func:`project` / :func:`project_` (tangent
projection, vector transport by projection), :func:`normalize_` (completes the projective
retraction after ``x += u``), :func:`expmap_` (exponential map with parallel transport) and
:func:`normalize_each_` (renormalisation along per-tensor axes). Per-slice reductions, which
``_foreach`` has no op for, come from a :class:`RowReducer`: one call per large tensor and one
stacked call per set of small same-shaped tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .checks import compute_dtype
from .dtensor import is_dtensor
from .functional import norm
from .series import sinc

__all__ = [
    "STACK_MAX_NUMEL",
    "RowReducer",
    "apply_",
    "expmap_",
    "normalize_",
    "normalize_each_",
    "project",
    "project_",
]

#: tensors with at most this many elements are reduced together with same-shaped ones
STACK_MAX_NUMEL = 1 << 15


def apply_(op: str, dsts: Sequence[Tensor], *args: object, **kwargs: object) -> None:
    """``torch._foreach_<op>_(dsts, *args, **kwargs)``; one in-place op per tensor while
    compiling.

    Inductor (torch 2.13, found on CPU) miscompiles an in-place ``_foreach`` op whose operands
    read its destination at other positions, e.g. ``_foreach_div_(xs, norms_of_xs_along_0)``
    or a copy back of values computed from the destination: it computes the operand inside the
    loop that already overwrote part of the destination (compiled optimizer steps were off by
    up to 4e-2 on column spheres; ``tests/test_optim_compile.py`` compiles these writes and
    every optimizer against eager). Per-tensor in-place ops compile correctly and fuse as
    well, so every such write of the sphere code goes through here. ``args``: lists (one entry
    per tensor) or scalars.
    """
    if not torch.compiler.is_compiling():
        getattr(torch, f"_foreach_{op}_")(dsts, *args, **kwargs)
        return
    method = getattr(Tensor, f"{op}_")
    for i, d in enumerate(dsts):
        method(d, *(a[i] if isinstance(a, (list, tuple)) else a for a in args), **kwargs)


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
    apply_("addcmul", vs, xs, red.inner(xs, vs), value=-1)


def normalize_(xs: Sequence[Tensor], red: RowReducer) -> None:
    r"""In place :math:`x \leftarrow x / \|x\|` along the reducer's axis."""
    apply_("div", xs, red.norm(xs))


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
        apply_("addcmul", transported, us, half, value=-0.5)
        torch._foreach_mul_(k, sinc_n)
        apply_("addcmul", transported, xs, k, value=-1)
    apply_("mul", xs, cos_n)
    apply_("addcmul", xs, us, sinc_n)
    normalize_(xs, red)


def normalize_each_(
    xs: Sequence[Tensor],
    dims: Sequence[int | None],
    *,
    foreach: bool = True,
    keep: Tensor | None = None,
) -> None:
    r"""In place :math:`x \leftarrow x / \|x\|` along ``dims[i]`` (``None``: left alone).

    Norms of half types are accumulated in float32. ``foreach=False``: torch's
    ``vector_norm`` (bitwise ``x.div_(x.norm(dim, keepdim=True))``); the multi-tensor path
    uses a float64-accumulated sum of squares along strided axes (within 1 ulp of the exactly
    rounded result, and ~10x faster than torch's CPU ``vector_norm`` there). ``keep`` (0-d):
    when nonzero everything stays bitwise unchanged, without a host synchronisation. Under
    autograd (a differentiable optimizer step) the division reads a copy of ``x``.
    """
    groups: dict[tuple[torch.device, torch.dtype, int], list[Tensor]] = {}
    for x, d in zip(xs, dims):
        if d is not None:
            groups.setdefault((x.device, x.dtype, d), []).append(x)
    for (_, dtype, dim), group in groups.items():
        grad_mode = not foreach and torch.is_grad_enabled()
        if grad_mode:  # autograd saves what norm() reads: read copies, then write x
            group, targets = [x.clone() for x in group], group
        if foreach:
            norms = RowReducer(group, dim).norm(group, dtype=compute_dtype(dtype), exact=True)
        else:
            norms = [norm(x, dim) for x in group]
        if keep is not None:
            # lerp(n, 1, keep) is exactly n for keep == 0 and exactly 1 for keep == 1
            one = torch.ones((), dtype=norms[0].dtype, device=norms[0].device)
            torch._foreach_lerp_(norms, [one] * len(norms), [keep.to(one.dtype)] * len(norms))
        if foreach:
            apply_("div", group, norms)
        elif grad_mode:
            for t, x, n in zip(targets, group, norms):
                t.copy_(x / n)
        else:  # DTensors (FSDP2) take this path: plain ops only
            for x, n in zip(group, norms):
                x.div_(n)
