r"""``spheretorch::rope_unit``: RoPE, per-head normalization and the query scale as one op.

For heads ``x`` of shape ``(B, T, n_heads, d_k)`` (nGPT's ``[q, k]`` heads side by side), the
rotate-half rotation by position ``t`` (tables ``cos``, ``sin`` of shape ``(T, d_k / 2)``),
normalization of every head, and a scale on the first ``H_q`` heads (the queries):

.. math::

    z = (x_1 \cos - x_2 \sin,\ x_1 \sin + x_2 \cos), \qquad u = z / \|z\|, \qquad
    \mathrm{out}_{j} = s_j \odot u_j \ (j < H_q), \quad \mathrm{out}_j = u_j \ (j \ge H_q)

with ``q_scale`` ``s`` of shape ``(H_q, d_k)`` (nGPT: ``s_qk^2 sqrt(d_k)`` per head). Backward:
:math:`\bar u = s \odot \bar{\mathrm{out}}`, :math:`\bar s = \sum_{B,T} \bar{\mathrm{out}}
\odot u`, :math:`\bar z = (\bar u - u \langle \bar u, u\rangle)/\|z\|`, and the transposed
rotation :math:`\bar x = (\bar z_1 \cos + \bar z_2 \sin,\ -\bar z_1 \sin + \bar z_2 \cos)`.
Float32 math for half inputs, result in ``x``'s dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..sphere.checks import compute_dtype, upcast
from .backend import triton_available
from .rowwise import autocast_off, backward_entry, jit, reduce_programs, reference_vjp, use_triton
from .unit import _inv_norm, inv_norm_rows, project_rows_

__all__ = ["rope_unit", "rope_unit_reference"]


def _rotate(xf: Tensor, c: Tensor, s: Tensor, sign: float = 1.0) -> Tensor:
    half = xf.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat((x1 * c - sign * x2 * s, sign * x1 * s + x2 * c), dim=-1)


def _tables(x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    ct = compute_dtype(x.dtype)
    return cos[:, None, :].to(ct), sin[:, None, :].to(ct)


def rope_unit_reference(x: Tensor, cos: Tensor, sin: Tensor, q_scale: Tensor) -> Tensor:
    """The definition (module docstring), differentiable by autograd."""
    c, s = _tables(x, cos, sin)
    z = _rotate(upcast(x), c, s)
    u = z * _inv_norm(z)
    hq = q_scale.shape[0]
    return torch.cat((u[:, :, :hq] * q_scale.to(u.dtype), u[:, :, hq:]), dim=2).to(x.dtype)


# ----------------------------------------------------------------------------- CPU path
# The op's PyTorch implementation: the reference's equations with preallocated halves and
# in-place updates (no concatenation, about a third of the reference's passes over memory).


def _rotate_into(out: Tensor, xf: Tensor, c: Tensor, s: Tensor, sign: float) -> Tensor:
    """``out = R x`` (``sign=1``) or ``R^T x`` (``sign=-1``), rotate-half layout."""
    half = xf.shape[-1] // 2
    x1, x2, o1, o2 = xf[..., :half], xf[..., half:], out[..., :half], out[..., half:]
    torch.mul(x1, c, out=o1)
    o1.addcmul_(x2, s, value=-sign)
    torch.mul(x2, c, out=o2)
    o2.addcmul_(x1, s, value=sign)
    return out


def _unit_rows_(z: Tensor) -> Tensor:
    """``z`` normalized per row in place; returns ``1 / |z|`` (kept axis)."""
    r = inv_norm_rows(z)
    z.mul_(r)
    return r


def _rope_torch(x: Tensor, cos: Tensor, sin: Tensor, q_scale: Tensor) -> Tensor:
    c, s = _tables(x, cos, sin)
    xf = upcast(x)
    u = _rotate_into(torch.empty(x.shape, dtype=xf.dtype, device=x.device), xf, c, s, 1.0)
    _unit_rows_(u)
    u[:, :, : q_scale.shape[0]].mul_(q_scale.to(u.dtype))
    return u.to(x.dtype)


def _rope_backward_torch(
    grad: Tensor, x: Tensor, cos: Tensor, sin: Tensor, q_scale: Tensor
) -> tuple[Tensor, Tensor]:
    c, s = _tables(x, cos, sin)
    xf = upcast(x)
    u = _rotate_into(torch.empty(x.shape, dtype=xf.dtype, device=x.device), xf, c, s, 1.0)
    r = _unit_rows_(u)
    hq = q_scale.shape[0]
    gu = grad.to(u.dtype, copy=True)
    dq_scale = (gu[:, :, :hq] * u[:, :, :hq]).sum((0, 1))
    gu[:, :, :hq].mul_(q_scale.to(u.dtype))
    project_rows_(gu, u, r)
    dx = _rotate_into(u, gu, c, s, -1.0)  # u is not needed any more: its memory takes dx
    return dx.to(x.dtype), dq_scale.to(q_scale.dtype)


# ----------------------------------------------------------------------------- Triton

if triton_available():
    import triton.language as tl

    def _rope_fwd_kernel(
        X, COS, SIN, QS, OUT, stride_tok, T, n_heads, hq, half,
        HEADS: tl.constexpr, HALF: tl.constexpr, F64: tl.constexpr,
    ):  # fmt: skip
        # One program per token: its (n_heads, d_k) heads as two (HEADS, HALF) halves.
        tok = tl.program_id(0).to(tl.int64)
        t = tok % T
        heads = tl.arange(0, HEADS)[:, None]
        cols = tl.arange(0, HALF)[None, :]
        m = (heads < n_heads) & (cols < half)
        mq = (heads < hq) & (cols < half)
        d_k = 2 * half
        src = X + tok * stride_tok + heads * d_k + cols
        x1 = tl.load(src, mask=m, other=0.0)
        x2 = tl.load(src + half, mask=m, other=0.0)
        c = tl.load(COS + t * half + cols, mask=cols < half, other=0.0)
        s = tl.load(SIN + t * half + cols, mask=cols < half, other=0.0)
        s1 = tl.load(QS + heads * d_k + cols, mask=mq, other=1.0)
        s2 = tl.load(QS + heads * d_k + half + cols, mask=mq, other=1.0)
        if F64:
            x1, x2, c, s = x1.to(tl.float64), x2.to(tl.float64), c.to(tl.float64), s.to(tl.float64)
            s1, s2 = s1.to(tl.float64), s2.to(tl.float64)
        else:
            x1, x2, c, s = x1.to(tl.float32), x2.to(tl.float32), c.to(tl.float32), s.to(tl.float32)
            s1, s2 = s1.to(tl.float32), s2.to(tl.float32)
        z1 = x1 * c - x2 * s
        z2 = x1 * s + x2 * c
        ss = tl.sum(z1 * z1 + z2 * z2, axis=1)[:, None]
        if F64:
            r = 1.0 / tl.sqrt(tl.maximum(ss, 2.2250738585072014e-308))
        else:
            r = 1.0 / tl.sqrt_rn(tl.maximum(ss, 1.1754943508222875e-38))
        dst = OUT + tok * (n_heads * d_k) + heads * d_k + cols
        tl.store(dst, (z1 * r * s1).to(OUT.dtype.element_ty), mask=m)
        tl.store(dst + half, (z2 * r * s2).to(OUT.dtype.element_ty), mask=m)

    def _rope_bwd_kernel(
        G, X, COS, SIN, QS, DX, DQS_PART, stride_g, stride_tok, n_tok, PER: tl.constexpr,
        T, n_heads, hq, half,
        HEADS: tl.constexpr, HALF: tl.constexpr, F64: tl.constexpr,
    ):  # fmt: skip
        # Each program takes tokens pid * PER ... pid * PER + PER - 1 and writes one partial
        # dq_scale.
        pid = tl.program_id(0)
        heads = tl.arange(0, HEADS)[:, None]
        cols = tl.arange(0, HALF)[None, :]
        m_heads = (heads < n_heads) & (cols < half)
        mq = (heads < hq) & (cols < half)
        d_k = 2 * half
        s1 = tl.load(QS + heads * d_k + cols, mask=mq, other=1.0)
        s2 = tl.load(QS + heads * d_k + half + cols, mask=mq, other=1.0)
        if F64:
            s1, s2 = s1.to(tl.float64), s2.to(tl.float64)
        else:
            s1, s2 = s1.to(tl.float32), s2.to(tl.float32)
        acc1 = s1 * 0.0
        acc2 = s2 * 0.0
        for i in range(0, PER):
            tok = pid.to(tl.int64) * PER + i
            valid = (heads * 0 + cols * 0 + tok) < n_tok  # a vector: older interpreters
            m = m_heads & valid
            t = tok % T
            src = X + tok * stride_tok + heads * d_k + cols
            gsrc = G + tok * stride_g + heads * d_k + cols
            x1 = tl.load(src, mask=m, other=0.0)
            x2 = tl.load(src + half, mask=m, other=0.0)
            g1 = tl.load(gsrc, mask=m, other=0.0)
            g2 = tl.load(gsrc + half, mask=m, other=0.0)
            c = tl.load(COS + t * half + cols, mask=cols < half, other=0.0)
            s = tl.load(SIN + t * half + cols, mask=cols < half, other=0.0)
            if F64:
                x1, x2, g1, g2 = (
                    x1.to(tl.float64),
                    x2.to(tl.float64),
                    g1.to(tl.float64),
                    g2.to(tl.float64),
                )
                c, s = c.to(tl.float64), s.to(tl.float64)
            else:
                x1, x2, g1, g2 = (
                    x1.to(tl.float32),
                    x2.to(tl.float32),
                    g1.to(tl.float32),
                    g2.to(tl.float32),
                )
                c, s = c.to(tl.float32), s.to(tl.float32)
            z1 = x1 * c - x2 * s
            z2 = x1 * s + x2 * c
            ss = tl.sum(z1 * z1 + z2 * z2, axis=1)[:, None]
            if F64:
                r = 1.0 / tl.sqrt(tl.maximum(ss, 2.2250738585072014e-308))
            else:
                r = 1.0 / tl.sqrt_rn(tl.maximum(ss, 1.1754943508222875e-38))
            u1, u2 = z1 * r, z2 * r
            acc1 += tl.where(valid, g1 * u1, 0.0)
            acc2 += tl.where(valid, g2 * u2, 0.0)
            gu1, gu2 = g1 * s1, g2 * s2
            dot = tl.sum(gu1 * u1 + gu2 * u2, axis=1)[:, None]
            dz1 = r * (gu1 - u1 * dot)
            dz2 = r * (gu2 - u2 * dot)
            dst = DX + tok * (n_heads * d_k) + heads * d_k + cols
            tl.store(dst, (dz1 * c + dz2 * s).to(DX.dtype.element_ty), mask=m)
            tl.store(dst + half, (dz2 * c - dz1 * s).to(DX.dtype.element_ty), mask=m)
        part = DQS_PART + pid.to(tl.int64) * (hq * d_k) + heads * d_k + cols
        tl.store(part, acc1, mask=mq)
        tl.store(part + half, acc2, mask=mq)  # fmt: skip


def _tokens(x: Tensor) -> Tensor:
    """``x`` ``(B, T, n, d_k)`` as ``(B T, n, d_k)`` with unit-stride heads (view if possible)."""
    x3 = x.reshape(-1, x.shape[2], x.shape[3])
    if x3.stride(2) != 1 or x3.stride(1) != x3.shape[2]:
        x3 = x3.contiguous()
    return x3


def _launch(x: Tensor) -> tuple[int, int, int]:
    heads = max(1, 1 << (x.shape[2] - 1).bit_length())
    half = max(1, 1 << (x.shape[3] // 2 - 1).bit_length())
    block = heads * half
    return heads, half, 1 if block <= 256 else 4 if block <= 2048 else 8


def _rope_triton(x: Tensor, cos: Tensor, sin: Tensor, q_scale: Tensor) -> Tensor:
    x3 = _tokens(x)
    out = torch.empty(x3.shape, dtype=x.dtype, device=x.device)
    ct = compute_dtype(x.dtype)
    if out.numel():
        heads, half, warps = _launch(x)
        jit(_rope_fwd_kernel)[(x3.shape[0],)](
            x3, cos.to(ct).contiguous(), sin.to(ct).contiguous(), q_scale.contiguous(), out,
            x3.stride(0), x.shape[1], x.shape[2], q_scale.shape[0], x.shape[3] // 2,
            HEADS=heads, HALF=half, F64=ct == torch.float64, num_warps=warps,
        )  # fmt: skip
    return out.view(x.shape)


def _rope_backward_triton(
    grad: Tensor, x: Tensor, cos: Tensor, sin: Tensor, q_scale: Tensor
) -> tuple[Tensor, Tensor]:
    x3, g3 = _tokens(x), _tokens(grad)
    dx = torch.empty(x3.shape, dtype=x.dtype, device=x.device)
    ct = compute_dtype(x.dtype)
    programs, per = reduce_programs(x3.shape[0], x.device)
    partial = torch.zeros(programs, *q_scale.shape, dtype=ct, device=x.device)
    if dx.numel():
        heads, half, warps = _launch(x)
        jit(_rope_bwd_kernel)[(programs,)](
            g3, x3, cos.to(ct).contiguous(), sin.to(ct).contiguous(), q_scale.contiguous(),
            dx, partial, g3.stride(0), x3.stride(0), x3.shape[0], per, x.shape[1], x.shape[2],
            q_scale.shape[0], x.shape[3] // 2,
            HEADS=heads, HALF=half, F64=ct == torch.float64, num_warps=warps,
        )  # fmt: skip
    return dx.view(x.shape), partial.sum(0).to(q_scale.dtype)


# ----------------------------------------------------------------------------- the ops


@torch.library.custom_op("spheretorch::rope_unit", mutates_args=())
def _rope_op(x: Tensor, cos: Tensor, sin: Tensor, q_scale: Tensor) -> Tensor:
    if use_triton(x):
        return _rope_triton(x, cos, sin, q_scale)
    with autocast_off(x):
        return _rope_torch(x, cos, sin, q_scale)


@_rope_op.register_fake
def _(x: Tensor, cos: Tensor, sin: Tensor, q_scale: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _rope_backward_impl(
    grad: Tensor, x: Tensor, cos: Tensor, sin: Tensor, q_scale: Tensor
) -> tuple[Tensor, Tensor]:
    if use_triton(x):
        return _rope_backward_triton(grad, x, cos, sin, q_scale)
    with autocast_off(x):
        return _rope_backward_torch(grad, x, cos, sin, q_scale)


@torch.library.custom_op("spheretorch::rope_unit_backward", mutates_args=())
def _rope_backward_op(
    grad: Tensor, x: Tensor, cos: Tensor, sin: Tensor, q_scale: Tensor
) -> tuple[Tensor, Tensor]:
    return _rope_backward_impl(grad, x, cos, sin, q_scale)


@_rope_backward_op.register_fake
def _(grad: Tensor, x: Tensor, cos: Tensor, sin: Tensor, q_scale: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(q_scale)


def _setup(ctx: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    x, cos, sin, q_scale = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: differentiable again through the reference
        dx, dq = reference_vjp(
            lambda x_, q_: rope_unit_reference(x_, cos, sin, q_), (x, q_scale), grad
        )
    else:
        bwd = backward_entry(_rope_backward_op, _rope_backward_impl, grad)
        dx, dq = bwd(grad, x, cos, sin, q_scale)
    return dx, None, None, dq


_rope_op.register_autograd(_backward, setup_context=_setup)


def rope_unit(x: Tensor, cos: Tensor, sin: Tensor, q_scale: Tensor) -> Tensor:
    """Rotate, normalize and scale the heads ``x`` ``(B, T, n_heads, d_k)`` (module docstring).

    Args:
        x: ``[q, k]`` heads; ``d_k`` even.
        cos, sin: rotation tables ``(T, d_k / 2)`` for positions ``0..T-1`` (not
            differentiated).
        q_scale: ``(H_q, d_k)``, ``H_q <= n_heads``: the scale of the first ``H_q`` heads.

    Returns:
        ``(B, T, n_heads, d_k)`` in ``x``'s dtype, contiguous.
    """
    if x.dim() != 4 or x.shape[3] % 2:
        raise ValueError(f"x must be (B, T, heads, d_k) with d_k even, got {tuple(x.shape)}")
    half = x.shape[3] // 2
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (x.shape[1], half):
            raise ValueError(f"{name} must have shape ({x.shape[1]}, {half}), got {tuple(t.shape)}")
    if q_scale.dim() != 2 or q_scale.shape[1] != x.shape[3] or q_scale.shape[0] > x.shape[2]:
        raise ValueError(
            f"q_scale must have shape (H_q, {x.shape[3]}) with H_q <= {x.shape[2]}, got "
            f"{tuple(q_scale.shape)}"
        )
    return _rope_op(x, cos, sin, q_scale)
