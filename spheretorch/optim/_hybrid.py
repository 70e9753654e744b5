r"""The base of :class:`.SphereMuon` and :class:`.AdamH`: a :class:`.SphereOptimizer` whose
parameters are routed by kind (sphere parameters, Euclidean matrices, the rest), with torch's
hyperparameter checks and wording, and torch's AdamW step (its own functional
``torch.optim.adam.adam``, so equal to ``torch.optim.AdamW`` bit for bit). From
:class:`.SphereOptimizer`: the non-finite gradient policy (``nonfinite="skip" | "raise" |
"ignore"``, warnings, ``skipped_steps``), torch's GradScaler protocol (a caller's
``found_inf``/``grad_scale``: unscale, skip), ``__setstate__`` defaults for older state dicts.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _default_to_fused_or_foreach

from .. import sphere
from ..parameter import sphere_dim_of
from ..sphere import foreach as sphere_foreach
from ..sphere import is_dtensor, sphere_layout
from ..sphere.foreach import STACK_MAX_NUMEL
from ._functional import new_step, use_triton
from ._torch_shims import torch_adam
from .optimizer import SphereOptimizer
from .sphere_steps import SphereLayout, StepRule, from_rows, hyperball_step_, rows, sphere_step

__all__ = ["HybridOptimizer", "SphereInfo", "check_hyper", "sphere_info"]


def check_hyper(name: str, value: Any, *, upper: float | None = None) -> None:
    """torch's wording for a bad hyperparameter: ``Invalid <name>: <value>``."""
    v = float(value) if not isinstance(value, Tensor) else float(value.detach().cpu())
    if not (0.0 <= v < math.inf) or (upper is not None and not v < upper):
        raise ValueError(f"Invalid {name}: {value if not isinstance(value, Tensor) else v}")


def check_lr(lr: Any) -> None:
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    check_hyper("learning rate", lr)


def check_betas(betas: Any) -> None:
    if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, b in enumerate(betas):
        check_hyper(f"beta parameter at index {i}", b, upper=1.0)


class SphereInfo:
    """Where a sphere parameter's spheres lie: its layout, radius and whether it is one
    sphere (the whole tensor: the Frobenius sphere)."""

    __slots__ = ("layout", "radius", "whole")

    def __init__(self, layout: SphereLayout, radius: float, whole: bool) -> None:
        self.layout, self.radius, self.whole = layout, radius, whole


def sphere_info(p: Tensor) -> SphereInfo | None:
    """The :class:`SphereInfo` of ``p``, or None for a Euclidean tensor (read each step: a
    loaded state dict may change a whole-tensor sphere's radius)."""
    dims = sphere_dim_of(p)
    if dims is None:
        return None
    return _info(tuple(p.shape), dims, float(getattr(p, "sphere_radius", 1.0)))


@functools.lru_cache(maxsize=4096)
def _info(shape: tuple[int, ...], dims: int | tuple[int, ...], radius: float) -> SphereInfo:
    """:class:`SphereInfo` by value (shared: never modified), so that a step does not redo
    the layout of every parameter several times."""
    layout = sphere_layout(shape, dims)
    return SphereInfo(layout, radius, layout.count == 1)


