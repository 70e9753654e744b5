r"""Adam, then renormalisation: the nGPT recipe (Loshchilov et al., 2024).

Every parameter gets torch's own Adam/AdamW step (``torch.optim.adam.adam``: fused, foreach or
single-tensor kernel); then every sphere parameter is put back on the sphere,
:math:`x \leftarrow x / \|x\|` along its ``sphere_dim``: bitwise :class:`torch.optim.Adam` with
the same flags followed by ``p.div_(p.norm(dim=sphere_dim, keepdim=True))`` (the single-tensor
path bitwise; the foreach path within an ulp of it, using the correctly rounded norm along
strided axes; the fused CPU path within an ulp of the exactly rounded renormalisation on
every axis: moments and steps stay bitwise torch's). The moments see
the full Euclidean gradient and nothing is transported (cheaper than
:class:`~spheretorch.optim.RiemannianAdam`). Weight decay applies to Euclidean parameters only.
On CPU the foreach and fused paths run in cache-sized buckets (Adam, then the renormalisation
of the same bucket). Details and measurements: docs/optimizers.md, docs/benchmarks.md.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from .. import sphere
from ..kernels import optim as kernels
from ..sphere import compute_dtype
from . import _native
from ._functional import (
    SphereGeometry,
    check_fused_param,
    check_hyperparameters,
    compiling,
    default_foreach,
    geometry_of,
    new_step,
    pick,
    run_stacked,
    scalar_value,
    sphere_of,
    use_triton,
    work_units,
    write_back,
)
from ._torch_shims import same_strides, torch_adam
from .optimizer import NonfinitePolicy, SphereOptimizer
from .sphere_steps import check_sphere_options, sphere_option_steps

__all__ = ["RenormAdam", "RenormAdamW", "renorm_adam"]

#: CPU bucket size: larger than RiemannianAdam's, each bucket costs a call of torch's Adam
RENORM_BUCKET_BYTES = 1 << 22
#: ``foreach=None`` on CPU takes torch's single-tensor Adam (torch's own CPU default) for at
#: most this many parameters of at most SMALL_NUMEL values each: measured, one float64 vector
#: of 200 values, one thread: torch's single-tensor Adam 108 us, its foreach Adam 227 us
SMALL_PARAMS, SMALL_NUMEL = 4, 4096


class RenormAdam(SphereOptimizer):
    r"""torch Adam/AdamW on every parameter, then sphere parameters renormalised (nGPT).

    Args:
        params: parameters or parameter groups; those with a ``sphere_dim`` are renormalised
            along it after the Adam step.
        lr, betas, eps, amsgrad, maximize: as :class:`torch.optim.Adam`.
        weight_decay: L2 penalty (or decoupled decay) for **Euclidean** parameters only.
        foreach, fused, capturable, differentiable: as :class:`torch.optim.Adam`; by
            default the foreach kernel on CPU/CUDA tensors. ``fused=True`` selects torch's
            fused kernel (moments and steps bitwise ``Adam(fused=True)``; parameters
            renormalised by the native CPU kernel, within an ulp of the exactly rounded
            ``p / p.norm()``; skips non-finite steps without a host sync).
            ``capturable=True`` keeps the step counters on the parameters' device and never
            synchronises with the host (CUDA graphs); a non-finite step is then skipped on
            the device too.
        decoupled_weight_decay: AdamW (equal to :class:`torch.optim.AdamW`).
        nonfinite: ``"skip"`` (default), ``"raise"`` or ``"ignore"``; see
            :mod:`spheretorch.optim.optimizer`.

    The state is torch Adam's (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``),
    so state dicts move between :class:`torch.optim.Adam` and this class.
    """

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
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        project_grad: bool = False,
        nonfinite: NonfinitePolicy = "skip",
        ordering: Literal["renorm", "oblique"] = "renorm",
        angular: bool = False,
    ) -> None:
        check_hyperparameters(lr, betas, eps, weight_decay)
        if not isinstance(project_grad, bool):
            raise TypeError(f"project_grad must be True or False, got {project_grad!r}")
        flags = dict(fused=fused, capturable=capturable, differentiable=differentiable)
        check_sphere_options(
            ordering, angular, ("renorm", "oblique"), "renorm", {**flags, "amsgrad": amsgrad}
        )
        defaults = dict(
            ordering=ordering,
            angular=angular,
            project_grad=project_grad,
            lr=lr,
            betas=tuple(float(b) for b in betas),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _implementation(self, group: dict[str, Any]) -> tuple[bool, bool]:
        """``(fused, foreach)`` for ``group``, resolving ``None`` from its parameters."""
        fused, foreach = bool(group["fused"]), group["foreach"]
        if group["differentiable"]:
            return False, False  # torch: autograd through the single-tensor loop only
        if foreach is None:
            params = group["params"]
            small = len(params) <= SMALL_PARAMS and all(
                p.is_cpu and p.numel() <= SMALL_NUMEL for p in params
            )
            foreach = not fused and not small and default_foreach(params)
        return fused, bool(foreach)

    _n_lists = 7

    def _state_layout(self, p: Tensor, group: dict[str, Any]) -> dict[str, tuple[Any, bool]]:
        keys = ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())
        return {k: ((), True) if k == "step" else (p.shape, True) for k in keys}

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        max_exp_avg_sqs: list[Tensor],
        steps: list[Tensor],
        dims: list[int | None],
    ) -> None:
        fused = self._implementation(group)[0]
        amsgrad = group["amsgrad"]
        state_of = self.state
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise self._sparse_error(group, p)
            state = state_of[p]
            if len(state) == 0:
                if fused:
                    check_fused_param(p)
                state["step"] = new_step(p, fused, group["capturable"])
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if amsgrad:
                    state["max_exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if amsgrad:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            steps.append(state["step"])
            dims.append(sphere_of(p))

    def _update(self, group: dict[str, Any], lists: Any, found_inf: Tensor | None) -> None:
        if group.get("ordering", "renorm") != "renorm" or group.get("angular"):
            # project_grad: the gradient's tangent part first, the "riemannian" ordering
            ordering = "riemannian" if group.get("project_grad") else group["ordering"]
            lists = sphere_option_steps(group, lists, ordering, self.state)
            if not lists[0]:
                return
        fused, foreach = self._implementation(group)
        beta1, beta2 = group["betas"]
        renorm_adam(
            *lists,
            foreach=foreach,
            fused=fused,
            found_inf=found_inf,
            amsgrad=group["amsgrad"],
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            capturable=group["capturable"],
            differentiable=group["differentiable"],
            project_grad=group.get("project_grad", False),
        )


class RenormAdamW(RenormAdam):
    r""":class:`RenormAdam` with AdamW's decoupled weight decay: the counterpart of
    :class:`torch.optim.AdamW` (same flags and defaults, ``weight_decay=1e-2``), then sphere
    parameters renormalised. Weight decay applies to Euclidean parameters only."""

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        project_grad: bool = False,
        nonfinite: NonfinitePolicy = "skip",
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            project_grad=project_grad,
            nonfinite=nonfinite,
        )


# torch's functional signature (lists, then keywords), shared on purpose by every core.
def renorm_adam(
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
    amsgrad: bool = False,
    beta1: float = 0.9,
    beta2: float = 0.999,
    lr: float | Tensor = 1e-3,
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    capturable: bool = False,
    differentiable: bool = False,
    project_grad: bool = False,
) -> None:
    r"""Functional RenormAdam: torch's functional Adam, then every sphere renormalised,
    :math:`x \leftarrow r\,x / \|x\|` (``renormalize`` of this module).

    Lists as for :func:`torch.optim.adam.adam` plus ``sphere_dims`` (entries as for
    :func:`~spheretorch.optim.riemannian_adam.riemannian_adam`). ``found_inf`` (fused only) is
    a 0-d float tensor: when nonzero nothing changes (the device-side skip).
    ``project_grad``: the moments see :math:`g - \langle x, g\rangle x / r^2` (the tangent
    part of each sphere parameter's gradient, a new tensor: ``p.grad`` is not modified).
    """
    if foreach is None:
        foreach = default_foreach(params)
    sphere_dims = [geometry_of(p, d) for p, d in zip(params, sphere_dims)]
    if project_grad:
        grads = tangent_grads(params, grads, sphere_dims)
    hyper = dict(
        foreach=foreach and not fused,
        fused=fused,
        found_inf=found_inf,
        amsgrad=amsgrad,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        eps=eps,
        maximize=maximize,
        decoupled_weight_decay=decoupled_weight_decay,
        capturable=capturable,
        differentiable=differentiable,
    )
    if fused and not compiling() and params and all(t.is_cpu for t in params):
        _fused_cpu(
            [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps],
            sphere_dims,
            weight_decay,
            hyper,
        )
        return
    # Work units: on CPU buckets of parameters go through Adam then their renormalisation
    # while still in cache; small same-shaped parameters with the same step are stacked into
    # one tensor (see _functional.work_units). Elementwise results are unchanged.
    # Not with fused: stacking changes the last bits of torch's fused kernel (no longer
    # bitwise Adam(fused=True)); it runs once per tensor anyway.
    multi = foreach or fused
    keys = None
    on_cpu = bool(params) and params[0].is_cpu
    if foreach and not fused and not compiling() and on_cpu and all(s.is_cpu for s in state_steps):
        # CPU only (on CUDA torch's foreach Adam and the Triton renormalisation take every
        # tensor in a few launches already); stack only parameters renormalised along one
        # axis on the unit sphere
        keys = [
            (d if _simple(d) else object(), scalar_value(s))
            for d, s in zip(sphere_dims, state_steps)
        ]
    for stacked, unit in (
        work_units(params, keys, RENORM_BUCKET_BYTES)
        if multi
        else [(False, list(range(len(params))))]
    ):
        u_params = pick(params, unit)
        u_dims = pick(sphere_dims, unit)
        lists = [
            u_params,
            pick(grads, unit),
            pick(exp_avgs, unit),
            pick(exp_avg_sqs, unit),
            pick(max_exp_avg_sqs, unit) if amsgrad else [],
            pick(state_steps, unit),
        ]
        if stacked:
            _stacked_unit(lists, u_dims[0], weight_decay, hyper, found_inf)
            continue
        euclidean = [i for i, d in enumerate(u_dims) if d is None]
        if weight_decay != 0 and len(euclidean) < len(u_params):
            spherical = [i for i, d in enumerate(u_dims) if d is not None]
            for idx, wd in ((euclidean, weight_decay), (spherical, 0.0)):
                sub = [pick(lst, idx) if lst else [] for lst in lists]
                torch_adam(*sub, weight_decay=wd, **hyper)
        else:
            torch_adam(*lists, weight_decay=weight_decay, **hyper)
        renormalize(u_params, u_dims, found_inf, foreach=multi)


def _simple(d: SphereGeometry | None) -> bool:
    """One sphere axis, unit radius: what the stacked and torch ``_foreach`` paths handle."""
    return d is not None and isinstance(d.dims, int) and d.radius == 1


def tangent_grads(
    params: list[Tensor], grads: list[Tensor], geoms: list[SphereGeometry | None]
) -> list[Tensor]:
    r"""``grads`` with each sphere parameter's replaced by its tangent part
    :math:`g - \langle x, g\rangle x / r^2` (new tensors, in the gradient's dtype)."""
    out = list(grads)
    idx = [i for i, d in enumerate(geoms) if d is not None]
    if not idx:
        return out
    xs = pick(params, idx)
    layouts = [geoms[i].layout for i in idx]  # type: ignore[union-attr]
    if use_triton(xs) and kernels.handles(xs, layouts):
        radii = [geoms[i].radius for i in idx]  # type: ignore[union-attr]
        for i, t in zip(idx, kernels.project(xs, pick(grads, idx), layouts, radii)):
            out[i] = t.view(grads[i].shape)
        return out
    for i in idx:
        geo = geoms[i]
        assert geo is not None
        x = geo.rows(params[i].detach())
        xc = x.to(compute_dtype(x.dtype))
        if geo.radius != 1:
            xc = xc / geo.radius
        g = geo.rows(grads[i])
        out[i] = sphere.project(xc, g, geo.axis).reshape(grads[i].shape)
    return out


def _stacked_unit(
    lists: list[list[Tensor]],
    dim: int | None,
    weight_decay: float,
    hyper: dict[str, Any],
    found_inf: Tensor | None,
) -> None:
    """Adam + renormalisation of small same-shaped parameters sharing one step, stacked."""
    steps = lists[5]
    step = steps[0].clone()
    wd = weight_decay if dim is None else 0.0
    run_stacked(lists[:5], _stacked_update, step, dim, wd, hyper, found_inf, cast=())
    torch._foreach_copy_(steps, [step] * len(steps))


def _stacked_update(
    st: list[Tensor | None],
    step: Tensor,
    dim: int | None,
    weight_decay: float,
    hyper: dict[str, Any],
    found_inf: Tensor | None,
) -> None:
    x, g, m, v, vmax = st
    vmaxs = [] if vmax is None else [vmax]
    torch_adam([x], [g], [m], [v], vmaxs, [step], weight_decay=weight_decay, **hyper)  # type: ignore[list-item]
    if dim is not None:  # a SphereGeometry with one axis and radius 1 (see _simple)
        axis = dim.dims if isinstance(dim, SphereGeometry) else dim
        sphere.foreach.normalize_each_([x], [axis + 1], keep=found_inf)  # type: ignore[list-item]


def renormalize(
    xs: list[Tensor],
    dims: list[Any],
    keep: Tensor | None,
    *,
    foreach: bool = True,
    native: bool = False,
) -> None:
    r"""In place :math:`x \leftarrow r\,x / \|x\|` on every sphere (``dims`` entries: ``None``
    for a Euclidean tensor, an axis, or a :class:`SphereGeometry`); nothing changes where
    ``keep`` (0-d) is nonzero.

    By the Triton kernel where :func:`use_triton` (one launch per row length), the native CPU
    kernel for contiguous CPU tensors with ``native`` (the fused path: within an ulp of the
    exactly rounded quotient on every axis), else
    :func:`spheretorch.sphere.foreach.normalize_each_` (``foreach=False``: bitwise
    ``x.div_(x.norm(dim, keepdim=True))``); spheres over several axes or of another radius
    one tensor at a time.
    """
    geoms = [geometry_of(x, d) for x, d in zip(xs, dims)]
    sph = [(x, g) for x, g in zip(xs, geoms) if g is not None]
    if not sph:
        return
    sx = [x for x, _ in sph]
    layouts = [g.layout for _, g in sph]
    if foreach and use_triton(sx) and kernels.handles(sx, layouts):
        kernels.renormalize_(sx, layouts, [g.radius for _, g in sph], keep=keep)
        return
    if native and all(g.radius == 1 for _, g in sph) and _native.usable(sx, host_flags=[keep]):
        _native.renormalize(sx, layouts, keep=keep)
        return
    simple = [(x, g) for x, g in sph if _simple(g)]
    if simple:
        sphere.foreach.normalize_each_(
            [x for x, _ in simple], [g.dims for _, g in simple], foreach=foreach, keep=keep
        )
    for x, g in sph:
        if _simple(g):
            continue
        rows = g.rows(x)
        xc = rows.to(compute_dtype(x.dtype))
        scale = g.radius / sphere.norm(xc, g.axis)
        if keep is not None:  # exactly 1 where keep is set
            scale = torch.lerp(scale, torch.ones_like(scale), keep.to(scale.dtype))
        write_back(x, (xc * scale).to(x.dtype))


def _fused_cpu(
    lists: list[list[Tensor]],
    sphere_dims: list[Any],
    weight_decay: float,
    hyper: dict[str, Any],
) -> None:
    """torch's fused Adam step then the renormalisation, bucket by bucket (CPU).

    What ``torch.optim.adam._fused_adam`` does (steps incremented, ``torch._fused_adam_``, steps
    decremented where ``found_inf``), but called on buckets of about :data:`RENORM_BUCKET_BYTES`,
    large parameters (sphere axis last) cut into blocks of whole rows, each bucket renormalised
    right after its Adam step while its parameters are still in L2/L3, last bucket first (the
    non-finite check has just read the gradients first to last). The kernel is elementwise and
    a row's norm does not depend on the other rows, so results are bitwise those of torch's
    ``Adam(fused=True)`` on whole parameters followed by the same renormalisation.
    """
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = lists
    grads = same_strides(params, grads)
    amsgrad, found_inf = hyper["amsgrad"], hyper["found_inf"]
    kernel = torch._fused_adamw_ if hyper["decoupled_weight_decay"] else torch._fused_adam_
    kw = dict(
        amsgrad=amsgrad,
        lr=hyper["lr"],
        beta1=float(hyper["beta1"]),
        beta2=float(hyper["beta2"]),
        eps=hyper["eps"],
        maximize=hyper["maximize"],
        grad_scale=None,
        found_inf=found_inf,
    )
    torch._foreach_add_(steps, 1)
    bucket: list[list[Tensor]] = [[] for _ in range(6)]
    dims: list[int | None] = []
    key: tuple[Any, ...] | None = None
    size = 0

    def flush() -> None:
        if dims:
            kernel(*bucket, weight_decay=key[1], **kw)  # type: ignore[index]
            renormalize(bucket[0], dims, found_inf, native=True)
            for lst in bucket:
                lst.clear()
            dims.clear()

    # last to first: the non-finite check has just read the gradients first to last
    for i in reversed(range(len(params))):
        p, d = params[i], sphere_dims[i]
        ts = [p, grads[i], exp_avgs[i], exp_avg_sqs[i]] + ([max_exp_avg_sqs[i]] if amsgrad else [])
        blocks: Any = [ts]
        if (
            _simple(d)
            and d.dims == p.dim() - 1  # type: ignore[union-attr]
            and p.nbytes > RENORM_BUCKET_BYTES
            and all(t.is_contiguous() for t in ts)
        ):
            rows = max(1, RENORM_BUCKET_BYTES // (p.shape[-1] * p.element_size()))
            blocks = zip(*(t.view(-1, p.shape[-1]).split(rows) for t in ts))
            d = 1
        for block in blocks:
            k = (p.dtype, weight_decay if d is None else 0.0)
            if k != key or size + p.element_size() * block[0].numel() > RENORM_BUCKET_BYTES:
                flush()
                key, size = k, 0
            for lst, t in zip(bucket, block):
                lst.append(t)
            bucket[5].append(steps[i])
            dims.append(d)
            size += p.element_size() * block[0].numel()
    flush()
    if found_inf is not None:
        torch._foreach_sub_(steps, [found_inf] * len(steps))
