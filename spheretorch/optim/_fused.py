r"""``fused=True`` for :class:`RiemannianAdam` and :class:`RiemannianSGD`.

Two implementations of one contract (the step of the foreach path, within float round-off;
a nonzero ``found_inf`` leaves parameters, moments and step counters bitwise unchanged, without
a host synchronisation):

* **CPU, float32/float64, contiguous tensors**: the hand-written C++ kernel of ``_native.cpp``
  (built on first use, 2-2.5 s once per machine, then cached on disk: see
  :mod:`spheretorch.optim._native`). One call per group of sphere parameters, OpenMP over
  slices; each slice is read from memory once, the dependent per-slice reductions (projection,
  second moment, retraction norm, transport) re-read it from L1, and the results are written
  once: torch's fused Adam's memory traffic. Measured at 1.1-1.2x torch ``Adam(fused=True)``
  (docs/benchmarks.md).
* **Everything else** (CUDA, half types, DTensors, non-contiguous tensors, no C++ compiler):
  the whole step of one sphere parameter as one function of tensor ops compiled by
  ``torch.compile`` (TorchInductor, dynamic shapes, ``fullgraph=True``; Triton on CUDA), the
  hyper-parameters that change between steps passed as tensors so that a scheduler causes no
  recompilation. First-call cost: one compilation per variant (sphere axis, number of axes,
  dtype, device, options), about 5-30 s on CPU, cached by torch for the process and on disk by
  Inductor. On CPU Inductor emits one loop nest per dependent reduction, each re-reading the
  tensors (about 5x torch's fused Adam: the reason for the native kernel); on CUDA it has not
  been measured yet. Small same-shaped parameters are stacked (CPU) as in the foreach path.

Euclidean parameters get torch's fused Adam/SGD kernels (with the same ``found_inf``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from .. import sphere
from . import _native
from ._functional import group_by_axis, pick, run_stacked, scalar_value, work_units
from ._torch_shims import torch_adam_on, torch_sgd_on

__all__ = ["fused_riemannian_adam", "fused_riemannian_sgd"]


def _retract_transport(
    x: Tensor, u: Tensor, m: Tensor | None, dim: int, exp: bool
) -> tuple[Tensor, Tensor | None]:
    """``(R_x(u), m moved to it)``: projective retraction + projection, or expmap + parallel
    transport (the formulas of :func:`spheretorch.sphere.foreach.expmap_`)."""
    if exp:
        n = torch.linalg.vector_norm(u, dim=dim, keepdim=True)
        sinc_n = sphere.sinc(n)
        if m is not None:
            k = (u * m).sum(dim, keepdim=True)
            half = sphere.sinc(n * 0.5)
            m = m - (0.5 * half * half * k) * u - (k * sinc_n) * x
        y = torch.cos(n) * x + sinc_n * u
    else:
        y = x + u
    y = y / torch.linalg.vector_norm(y, dim=dim, keepdim=True)
    if m is not None and not exp:
        m = m - (y * m).sum(dim, keepdim=True) * y
    return y, m


def _adam_kernel(
    x: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor,
    vmax: Tensor | None,
    step: Tensor,
    lr: Tensor,
    found_inf: Tensor,
    *,
    dim: int,
    beta1: float,
    beta2: float,
    eps: float,
    maximize: bool,
    row: bool,
    exp: bool,
) -> list[Tensor]:
    """One RiemannianAdam step of one (possibly stacked) sphere tensor: the new values of
    ``x, m, v, step`` (and ``vmax``), equal to the old ones where ``found_inf`` is set."""
    cd = m.dtype
    xc, gc = x.to(cd), g.to(cd)
    if maximize:
        gc = -gc
    t = step + 1
    # scalars in float64 (as the host-side numbers of the foreach path), used in ``cd``: a
    # float64 factor in the elementwise math would make Inductor compute it all in float64
    t64 = t.to(torch.float64)
    bc2_sqrt = (1 - beta2**t64).sqrt().to(cd)
    neg_step = (-lr / (1 - beta1**t64)).to(cd)
    rg = gc - (xc * gc).sum(dim, keepdim=True) * xc
    m1 = torch.lerp(m, rg, 1 - beta1)
    if row:
        v1 = v * beta2 + (rg * rg).sum(dim, keepdim=True) * (1 - beta2)
    else:
        v1 = v * beta2 + rg * rg * (1 - beta2)
    vv = v1 if vmax is None else torch.maximum(vmax, v1)
    u = m1 / (vv.sqrt() / bc2_sqrt + eps) * neg_step
    if not row:
        u = u - (xc * u).sum(dim, keepdim=True) * xc
    y, m1 = _retract_transport(xc, u, m1, dim, exp)
    skip = found_inf != 0
    new = [y.to(x.dtype), m1, v1, t] + ([] if vmax is None else [vv])
    old = [x, m, v, step] + ([] if vmax is None else [vmax])
    return [torch.where(skip, a, b) for a, b in zip(old, new)]


def _sgd_kernel(
    x: Tensor,
    g: Tensor,
    buf: Tensor | None,
    lr: Tensor,
    found_inf: Tensor,
    *,
    dim: int,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    exp: bool,
    first: bool,
) -> list[Tensor]:
    """One RiemannianSGD step of one (possibly stacked) sphere tensor: the new ``x`` (and
    momentum buffer), equal to the old ones where ``found_inf`` is set."""
    cd = sphere.compute_dtype(x.dtype)
    xc, gc = x.to(cd), g.to(cd)
    if maximize:
        gc = -gc
    rg = gc - (xc * gc).sum(dim, keepdim=True) * xc
    b1 = None
    direction = rg
    if buf is not None:
        b1 = rg if first else buf * momentum + rg * (1 - dampening)
        direction = rg + momentum * b1 if nesterov else b1
    y, b1 = _retract_transport(xc, -lr.to(cd) * direction, b1, dim, exp)
    skip = found_inf != 0
    out = [torch.where(skip, x, y.to(x.dtype))]
    return out if buf is None else [*out, torch.where(skip, buf, b1)]


#: the arguments each kernel's results are written to, in the order it returns them
_WRITES = {_adam_kernel: (0, 2, 3, 5, 4), _sgd_kernel: (0, 2)}


def _targets(kernel: Any, args: tuple[Any, ...]) -> list[Tensor]:
    return [args[i] for i in _WRITES[kernel] if args[i] is not None]


def _in_place(kernel: Any) -> Any:
    def run(*args: Any, **kw: Any) -> None:
        for t, new in zip(_targets(kernel, args), kernel(*args, **kw)):
            t.copy_(new)

    return run


@functools.cache
def _compiled(kernel: Any, in_place: bool) -> Any:
    return torch.compile(_in_place(kernel) if in_place else kernel, dynamic=True, fullgraph=True)


#: variants whose in-place compilation failed (an Inductor bug in the CPU outer-loop fusion
#: of some patterns): they return new values, copied in place afterwards
_COPY_AFTER: set[tuple[Any, ...]] = set()
_RECOMPILE_LIMIT = 256


def _run(kernel: Any, *args: Any, **kw: Any) -> None:
    """Run ``kernel`` compiled, writing its results into its tensor arguments (in the
    kernel when Inductor can, else by one ``_foreach_copy_`` after it)."""
    x = args[0]
    key = (kernel, x.dim(), x.dtype, x.device.type, *sorted(kw.items()))
    # every variant (axis, options, dtype) is one more compilation of the same code: allow
    # more than dynamo's default of 8
    with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
        if key not in _COPY_AFTER:
            try:
                return _compiled(kernel, True)(*args, **kw)
            except Exception:  # compilation failed before anything was written
                _COPY_AFTER.add(key)
        new = _compiled(kernel, False)(*args, **kw)
    torch._foreach_copy_(_targets(kernel, args), new)


def _as_tensor(value: float | Tensor, like: Tensor) -> Tensor:
    """A 0-d float64 tensor on ``like``'s device: changing values do not recompile."""
    return torch.as_tensor(value, dtype=torch.float64, device=like.device)


