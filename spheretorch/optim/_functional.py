r"""Helpers the three optimizers share (torch keeps these in ``optim/_functional.py`` and
``_foreach_utils.py``): argument checks, list handling, the CPU bucketing and small-tensor
stacking of the multi-tensor paths, the non-finite test, and the single-tensor retraction.

:func:`work_units` orders the work for the CPU caches: on CPU the lists are cut into buckets
of about :data:`CPU_BUCKET_BYTES` and every op of a step runs bucket by bucket, so a bucket's
parameter, gradient and moments come from memory once per step (about 1.4x faster than
streaming the whole list once per op). Small same-shaped tensors form stacked units, updated
as one tensor by :func:`run_stacked`.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .. import sphere
from ..kernels.backend import BACKEND_ENV, Backend, backend_for
from ..sphere import foreach as sphere_foreach
from ..sphere.dtensor import global_value, is_dtensor
from ..sphere.layout import SphereDims, canonical_sphere_dims, sphere_layout
from . import _native

Retraction = Literal["project", "exp"]
SecondMoment = Literal["row", "coordinate"]

#: parameter bytes per bucket on CPU (a bucket's working set, ~4x this, stays in L2/L3)
CPU_BUCKET_BYTES = 1 << 20
#: same-shaped parameters with at most this many elements are updated as one stacked tensor
STACK_STEP_MAX_NUMEL = 4096
_FOREACH_DEVICES = ("cpu", "cuda")
_BIG = 1 << 16  # gradients with at least this many elements are checked one by one


# ---------------------------------------------------------------------- sphere geometry


@dataclass(frozen=True)
class SphereGeometry:
    r"""Where one parameter's spheres lie: its sphere axes, their radius, and the
    ``(outer, size, inner)`` view of ``spheretorch.sphere.layout.sphere_layout``.

    ``dims``: an int (slices along one axis), a tuple of adjacent axes, or ``None`` (the whole
    tensor is one sphere). ``radius``: every sphere is :math:`\|x\| = r`.
    """

    dims: SphereDims
    radius: float
    layout: Any  #: the ``spheretorch.sphere.layout.SphereLayout`` of the parameter

    @property
    def axis(self) -> int:
        """The axis the reductions run along in :meth:`rows` views."""
        return self.dims if isinstance(self.dims, int) else 1

    def rows(self, t: Tensor) -> Tensor:
        """``t`` itself (one sphere axis) or its ``(outer, size, inner)`` view (no copy; a
        tensor whose strides forbid the view is copied, so only read such results)."""
        if isinstance(self.dims, int):
            return t
        if t.numel() == self.layout.count:  # a per-sphere statistic (size 1 along the spheres)
            return t.reshape(self.layout.outer, 1, self.layout.inner)
        return t.reshape(self.layout.outer, self.layout.size, self.layout.inner)

    def moment_shape(self, shape: Sequence[int]) -> list[int]:
        """``shape`` with every sphere axis of size 1 (one value per sphere)."""
        out = list(shape)
        axes = (
            range(len(out))
            if self.dims is None
            else (self.dims,)
            if isinstance(self.dims, int)
            else self.dims
        )
        for a in axes:
            out[a] = 1
        return out


def write_back(t: Tensor, rows: Tensor) -> None:
    """Store ``rows`` (computed on :meth:`SphereGeometry.rows` of ``t``) into ``t``, unless
    it already is ``t`` or a view of it (written in place)."""
    if rows is t:
        return
    if rows.shape == t.shape:
        t.copy_(rows)  # one sphere axis: rows is a new result (DTensors take this path)
        return
    if rows.numel() and rows.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
        return  # a reshape view of t: the in-place updates went to t
    t.copy_(rows.reshape(t.shape))


@functools.lru_cache(maxsize=4096)
def _geometry(shape: tuple[int, ...], dims: Any, radius: float) -> SphereGeometry:
    canon = canonical_sphere_dims(len(shape), dims)
    return SphereGeometry(canon, float(radius), sphere_layout(shape, canon))


def sphere_of(p: Tensor) -> SphereGeometry | None:
    """THE hook the optimizers use to ask "is ``p`` on a sphere, and which": ``None`` for a
    Euclidean tensor, else its :class:`SphereGeometry`.

    Read from the tensor's attributes: ``sphere_dim`` (an int, a tuple of adjacent axes, or
    ``None`` = the whole tensor, the latter only on a :class:`~spheretorch.SphereParameter`:
    on any other tensor a ``None`` or missing ``sphere_dim`` means Euclidean) and
    ``sphere_radius`` (default 1.0).
    """
    dims = getattr(p, "sphere_dim", None)
    if dims is None:
        from ..parameter import SphereParameter

        if not isinstance(p, SphereParameter):
            return None
    return _geometry(tuple(p.shape), dims, getattr(p, "sphere_radius", 1.0))


def geometry_of(p: Tensor, d: Any) -> SphereGeometry | None:
    """An entry of a functional core's ``sphere_dims`` list as a :class:`SphereGeometry`:
    ``None`` (Euclidean), a :class:`SphereGeometry`, or sphere axes (radius 1)."""
    if d is None or isinstance(d, SphereGeometry):
        return d
    return _geometry(tuple(p.shape), d, 1.0)


def sphere_groups(
    params: Sequence[Tensor], geoms: Sequence[SphereGeometry | None]
) -> tuple[list[int], dict[tuple[Any, ...], list[int]]]:
    """Indices of Euclidean parameters, and of sphere ones keyed by (device, dtype, view kind,
    reduction axis, radius): the parameters one multi-tensor update handles together."""
    euclidean: list[int] = []
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, (p, geo) in enumerate(zip(params, geoms)):
        if geo is None:
            euclidean.append(i)
        else:
            kind = isinstance(geo.dims, int)
            groups.setdefault((p.device, p.dtype, kind, geo.axis, geo.radius), []).append(i)
    return euclidean, groups


def use_triton(tensors: Sequence[Tensor]) -> bool:
    """Whether the Triton kernels run these tensors' sphere updates
    (:func:`spheretorch.kernels.backend.backend_for` of their device: CUDA by default, any
    device with ``SPHERETORCH_FUSED_BACKEND=triton``); never while compiling or for DTensors."""
    if not tensors or compiling() or is_dtensor(tensors[0]):
        return False
    device = tensors[0].device
    if device.type == "cpu" and BACKEND_ENV not in os.environ:
        return False  # the common CPU case without reading the switch (small problems)
    return backend_for(device) is Backend.TRITON


def run_masked(found_inf: Tensor | None, written: Sequence[Tensor], fn: Callable[[], None]) -> None:
    """Run ``fn`` (which updates ``written`` in place); where ``found_inf`` is nonzero, restore
    every tensor of ``written`` bitwise, without a host synchronisation. The device-side skip
    for a path that has no ``found_inf`` input of its own."""
    if found_inf is None:
        fn()
        return
    saved = [t.clone() for t in written]
    fn()
    skip = found_inf.to(torch.bool)
    for t, old in zip(written, saved):
        t.copy_(torch.where(skip, old, t))


# ---------------------------------------------------------------------- arguments


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_hyperparameters(
    lr: Any, betas: Any = None, eps: Any = None, weight_decay: Any = 0.0, momentum: Any = None
) -> None:
    """torch's checks and wording, plus: non-finite values are rejected as well."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= float(lr) < math.inf:
            raise ValueError(f"Invalid learning rate: {float(lr)}")
    elif not 0.0 <= lr < math.inf:
        raise ValueError(f"Invalid learning rate: {lr}")
    if eps is not None and not 0.0 <= eps < math.inf:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if betas is not None:
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        if len({isinstance(b, Tensor) for b in betas}) != 1:
            raise ValueError("betas must be either both floats or both Tensors")
        for i, b in enumerate(betas):
            if not 0.0 <= float(b) < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b}")
    if momentum is not None and not 0.0 <= momentum < math.inf:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if not 0.0 <= weight_decay < math.inf:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def default_foreach(tensors: Iterable[Tensor]) -> bool:
    """``foreach=None`` resolves to ``True`` when every tensor is a plain CPU or CUDA tensor.

    DTensors (FSDP2) take the single-tensor path, whose reductions along a sharded axis are
    ordinary DTensor ops.
    """
    return all(t.device.type in _FOREACH_DEVICES and not is_dtensor(t) for t in tensors)


