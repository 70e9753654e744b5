r"""``spheretorch::nlerp_residual``: nGPT's residual step as one op, forward and backward.

.. math::

    a = \mathrm{Norm}(h),\quad b = \mathrm{Norm}(f),\quad y = a + \alpha \odot (b - a),\quad
    h' = \begin{cases} y / \|y\| & \|y\| > 16\,\epsilon \\ a & \text{otherwise}\end{cases}

for states ``h`` and block outputs ``f`` of shape ``(..., d)`` (normalized along the last axis)
and a step-size vector ``alpha`` of shape ``(d,)`` (nGPT's eigen learning rates, already
``|alpha_param * init / scale|``). Both inputs are normalized inside, as NVIDIA's reference does
(``justnorm(h)``, ``justnorm(h_att)``), so the gradient keeps the radial part that ``h`` and
``f`` have before normalization. ``epsilon`` is the compute dtype's machine epsilon; a chord
through the origin (``alpha == 1/2`` and ``f == -h``) leaves ``Norm(h)``.

Backward, with :math:`\bar y = (\bar h' - h' \langle \bar h', h'\rangle)/\|y\|` (zero in the
degenerate case, where :math:`\bar a` gets :math:`\bar h'` instead):
:math:`\bar a = (1-\alpha)\odot\bar y`, :math:`\bar b = \alpha\odot\bar y`,
:math:`\bar\alpha = \sum_{rows} \bar y \odot (b - a)`, and the :mod:`.unit` backward for
:math:`\bar h, \bar f`. Float32 math for half inputs; results in the inputs' dtypes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..sphere.checks import compute_dtype, upcast
from .backend import triton_available
from .rowwise import (
    as_rows,
    autocast_off,
    backward_entry,
    block_and_warps,
    jit,
    reduce_programs,
    reference_vjp,
    use_triton,
)
from .unit import _inv_norm, inv_norm_rows, project_rows_

__all__ = ["nlerp_residual", "nlerp_residual_backward_reference", "nlerp_residual_reference"]


def _degenerate_bound(dtype: torch.dtype) -> float:
    return 16 * torch.finfo(dtype).eps


def nlerp_residual_reference(h: Tensor, f: Tensor, alpha: Tensor) -> Tensor:
    """The definition (module docstring), differentiable by autograd."""
    hf, ff = upcast(h), upcast(f)
    a, b = hf * _inv_norm(hf), ff * _inv_norm(ff)
    y = a + alpha.to(a.dtype) * (b - a)
    n = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
    degenerate = n <= _degenerate_bound(n.dtype)
    out = torch.where(degenerate, a, y / torch.where(degenerate, torch.ones_like(n), n))
    return out.to(h.dtype)


def _nlerp_torch(h: Tensor, f: Tensor, alpha: Tensor) -> Tensor:
    """The op's PyTorch implementation (one pass per line of the definition)."""
    hf, ff = upcast(h), upcast(f)
    a, b = hf * inv_norm_rows(hf), ff * inv_norm_rows(ff)
    ct = torch.promote_types(a.dtype, b.dtype)
    y = torch.lerp(a.to(ct), b.to(ct), alpha.to(ct))
    n = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
    degenerate = n <= _degenerate_bound(ct)
    y.mul_(torch.where(degenerate, 0.0, n.reciprocal()))
    return y.addcmul_(a, degenerate.to(ct)).to(h.dtype)  # Norm(h) where the chord is ~0