# torch's functional signature (lists, then keywords), shared on purpose by every core.
def fused_riemannian_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    sphere_dims: list[int | None],
    *,
    found_inf: Tensor | None,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    second_moment: str,
    retraction: str,
    decoupled_weight_decay: bool,
) -> None:
    """Fused RiemannianAdam (lists as :func:`~spheretorch.optim.riemannian_adam.riemannian_adam`;
    step counters on the parameters' device, float32, as torch's fused Adam keeps them)."""
    euclidean, groups = group_by_axis(params, sphere_dims)
    torch_adam_on(
        euclidean,
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        state_steps,
        foreach=False,
        fused=True,
        found_inf=found_inf,
        amsgrad=amsgrad,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        maximize=maximize,
        decoupled_weight_decay=decoupled_weight_decay,
    )
    kernel = functools.partial(_run, _adam_kernel)
    opts = dict(
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        maximize=maximize,
        row=second_moment == "row",
        exp=retraction == "exp",
    )
    for (_, _, dim), idx in groups.items():
        xs = pick(params, idx)
        lists = [pick(t, idx) for t in (grads, exp_avgs, exp_avg_sqs, state_steps)]
        vmaxs = pick(max_exp_avg_sqs, idx) if amsgrad else []
        if _native.usable(xs, *lists[:3], vmaxs, host_flags=[*lists[3], found_inf]):
            _native.riemannian_adam(
                xs,
                *lists[:3],
                vmaxs,
                lists[3],
                [dim] * len(xs),
                lr=scalar_value(lr),
                found_inf=found_inf,
                **opts,
            )
            continue
        lr_t = _as_tensor(lr, xs[0])
        inf_t = _as_tensor(0.0 if found_inf is None else found_inf, xs[0])
        steps = pick(state_steps, idx)
        keys = [scalar_value(s) for s in steps] if xs[0].is_cpu else None
        for stacked, unit in work_units(xs, keys):
            u_idx = [idx[j] for j in unit]
            lists = [
                pick(params, u_idx),
                pick(grads, u_idx),
                pick(exp_avgs, u_idx),
                pick(exp_avg_sqs, u_idx),
                pick(max_exp_avg_sqs, u_idx) if amsgrad else [],
            ]
            if stacked:
                step = steps[unit[0]].clone()
                args = (step, lr_t, inf_t, kernel, dict(dim=dim + 1, **opts))
                run_stacked(lists, _run_adam, *args, cast=())
                torch._foreach_copy_(pick(steps, unit), [step] * len(unit))
                continue
            for j, (x, g, m, v) in zip(unit, zip(*lists[:4])):
                vmax = max_exp_avg_sqs[idx[j]] if amsgrad else None
                kernel(x, g, m, v, vmax, steps[j], lr_t, inf_t, dim=dim, **opts)


