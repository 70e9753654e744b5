r""":class:`SphereMuon`: Muon (momentum, Newton-Schulz orthogonalization) on sphere parameters,
with steps whose angle is the learning rate; plain Muon and AdamW for the rest."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from .. import sphere
from ..sphere import is_dtensor
from ._hybrid import (
    HybridOptimizer,
    SphereInfo,
    check_betas,
    check_hyper,
    check_lr,
    sphere_info,
)
from .sphere_steps import (
    NS_COEFFICIENTS,
    from_rows,
    matrix_of,
    orthogonalize,
)

__all__ = ["SphereMuon"]

_ADJUST_LR = (None, "original", "match_rms_adamw")


def _adjusted_lr(lr: float, fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's shape-dependent LR of a Euclidean matrix (its ``adjust_lr_fn``)."""
    a, b = shape[0], shape[1]
    if fn is None or fn == "original":
        return lr * max(1.0, a / b) ** 0.5
    return lr * 0.2 * max(a, b) ** 0.5


class SphereMuon(HybridOptimizer):
    r"""Muon on the sphere: momentum, tangent projection, Newton-Schulz orthogonalization, a
    step whose angle is ``lr``, retraction. Euclidean matrices get torch.optim.Muon's step,
    everything else torch's AdamW, as Muon users expect.

    **Sphere parameters** (a :class:`~spheretorch.SphereParameter` of any kind, radius
    :math:`r`) with momentum buffer :math:`B`, Euclidean gradient :math:`G`:

    .. math::
        B &\leftarrow \mu P_X B + (1 - \mu) P_X G, \qquad
        \tilde B = (1-\mu) P_X G + \mu B \text{ (nesterov) or } B \\
        O &= P_X\big(\mathrm{NS}(P_X \tilde B)\big), \qquad
        X \leftarrow \exp_X(-\theta\, O / \|O\|) \text{ per sphere}

    where :math:`P_X` is the tangent projection (also moving the buffer to the current point:
    transport by projection) and :math:`\mathrm{NS}` Muon's quintic
    Newton-Schulz iteration (coefficients ``(3.4445, -4.7750, 2.0315)``,
    :func:`~spheretorch.optim.sphere_steps.newton_schulz`). *What is orthogonalized*:

    * **row spheres** (``dim`` an int or a tuple of adjacent axes; :math:`k` spheres of size
      :math:`s`): the :math:`k \times s` matrix :math:`Z` whose rows are the spheres (a row
      sphere as it is, a column sphere ``dim=0`` transposed, a conv weight with ``dim=(1, 2,
      3)`` as ``(out, in*kh*kw)``). :math:`P_X` removes from each row its component along that
      row's point (:math:`\delta_i - \langle \hat z_i, \delta_i\rangle \hat z_i`).
      Orthogonalizing mixes rows, so its result is projected again. The angles:
      ``angle_per="tensor"`` (default) turns row :math:`i` by :math:`\theta_i = \eta\,
      \|o_i\| / \mathrm{rms}_j \|o_j\|` (the RMS angle is :math:`\eta`, the orthogonalized
      update's shape is kept: nearly equal angles for a wide matrix, whose polar factor has
      unit rows before the second projection); ``angle_per="sphere"`` turns every row by
      exactly :math:`\eta`.
    * **the Frobenius sphere** (``dim=None``: the whole matrix on one sphere of radius
      :math:`r`): the matrix itself (``reshape(shape[0], -1)`` for more axes, as Muon does for
      conv weights); :math:`P_X \Delta = \Delta - \langle \hat X, \Delta\rangle_F \hat X`.
      The matrix turns by exactly :math:`\theta = \eta` radians along :math:`O / \|O\|_F`
      (great circle), staying at radius :math:`r`.

    ``weight_decay`` does not apply to sphere parameters (their norm is fixed). The angle each
    sphere turned is kept in ``state["angle"]`` (shape ``(k,)``) with ``measure_angle=True``.

    **Euclidean 2-D parameters** (``use_muon`` true or unset): exactly ``torch.optim.Muon``
    with the same settings (same momentum, bfloat16 Newton-Schulz, ``adjust_lr_fn``, decoupled
    ``weight_decay``; note torch's default ``weight_decay`` is 0.1, ours 0), step for step and
    bit for bit. **Other parameters** (1-D, 0-D, >2-D Euclidean, or any group with
    ``use_muon=False``, e.g. embeddings and the output head): torch's AdamW with
    ``adamw_lr`` (default: the group's ``lr``, so that a group of AdamW parameters with its
    own ``lr`` follows LR schedulers), ``adamw_betas``, ``adamw_eps``, ``adamw_weight_decay``
    (``maximize`` too). Every option may be overridden per param group.

    Args:
        params: parameters or param groups (a group may set ``use_muon``: True sends
            Euclidean tensors of >= 2 axes to Muon (reshaped to ``(shape[0], -1)``), False
            sends Euclidean ones to AdamW; sphere parameters always take the sphere step).
        lr: Muon's learning rate (Euclidean) and the step angle in radians (spheres).
        momentum, nesterov: Muon's momentum (``torch.optim.Muon``'s convention).
        ns_steps, ns_coefficients, eps: the Newton-Schulz iteration (``eps``: the least norm
            divided by).
        ns_dtype: its matmul dtype (bfloat16 as Muon; ``None``: the parameter's dtype).
        weight_decay: Muon's decoupled weight decay on Euclidean matrices.
        adjust_lr_fn: ``None``/``"original"`` or ``"match_rms_adamw"`` (torch.optim.Muon's).
        ordering: ``"riemannian"`` (default: the sphere step above) or ``"renorm"``: sphere
            parameters get torch.optim.Muon's Euclidean step (on ``reshape(shape[0], -1)``,
            with ``weight_decay`` and ``adjust_lr_fn``), then are renormalized to their radius
            (the Muon analogue of :class:`.RenormAdam`, a baseline for studies).
        angle_per: ``"tensor"`` or ``"sphere"`` (above).
        measure_angle: keep the angle each sphere turned in ``state["angle"]``.
        batch_ns: iterate same-shape matrices together (``torch.bmm`` on a stack).
        foreach: the momentum, Muon and AdamW updates and the tangent projections as
            ``_foreach`` ops (default on CPU/CUDA tensors, not DTensors).
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

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        *,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_dtype: torch.dtype | None = torch.bfloat16,
        adjust_lr_fn: str | None = None,
        ordering: Literal["riemannian", "renorm"] = "riemannian",
        angle_per: Literal["tensor", "sphere"] = "tensor",
        measure_angle: bool = False,
        batch_ns: bool = True,
        adamw_lr: float | Tensor | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        nonfinite: str = "skip",
    ) -> None:
        check_lr(lr)
        if adamw_lr is not None:
            check_lr(adamw_lr)
        check_hyper("momentum value", momentum, upper=1.0)
        check_hyper("weight_decay value", weight_decay)
        check_hyper("weight_decay value", adamw_weight_decay)
        check_hyper("epsilon value", eps)
        check_hyper("epsilon value", adamw_eps)
        check_betas(adamw_betas)
        if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or not 0 <= ns_steps < 100:
            raise ValueError(f"ns_steps must be an int in [0, 100), got {ns_steps!r}")
        if len(ns_coefficients) != 3:
            raise ValueError(f"ns_coefficients must be 3 floats (a, b, c), got {ns_coefficients}")
        if adjust_lr_fn not in _ADJUST_LR:
            raise ValueError(
                f"adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got {adjust_lr_fn!r}"
            )
        if angle_per not in ("tensor", "sphere"):
            raise ValueError(f"angle_per must be 'tensor' or 'sphere', got {angle_per!r}")
        if ordering not in ("riemannian", "renorm"):
            raise ValueError(f"ordering must be 'riemannian' or 'renorm', got {ordering!r}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            weight_decay=weight_decay,
            ns_coefficients=tuple(ns_coefficients),
            eps=eps,
            ns_dtype=ns_dtype,
            adjust_lr_fn=adjust_lr_fn,
            ordering=ordering,
            angle_per=angle_per,
            measure_angle=measure_angle,
            batch_ns=batch_ns,
            adamw_lr=adamw_lr,
            adamw_betas=adamw_betas,
            adamw_eps=adamw_eps,
            adamw_weight_decay=adamw_weight_decay,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            differentiable=differentiable,
        )
        super().__init__(params, defaults, nonfinite)

    def _route(self, group: dict[str, Any], p: Tensor) -> str:
        """``"sphere"``, ``"renorm"`` (a sphere parameter, ``ordering="renorm"``), ``"muon"``
        or ``"adamw"`` for ``p``."""
        if sphere_info(p) is not None:
            return "renorm" if group["ordering"] == "renorm" else "sphere"
        use = group.get("use_muon")
        if use is None:
            return "muon" if p.dim() == 2 and not torch.is_complex(p) else "adamw"
        if use and (p.dim() < 2 or torch.is_complex(p)):
            raise ValueError(
                f"SphereMuon: use_muon=True needs real tensors of >= 2 axes, got one of shape "
                f"{tuple(p.shape)} ({p.dtype})"
            )
        return "muon" if use else "adamw"

    def _new_state(self, group: dict[str, Any], p: Tensor) -> list[Tensor]:
        if self._route(group, p) == "adamw":
            return self._adamw_state(group, p)
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return [state["momentum_buffer"]]

    def _group_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        ours: list[Tensor] = []
        kinds: list[str] = []
        adamw: list[Tensor] = []
        for p in params:
            kind = self._route(group, p)
            if kind == "adamw":
                adamw.append(p)
                continue
            ours.append(p)
            kinds.append(kind)
        adamw_lr = group["adamw_lr"]
        self._adamw(
            group,
            adamw,
            lr=group["lr"] if adamw_lr is None else adamw_lr,
            betas=group["adamw_betas"],
            eps=group["adamw_eps"],
            weight_decay=group["adamw_weight_decay"],
        )
        if ours:
            self._muon(group, ours, kinds)

    def _muon(self, group: dict[str, Any], params: list[Tensor], kinds: list[str]) -> None:
        mu = float(group["momentum"])
        grads = [self._grad_of(group, p) for p in params]
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        foreach = self._use_foreach(group, params)
        if foreach:
            torch._foreach_lerp_(bufs, grads, 1 - mu)
            updates = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
        else:
            updates = []
            for b, g in zip(bufs, grads):
                b.lerp_(g, 1 - mu)
                updates.append(g.lerp(b, mu) if group["nesterov"] else b)
        # Riemannian momentum: the buffer projected at the current point after every update,
        # i.e. B = mu P(B_old) + (1 - mu) P(g) (transport by projection; P is linear), and so
        # is the Nesterov update. Momentum of Euclidean gradients would drag each point back
        # towards its past positions (their radial parts projected at the new point), a
        # bias of the order of the step itself.
        on = [i for i, kind in enumerate(kinds) if kind == "sphere"]
        if on:
            ps = [params[i] for i in on]
            self._tangent(ps, [bufs[i] for i in on], inplace=True)
            if group["nesterov"]:
                self._tangent(ps, [updates[i] for i in on], inplace=True)

        # the matrices to orthogonalize: tangent parts of sphere updates, Euclidean updates
        infos = [sphere_info(p) for p in params]
        mats: list[Tensor] = []
        for p, u, kind, info in zip(params, updates, kinds, infos):
            if kind == "sphere":  # tangent already (projected above)
                assert info is not None
                mats.append(matrix_of(u, info.layout).to(sphere.compute_dtype(p.dtype)))
            else:
                mats.append(u.reshape(u.shape[0], math.prod(u.shape[1:])))
        dtype = group["ns_dtype"]
        keep = [i for i, m in enumerate(mats) if m.numel()]
        outs = orthogonalize(
            [mats[i] for i in keep],
            group["ns_steps"],
            group["ns_coefficients"],
            group["eps"],
            dtype,
            batch=bool(group["batch_ns"]),
        )
        lr = self._host_lr(group)
        spheres: list[tuple[Tensor, SphereInfo, Tensor]] = []
        # Euclidean matrices sharing an adjusted LR (a shape): torch.optim.Muon's two
        # operations as one _foreach op each (the same arithmetic, element for element)
        together: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
        renorm: list[Tensor] = []  # ordering="renorm": back on the sphere after the update
        for i, o in zip(keep, outs):
            p, kind, info = params[i], kinds[i], infos[i]
            if kind in ("muon", "renorm"):
                # torch.optim.Muon's update, operation for operation
                adjusted = _adjusted_lr(lr, group["adjust_lr_fn"], mats[i].shape)
                if kind == "renorm":
                    renorm.append(p)
                if not isinstance(adjusted, Tensor) and not is_dtensor(p):
                    ps_, os_ = together.setdefault((adjusted, p.device, p.dtype), ([], []))
                    ps_.append(p)
                    os_.append(o.reshape(p.shape))
                    continue
                p.mul_(1 - lr * group["weight_decay"])
                if isinstance(adjusted, Tensor):  # capturable: no host read of the LR
                    p.sub_(o.reshape(p.shape) * adjusted.to(p.dtype))
                else:
                    p.add_(o.reshape(p.shape), alpha=-adjusted)
                continue
            assert info is not None
            # back to p's shape: a view of the polar factor (read where it lies)
            d = o.reshape(p.shape) if info.whole else from_rows(o, info.layout, p.shape)
            spheres.append((p, info, d))
        for (adjusted, _, _), (ps_, os_) in together.items():
            torch._foreach_mul_(ps_, 1 - lr * group["weight_decay"])
            torch._foreach_add_(ps_, os_, alpha=-adjusted)
        if renorm:  # as RenormAdam after Adam
            self._renormalize(renorm)
        self._sphere_steps(
            group,
            spheres,
            lr,
            rule="angular",
            project=True,
            stack=bool(group["batch_ns"]),
        )
