r""":class:`AdamH`: hyperball Adam. Sphere parameters keep their norm and every step has a
fixed norm relative to it; Euclidean parameters get torch's AdamW."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from .. import sphere
from ._functional import increment_steps, new_step, use_triton
from ._hybrid import HybridOptimizer, check_betas, check_hyper, check_lr, sphere_info
from .sphere_steps import ORDERINGS, adam_direction, adam_directions

__all__ = ["AdamH"]


class AdamH(HybridOptimizer):
    r"""Adam on the hyperball: the weight's norm is fixed per sphere, and so is the update's.

    For each sphere parameter (any kind of :class:`~spheretorch.SphereParameter`: one sphere
    per row/column/filter, or the whole tensor on the sphere of radius :math:`r`, e.g.
    ``SphereParameter(w, dim=None)``), with Adam's moments :math:`m, v` of the Euclidean
    gradient (per coordinate, float32 for half types) and the bias-corrected direction
    :math:`D = \hat m / (\sqrt{\hat v} + \epsilon)`, per sphere :math:`x` (radius :math:`r`):

    .. math::
        u = \eta\, r\, \frac{D}{\|D\|}, \qquad x \leftarrow r\, \frac{x - u}{\|x - u\|}

    (``ordering="renorm"``, the hyperball recipe of modded-nanogpt's AdamH: :math:`\|u\| =
    \eta\|x\|`). ``ordering="oblique"`` projects :math:`D` onto the tangent space first
    (NVIDIA Emerging-Optimizers' ObliqueAdam ordering), so that every sphere turns by exactly
    :math:`\arctan\eta`. ``ordering="riemannian"`` projects the *gradient* before the moments
    (and moves the first moment to the current point by projection), then the direction too.

    Which ordering has the right fixed points: with per-coordinate second moments, ``"renorm"``
    and ``"oblique"`` stop where the tangent part of the *preconditioned* direction vanishes,
    not the gradient's. Maximizing :math:`\mathrm{tr}(W^\top A)` on the Frobenius sphere, a
    constant gradient makes :math:`D = -\mathrm{sign}(A)` and they converge to
    :math:`r\,\mathrm{sign}(A)/\|\mathrm{sign}(A)\|` instead of :math:`r A/\|A\|_F` (the
    radial bias measured in RenormAdam); ``"riemannian"`` reaches :math:`rA/\|A\|_F` (tests:
    tests/test_sphere_muon.py).

    ``angular=True``: the step turns every sphere by exactly :math:`\eta` radians along the
    tangent part of :math:`D` (the exponential map; ``angle_per="tensor"``: the RMS angle over a
    tensor's spheres is :math:`\eta`). The angle turned is kept in
    ``state["angle"]`` (shape ``(k,)``, one per sphere) with ``measure_angle=True``. Formulas:
    :mod:`spheretorch.optim.sphere_steps`.

    ``weight_decay`` applies to Euclidean parameters only (decoupled, as AdamW); a sphere's
    norm is fixed. Euclidean parameters get exactly ``torch.optim.AdamW``'s step.

    Args:
        params: parameters or param groups (any option may be overridden per group).
        lr: the update norm relative to the weight norm (spheres; the angle with
            ``angular=True``) and AdamW's learning rate (Euclidean parameters).
        betas, eps: Adam's.
        weight_decay: AdamW's decoupled weight decay (Euclidean parameters).
        ordering: ``"renorm"`` (default, the hyperball recipe), ``"oblique"`` or
            ``"riemannian"``.
        angular, angle_per, measure_angle: as above.
        maximize, foreach: as torch's Adam (``foreach``: moments, projections and stacked
            sphere steps; default on CPU/CUDA tensors, not DTensors).
        nonfinite: ``"skip"`` (default: skipped steps warned about and counted in
            ``skipped_steps``), ``"raise"`` or ``"ignore"`` a step whose gradients are not
            finite (one host synchronisation when checked, none with ``capturable``), as
            the other sphere optimizers (:class:`.SphereOptimizer`).
        capturable: as torch's: step counters on the parameters' device, a Tensor ``lr``
            used there, and the non-finite check and skip decided on the device (the step
            taken, then undone where a gradient is not finite): no host synchronisation.
            Also the way to take a caller's ``found_inf`` (GradScaler, the trainer) without
            one (:class:`._hybrid.HybridOptimizer`). ``nonfinite="raise"`` is refused with it.
        fused, differentiable: not supported (``RuntimeError`` when true).
    """

    #: sphere parameters' moments stay float32 for half types across load_state_dict
    _compute_dtype_state = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        ordering: Literal["renorm", "oblique", "riemannian"] = "renorm",
        angular: bool = False,
        angle_per: Literal["sphere", "tensor"] = "sphere",
        measure_angle: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        nonfinite: str = "skip",
    ) -> None:
        check_lr(lr)
        check_hyper("epsilon value", eps)
        check_hyper("weight_decay value", weight_decay)
        check_betas(betas)
        if ordering not in ORDERINGS:
            raise ValueError(
                f"ordering must be one of {', '.join(map(repr, ORDERINGS))}, got {ordering!r}"
            )
        if angle_per not in ("tensor", "sphere"):
            raise ValueError(f"angle_per must be 'sphere' or 'tensor', got {angle_per!r}")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            ordering=ordering,
            angular=angular,
            angle_per=angle_per,
            measure_angle=measure_angle,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            differentiable=differentiable,
        )
        super().__init__(params, defaults, nonfinite)

    def _new_state(self, group: dict[str, Any], p: Tensor) -> list[Tensor]:
        if sphere_info(p) is None:
            return self._adamw_state(group, p)
        state = self.state[p]
        if "step" not in state:
            cdt = sphere.compute_dtype(p.dtype)
            state["step"] = new_step(p, capturable=bool(group.get("capturable")))
            state["exp_avg"] = torch.zeros_like(p, dtype=cdt)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=cdt)
        return [state["step"], state["exp_avg"], state["exp_avg_sq"]]

    def _group_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        spheres: list[Tensor] = []
        euclid: list[Tensor] = []
        for p in params:
            (spheres if sphere_info(p) is not None else euclid).append(p)
        self._adamw(
            group,
            euclid,
            lr=group["lr"],
            betas=group["betas"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
        )
        if spheres:
            self._hyperball(group, spheres)

    def _fusable(self, group: dict[str, Any], params: list[Tensor]) -> dict[int, tuple]:
        """The sphere parameters whose whole step (moments, direction, sphere step) the Triton
        kernels take in one pass (:class:`~spheretorch.kernels.optim.AdamMoments`): on CUDA
        (or with the Triton backend forced), moments of the gradient (``"renorm"`` and
        ``"oblique"``: ``"riemannian"`` projects the gradient first), the ``foreach`` path,
        contiguous tensors the kernels handle (:meth:`_kernel_layout`), one shared step
        number unless the counters are on the device. ``id(p)`` -> ``(grad, exp_avg,
        exp_avg_sq, step)``."""
        if group["ordering"] == "riemannian" or not self._use_foreach(group, params):
            return {}  # (foreach=False: the single-tensor loop, the reference)
        if not use_triton(params):
            return {}
        out: dict[int, tuple] = {}
        first_step = None
        for p in params:
            info = sphere_info(p)
            st = self.state[p]
            g, m, v = p.grad, st["exp_avg"], st["exp_avg_sq"]
            if g is None or g.dtype != p.dtype or g.is_sparse:
                continue
            if self._kernel_layout([p], info, [[g], [m], [v]]) is None:  # type: ignore[arg-type]
                continue
            step: Any = st["step"] if group["capturable"] else float(st["step"])
            if not group["capturable"]:
                first_step = step if first_step is None else first_step
                if step != first_step:
                    continue
            out[id(p)] = (g, m, v, step)
        return out

    def _hyperball(self, group: dict[str, Any], params: list[Tensor]) -> None:
        b1, b2 = (float(b) for b in group["betas"])
        states = [self.state[p] for p in params]
        increment_steps([st["step"] for st in states])
        lr = self._host_lr(group)
        rule = "angular" if group["angular"] else "hyperball"
        project = group["ordering"] != "renorm"
        fused = self._fusable(group, params)
        if fused:  # one kernel pass each: moments, direction and step
            self._sphere_steps(
                group,
                [(p, sphere_info(p), None) for p in params if id(p) in fused],  # type: ignore[misc]
                lr,
                rule=rule,
                project=project,
                stack=True,
                adam=fused,
                adam_hyper=((b1, b2), float(group["eps"]), bool(group["maximize"])),
            )
            params = [p for p in params if id(p) not in fused]
            if not params:
                return
            states = [self.state[p] for p in params]
        avgs = [st["exp_avg"] for st in states]
        sqs = [st["exp_avg_sq"] for st in states]
        grads = [self._grad_of(group, p).to(m.dtype) for p, m in zip(params, avgs)]
        if group["ordering"] == "riemannian":
            # moments of the Riemannian gradient; the first moment moved to the current
            # point (transport by projection)
            grads = self._tangent(params, grads, inplace=False)
            self._tangent(params, avgs, inplace=True)
        foreach = self._use_foreach(group, params)
        if foreach:
            torch._foreach_lerp_(avgs, grads, 1 - b1)
            torch._foreach_mul_(sqs, b2)
            torch._foreach_addcmul_(sqs, grads, grads, 1 - b2)
        else:
            for m, v, g in zip(avgs, sqs, grads):
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
        steps: list[Any] = [
            self.state[p]["step"].to(torch.float64)  # capturable: on the device, no host read
            if group["capturable"]
            else float(self.state[p]["step"])
            for p in params
        ]
        if foreach:
            # both rules normalize the direction: a positive multiple of it will do
            dirs = adam_directions(avgs, sqs, steps, (b1, b2), group["eps"], up_to_scale=True)
        else:
            dirs = [
                adam_direction(m, v, t, (b1, b2), group["eps"]) for m, v, t in zip(avgs, sqs, steps)
            ]
        items = []
        for p, d in zip(params, dirs):
            info = sphere_info(p)
            assert info is not None
            items.append((p, info, d))
        self._sphere_steps(
            group,
            items,
            lr,
            rule=rule,
            project=project,
            stack=bool(foreach),
            consume=bool(foreach),
        )
