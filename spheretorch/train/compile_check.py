"""Compiled-versus-eager gradients: the guard that keeps a compiler fault from training.

``torch.compile`` has produced a model whose loss equals eager's while its gradients do not
(torch 2.11, a custom autograd Function returning a no-op ``.to()``: docs/transformers.md,
"torch.compile and custom autograd Functions"). A loss check cannot see that, so with
``--compile`` the trainer runs the first batch through both the eager and the compiled model
and compares every parameter's gradient (:func:`grad_errors`); beyond the round-off of the
compute dtype (:func:`tolerance`) it stops (:class:`CompiledGradientMismatch`, exit status 2)
or, with ``--compile-check eager``, warns and trains eager. docs/errors.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import UserError

__all__ = [
    "COMPILE_CHECKS",
    "CompiledGradientMismatch",
    "GradParity",
    "ParityRun",
    "grad_errors",
    "grad_parity",
    "tolerance",
]

#: ``--compile-check``: stop (exit 2) on a mismatch, train eager instead (a warning), or skip
COMPILE_CHECKS = ("error", "eager", "off")

#: relative L2 error allowed per parameter gradient, by compute dtype (compiled kernels
#: reorder reductions and round bf16 at other points than eager ones). Measured with inductor
#: on the CPU (torch 2.13, 2-layer models, d 32): float32 <= 1.2e-6, bf16 autocast <= 1.1e-2
#: (GeoNorm's b_m; nGPT 8.5e-3, GPT 4.2e-3); CUDA figures are owed to the GPU check. The
#: faults seen were 0.6 to 1.0 (zero or scrambled gradients), far above both bounds.
_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.1, torch.float16: 0.05}

#: gradients smaller than this fraction of the largest parameter gradient are compared
#: against that floor, not against their own (round-off-sized) norm
_FLOOR = 1e-4


class CompiledGradientMismatch(UserError):
    """The compiled model's gradients differ from eager ones beyond round-off (exit status 2:
    ``--compile-check eager`` trains eager instead, ``--compile-check off`` does not check)."""


@dataclass(frozen=True)
class GradParity:
    """Per-parameter relative L2 error of compiled against eager gradients.

    ``errors[name] = ||g_compiled - g_eager|| / max(||g_eager||, 1e-4 max_q ||g_eager_q||)``
    (``inf`` when one side has no gradient); ``tolerance`` is the dtype's bound.
    """

    errors: dict[str, float]
    tolerance: float
    dtype: torch.dtype

    @property
    def worst(self) -> tuple[str, float]:
        """``(name, error)`` of the parameter with the largest error."""
        name = max(self.errors, key=lambda k: self.errors[k])
        return name, self.errors[name]

    @property
    def ok(self) -> bool:
        return all(e <= self.tolerance for e in self.errors.values())

    def message(self, fallback: bool = False) -> str:
        """One line naming the worst parameter; ``fallback``: for a run that goes on eager."""
        name, err = self.worst
        what = (
            f"torch.compile computes wrong gradients: parameter {name} is {err:.3g} off eager "
            f"(relative L2; {_dtype_name(self.dtype)} round-off allows {self.tolerance:g}) on "
            f"the first batch"
        )
        if fallback:
            return what + "; training eager instead (--compile-check eager)"
        return what + "; rerun with --compile-check eager to train eager, or without --compile"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tolerance(dtype: torch.dtype) -> float:
    """The largest relative L2 gradient error that round-off in ``dtype`` explains."""
    return _TOLERANCE.get(dtype, _TOLERANCE[torch.float32])


def _full(t: Tensor) -> Tensor:
    full = getattr(t, "full_tensor", None)  # a DTensor shard under FSDP2: every rank agrees
    return (full() if full is not None else t).detach().double()


def grad_errors(
    named: Iterable[tuple[str, Tensor | None, Tensor | None]],
) -> dict[str, float]:
    """``{name: relative L2 error}`` for ``(name, eager grad, compiled grad)`` triples (see
    :class:`GradParity`)."""
    rows = [
        (n, None if a is None else _full(a), None if b is None else _full(b)) for n, a, b in named
    ]
    norms = [float(a.norm()) for _, a, _ in rows if a is not None]
    floor = _FLOOR * max(norms, default=0.0) or torch.finfo(torch.float64).tiny
    errors = {}
    for name, a, b in rows:
        if a is None and b is None:
            continue
        if a is None or b is None:
            errors[name] = math.inf
            continue
        diff = float((b - a).norm())
        errors[name] = diff / max(float(a.norm()), floor) if math.isfinite(diff) else math.inf
    return errors


@dataclass
class ParityRun:
    """What :func:`grad_parity` ran: the comparison, both losses (detached) and the eager
    gradients (in ``model.parameters()`` order, for a caller that falls back to eager)."""

    parity: GradParity
    eager_loss: Tensor
    compiled_loss: Tensor
    eager_grads: list[Tensor | None]

    def restore_eager_grads(self, model: nn.Module) -> None:
        """Put the eager gradients back into ``model``'s ``.grad`` (train eager instead)."""
        params = [p for p in model.parameters() if p.requires_grad]
        for p, g in zip(params, self.eager_grads):
            p.grad = g


def grad_parity(
    model: nn.Module,
    eager: Callable[[], Tensor],
    compiled: Callable[[], Tensor],
    dtype: torch.dtype,
) -> ParityRun:
    """Run ``eager()`` and then ``compiled()`` (each returns the loss of the same batch), each
    with its backward, and compare the gradients of ``model``'s parameters.

    Gradients already in ``.grad`` are dropped first (they would be added to one side only);
    the compiled gradients are left in ``.grad`` (a trainer's first step uses them: the check
    costs one eager forward and backward).
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for _, p in params:
        p.grad = None
    loss_e = eager()
    loss_e.backward()
    grads_e = [None if p.grad is None else p.grad.detach().clone() for _, p in params]
    for _, p in params:
        p.grad = None
    loss_c = compiled()
    loss_c.backward()
    errors = grad_errors((n, g, p.grad) for (n, p), g in zip(params, grads_e))
    parity = GradParity(errors, tolerance(dtype), dtype)
    return ParityRun(parity, loss_e.detach(), loss_c.detach(), grads_e)
