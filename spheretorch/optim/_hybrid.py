r"""The base of :class:`.SphereMuon` and :class:`.AdamH`: a :class:`torch.optim.Optimizer` whose
parameters are routed by kind (sphere parameters, Euclidean matrices, the rest), with torch's
hyperparameter checks and wording, the non-finite gradient policy of the other sphere
optimizers (``nonfinite="skip" | "raise" | "ignore"``), torch's AdamW step (its own functional
``torch.optim.adam.adam``, so equal to ``torch.optim.AdamW`` bit for bit) and torch's
``__setstate__`` defaults for older state dicts.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.adam import adam as torch_adam
from torch.optim.optimizer import _get_scalar_dtype

from ..parameter import sphere_dim_of
from ..sphere import sphere_layout
from .sphere_steps import SphereLayout

__all__ = ["HybridOptimizer", "SphereInfo", "check_hyper", "sphere_info"]

NONFINITE_POLICIES = ("skip", "raise", "ignore")


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
    layout = sphere_layout(p.shape, dims)
    return SphereInfo(layout, float(getattr(p, "sphere_radius", 1.0)), layout.count == 1)


class HybridOptimizer(Optimizer):
    """Shared machinery of :class:`.SphereMuon` and :class:`.AdamH`; a subclass implements
    ``_group_step(group)`` (one param group's update)."""

    def __init__(self, params: Any, defaults: dict[str, Any], nonfinite: str) -> None:
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"nonfinite must be one of {', '.join(map(repr, NONFINITE_POLICIES))}, "
                f"got {nonfinite!r}"
            )
        name = type(self).__name__
        for flag in ("fused", "capturable", "differentiable"):
            if defaults.get(flag):
                raise RuntimeError(f"`{flag}` is not supported by {name} (pass {flag}=None)")
        self.nonfinite = nonfinite
        self._skipped = 0
        super().__init__(params, defaults)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped so far because a gradient was not finite (``nonfinite="skip"``)."""
        return self._skipped

    def __repr__(self) -> str:
        return super().__repr__().replace("(", f"(nonfinite: {self.nonfinite!r}\n", 1)

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("nonfinite", "skip")
        state.setdefault("_skipped", 0)
        super().__setstate__(state)
        fill = {
            k: v.default
            for k, v in inspect.signature(type(self).__init__).parameters.items()
            if v.default is not inspect.Parameter.empty and k != "nonfinite"
        }
        fill.update(self.defaults)
        for group in self.param_groups:
            for key, value in fill.items():
                group.setdefault(key, value)
            for p in group["params"]:
                s = self.state.get(p, {})
                if "step" in s and not torch.is_tensor(s["step"]):
                    s["step"] = torch.tensor(float(s["step"]), dtype=_get_scalar_dtype())

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for flag in ("fused", "capturable", "differentiable"):
            if group.get(flag):
                raise RuntimeError(
                    f"`{flag}` is not supported by {type(self).__name__} (pass {flag}=None)"
                )

    # ------------------------------------------------------------------ step

    def _grad_of(self, group: dict[str, Any], p: Tensor) -> Tensor:
        if p.grad.is_sparse:
            gi = next(i for i, g in enumerate(self.param_groups) if g is group)
            pi = next(i for i, q in enumerate(group["params"]) if q is p)
            raise RuntimeError(
                f"{type(self).__name__} does not support sparse gradients: "
                f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)}) has a sparse .grad"
            )
        g = p.grad
        return -g if group.get("maximize") else g

    def _nonfinite_skip(self) -> bool:
        """Apply the policy: True when this step is skipped. One host sync when checked."""
        if self.nonfinite == "ignore":
            return False
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return False
        flags = [torch.isfinite(g).all() for g in grads if g.numel()]
        if not flags or bool(torch.stack(flags).all()):
            return False
        if self.nonfinite == "raise":
            for gi, group in enumerate(self.param_groups):
                for pi, p in enumerate(group["params"]):
                    if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                        raise FloatingPointError(
                            f"{type(self).__name__}: non-finite gradient (NaN or inf) in "
                            f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)}); "
                            f"nothing was updated (nonfinite='raise')"
                        )
        self._skipped += 1
        return True

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one optimisation step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.
        Returns:
            The closure's loss (``None`` without a closure).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._nonfinite_skip():
            return loss
        for group in self.param_groups:
            self._group_step(group)
        return loss

    def _group_step(self, group: dict[str, Any]) -> None:
        raise NotImplementedError  # pragma: no cover

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
        has_complex = False
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            has_complex |= torch.is_complex(p)
            grads.append(p.grad)
            avgs.append(state["exp_avg"])
            sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if isinstance(lr, Tensor):
            lr = float(lr)  # a host read: torch's foreach AdamW takes a Tensor lr only capturable
        b1, b2 = (float(b) for b in betas)
        torch_adam(
            params,
            grads,
            avgs,
            sqs,
            [],
            steps,
            foreach=group.get("foreach"),
            has_complex=has_complex,
            decoupled_weight_decay=True,
            amsgrad=False,
            beta1=b1,
            beta2=b2,
            lr=lr,
            weight_decay=weight_decay,
            eps=eps,
            maximize=bool(group.get("maximize")),
        )