def _run_adam(st: list[Tensor | None], step: Tensor, *args: Any) -> None:
    lr_t, inf_t, kernel, kw = args
    x, g, m, v, vmax = st
    kernel(x, g, m, v, vmax, step, lr_t, inf_t, **kw)


# torch's functional signature (lists, then keywords), shared on purpose by every core.
def fused_riemannian_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    sphere_dims: list[int | None],
    *,
    found_inf: Tensor | None,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    retraction: str,
) -> None:
    """Fused RiemannianSGD (lists as :func:`~spheretorch.optim.riemannian_sgd.riemannian_sgd`).

    A missing momentum buffer is created (zeros) and the first step writes the gradient into
    it, as torch's SGD. (A first step skipped for a non-finite gradient leaves that zero
    buffer, so with ``dampening != 0`` the next step dampens it where torch would not.)
    """
    euclidean, groups = group_by_axis(params, sphere_dims)
    torch_sgd_on(
        euclidean,
        params,
        grads,
        momentum_buffers,
        foreach=False,
        fused=True,
        found_inf=found_inf,
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        maximize=maximize,
    )
    kernel = functools.partial(_run, _sgd_kernel)
    opts = dict(
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        maximize=maximize,
        exp=retraction == "exp",
    )
    for (_, dtype, dim), idx in groups.items():
        xs = pick(params, idx)
        first = [momentum_buffers[i] is None for i in idx]
        if momentum != 0:
            cd = sphere.compute_dtype(dtype)
            for i in idx:
                if momentum_buffers[i] is None:
                    momentum_buffers[i] = torch.zeros_like(params[i], dtype=cd)
        gs, bufs = pick(grads, idx), pick(momentum_buffers, idx) if momentum != 0 else []
        if len(set(first)) == 1 and _native.usable(xs, gs, bufs, host_flags=[found_inf]):
            _native.riemannian_sgd(
                xs,
                gs,
                bufs,
                [dim] * len(xs),
                lr=scalar_value(lr),
                first=first[0],
                found_inf=found_inf,
                **opts,
            )
            continue
        lr_t = _as_tensor(lr, xs[0])
        inf_t = _as_tensor(0.0 if found_inf is None else found_inf, xs[0])
        keys = first if xs[0].is_cpu else None
        for stacked, unit in work_units(xs, keys):
            u_idx = [idx[j] for j in unit]
            bufs = pick(momentum_buffers, u_idx) if momentum != 0 else []
            kw = dict(dim=dim, first=first[unit[0]], **opts)
            if stacked:
                kw["dim"] = dim + 1
                lists = [pick(params, u_idx), pick(grads, u_idx), bufs]
                run_stacked(lists, _run_sgd, lr_t, inf_t, kernel, kw, cast=())
                continue
            for j, i in zip(unit, u_idx):
                buf = momentum_buffers[i] if momentum != 0 else None
                kernel(params[i], grads[i], buf, lr_t, inf_t, **{**kw, "first": first[j]})


def _run_sgd(st: list[Tensor | None], *args: Any) -> None:
    lr_t, inf_t, kernel, kw = args
    kernel(st[0], st[1], st[2], lr_t, inf_t, **kw)
