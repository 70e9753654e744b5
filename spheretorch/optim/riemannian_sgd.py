r"""Riemannian SGD on the sphere, with momentum and Nesterov momentum.

For a sphere parameter :math:`x` with Euclidean gradient :math:`g`:

.. math::
    r_t &= g - \langle x, g\rangle x\\
    b_t &= \begin{cases} r_t & t = 1\\ \mu\, b_{t-1} + (1-\tau)\, r_t & t > 1\end{cases}
    \qquad d_t = \begin{cases} r_t + \mu\, b_t & \text{Nesterov}\\ b_t\end{cases}\\
    x_t &= R_{x_{t-1}}(-\gamma\, d_t), \qquad b_t \leftarrow \text{transport of } b_t
    \text{ to } x_t

with torch's conventions (:class:`torch.optim.SGD`): the buffer starts as the first gradient,
without dampening (geoopt instead dampens the first step too). The retraction is
:math:`(x+u)/\|x+u\|` with the momentum transported by projection (``retraction="project"``,
default) or the exponential map with parallel transport (``retraction="exp"``).

Euclidean parameters get exactly :class:`torch.optim.SGD` (torch's own functional ``sgd``);
weight decay applies to them only, never to sphere parameters, and ``p.grad`` is never
modified.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from .. import sphere
from ..parameter import sphere_dim_of
from ..sphere import compute_dtype
from ._functional import (
    Retraction,
    check_choice,
    check_fused_param,
    check_hyperparameters,
    compiling,
    default_foreach,
    group_by_axis,
    pick,
    retract_,
    run_stacked,
    to_dtype,
    work_units,
)
from ._fused import fused_riemannian_sgd
from ._torch_shims import torch_sgd_on
from .optimizer import NonfinitePolicy, SphereOptimizer

__all__ = ["RiemannianSGD", "riemannian_sgd"]


class RiemannianSGD(SphereOptimizer):
    r"""SGD on the sphere (Riemannian gradient, transported momentum, retraction).

    Args:
        params: parameters or parameter groups; those with a ``sphere_dim`` move on the
            sphere, the others get torch's SGD step.
        lr: learning rate (float or one-element tensor).
        momentum, dampening, nesterov, maximize: as :class:`torch.optim.SGD`.
        weight_decay: L2 penalty for **Euclidean** parameters only.
        retraction: ``"project"`` (default) or ``"exp"``.
        foreach: ``None`` (default) picks the multi-tensor implementation on CPU/CUDA.
        differentiable: let autograd record the step (single-tensor path), as torch's flag.
        fused: one pass over memory per group, as the ``fused`` of
            :class:`~spheretorch.optim.RiemannianAdam` (the native CPU kernel, else a
            ``torch.compile``\ d one).
        nonfinite: ``"skip"`` (default), ``"raise"`` or ``"ignore"``; see
            :mod:`spheretorch.optim.optimizer`.

    State: ``momentum_buffer`` per parameter when ``momentum != 0`` (float32 for
    float16/bfloat16 sphere parameters).
    """

    _compute_dtype_state = ("momentum_buffer",)
    _family_key = "momentum"

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        retraction: Retraction = "project",
        nonfinite: NonfinitePolicy = "skip",
    ) -> None:
        check_hyperparameters(lr, weight_decay=weight_decay, momentum=momentum)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        check_choice("retraction", retraction, ("project", "exp"))
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
            retraction=retraction,
        )
        super().__init__(params, defaults, nonfinite=nonfinite)

    _n_lists = 4

    def _state_layout(self, p: Tensor, group: dict[str, Any]) -> dict[str, tuple[Any, bool]]:
        return {"momentum_buffer": (p.shape, False)}

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        momentum_buffers: list[Tensor | None],
        dims: list[int | None],
    ) -> None:
        with_momentum = group["momentum"] != 0
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise self._sparse_error(group, p)
            if group["fused"] and p not in self.state:
                check_fused_param(p)
            params.append(p)
            grads.append(p.grad)
            momentum_buffers.append(self.state[p].get("momentum_buffer") if with_momentum else None)
            dims.append(sphere_dim_of(p))

    def _update(self, group: dict[str, Any], lists: Any, found_inf: Tensor | None) -> None:
        params, _, momentum_buffers, _ = lists
        foreach = group["foreach"]
        if foreach is None:
            foreach = default_foreach(params)
        riemannian_sgd(
            *lists,
            foreach=foreach and not group["differentiable"],
            fused=bool(group["fused"]),
            found_inf=found_inf,
            differentiable=group["differentiable"],
            lr=group["lr"],
            momentum=group["momentum"],
            dampening=group["dampening"],
            weight_decay=group["weight_decay"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            retraction=group["retraction"],
        )
        if group["momentum"] != 0:
            for p, buf in zip(params, momentum_buffers):
                self.state[p]["momentum_buffer"] = buf


# torch's functional signature (lists, then keywords), shared on purpose by every core.
def riemannian_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    sphere_dims: list[int | None],
    *,
    foreach: bool | None = None,
    fused: bool = False,
    found_inf: Tensor | None = None,
    differentiable: bool = False,
    lr: float | Tensor = 1e-3,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    retraction: Retraction = "project",
) -> None:
    r"""Functional Riemannian SGD: updates ``params`` and ``momentum_buffers`` in place.

    ``momentum_buffers[i]`` is ``None`` before the first step (it is then created, as in
    :func:`torch.optim.sgd.sgd`); buffers of sphere parameters are in the compute dtype.
    """
    if foreach is None:
        foreach = default_foreach(params)
    if fused:
        fn: Any = functools.partial(fused_riemannian_sgd, found_inf=found_inf)
    elif foreach:
        fn = _multi_tensor_riemannian_sgd
    else:
        fn = functools.partial(_single_tensor_riemannian_sgd, differentiable=differentiable)
    fn(
        params,
        grads,
        momentum_buffers,
        sphere_dims,
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        maximize=maximize,
        retraction=retraction,
    )


def _single_tensor_riemannian_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    sphere_dims: list[int | None],
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    retraction: Retraction,
    differentiable: bool = False,
) -> None:
    """Reference loop, one parameter at a time, written with :mod:`spheretorch.sphere`."""
    euclidean = [i for i, d in enumerate(sphere_dims) if d is None]
    torch_sgd_on(
        euclidean,
        params,
        grads,
        momentum_buffers,
        foreach=False,
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        maximize=maximize,
    )
    for i, d in enumerate(sphere_dims):
        if d is None:
            continue
        x = params[i]
        cd = compute_dtype(x.dtype)
        xc = x.to(cd, copy=differentiable)
        g = grads[i].to(cd)
        if maximize:
            g = -g
        rg = sphere.project(xc, g, d)
        direction = rg
        buf = None
        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:
                buf = momentum_buffers[i] = rg.clone()
            else:
                buf.mul_(momentum).add_(rg, alpha=1 - dampening)
            direction = rg.add(buf, alpha=momentum) if nesterov else buf
        u = direction * -lr
        y = retract_(xc, u, d, retraction, [] if buf is None else [buf], differentiable)
        x.copy_(y)


def _multi_tensor_riemannian_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    sphere_dims: list[int | None],
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    retraction: Retraction,
) -> None:
    """``_foreach`` implementation, grouped by (device, dtype, axis) and bucketed on CPU."""
    euclidean, groups = group_by_axis(params, sphere_dims)
    torch_sgd_on(
        euclidean,
        params,
        grads,
        momentum_buffers,
        foreach=True,
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        maximize=maximize,
    )
    hyper = dict(
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        maximize=maximize,
        exp=retraction == "exp",
    )
    for (_, dtype, dim), idx in groups.items():
        cd = compute_dtype(dtype)
        xs_all = pick(params, idx)
        keys = None if compiling() else [momentum_buffers[i] is None for i in idx]
        for stacked, unit in work_units(xs_all, keys):
            u_idx = [idx[j] for j in unit]
            xs = pick(xs_all, unit)
            gs = pick(grads, u_idx)
            bufs = pick(momentum_buffers, u_idx)
            if stacked:  # one tensor for many small same-shaped parameters
                fresh = bufs[0] is None
                st = run_stacked(
                    [xs, gs, [] if fresh else bufs], _stacked_bucket, dim + 1, hyper, dtype=cd
                )
                if fresh and momentum != 0:  # torch: the first buffer is the gradient
                    for i, new in zip(u_idx, st[2].unbind(0)):  # type: ignore[union-attr]
                        momentum_buffers[i] = new.clone()
                continue
            xc, gs = to_dtype(xs, cd), to_dtype(gs, cd)
            _sphere_sgd_bucket(xc, gs, bufs, dim, **hyper)
            for i, b_new in zip(u_idx, bufs):
                momentum_buffers[i] = b_new
            if xc is not xs:
                torch._foreach_copy_(xs, xc)


def _stacked_bucket(st: list[Tensor | None], dim: int, hyper: dict[str, Any]) -> None:
    """:func:`_sphere_sgd_bucket` on stacked tensors (see ``_functional.run_stacked``)."""
    bufs = [st[2]]
    _sphere_sgd_bucket([st[0]], [st[1]], bufs, dim, **hyper)  # type: ignore[list-item]
    st[2] = bufs[0]


def _sphere_sgd_bucket(
    xc: list[Tensor],
    gs: list[Tensor],
    bufs: list[Tensor | None],
    dim: int,
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    exp: bool,
) -> None:
    """One bucket of sphere parameters sharing ``dim``, in the compute dtype. ``bufs`` is
    updated in place (``None`` entries are replaced by new buffers when ``momentum != 0``)."""
    red = sphere.foreach.RowReducer(xc, dim)
    if maximize:
        gs = torch._foreach_neg(gs)
    rg = sphere.foreach.project(xc, gs, red)
    transported: list[Tensor] | None = None
    direction = rg
    if momentum != 0:
        if all(b is not None for b in bufs):
            transported = bufs  # type: ignore[assignment]
            torch._foreach_mul_(transported, momentum)
            torch._foreach_add_(transported, rg, alpha=1 - dampening)
        else:
            for j, b in enumerate(bufs):
                if b is None:
                    bufs[j] = rg[j].clone()  # torch: the first buffer is the gradient
                else:
                    b.mul_(momentum).add_(rg[j], alpha=1 - dampening)
            transported = bufs  # type: ignore[assignment]
        if nesterov:
            torch._foreach_add_(rg, transported, alpha=momentum)
        else:
            direction = transported
    if not exp:
        if isinstance(lr, Tensor):
            torch._foreach_sub_(xc, torch._foreach_mul(direction, lr))
        else:
            torch._foreach_add_(xc, direction, alpha=-lr)
        sphere.foreach.normalize_(xc, red)
        if transported is not None:
            sphere.foreach.project_(xc, transported, red)
    else:
        u = torch._foreach_mul(direction, -lr)
        sphere.foreach.expmap_(xc, u, red, transported=transported)