def compiling() -> bool:
    return torch.compiler.is_compiling()


def scalar_value(x: Tensor | float) -> Tensor | float:
    """A step counter or hyper-parameter as a Python number (a tensor while compiling)."""
    if isinstance(x, Tensor) and not compiling():
        return x.item()
    return x


def scalar_dtype() -> torch.dtype:
    """dtype of a host-side step counter (torch's convention: float64 under a float64 default)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def new_step(p: Tensor, fused: bool = False, capturable: bool = False) -> Tensor:
    """A zero step counter where torch keeps it: on ``p``'s device for fused (float32) and
    capturable steps, else on the host (no kernel launch to increment it)."""
    if fused or capturable:
        return torch.zeros((), dtype=torch.float32 if fused else scalar_dtype(), device=p.device)
    return torch.zeros((), dtype=scalar_dtype())


def check_fused_param(p: Tensor) -> None:
    """torch's check (and wording) for ``fused=True``: floating point, on a supported device."""
    if not (p.device.type in _FOREACH_DEVICES and torch.is_floating_point(p)):
        raise RuntimeError(
            "`fused=True` requires all the params to be floating point Tensors of supported "
            f"devices: {list(_FOREACH_DEVICES)} but {p.dtype} and {p.device.type}"
        )


def increment_steps(steps: list[Tensor]) -> None:
    """``step += 1`` for a list of step counters, as torch's foreach Adam does it."""
    if not steps:
        return
    if not compiling() and steps[0].is_cpu:
        # one wrapped scalar instead of one per tensor on the CPU slow path
        torch._foreach_add_(steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
    else:
        torch._foreach_add_(steps, 1)


def group_by_axis(
    params: Sequence[Tensor], sphere_dims: Sequence[int | None]
) -> tuple[list[int], dict[tuple[torch.device, torch.dtype, int], list[int]]]:
    """Split indices into Euclidean ones and sphere ones keyed by (device, dtype, sphere axis)."""
    euclidean: list[int] = []
    spheres: dict[tuple[torch.device, torch.dtype, int], list[int]] = {}
    for i, (p, d) in enumerate(zip(params, sphere_dims)):
        if d is None:
            euclidean.append(i)
        else:
            spheres.setdefault((p.device, p.dtype, d), []).append(i)
    return euclidean, spheres


def pick(seq: Sequence[Any], idx: Sequence[int]) -> list[Any]:
    return [seq[i] for i in idx]


# ---------------------------------------------------------------------- CPU buckets and stacking


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


def stack_into(tensors: Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """``torch.stack(tensors)``, converted to ``dtype`` if given."""
    st = torch.stack(list(tensors))
    return st if dtype is None or st.dtype == dtype else st.to(dtype)


def run_stacked(
    lists: Sequence[Sequence[Tensor]],
    fn: Callable[..., None],
    *args: Any,
    dtype: torch.dtype | None = None,
    cast: tuple[int, ...] = (0, 1),
    read_only: tuple[int, ...] = (1,),
) -> list[Tensor | None]:
    """Update many small same-shaped tensors as one: stack each list (those in ``cast``
    converted to ``dtype``), let ``fn(stacks, *args)`` update the stacks in place (it may
    also put a new tensor where a list was empty), then copy every stack not in
    ``read_only`` back.

    Elementwise results are those of updating the tensors one by one. Returns the stacks.
    """
    stacks: list[Tensor | None] = [
        stack_into(ts, dtype if i in cast else None) if ts else None for i, ts in enumerate(lists)
    ]
    fn(stacks, *args)
    for i, (ts, st) in enumerate(zip(lists, stacks)):
        if ts and i not in read_only:
            sphere_foreach.apply_("copy", ts, st.unbind(0))  # type: ignore[union-attr]
    return stacks


def to_dtype(ts: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """``ts`` converted to ``dtype`` (the same list object when nothing needs converting)."""
    return ts if all(t.dtype == dtype for t in ts) else [t.to(dtype) for t in ts]


# ---------------------------------------------------------------------- non-finite test


_NATIVE_SCAN_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def nonfinite_flag(grads: Sequence[Tensor]) -> Tensor | bool:
    """0-d tensor (or a Python bool, when computed on the host), nonzero when some gradient
    may hold a NaN or an infinity. No sync.

    Where :func:`use_triton` (CUDA) and the gradients are contiguous: an exact scan by one
    Triton launch per dtype (:func:`spheretorch.kernels.optim.nonfinite_flag`, float32 0/1).
    Contiguous CPU gradients: an exact scan of the exponent bits by the native kernel
    (``_native.nonfinite``). Otherwise (DTensors, strided gradients):
    One full reduction per gradient (in float32 for half types): a sum for large gradients
    (the cheapest; ~1.7x faster than a norm on CPU), one ``_foreach_norm`` for all small ones.
    A finite gradient whose sum (of squares) overflows is flagged too; :func:`really_nonfinite`
    re-checks. Sharded (DTensor) flags are all-reduced, one per mesh, so all ranks agree.
    """
    if (
        use_triton(grads)
        and all(g.is_contiguous() and g.device == grads[0].device for g in grads)
        and all(g.dtype in _NATIVE_SCAN_DTYPES for g in grads)
    ):
        from ..kernels import optim as kernels

        return kernels.nonfinite_flag(grads)
    if grads[0].is_cpu and _native.usable(grads, dtypes=_NATIVE_SCAN_DTYPES, same_dtype=False):
        # exact, and one read of each element at memory speed; the answer is on the host: a
        # Python bool (no tensor to make for a small problem's step)
        return _native.nonfinite(grads)
    by_key: dict[tuple[Any, ...], list[Tensor]] = {}
    for g in grads:
        mesh = g.device_mesh if is_dtensor(g) else None  # type: ignore[attr-defined]
        by_key.setdefault((g.device, g.dtype, g.numel() >= _BIG, mesh), []).append(g)
    flag: Tensor | None = None
    for (_, dtype, big, _), gs in by_key.items():
        acc = torch.float32 if dtype in sphere.UPCAST_DTYPES else None
        if big:
            sums = torch.stack([g.sum(dtype=acc) for g in gs])
        else:
            sums = torch.stack(torch._foreach_norm(gs, 2, dtype=acc))
        bad = global_value(~torch.isfinite(sums).all())
        flag = bad if flag is None else flag | bad.to(flag.device)
    assert flag is not None
    return flag


def really_nonfinite(grads: Sequence[Tensor]) -> bool:
    """Exact re-check (syncs) of a step flagged by :func:`nonfinite_flag`."""
    return any(not bool(global_value(torch.isfinite(g).all())) for g in grads)


# ---------------------------------------------------------------------- single-tensor retraction


def retract_(
    x: Tensor,
    u: Tensor,
    dim: int,
    retraction: Retraction,
    transported: list[Tensor],
    differentiable: bool = False,
) -> Tensor:
    r"""The new point :math:`R_x(u)` (``"project"``: :math:`(x+u)/\|x+u\|`, tangent vectors
    in ``transported`` moved by projection; ``"exp"``: :math:`\exp_x(u)`, parallel transport).

    ``transported`` is updated in place; ``x`` is not written. With ``differentiable`` the
    vectors are read through a copy, so autograd never sees a saved tensor modified.
    """
    old = [b.clone() for b in transported] if differentiable else transported
    if retraction == "project":
        y = sphere.retract(x, u, dim)
        for b, b0 in zip(transported, old):
            b.copy_(sphere.project(y, b0, dim))
    elif is_dtensor(x):
        # sphere.transport's antipodal fallback (argmin, scatter) has no DTensor rule along a
        # sharded axis; the transport along the geodesic of u needs only reductions.
        y = x.clone()
        red = sphere.foreach.RowReducer([y], dim)
        sphere.foreach.expmap_([y], [u], red, transported=transported or None)
    else:
        y = sphere.expmap(x, u, dim)
        for b, b0 in zip(transported, old):
            b.copy_(sphere.transport(x, y, b0, dim))
    return y