def nlerp_residual_backward_reference(
    grad: Tensor, h: Tensor, f: Tensor, alpha: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dh, df, dalpha)`` of :func:`nlerp_residual_reference` (formulas in the module
    docstring), with in-place updates."""
    hf, ff = upcast(h), upcast(f)
    rh, rf = inv_norm_rows(hf), inv_norm_rows(ff)
    ct = torch.promote_types(rh.dtype, rf.dtype)
    a, b, al = (hf * rh).to(ct), (ff * rf).to(ct), alpha.to(ct)
    y = torch.lerp(a, b, al)
    n = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
    degenerate = n <= _degenerate_bound(ct)
    rn = torch.where(degenerate, 0.0, n.reciprocal())
    out, g = y.mul_(rn), grad.to(ct)
    dy = project_rows_(g.clone(), out, rn)  # zero on degenerate rows (rn = 0)
    d = y.shape[-1]
    dalpha = (out.copy_(b).sub_(a).mul_(dy)).reshape(-1, d).sum(0)  # out's memory reused
    da = torch.addcmul(dy * (1 - al), g, degenerate.to(ct))  # there h' = Norm(h): da = g
    db = dy.mul_(al)
    dh = project_rows_(da, a, rh)
    df = project_rows_(db, b, rf)
    return dh.to(h.dtype), df.to(f.dtype), dalpha.to(alpha.dtype)


# ----------------------------------------------------------------------------- Triton

if triton_available():
    import triton.language as tl

    def _nlerp_fwd_kernel(
        H, F, A, OUT, stride_h, stride_f, d, BLOCK: tl.constexpr, F64: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < d
        h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0)
        f = tl.load(F + row * stride_f + cols, mask=mask, other=0.0)
        al = tl.load(A + cols, mask=mask, other=0.0)
        if F64:
            h, f, al = h.to(tl.float64), f.to(tl.float64), al.to(tl.float64)
            rh = 1.0 / tl.sqrt(tl.maximum(tl.sum(h * h, axis=0), 2.2250738585072014e-308))
            rf = 1.0 / tl.sqrt(tl.maximum(tl.sum(f * f, axis=0), 2.2250738585072014e-308))
            bound = 3.552713678800501e-15
        else:
            h, f, al = h.to(tl.float32), f.to(tl.float32), al.to(tl.float32)
            rh = 1.0 / tl.sqrt_rn(tl.maximum(tl.sum(h * h, axis=0), 1.1754943508222875e-38))
            rf = 1.0 / tl.sqrt_rn(tl.maximum(tl.sum(f * f, axis=0), 1.1754943508222875e-38))
            bound = 1.9073486328125e-06
        a = h * rh
        y = a + al * (f * rf - a)
        n = tl.sqrt(tl.sum(y * y, axis=0))
        degenerate = n <= bound
        out = tl.where(degenerate, a, y / tl.where(degenerate, 1.0, n))
        tl.store(OUT + row * d + cols, out.to(OUT.dtype.element_ty), mask=mask)

    def _nlerp_bwd_kernel(
        G, H, F, A, DH, DF, DA_PART, stride_g, stride_h, stride_f, n_rows, PER: tl.constexpr, d,
        BLOCK: tl.constexpr, F64: tl.constexpr,
    ):  # fmt: skip
        # Each program takes rows pid * PER ... pid * PER + PER - 1 and writes one partial
        # dalpha row.
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        col_mask = cols < d
        al = tl.load(A + cols, mask=col_mask, other=0.0)
        al = al.to(tl.float64 if F64 else tl.float32)
        acc = al * 0.0
        for i in range(0, PER):
            row = pid.to(tl.int64) * PER + i
            valid = (cols * 0 + row) < n_rows  # as a vector: older interpreters need it so
            mask = col_mask & valid
            h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0)
            f = tl.load(F + row * stride_f + cols, mask=mask, other=0.0)
            g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0)
            if F64:
                h, f, g = h.to(tl.float64), f.to(tl.float64), g.to(tl.float64)
                rh = 1.0 / tl.sqrt(tl.maximum(tl.sum(h * h, axis=0), 2.2250738585072014e-308))
                rf = 1.0 / tl.sqrt(tl.maximum(tl.sum(f * f, axis=0), 2.2250738585072014e-308))
                bound = 3.552713678800501e-15
            else:
                h, f, g = h.to(tl.float32), f.to(tl.float32), g.to(tl.float32)
                rh = 1.0 / tl.sqrt_rn(tl.maximum(tl.sum(h * h, axis=0), 1.1754943508222875e-38))
                rf = 1.0 / tl.sqrt_rn(tl.maximum(tl.sum(f * f, axis=0), 1.1754943508222875e-38))
                bound = 1.9073486328125e-06
            a, b = h * rh, f * rf
            y = a + al * (b - a)
            n = tl.sqrt(tl.sum(y * y, axis=0))
            degenerate = n <= bound
            rn = 1.0 / tl.where(degenerate, 1.0, n)
            out = y * rn
            dy = tl.where(degenerate, 0.0, (g - out * tl.sum(g * out, axis=0)) * rn)
            da = dy * (1.0 - al) + tl.where(degenerate, g, 0.0)
            db = dy * al
            acc += tl.where(valid, dy * (b - a), 0.0)
            dh = rh * (da - a * tl.sum(da * a, axis=0))
            df = rf * (db - b * tl.sum(db * b, axis=0))
            tl.store(DH + row * d + cols, dh.to(DH.dtype.element_ty), mask=mask)
            tl.store(DF + row * d + cols, df.to(DF.dtype.element_ty), mask=mask)
        tl.store(DA_PART + pid.to(tl.int64) * d + cols, acc, mask=col_mask)


def _wide(h: Tensor, f: Tensor) -> torch.dtype:
    return torch.promote_types(compute_dtype(h.dtype), compute_dtype(f.dtype))


# ----------------------------------------------------------------------------- the ops

Residual = Callable[[Tensor, Tensor, Tensor], Tensor]
Backward = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


def residual_op(
    name: str,
    kernels: tuple[Any, Any] | None,
    forward: Residual,
    backward: Backward,
    reference: Residual,
) -> Residual:
    """Register a residual rule ``(h, f, alpha) -> h'`` as the custom ops
    ``spheretorch::<name>`` and ``spheretorch::<name>_backward`` and return the forward op.

    ``kernels``: its Triton ``(forward, backward)`` kernels (``None`` without Triton), with the
    launch signature of this module's nlerp kernels (the backward writes per-program partial
    sums of the ``alpha`` gradient); ``forward``/``backward``: the PyTorch implementation and
    the hand-written backward (CPU); ``reference``: the readable definition, differentiated by
    autograd under ``create_graph=True``. The nlerp and slerp rules share all of this.
    """

    def run_triton(h: Tensor, f: Tensor, alpha: Tensor) -> Tensor:
        assert kernels is not None
        h2, f2 = as_rows(h), as_rows(f)
        out = torch.empty(h2.shape, dtype=h.dtype, device=h.device)
        if out.numel():
            block, warps = block_and_warps(h2.shape[1])
            jit(kernels[0])[(h2.shape[0],)](
                h2, f2, alpha.contiguous(), out, h2.stride(0), f2.stride(0), h2.shape[1],
                BLOCK=block, F64=_wide(h, f) == torch.float64, num_warps=warps,
            )  # fmt: skip
        return out.view(h.shape)

    def backward_triton(
        grad: Tensor, h: Tensor, f: Tensor, alpha: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        assert kernels is not None
        g2, h2, f2 = as_rows(grad), as_rows(h), as_rows(f)
        rows, d = h2.shape
        dh = torch.empty(h2.shape, dtype=h.dtype, device=h.device)
        df = torch.empty(f2.shape, dtype=f.dtype, device=f.device)
        ct = _wide(h, f)
        programs, per = reduce_programs(rows, h.device)
        partial = torch.zeros(programs, d, dtype=ct, device=h.device)
        if rows and d:
            block, warps = block_and_warps(d)
            jit(kernels[1])[(programs,)](
                g2, h2, f2, alpha.contiguous(), dh, df, partial, g2.stride(0), h2.stride(0),
                f2.stride(0), rows, per, d, BLOCK=block, F64=ct == torch.float64,
                num_warps=warps,
            )  # fmt: skip
        return dh.view(h.shape), df.view(f.shape), partial.sum(0).to(alpha.dtype)

    def op_impl(h: Tensor, f: Tensor, alpha: Tensor) -> Tensor:
        if use_triton(h):
            return run_triton(h, f, alpha)
        with autocast_off(h):
            return forward(h, f, alpha).contiguous()

    def fake(h: Tensor, f: Tensor, alpha: Tensor) -> Tensor:
        return torch.empty_like(h, memory_format=torch.contiguous_format)

    def backward_impl(
        grad: Tensor, h: Tensor, f: Tensor, alpha: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        if use_triton(h):
            return backward_triton(grad, h, f, alpha)
        with autocast_off(h):
            dh, df, dalpha = backward(grad, h, f, alpha)
        return dh.contiguous(), df.contiguous(), dalpha

    def backward_fake(
        grad: Tensor, h: Tensor, f: Tensor, alpha: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        fmt = torch.contiguous_format
        return (
            torch.empty_like(h, memory_format=fmt),
            torch.empty_like(f, memory_format=fmt),
            torch.empty_like(alpha),
        )

    op = torch.library.custom_op(f"spheretorch::{name}", op_impl, mutates_args=())
    op.register_fake(fake)
    backward_op = torch.library.custom_op(
        f"spheretorch::{name}_backward", backward_impl, mutates_args=()
    )
    backward_op.register_fake(backward_fake)

    def setup(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    def autograd_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        h, f, alpha = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiable again through the reference
            return reference_vjp(reference, (h, f, alpha), grad)
        return backward_entry(backward_op, backward_impl, grad)(grad, h, f, alpha)

    op.register_autograd(autograd_backward, setup_context=setup)
    return op


def check_residual_args(h: Tensor, f: Tensor, alpha: Tensor) -> None:
    """One-line errors for a residual op's arguments: ``h``, ``f`` ``(..., d)`` alike,
    ``alpha`` ``(d,)``."""
    if h.shape != f.shape:
        raise ValueError(
            f"h and f must have the same shape, got {tuple(h.shape)} and {tuple(f.shape)}"
        )
    if alpha.shape != h.shape[-1:]:
        raise ValueError(
            f"alpha must have shape ({h.shape[-1]},) (one step size per coordinate), got "
            f"{tuple(alpha.shape)}"
        )


_nlerp_op = residual_op(
    "nlerp_residual",
    (_nlerp_fwd_kernel, _nlerp_bwd_kernel) if triton_available() else None,
    _nlerp_torch,
    nlerp_residual_backward_reference,
    nlerp_residual_reference,
)


def nlerp_residual(h: Tensor, f: Tensor, alpha: Tensor) -> Tensor:
    """``Norm(Norm(h) + alpha * (Norm(f) - Norm(h)))`` along the last axis (module docstring).

    Args:
        h: states ``(..., d)``, any norm (normalized inside).
        f: block outputs, same shape as ``h`` (normalized inside); its dtype may differ
            (bf16 autocast outputs with float32 states): the math runs in the wider one.
        alpha: step sizes, shape ``(d,)``, floating point.

    Returns:
        Unit rows, shaped and typed like ``h``.
    """
    check_residual_args(h, f, alpha)
    return _nlerp_op(h, f, alpha)