class HybridOptimizer(SphereOptimizer):
    """Shared machinery of :class:`.SphereMuon` and :class:`.AdamH`. A subclass implements
    ``_new_state(group, p)`` (create ``p``'s state, return the tensors a step writes besides
    ``p``) and ``_group_step(group, params)`` (one param group's update of ``params``, the
    parameters with a gradient).

    A caller's skip decision (torch's GradScaler protocol, also the trainer's device-side
    check: ``found_inf`` set on the optimizer, ``_step_supports_amp_scaling``): with
    ``capturable=True`` the step is taken and undone on the device where ``found_inf`` is
    nonzero (no host read; parameters and state restored bitwise); otherwise ``found_inf``
    is read on the host once per param group (one synchronisation on an accelerator, as a
    GradScaler's own check for an optimizer without the protocol) and the step skipped.
    """

    #: parameters, gradients, and the state tensors a step writes (restored on a skip)
    _n_lists = 3

    def __init__(self, params: Any, defaults: dict[str, Any], nonfinite: str) -> None:
        name = type(self).__name__
        for flag in ("fused", "differentiable"):
            if defaults.get(flag):
                raise RuntimeError(f"`{flag}` is not supported by {name} (pass {flag}=None)")
        super().__init__(params, defaults, nonfinite=nonfinite)  # type: ignore[arg-type]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for flag in ("fused", "differentiable"):
            if group.get(flag):
                raise RuntimeError(
                    f"`{flag}` is not supported by {type(self).__name__} (pass {flag}=None)"
                )

    def _check_loadable(self, state_dict: dict[str, Any]) -> None:
        """torch's loading as it is (state of torch's Muon and AdamW loads into the
        parameters routed to them)."""

    # ------------------------------------------------------------------ step

    def _init_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], written: list
    ) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise self._sparse_error(group, p)
            params.append(p)
            grads.append(p.grad)
            written.extend(self._new_state(group, p))

    def _new_state(self, group: dict[str, Any], p: Tensor) -> list[Tensor]:
        raise NotImplementedError  # pragma: no cover

    def _adamw_state(self, group: dict[str, Any], p: Tensor) -> list[Tensor]:
        """torch's Adam state of ``p`` (``step``, ``exp_avg``, ``exp_avg_sq``), created lazily;
        the step counter on ``p``'s device with ``capturable``, as torch's."""
        state = self.state[p]
        if "step" not in state:
            state["step"] = new_step(p, capturable=bool(group.get("capturable")))
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return [state["step"], state["exp_avg"], state["exp_avg_sq"]]

    def _update(self, group: dict[str, Any], lists: Any, found_inf: Tensor | None) -> None:
        self._group_step(group, lists[0])

    def _update_masked(self, group: dict[str, Any], lists: Any, found_inf: Tensor) -> None:
        if not group.get("capturable"):
            if not bool(found_inf):  # the host read (see the class docstring)
                self._update(group, lists, None)
            return
        super()._update_masked(group, lists, found_inf)

    def _grad_of(self, group: dict[str, Any], p: Tensor) -> Tensor:
        g = p.grad
        return -g if group.get("maximize") else g

    def _group_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        raise NotImplementedError  # pragma: no cover

    @staticmethod
    def _use_foreach(group: dict[str, Any], params: list[Tensor]) -> bool:
        """The group's ``foreach``; by default on CPU and CUDA tensors, but not for DTensors
        (FSDP2): torch 2.11's DTensor has no sharding rule for ``_foreach_lerp``, and each
        DTensor op is dispatched on its own anyway."""
        foreach = group.get("foreach")
        if foreach is None:
            return all(p.device.type in ("cpu", "cuda") and not is_dtensor(p) for p in params)
        return bool(foreach)

    @staticmethod
    def _host_lr(group: dict[str, Any]) -> float | Tensor:
        """The group's LR: a Tensor LR stays a Tensor with ``capturable`` (no host read),
        else a float."""
        lr = group["lr"]
        if isinstance(lr, Tensor) and not group.get("capturable"):
            return float(lr)
        return lr

    # ------------------------------------------------------------------ sphere steps

    @staticmethod
    def _tangent(params: list[Tensor], ts: list[Tensor], *, inplace: bool) -> list[Tensor]:
        r""":math:`P_x t` for each sphere parameter :math:`x` of ``params`` and its ``t``
        (along ``x``'s own sphere axes, at its radius): ``t`` updated in place (returned) with
        ``inplace``, else new tensors. Unit spheres along one axis in float32/float64 (the
        common case) take ``_foreach`` ops, per-sphere sums stacked for small same-shape
        tensors (:class:`~spheretorch.sphere.foreach.RowReducer`); whole-tensor spheres of one
        size (small ones, or on CUDA) one stacked projection; the others one by one."""
        out = list(ts)
        by_dim: dict[int, list[int]] = {}
        wholes: dict[tuple, list[int]] = {}  # whole-tensor spheres of one size: one stack
        for i, (p, t) in enumerate(zip(params, ts)):
            dims = sphere_dim_of(p)
            r = float(getattr(p, "sphere_radius", 1.0))
            plain = (
                p.dtype == t.dtype
                and p.dtype in (torch.float32, torch.float64)
                and not is_dtensor(p)
            )
            if plain and isinstance(dims, int) and r == 1.0:
                by_dim.setdefault(dims, []).append(i)
                continue
            info = sphere_info(p)
            small = p.numel() <= STACK_MAX_NUMEL or p.device.type == "cuda"
            if plain and small and info is not None and info.whole:
                wholes.setdefault((p.numel(), p.dtype, p.device), []).append(i)
                continue
            HybridOptimizer._tangent_one(p, t, dims, r, inplace, out, i)
        for idx in wholes.values():
            if len(idx) == 1:
                i = idx[0]
                p = params[i]
                r = float(getattr(p, "sphere_radius", 1.0))
                HybridOptimizer._tangent_one(p, ts[i], sphere_dim_of(p), r, inplace, out, i)
                continue
            # rows of unit points X (each x / r) and of the vectors T: T - <X, T> X per row
            radii = [float(getattr(params[i], "sphere_radius", 1.0)) for i in idx]
            flat = [params[i].detach().reshape(-1) for i in idx]
            xs = torch.stack(torch._foreach_div(flat, radii))
            t2 = torch.stack([ts[i].reshape(-1) for i in idx])
            t2.addcmul_(xs, (xs * t2).sum(dim=1, keepdim=True), value=-1)
            rows_ = [row.view(ts[i].shape) for i, row in zip(idx, t2.unbind(0))]
            if inplace:
                sphere_foreach.apply_("copy", [ts[i] for i in idx], rows_)
            else:
                for i, row in zip(idx, rows_):
                    out[i] = row
        for dim, idx in by_dim.items():
            xs = [params[i].detach() for i in idx]
            vs = [ts[i] for i in idx]
            red = sphere_foreach.RowReducer(xs, dim)
            if inplace:
                sphere_foreach.project_(xs, vs, red)
            else:
                for i, v in zip(idx, sphere_foreach.project(xs, vs, red)):
                    out[i] = v
        return out

    @staticmethod
    def _tangent_one(
        p: Tensor, t: Tensor, dims: Any, r: float, inplace: bool, out: list[Tensor], i: int
    ) -> None:
        """:meth:`_tangent` of one parameter (into ``t``, or ``out[i]``)."""
        x = p.detach()
        if not inplace:
            out[i] = sphere.project(x, t, dims, radius=r)
        elif t.dtype == x.dtype == sphere.compute_dtype(x.dtype):
            c = sphere.inner(x, t, dims) / (r * r)
            t.addcmul_(x, c, value=-1)  # two passes: the inner products, then this
        else:  # half precision: the projection in float32, stored back
            t.copy_(sphere.project(x, t, dims, radius=r))

    @staticmethod
    def _renormalize(params: list[Tensor]) -> None:
        r"""Each sphere parameter back to its radius along its sphere axes, in place
        (:math:`x \leftarrow r\,x/\|x\|`; :func:`spheretorch.sphere.normalize` with
        ``on_zero="keep"`` is the reference): on CUDA (or the forced Triton backend) the
        Triton kernels, per dtype: one launch per row length for spheres of at most
        ``MAX_ROW`` values (as :class:`.RenormAdam`), two passes per size for larger
        whole-tensor spheres (sums of squares, then the scaling); else ``_foreach`` ops for
        unit spheres along a contiguous axis (the same operations as the reference), the
        others one by one."""
        if use_triton(params):
            from ..kernels import optim as kernels

            infos = [sphere_info(p) for p in params]
            sets: dict[tuple, list[int]] = {}  # one kernel call per set
            for i, (p, info) in enumerate(zip(params, infos)):
                assert info is not None
                big = info.whole and p.numel() > kernels.MAX_ROW
                sets.setdefault((p.dtype, p.numel() if big else None), []).append(i)
            left = []
            for (_, numel), idx in sets.items():
                ps = [params[i] for i in idx]
                radii = [infos[i].radius for i in idx]  # type: ignore[union-attr]
                if numel is not None:
                    layouts = [SphereLayout(1, numel, 1)] * len(ps)
                    if kernels.handles(ps, layouts, max_row=numel):
                        kernels.renormalize_whole_(ps, radii)
                        continue
                else:
                    layouts = [infos[i].layout for i in idx]  # type: ignore[union-attr]
                    if kernels.handles(ps, layouts):
                        kernels.renormalize_(ps, layouts, radii)
                        continue
                left += ps
            params = left
        together: dict[tuple, list[Tensor]] = {}
        for p in params:
            dims = sphere_dim_of(p)
            r = float(getattr(p, "sphere_radius", 1.0))
            if (
                isinstance(dims, int)
                and r == 1.0
                and p.dtype in (torch.float32, torch.float64)
                and not is_dtensor(p)
                and p.stride(dims) == 1
            ):
                together.setdefault((dims, p.dtype), []).append(p)
                continue
            p.copy_(sphere.normalize(p, dims, on_zero="keep", radius=r))
        for (dim, dtype), ps in together.items():
            norms = sphere_foreach.RowReducer(ps, dim).norm(ps)
            torch._foreach_clamp_min_(norms, torch.finfo(dtype).tiny)
            sphere_foreach.apply_("div", ps, norms)

    def _sphere_steps(
        self,
        group: dict[str, Any],
        items: list[tuple[Tensor, SphereInfo, Tensor]],
        lr: float | Tensor,
        *,
        rule: StepRule,
        project: bool,
        stack: bool,
        consume: bool = False,
        adam: dict[int, tuple[Tensor, Tensor, Tensor, Any]] | None = None,
        adam_hyper: tuple[tuple[float, float], float, bool] | None = None,
    ) -> None:
        """:func:`~.sphere_steps.sphere_step` of every sphere parameter ``p`` along its
        direction ``d`` (``items``: ``(p, info, d)``, ``d`` shaped like ``p``, any strides),
        in place; the measured angles into ``state["angle"]`` with ``measure_angle``.

        ``adam`` (AdamH fused into the kernels): for the items whose ``d`` is None, keyed by
        ``id(p)``, the gradient, the two moments and the step (a float, or the device
        counter); ``adam_hyper``: ``(betas, eps, maximize)``. Such items must be ones the
        kernels take (:meth:`_kernel_layout`).

        ``consume``: the directions are the caller's to overwrite; a hyperball step of one
        float32/float64 parameter whose spheres are contiguous rows (or the whole tensor) then
        runs in place (:func:`~.sphere_steps.hyperball_step_`: no buffer of the parameter's
        size, which matters on the CPU) where no kernel takes it.

        With ``stack``, same-shape parameters take one call on their stacked rows (on CUDA,
        or for tensors of at most ``STACK_MAX_NUMEL`` values, as the other optimizers stack:
        stacking copies, which pays where launches dominate); a whole-tensor sphere is one
        row, scaled to the unit sphere. Where the Triton kernels apply (:meth:`_kernel_step`)
        each such set is one kernel step instead."""
        batches: dict[tuple, list[int]] = {}
        for j, (p, info, _) in enumerate(items):
            small = p.numel() <= STACK_MAX_NUMEL or p.device.type == "cuda"
            if not (stack and small) or is_dtensor(p):
                key: tuple = (j,)
            elif info.whole:
                key = ("whole", p.numel(), p.dtype, p.device)
            else:
                key = ("rows", tuple(p.shape), info.layout, info.radius, p.dtype, p.device)
            batches.setdefault(key, []).append(j)
        measure = bool(group["measure_angle"])
        for idx in batches.values():
            ps = [items[j][0] for j in idx]
            taken, angle = self._kernel_step(
                group, items, idx, lr, rule, project, measure, adam, adam_hyper
            )
            if not taken and items[idx[0]][2] is None:  # pragma: no cover - an internal bug
                raise RuntimeError("AdamH: a fused step was not taken by the kernels")
            if not taken and consume and rule == "hyperball" and not measure and len(idx) == 1:
                taken = self._in_place_step(items[idx[0]], lr, project)
            if not taken:
                angle = self._torch_step(group, items, idx, lr, rule, project, measure)
            if angle is not None:
                for p, a in zip(ps, angle.split(angle.numel() // len(ps))):
                    self.state[p]["angle"] = a.clone()

    @staticmethod
    def _in_place_step(
        item: tuple[Tensor, SphereInfo, Tensor], lr: float | Tensor, project: bool
    ) -> bool:
        """:func:`~.sphere_steps.hyperball_step_` of one parameter, where it applies (a float
        ``lr``; ``p`` and ``d`` contiguous, of one float32/float64 dtype; row spheres or the
        whole tensor); whether it did."""
        p, info, d = item
        if not (isinstance(lr, float) and p.dtype in (torch.float32, torch.float64)):
            return False
        if is_dtensor(p) or not (info.whole or info.layout.inner == 1):
            return False
        if (
            d.dtype != p.dtype
            or d.shape != p.shape
            or not (p.is_contiguous() and d.is_contiguous())
        ):
            return False
        shape = (1, p.numel()) if info.whole else (info.layout.count, info.layout.size)
        hyperball_step_(
            p.detach().view(shape), d.view(shape), lr, radius=info.radius, project=project
        )
        return True

    @staticmethod
    def _torch_step(
        group: dict[str, Any],
        items: list[tuple[Tensor, SphereInfo, Tensor]],
        idx: list[int],
        lr: float | Tensor,
        rule: StepRule,
        project: bool,
        measure: bool,
    ) -> Tensor | None:
        """:func:`~.sphere_steps.sphere_step` of ``items[idx]`` (same shape) on their stacked
        rows; returns the measured angles (``measure``)."""
        ps = [items[j][0] for j in idx]
        info = items[idx[0]][1]
        cdt = sphere.compute_dtype(ps[0].dtype)
        if info.whole:  # one row per parameter, scaled to the unit sphere
            radii = [items[j][1].radius for j in idx]
            z = torch.stack([p.detach().reshape(-1).to(cdt) / r for p, r in zip(ps, radii)])
            radius = 1.0
            ds = [items[j][2].reshape(1, -1) for j in idx]
        else:
            zs = [rows(p.detach(), info.layout) for p in ps]
            z = (zs[0] if len(zs) == 1 else torch.cat(zs)).to(cdt)  # one: no copy
            radius = info.radius
            ds = [rows(items[j][2], info.layout) for j in idx]
        k = z.shape[0] // len(idx)
        # (one: made contiguous, e.g. the transposed polar factor of a tall matrix: the
        # per-row reductions below read rows)
        d = (ds[0].contiguous() if len(ds) == 1 else torch.cat(ds)).to(cdt)
        new, angle = sphere_step(
            z,
            d,
            lr,
            radius=radius,
            project=project,
            rule=rule,
            angle_per=group["angle_per"],
            measure=measure,
            blocks=len(idx),
        )
        blocks = list(new.split(k))
        if info.whole:  # back to each sphere's radius
            blocks = list(torch._foreach_mul(blocks, radii))
        dsts, srcs = [], []  # written back by one _foreach_copy_ where p has a row view
        for p, block in zip(ps, blocks):
            view = p.is_contiguous() and (info.whole or info.layout.inner == 1)
            if view and not is_dtensor(p):
                dsts.append(p.view(block.shape))
                srcs.append(block)
                continue
            back = block.reshape(p.shape) if info.whole else from_rows(block, info.layout, p.shape)
            p.copy_(back)
        if dsts:
            sphere_foreach.apply_("copy", dsts, srcs)
        return angle

    @staticmethod
    def _kernel_step(
        group: dict[str, Any],
        items: list[tuple[Tensor, SphereInfo, Tensor]],
        idx: list[int],
        lr: float | Tensor,
        rule: StepRule,
        project: bool,
        measure: bool,
        adam: dict[int, tuple[Tensor, Tensor, Tensor, Any]] | None = None,
        adam_hyper: tuple[tuple[float, float], float, bool] | None = None,
    ) -> tuple[bool, Tensor | None]:
        """The step of the same-shape parameters ``items[idx]`` by the Triton kernels of
        :mod:`spheretorch.kernels.optim` where they apply (:meth:`_kernel_layout`): the
        ``"angular"`` or ``"hyperball"`` rule, CUDA (or the forced Triton backend),
        contiguous parameters, one direction dtype. Spheres of at most ``MAX_ROW`` values
        (rows, columns, any axis; a small whole tensor as one row):
        :func:`~spheretorch.kernels.optim.sphere_rows_step_`; larger whole-tensor spheres:
        :func:`~spheretorch.kernels.optim.sphere_whole_step_`. Items without a direction take
        it from their moments (``adam``: :class:`~spheretorch.kernels.optim.AdamMoments`).
        Returns ``(taken, angles)`` (the angles with ``measure``)."""
        if rule not in ("angular", "hyperball"):
            return False, None
        ps = [items[j][0] for j in idx]
        info = items[idx[0]][1]
        ds = [items[j][2] for j in idx]
        fused = ds[0] is None
        if fused:
            assert adam is not None and adam_hyper is not None
            g, m, v, step = (list(t) for t in zip(*(adam[id(p)] for p in ps)))
            others: list[list[Tensor]] = [g, m, v]
        else:
            if len({d.dtype for d in ds}) != 1:  # type: ignore[union-attr]
                return False, None
            others = []
        kind = HybridOptimizer._kernel_layout(ps, info, others)
        if kind is None:
            return False, None
        from ..kernels import optim as kernels

        moments = None
        if fused:
            betas, eps, maximize = adam_hyper  # type: ignore[misc]
            steps = step if isinstance(step[0], Tensor) else float(step[0])
            moments = kernels.AdamMoments(g, m, v, steps, betas, eps, maximize)
        project = project or rule == "angular"
        radii = [items[j][1].radius for j in idx]
        layout = kind[1]
        if kind[0] == "whole":
            angle = kernels.sphere_whole_step_(
                ps,
                None if fused else ds,  # type: ignore[arg-type]
                radii,
                lr,
                rule=rule,
                project=project,
                measure=measure,
                adam=moments,
            )
            return True, angle
        angle = kernels.sphere_rows_step_(
            ps,
            None if fused else ds,  # type: ignore[arg-type]
            layout,
            radii,
            lr,
            rule=rule,
            project=project,
            per_tensor=group["angle_per"] == "tensor" and layout.count > 1,
            measure=measure,
            adam=moments,
        )
        return True, angle

    @staticmethod
    def _kernel_layout(
        ps: list[Tensor], info: SphereInfo, others: list[list[Tensor]]
    ) -> tuple[str, SphereLayout] | None:
        """Whether the Triton kernels take a step of the same-shape parameters ``ps`` (whose
        spheres ``info`` describes; ``others``: lists read alongside, such as gradients and
        moments, each of one dtype): ``("rows", layout)`` for spheres of at most ``MAX_ROW``
        values (a small whole tensor as one row), ``("whole", layout)`` for larger
        whole-tensor spheres (two passes), else None."""
        if not use_triton(ps):
            return None
        from ..kernels import optim as kernels

        if any(len({t.dtype for t in ts}) != 1 for ts in others):
            return None
        layout = SphereLayout(1, ps[0].numel(), 1) if info.whole else info.layout
        layouts = [layout] * len(ps)
        if info.whole and layout.size > kernels.MAX_ROW:
            ok = kernels.handles(ps, layouts, *others, max_row=layout.size)
            return ("whole", layout) if ok else None
        return ("rows", layout) if kernels.handles(ps, layouts, *others) else None

    # ------------------------------------------------------------------ AdamW (torch's)

    def _adamw(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        *,
        lr: Any,
        betas: tuple[Any, Any],
        eps: float,
        weight_decay: float,
    ) -> None:
        """torch's AdamW step (``torch.optim.adam.adam`` with decoupled decay) on ``params``;
        state ``step``/``exp_avg``/``exp_avg_sq`` as torch keeps it (loadable both ways)."""
        if not params:
            return
        grads, avgs, sqs, steps = [], [], [], []
        for p in params:
            step, avg, sq = self._adamw_state(group, p)
            grads.append(p.grad)
            avgs.append(avg)
            sqs.append(sq)
            steps.append(step)
        capturable = bool(group.get("capturable"))
        if isinstance(lr, Tensor) and not capturable:
            lr = float(lr)  # a host read: torch's foreach AdamW takes a Tensor lr only capturable
        foreach = group.get("foreach")
        if foreach is None:  # torch's default (foreach on accelerators)
            _, foreach = _default_to_fused_or_foreach(params, False, use_fused=False)
        b1, b2 = (float(b) for b in betas)
        torch_adam(
            params,
            grads,
            avgs,
            sqs,
            [],
            steps,
            foreach=bool(foreach),
            decoupled_weight_decay=True,
            amsgrad=False,
            beta1=b1,
            beta2=b2,
            lr=lr,
            weight_decay=weight_decay,
            eps=eps,
            maximize=bool(group.get("maximize")),
            capturable=capturable,
        )
