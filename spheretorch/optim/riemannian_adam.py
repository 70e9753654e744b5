r"""Riemannian Adam on the sphere (Bécigneul & Ganea, 2019), geoopt-compatible by default.

For a sphere parameter :math:`x` (unit slices along its ``sphere_dim``) with Euclidean
gradient :math:`g`, one step is

.. math::
    r_t &= g - \langle x, g\rangle x \qquad\text{(Riemannian gradient, per slice)}\\
    m_t &= \beta_1 m_{t-1} + (1-\beta_1) r_t\\
    v_t &= \beta_2 v_{t-1} + (1-\beta_2) \|r_t\|^2 \qquad\text{(one number per slice)}\\
    u_t &= -\gamma\, \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon}\\
    x_{t} &= R_{x_{t-1}}(u_t) = \frac{x_{t-1} + u_t}{\|x_{t-1} + u_t\|}, \qquad
    m_t \leftarrow m_t - \langle x_t, m_t\rangle x_t

which is :class:`geoopt.optim.RiemannianAdam` on :class:`geoopt.Sphere` step for step (tested
in float64), on any sphere axis. Options: ``second_moment="coordinate"`` (per-coordinate
:math:`v_t`, the direction then projected), ``retraction="exp"`` (exponential map, parallel
transport), ``amsgrad``, ``maximize``. Euclidean parameters get torch's own Adam/AdamW; weight
decay is not applied to sphere parameters (meaningless at fixed radius); ``p.grad`` is never
modified. Derivation and choices: docs/optimizers.md.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import torch
from torch import Tensor

from .. import sphere
from ..kernels import optim as kernels
from ..sphere import compute_dtype
from ..sphere import foreach as sphere_foreach
from . import _native
from ._functional import (
    Retraction,
    SecondMoment,
    SphereGeometry,
    check_choice,
    check_fused_param,
    check_hyperparameters,
    compiling,
    default_foreach,
    geometry_of,
    increment_steps,
    new_step,
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
from ._torch_shims import torch_adam_on
from .optimizer import NonfinitePolicy, SphereOptimizer
from .sphere_steps import check_sphere_options, sphere_option_steps

__all__ = ["RiemannianAdam", "riemannian_adam"]


def _check_choices(second_moment: str, retraction: str) -> None:
    check_choice("second_moment", second_moment, ("row", "coordinate"))
    check_choice("retraction", retraction, ("project", "exp"))


class RiemannianAdam(SphereOptimizer):
    r"""Adam on the sphere: Riemannian gradient, moments in the tangent space, retraction.

    Args:
        params: parameters or parameter groups. Parameters with a ``sphere_dim`` (see
            :func:`spheretorch.optim._functional.sphere_of`) are updated on the sphere along that
            axis; all others get torch's Adam/AdamW step.
        lr: learning rate :math:`\gamma` (a float, or a one-element tensor).
        betas: :math:`(\beta_1, \beta_2)`.
        eps: :math:`\epsilon`, added to :math:`\sqrt{\hat v}`.
        weight_decay: L2 penalty for **Euclidean** parameters only (see the module notes).
        amsgrad: use the running maximum of the second moment.
        foreach: ``None`` (default): the native CPU kernel where it applies, the Triton
            kernels on CUDA, else the multi-tensor implementation; ``True``: the
            multi-tensor implementation (torch ``_foreach`` ops on CPU); ``False``: the
            single-tensor reference loop.
        maximize: maximise the objective instead of minimising it.
        second_moment: ``"row"`` (default, geoopt: one second moment per slice) or
            ``"coordinate"``.
        retraction: ``"project"`` (default, geoopt: :math:`(x+u)/\|x+u\|`, momentum
            transported by projection) or ``"exp"`` (exponential map, parallel transport).
        decoupled_weight_decay: AdamW-style weight decay for the Euclidean parameters
            (equal to :class:`torch.optim.AdamW`).
        capturable: keep step counters on the parameters' device and never synchronise
            with the host (CUDA graphs); a non-finite step is skipped on the device.
        differentiable: let autograd record the step (single-tensor path), as torch's flag.
        fused: one pass over memory per group. CPU: a hand-written C++ kernel, compiled
            with the system compiler on first use (2-2.5 s, once per machine: cached on
            disk; see ``spheretorch.optim._native``); CUDA: the Triton kernels of
            :mod:`spheretorch.kernels.optim` (one launch per row length); anything no kernel
            takes (DTensors, half types on CPU, no compiler): the foreach path, skipped on the
            device by masking. Equal to the single-tensor reference within rounding; non-finite
            steps skipped without a host synchronisation.
        nonfinite: ``"skip"`` (default), ``"raise"`` or ``"ignore"``: what a NaN/inf gradient
            does; see :mod:`spheretorch.optim.optimizer`.

    The state of a sphere parameter is ``step``, ``exp_avg`` (shape of the parameter),
    ``exp_avg_sq`` (the parameter's shape with the sphere axis of size 1 for
    ``second_moment="row"``) and ``max_exp_avg_sq`` with ``amsgrad``; in float32 for
    float16/bfloat16 parameters. Euclidean parameters have torch Adam's state.
    """

    _compute_dtype_state = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        second_moment: SecondMoment = "row",
        retraction: Retraction = "project",
        decoupled_weight_decay: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        nonfinite: NonfinitePolicy = "skip",
        ordering: Literal["riemannian", "oblique"] = "riemannian",
        angular: bool = False,
    ) -> None:
        check_hyperparameters(lr, betas, eps, weight_decay)
        _check_choices(second_moment, retraction)
        flags = dict(fused=fused, capturable=capturable, differentiable=differentiable)
        check_sphere_options(
            ordering,
            angular,
            ("riemannian", "oblique"),
            "riemannian",
            {**flags, "amsgrad": amsgrad},
        )
        defaults = dict(
            ordering=ordering,
            angular=angular,
            lr=lr,
            betas=tuple(float(b) for b in betas),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            foreach=foreach,
            maximize=maximize,
            second_moment=second_moment,
            retraction=retraction,
            decoupled_weight_decay=decoupled_weight_decay,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        )
        super().__init__(params, defaults, nonfinite=nonfinite)

    _n_lists = 7

    def _group_problem(self, saved: dict[str, Any], group: dict[str, Any]) -> str | None:
        mine, theirs = group["second_moment"], saved.get("second_moment", group["second_moment"])
        if theirs != mine:
            return (
                f"it keeps second_moment={theirs!r} state and this optimizer was built with "
                f"second_moment={mine!r} (build it with second_moment={theirs!r} to resume)"
            )
        return None

    def _state_layout(self, p: Tensor, group: dict[str, Any]) -> dict[str, tuple[Any, bool]]:
        geo = sphere_of(p)
        moment = list(p.shape)
        if geo is not None and group["second_moment"] == "row":
            moment = geo.moment_shape(p.shape)
        out: dict[str, tuple[Any, bool]] = {
            "step": ((), True),
            "exp_avg": (p.shape, True),
            "exp_avg_sq": (moment, True),
        }
        if group["amsgrad"]:
            out["max_exp_avg_sq"] = (moment, True)
        return out

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        max_exp_avg_sqs: list[Tensor],
        steps: list[Tensor],
        dims: list[SphereGeometry | None],
    ) -> None:
        state_of = self.state
        amsgrad = group["amsgrad"]
        row = group["second_moment"] == "row"
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise self._sparse_error(group, p)
            geo = sphere_of(p)
            state = state_of[p]
            if len(state) == 0:
                if group["fused"]:
                    check_fused_param(p)
                state["step"] = new_step(p, bool(group["fused"]), group["capturable"])
                dtype = p.dtype if geo is None else compute_dtype(p.dtype)
                state["exp_avg"] = torch.zeros_like(p, dtype=dtype)
                for key in ("exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg_sq",):
                    # one second moment per slice ("row"): replicated across the ranks that
                    # share a slice when FSDP2 shards the sphere axis (see zeros_per_slice)
                    if geo is None or not row:
                        state[key] = torch.zeros_like(p, dtype=dtype)
                    elif isinstance(geo.dims, int):
                        state[key] = sphere.zeros_per_slice(p, geo.dims, dtype)
                    else:
                        state[key] = p.new_zeros(geo.moment_shape(p.shape), dtype=dtype)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if amsgrad:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            steps.append(state["step"])
            dims.append(geo)

    def _update(self, group: dict[str, Any], lists: Any, found_inf: Tensor | None) -> None:
        if group.get("ordering", "riemannian") != "riemannian" or group.get("angular"):
            ordering = group.get("ordering", "riemannian")
            lists = sphere_option_steps(group, lists, ordering, self.state)
            if not lists[0]:
                return
        # None stays None: the functional core's "auto" (the native CPU kernel where it
        # applies, else the multi-tensor path)
        foreach = group["foreach"]
        beta1, beta2 = group["betas"]
        riemannian_adam(
            *lists,
            foreach=False if group["differentiable"] else foreach,
            fused=bool(group["fused"]),
            found_inf=found_inf,
            capturable=group["capturable"],
            differentiable=group["differentiable"],
            amsgrad=group["amsgrad"],
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
            second_moment=group["second_moment"],
            retraction=group["retraction"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
        )


# torch's functional signature (lists, then keywords), shared on purpose by every core.
def riemannian_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    sphere_dims: list[Any],
    *,
    foreach: bool | None = None,
    fused: bool = False,
    found_inf: Tensor | None = None,
    capturable: bool = False,
    differentiable: bool = False,
    amsgrad: bool = False,
    beta1: float = 0.9,
    beta2: float = 0.999,
    lr: float | Tensor = 1e-3,
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    maximize: bool = False,
    second_moment: SecondMoment = "row",
    retraction: Retraction = "project",
    decoupled_weight_decay: bool = False,
) -> None:
    r"""Functional Riemannian Adam: updates ``params`` and the state lists in place.

    All lists are aligned with ``params`` (``max_exp_avg_sqs`` is empty unless ``amsgrad``);
    ``sphere_dims[i]`` is ``None`` for a Euclidean ``params[i]``, else its sphere axes (an int,
    a tuple of adjacent axes) or its :class:`~spheretorch.optim._functional.SphereGeometry`
    (axes and radius, as :func:`~spheretorch.optim._functional.sphere_of` gives).
    The state of a sphere parameter is in its compute dtype and ``exp_avg_sqs[i]`` has size 1
    along the axis for ``second_moment="row"``. ``fused``/``foreach`` select
    ``_multi_tensor_riemannian_adam`` (its kernels) or ``_single_tensor_riemannian_adam`` (the
    reference), which give the same result up to rounding; ``foreach=None`` on CPU takes the
    native kernel where it applies.
    ``found_inf`` (fused only): a 0-d tensor, nonzero to skip the step on the device.
    """
    _check_choices(second_moment, retraction)
    auto = foreach is None
    if foreach is None:
        foreach = default_foreach(params)
    sphere_dims = [geometry_of(p, d) for p, d in zip(params, sphere_dims)]
    if fused:
        fn: Any = functools.partial(_multi_tensor_riemannian_adam, fused=True, found_inf=found_inf)
    elif foreach:
        fn = functools.partial(
            _multi_tensor_riemannian_adam, capturable=capturable, native=auto and not capturable
        )
    else:
        fn = functools.partial(
            _single_tensor_riemannian_adam, capturable=capturable, differentiable=differentiable
        )
    fn(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        state_steps,
        sphere_dims,
        amsgrad=amsgrad,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        maximize=maximize,
        second_moment=second_moment,
        retraction=retraction,
        decoupled_weight_decay=decoupled_weight_decay,
    )


def _single_tensor_riemannian_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    sphere_dims: list[int | None],
    *,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    second_moment: SecondMoment,
    retraction: Retraction,
    decoupled_weight_decay: bool,
    capturable: bool = False,
    differentiable: bool = False,
) -> None:
    """Reference loop, one parameter at a time, written with :mod:`spheretorch.sphere`.

    ``differentiable``: every tensor that autograd saves is a copy, never one written later.
    """
    euclidean = [i for i, d in enumerate(sphere_dims) if d is None]
    torch_adam_on(
        euclidean,
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        state_steps,
        foreach=False,
        amsgrad=amsgrad,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        maximize=maximize,
        decoupled_weight_decay=decoupled_weight_decay,
        capturable=capturable,
        differentiable=differentiable,
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
        m = geo.rows(exp_avgs[i])
        v = v_rows = geo.rows(exp_avg_sqs[i])
        step_t = state_steps[i]
        step_t += 1
        # capturable: bias corrections on the device, in float64 as the host-side numbers
        step = step_t.to(torch.float64) if capturable else scalar_value(step_t)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step

        rg = sphere.project(xc, g, d)
        m.lerp_(rg, 1 - beta1)
        if second_moment == "row":
            v.mul_(beta2).add_(sphere.inner(rg, rg, d), alpha=1 - beta2)
        else:
            v.mul_(beta2).addcmul_(rg, rg, value=1 - beta2)
        if amsgrad:
            vmax = geo.rows(max_exp_avg_sqs[i])
            vmax.copy_(torch.maximum(vmax.clone() if differentiable else vmax, v))
            write_back(max_exp_avg_sqs[i], vmax)
            v = vmax
        denom = (v.sqrt() / bias_correction2**0.5).add_(eps)
        u = (m.clone() if differentiable else m) / denom * (-lr / bias_correction1)
        if second_moment == "coordinate":
            u = sphere.project(xc, u, d)  # m / denom is not tangent
        if r != 1:
            u = u / r
        y = retract_(xc, u, d, retraction, [m], differentiable)
        if r != 1:
            y = y * r
        write_back(exp_avgs[i], m)
        write_back(exp_avg_sqs[i], v_rows)
        write_back(params[i], y)


def _multi_tensor_riemannian_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    sphere_dims: list[SphereGeometry | None],
    *,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    second_moment: SecondMoment,
    retraction: Retraction,
    decoupled_weight_decay: bool,
    capturable: bool = False,
    fused: bool = False,
    found_inf: Tensor | None = None,
    native: bool = False,
) -> None:
    """Multi-tensor implementation (``foreach``, and ``fused`` with ``fused=True``): sphere
    parameters grouped by (device, dtype, layout kind, radius); each group goes to one kernel
    (the native CPU one for ``fused`` and, with ``native``, for the default ``foreach=None``;
    the Triton one where :func:`use_triton`), else to
    ``_foreach`` ops in cache-sized buckets (CPU). Euclidean ones go to torch's foreach or
    fused Adam. ``found_inf`` (``fused`` only): nonzero skips the step on the device."""
    euclidean, groups = sphere_groups(params, sphere_dims)
    torch_adam_on(
        euclidean,
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        state_steps,
        foreach=not fused,
        fused=fused,
        found_inf=found_inf if fused else None,
        amsgrad=amsgrad,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        maximize=maximize,
        decoupled_weight_decay=decoupled_weight_decay,
        capturable=capturable and not fused,
    )
    opts = dict(
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        maximize=maximize,
        row=second_moment == "row",
        exp=retraction == "exp",
    )
    for idx in groups.values():
        geoms = pick(sphere_dims, idx)
        xs, steps = pick(params, idx), pick(state_steps, idx)
        gs = pick(grads, idx)
        ms, vs = pick(exp_avgs, idx), pick(exp_avg_sqs, idx)
        vmaxs = pick(max_exp_avg_sqs, idx) if amsgrad else []
        layouts = [geo.layout for geo in geoms]
        if use_triton(xs) and kernels.handles(xs, layouts, ms, vs, vmaxs):
            _triton_adam(xs, gs, ms, vs, vmaxs, steps, geoms, lr, opts, found_inf, fused)
            continue
        if (fused or native) and geoms[0].radius == 1:
            gc = [g.contiguous() for g in gs]  # a strided gradient: one copy, same kernel
            if _native.usable(xs, gc, ms, vs, vmaxs, host_flags=[*steps, found_inf]):
                _native.riemannian_adam(
                    xs, gc, ms, vs, vmaxs, steps, layouts,
                    lr=scalar_value(lr), found_inf=found_inf, **opts,
                )  # fmt: skip
                continue
        # _foreach ops; fused: device step counters, skipped on the device by masking
        device_steps = capturable or (fused and not steps[0].is_cpu)
        written = [*xs, *ms, *vs, *vmaxs, *steps]
        run_masked(
            found_inf if fused else None,
            written,
            functools.partial(
                _foreach_group, xs, gs, ms, vs, vmaxs, steps, geoms, lr=lr, amsgrad=amsgrad,
                capturable=device_steps, **opts,
            ),
        )  # fmt: skip


def _triton_adam(
    xs: list[Tensor],
    gs: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor],
    vmaxs: list[Tensor],
    steps: list[Tensor],
    geoms: list[SphereGeometry],
    lr: float | Tensor,
    opts: dict[str, Any],
    found_inf: Tensor | None,
    fused: bool,
) -> None:
    """One group through :func:`spheretorch.kernels.optim.sphere_adam_` (one launch per row
    length); step counters on the device are read by the kernel, host ones grouped by value."""
    gs = [g.contiguous() for g in gs]  # a strided gradient: one copy, same kernel
    layouts = [geo.layout for geo in geoms]
    radii = [geo.radius for geo in geoms]
    if not steps[0].is_cpu or fused:
        torch._foreach_add_(steps, 1)
        kernels.sphere_adam_(
            xs, gs, ms, vs, vmaxs, layouts, radii,
            steps=steps, step=None, lr=lr, found_inf=found_inf, **opts,
        )  # fmt: skip
        if found_inf is not None:
            torch._foreach_sub_(steps, [found_inf] * len(steps))
        return
    increment_steps(steps)
    by_step: dict[float, list[int]] = {}
    for j, s in enumerate(steps):
        by_step.setdefault(float(s), []).append(j)
    for value, sub in by_step.items():
        kernels.sphere_adam_(
            pick(xs, sub), pick(gs, sub), pick(ms, sub), pick(vs, sub),
            pick(vmaxs, sub) if vmaxs else [], pick(layouts, sub), pick(radii, sub),
            steps=None, step=value, lr=lr, found_inf=found_inf, **opts,
        )  # fmt: skip


def _foreach_group(
    xs: list[Tensor],
    gs: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor],
    vmaxs: list[Tensor],
    steps: list[Tensor],
    geoms: list[SphereGeometry],
    *,
    lr: float | Tensor,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    eps: float,
    maximize: bool,
    row: bool,
    exp: bool,
    capturable: bool,
) -> None:
    """One group (same dtype, layout kind, radius) with ``_foreach`` ops, in cache-sized
    buckets on CPU, small same-shaped tensors stacked."""
    geo0 = geoms[0]
    dim, radius = geo0.axis, geo0.radius
    if not isinstance(geo0.dims, int):  # (outer, size, inner) views of every list
        views = [[geo.rows(t) for geo, t in zip(geoms, ts)] for ts in (xs, ms, vs, vmaxs)]
        if any(
            v.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
            for vl, tl in zip(views, (xs, ms, vs, vmaxs))
            for v, t in zip(vl, tl)
        ):  # strides forbid views: the reference loop, one tensor at a time
            _single_tensor_riemannian_adam(
                xs, gs, ms, vs, vmaxs, steps, list(geoms), amsgrad=amsgrad, beta1=beta1,
                beta2=beta2, lr=lr, weight_decay=0.0, eps=eps, maximize=maximize,
                second_moment="row" if row else "coordinate",
                retraction="exp" if exp else "project", decoupled_weight_decay=False,
                capturable=capturable,
            )  # fmt: skip
            return
        xs, ms, vs, vmaxs = views
        gs = [geo.rows(g) for geo, g in zip(geoms, gs)]
    tensor_lr = isinstance(lr, Tensor)
    hyper = dict(
        lr=lr if tensor_lr else None,
        amsgrad=amsgrad,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        maximize=maximize,
        row=row,
        exp=exp,
    )
    increment_steps(steps)
    # capturable: 0-d device tensors in float64 (no host sync), else Python numbers
    step_values = [s.to(torch.float64) if capturable else scalar_value(s) for s in steps]
    bc1 = [1 - beta1**s for s in step_values]
    bc2_sqrt = [(1 - beta2**s) ** 0.5 for s in step_values]
    # -lr / bc1 / radius (the step in unit-sphere coordinates), lr applied separately when
    # it is a tensor
    neg_step = [(-1 if tensor_lr else -lr) / b / radius for b in bc1]
    cd = compute_dtype(xs[0].dtype)
    keys = None if compiling() or capturable else step_values
    for stacked, unit in work_units(xs, keys):
        ux, ug = pick(xs, unit), pick(gs, unit)
        ms_u, vs_u = pick(ms, unit), pick(vs, unit)
        vmaxs_u = pick(vmaxs, unit) if amsgrad else []
        if stacked and radius == 1:  # one tensor for many small same-shaped parameters
            j = unit[0]
            b = [neg_step[j]], [bc2_sqrt[j]], dim + 1
            run_stacked([ux, ug, ms_u, vs_u, vmaxs_u], _stacked_bucket, *b, hyper, dtype=cd)
            continue
        xc, ug = to_dtype(ux, cd), to_dtype(ug, cd)
        if radius != 1:  # work on x / r, on the unit sphere
            xc = torch._foreach_div(xc, radius)
        _sphere_adam_bucket(
            xc, ug, ms_u, vs_u, vmaxs_u, pick(neg_step, unit), pick(bc2_sqrt, unit), dim, **hyper
        )
        if radius != 1:
            torch._foreach_mul_(xc, radius)
        if xc is not ux:
            sphere_foreach.apply_("copy", ux, xc)


def _stacked_bucket(st: list[Tensor | None], *args: Any) -> None:
    """:func:`_sphere_adam_bucket` on stacked tensors (see ``_functional.run_stacked``)."""
    x, g, m, v, vmax = st
    _sphere_adam_bucket([x], [g], [m], [v], [] if vmax is None else [vmax], *args[:-1], **args[-1])


def _sphere_adam_bucket(
    xs: list[Tensor],
    gs: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor],
    vmaxs: list[Tensor],
    neg_step: list[float],
    bc2_sqrt: list[float],
    dim: int,
    *,
    lr: Tensor | None,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    eps: float,
    maximize: bool,
    row: bool,
    exp: bool,
) -> None:
    """One bucket of sphere parameters sharing ``dim``, all in the compute dtype."""
    red = sphere.foreach.RowReducer(xs, dim)
    if maximize:
        gs = torch._foreach_neg(gs)
    rg = sphere.foreach.project(xs, gs, red)
    torch._foreach_lerp_(ms, rg, 1 - beta1)
    torch._foreach_mul_(vs, beta2)
    if row:
        torch._foreach_add_(vs, red.sqnorm(rg), alpha=1 - beta2)
    else:
        torch._foreach_addcmul_(vs, rg, rg, value=1 - beta2)
    del rg
    if amsgrad:
        torch._foreach_maximum_(vmaxs, vs)
        vs = vmaxs
    denom = torch._foreach_sqrt(vs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    if row:
        # per-slice divisor of the momentum: denom * bc1 / -lr (tiny tensors; a division,
        # not a reciprocal: FSDP2's DTensors have no sharding rule for _foreach_reciprocal)
        torch._foreach_div_(denom, neg_step)
        if lr is not None:
            torch._foreach_div_(denom, lr)
        if exp:
            sphere.foreach.expmap_(xs, torch._foreach_div(ms, denom), red, transported=ms)
            return
        torch._foreach_addcdiv_(xs, ms, denom)  # x + u
    else:
        # the preconditioned direction m / denom is not tangent: project it
        u = torch._foreach_div(ms, denom)
        del denom
        torch._foreach_mul_(u, neg_step)
        if lr is not None:
            torch._foreach_mul_(u, lr)
        sphere.foreach.project_(xs, u, red)
        if exp:
            sphere.foreach.expmap_(xs, u, red, transported=ms)
            return
        torch._foreach_add_(xs, u)  # x + u
    sphere.foreach.normalize_(xs, red)  # projective retraction
    sphere.foreach.project_(xs, ms, red)  # momentum transported by projection
