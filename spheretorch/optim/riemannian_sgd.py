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
from ..kernels import optim as kernels
from ..sphere import compute_dtype
from ..sphere import foreach as sphere_foreach
from . import _native
from ._functional import (
    Retraction,
    SphereGeometry,
    check_choice,
    check_fused_param,
    check_hyperparameters,
    compiling,
    default_foreach,
    geometry_of,
    pick,
    retract_,
    run_masked,
    run_stacked,
    scalar_value,
    sphere_groups,
    sphere_of,
    to_dtype,
    use_triton,
    work_units,
    write_back,
)
from ._torch_shims import torch_sgd_on
from .optimizer import NonfinitePolicy, SphereOptimizer
from .sphere_steps import check_sphere_options, sgd_sphere_angular_

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
            :class:`~spheretorch.optim.RiemannianAdam` (the native CPU kernel, the Triton
            kernels on CUDA, else the foreach path masked on the device).
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
        angular: bool = False,
    ) -> None:
        check_hyperparameters(lr, weight_decay=weight_decay, momentum=momentum)
        check_sphere_options(
            "riemannian",
            angular,
            ("riemannian",),
            "riemannian",
            dict(fused=fused, differentiable=differentiable),
        )
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        check_choice("retraction", retraction, ("project", "exp"))
        defaults = dict(
            angular=angular,
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
            geo = sphere_of(p)
            grad = p.grad
            if grad.is_sparse:
                if group["fused"] or group["differentiable"]:
                    raise self._sparse_error(group, p)  # as torch's SGD
                # torch's SGD takes sparse gradients; a sphere step needs the dense one
                if geo is not None:
                    grad = grad.to_dense()
            if group["fused"] and p not in self.state:
                check_fused_param(p)
            params.append(p)
            grads.append(grad)
            momentum_buffers.append(self.state[p].get("momentum_buffer") if with_momentum else None)
            dims.append(geo)

    def _update(self, group: dict[str, Any], lists: Any, found_inf: Tensor | None) -> None:
        if group.get("angular"):
            lists = self._angular_spheres(group, lists)
            if not lists[0]:
                return
        params, _, momentum_buffers, _ = lists
        # None stays None: the functional core's "auto" (the native CPU kernel where it
        # applies, else the multi-tensor path)
        foreach = group["foreach"]
        riemannian_sgd(
            *lists,
            foreach=False if group["differentiable"] else foreach,
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

    def _angular_spheres(self, group: dict[str, Any], lists: Any) -> Any:
        """``angular=True``: the sphere parameters turn by exactly ``lr`` radians
        (:func:`~spheretorch.optim.sphere_steps.sgd_sphere_angular_`, angles in
        ``state[p]["angle"]``); returns the lists of the Euclidean ones."""
        params, grads, bufs, dims = lists
        keep: list[int] = []
        for i, (p, d) in enumerate(zip(params, dims)):
            if d is None:
                keep.append(i)
                continue
            buf, angle = sgd_sphere_angular_(
                p,
                grads[i],
                bufs[i],
                lr=float(group["lr"]),
                momentum=group["momentum"],
                dampening=group["dampening"],
                weight_decay=group["weight_decay"],
                nesterov=group["nesterov"],
                maximize=group["maximize"],
            )
            if buf is not None:
                self.state[p]["momentum_buffer"] = buf
            self.state[p]["angle"] = angle
        return tuple([lst[i] for i in keep] for lst in lists)


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
    auto = foreach is None
    if foreach is None:
        foreach = default_foreach(params)
    sphere_dims = [geometry_of(p, d) for p, d in zip(params, sphere_dims)]
    if fused:
        fn: Any = functools.partial(_multi_tensor_riemannian_sgd, fused=True, found_inf=found_inf)
    elif foreach:
        fn = functools.partial(_multi_tensor_riemannian_sgd, native=auto)
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
    for i, geo in enumerate(sphere_dims):
        if geo is None:
            continue
        d, r = geo.axis, geo.radius
        x = geo.rows(params[i])
        cd = compute_dtype(x.dtype)
        xc = x.to(cd, copy=differentiable)
        if r != 1:  # the update on the sphere of radius r, computed on x / r (unit)
            xc = xc / r
        g = geo.rows(grads[i]).to(cd)
        if maximize:
            g = -g
        rg = sphere.project(xc, g, d)
        direction = rg
        buf = None
        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:
                buf = rg.clone()
                momentum_buffers[i] = buf.reshape(params[i].shape)
            else:
                buf = geo.rows(buf)
                buf.mul_(momentum).add_(rg, alpha=1 - dampening)
            direction = rg.add(buf, alpha=momentum) if nesterov else buf
        u = direction * -lr
        if r != 1:
            u = u / r
        y = retract_(xc, u, d, retraction, [] if buf is None else [buf], differentiable)
        if r != 1:
            y = y * r
        if buf is not None:
            write_back(momentum_buffers[i], buf)
        write_back(params[i], y)


def _multi_tensor_riemannian_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    sphere_dims: list[SphereGeometry | None],
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    retraction: Retraction,
    fused: bool = False,
    found_inf: Tensor | None = None,
    native: bool = False,
) -> None:
    """Multi-tensor implementation (``foreach``; ``fused`` with ``fused=True``): groups by
    (device, dtype, layout kind, radius); each group to the native CPU kernel (``fused``, and
    the default ``foreach=None`` with ``native``) or
    the Triton one (:func:`use_triton`), else ``_foreach`` ops bucketed on CPU.

    With ``fused`` a missing momentum buffer is created (zeros) for the kernels, which then
    write the gradient into it, as torch's SGD. (A first step skipped for a non-finite
    gradient leaves that zero buffer, so with ``dampening != 0`` the next step dampens it
    where torch would not.)"""
    euclidean, groups = sphere_groups(params, sphere_dims)
    torch_sgd_on(
        euclidean,
        params,
        grads,
        momentum_buffers,
        foreach=not fused,
        fused=fused,
        found_inf=found_inf if fused else None,
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
    for idx in groups.values():
        geoms = pick(sphere_dims, idx)
        xs, gs = pick(params, idx), pick(grads, idx)
        layouts = [geo.layout for geo in geoms]
        first = [momentum_buffers[i] is None for i in idx]
        kernel_ok = use_triton(xs) and kernels.handles(xs, layouts)
        if kernel_ok and len(set(first)) == 1:
            bufs = _new_buffers(momentum_buffers, params, idx) if momentum != 0 else None
            kernels.sphere_sgd_(
                xs, [g.contiguous() for g in gs], bufs, layouts, [geo.radius for geo in geoms],
                first=first[0], found_inf=found_inf, **hyper,
            )  # fmt: skip
            continue
        if (fused or native) and geoms[0].radius == 1 and len(set(first)) == 1 and xs[0].is_cpu:
            gc = [g.contiguous() for g in gs]
            have = [b for b in pick(momentum_buffers, idx) if b is not None]
            if _native.usable(xs, gc, have, host_flags=[found_inf]):
                bufs = _new_buffers(momentum_buffers, params, idx) if momentum != 0 else []
                _native.riemannian_sgd(
                    xs, gc, bufs, layouts, lr=scalar_value(lr), first=first[0],
                    found_inf=found_inf, **{k: v for k, v in hyper.items() if k != "lr"},
                )  # fmt: skip
                continue
        bufs_now = pick(momentum_buffers, idx)
        written = [*xs, *(b for b in bufs_now if b is not None)]

        def run(idx: list[int] = idx, geoms: list[SphereGeometry] = geoms) -> None:
            _foreach_group(params, grads, momentum_buffers, idx, geoms, **hyper)

        run_masked(found_inf if fused else None, written, run)


def _new_buffers(
    momentum_buffers: list[Tensor | None], params: list[Tensor], idx: list[int]
) -> list[Tensor]:
    """The momentum buffers at ``idx``, zeros created (compute dtype, contiguous) where
    missing: a kernel writes the first gradient into them."""
    for i in idx:
        if momentum_buffers[i] is None:
            p = params[i]
            momentum_buffers[i] = torch.zeros(
                p.shape, dtype=compute_dtype(p.dtype), device=p.device
            )
    return pick(momentum_buffers, idx)  # type: ignore[return-value]


def _foreach_group(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    idx: list[int],
    geoms: list[SphereGeometry],
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    exp: bool,
) -> None:
    """One group with ``_foreach`` ops, bucketed on CPU, small same-shaped tensors stacked."""
    hyper = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                 maximize=maximize, exp=exp)  # fmt: skip
    geo0 = geoms[0]
    dim, radius = geo0.axis, geo0.radius
    views = not isinstance(geo0.dims, int)
    if views or radius != 1:
        # (outer, size, inner) views or a radius: the reference loop, one tensor at a time
        # (rare layouts; the kernels handle them at speed)
        sub_bufs = pick(momentum_buffers, idx)
        _single_tensor_riemannian_sgd(
            pick(params, idx), pick(grads, idx), sub_bufs, list(geoms),
            retraction="exp" if exp else "project", weight_decay=0.0, lr=lr,
            momentum=momentum, dampening=dampening, nesterov=nesterov, maximize=maximize,
        )  # fmt: skip
        for i, b in zip(idx, sub_bufs):
            momentum_buffers[i] = b
        return
    cd = compute_dtype(params[idx[0]].dtype)
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
            sphere_foreach.apply_("copy", xs, xc)


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
