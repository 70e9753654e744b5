r"""``spheretorch::unit``: :math:`y = x / \|x\|` along the last axis, forward and backward.

.. math::

    y = x\,r, \quad r = 1/\sqrt{\max(\textstyle\sum_i x_i^2,\ \mathrm{tiny})}, \qquad
    \bar x = r\,(\bar y - y\,\langle \bar y, y\rangle)

Zero rows stay zero (``tiny`` is the compute dtype's smallest normal number). Computed in
float32 for float16/bfloat16 inputs (float64 stays float64) and returned in the input dtype.
:func:`unit_reference` is the readable definition; the op runs it on CPU and the Triton kernels
on CUDA. The backward saves only ``x`` and recomputes ``r`` (one more read of a row it reads
anyway).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..sphere.checks import upcast
from .backend import triton_available
from .rowwise import (
    as_rows,
    autocast_off,
    backward_entry,
    block_and_warps,
    jit,
    reference_vjp,
    use_triton,
)

__all__ = ["unit", "unit_backward_reference", "unit_reference"]


def _inv_norm(xf: Tensor) -> Tensor:
    return torch.rsqrt((xf * xf).sum(-1, keepdim=True).clamp_min(torch.finfo(xf.dtype).tiny))


def inv_norm_rows(xf: Tensor) -> Tensor:
    """``1 / max(|x|, sqrt(tiny))`` per row (last axis, kept): the reference's
    ``rsqrt(max(sum x^2, tiny))`` in one pass over ``x`` (the CPU implementations' form)."""
    tiny = torch.finfo(xf.dtype).tiny
    return torch.linalg.vector_norm(xf, dim=-1, keepdim=True).clamp_min_(tiny**0.5).reciprocal_()


def project_rows_(grad: Tensor, y: Tensor, r: Tensor) -> Tensor:
    """``grad <- r (grad - y <grad, y>)`` in place: the backward of ``y = x r``, ``|y| = 1``."""
    return grad.addcmul_(y, torch.linalg.vecdot(grad, y, dim=-1).unsqueeze(-1), value=-1).mul_(r)


def unit_reference(x: Tensor) -> Tensor:
    """The definition: ``x / ||x||`` (last axis), zero rows kept, fp32 math for half types."""
    xf = upcast(x)
    return (xf * _inv_norm(xf)).to(x.dtype)


def unit_backward_reference(grad: Tensor, x: Tensor) -> Tensor:
    """``r (g - y <g, y>)``: the gradient of :func:`unit_reference` with respect to ``x``."""
    xf = upcast(x)
    r = inv_norm_rows(xf)
    return project_rows_(grad.to(xf.dtype, copy=True), xf * r, r).to(x.dtype)


def _unit_torch(x: Tensor) -> Tensor:
    xf = upcast(x)
    return (xf * inv_norm_rows(xf)).to(x.dtype)


# ----------------------------------------------------------------------------- Triton

if triton_available():
    import triton.language as tl

    def _unit_fwd_kernel(X, Y, stride_x, d, BLOCK: tl.constexpr, F64: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < d
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        if F64:
            x = x.to(tl.float64)
            r = 1.0 / tl.sqrt(tl.maximum(tl.sum(x * x, axis=0), 2.2250738585072014e-308))
        else:
            x = x.to(tl.float32)
            r = 1.0 / tl.sqrt_rn(tl.maximum(tl.sum(x * x, axis=0), 1.1754943508222875e-38))
        tl.store(Y + row * d + cols, (x * r).to(Y.dtype.element_ty), mask=mask)

    def _unit_bwd_kernel(G, X, DX, stride_g, stride_x, d, BLOCK: tl.constexpr, F64: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < d
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0)
        if F64:
            x, g = x.to(tl.float64), g.to(tl.float64)
            r = 1.0 / tl.sqrt(tl.maximum(tl.sum(x * x, axis=0), 2.2250738585072014e-308))
        else:
            x, g = x.to(tl.float32), g.to(tl.float32)
            r = 1.0 / tl.sqrt_rn(tl.maximum(tl.sum(x * x, axis=0), 1.1754943508222875e-38))
        y = x * r
        dx = (g - y * tl.sum(g * y, axis=0)) * r
        tl.store(DX + row * d + cols, dx.to(DX.dtype.element_ty), mask=mask)


def _unit_triton(x: Tensor) -> Tensor:
    x2 = as_rows(x)
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if y.numel():
        block, warps = block_and_warps(x2.shape[1])
        f64 = x.dtype == torch.float64
        jit(_unit_fwd_kernel)[(x2.shape[0],)](
            x2, y, x2.stride(0), x2.shape[1], BLOCK=block, F64=f64, num_warps=warps
        )
    return y.view(x.shape)


def _unit_backward_triton(grad: Tensor, x: Tensor) -> Tensor:
    x2, g2 = as_rows(x), as_rows(grad)
    dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if dx.numel():
        block, warps = block_and_warps(x2.shape[1])
        f64 = x.dtype == torch.float64
        jit(_unit_bwd_kernel)[(x2.shape[0],)](
            g2, x2, dx, g2.stride(0), x2.stride(0), x2.shape[1], BLOCK=block, F64=f64,
            num_warps=warps,
        )  # fmt: skip
    return dx.view(x.shape)


# ----------------------------------------------------------------------------- the ops


@torch.library.custom_op("spheretorch::unit", mutates_args=())
def _unit_op(x: Tensor) -> Tensor:
    # contiguous: the fake's layout whatever x's strides (a no-op for the models' tensors)
    if use_triton(x):
        return _unit_triton(x)
    with autocast_off(x):
        return _unit_torch(x).contiguous()


@_unit_op.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _unit_backward_impl(grad: Tensor, x: Tensor) -> Tensor:
    if use_triton(x):
        return _unit_backward_triton(grad, x)
    with autocast_off(x):
        return unit_backward_reference(grad, x).contiguous()


@torch.library.custom_op("spheretorch::unit_backward", mutates_args=())
def _unit_backward_op(grad: Tensor, x: Tensor) -> Tensor:
    return _unit_backward_impl(grad, x)


@_unit_backward_op.register_fake
def _(grad: Tensor, x: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
    ctx.save_for_backward(inputs[0])


def _backward(ctx: Any, grad: Tensor) -> Tensor:
    (x,) = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: a backward that is differentiable again
        return reference_vjp(unit_reference, (x,), grad)[0]
    return backward_entry(_unit_backward_op, _unit_backward_impl, grad)(grad, x)


_unit_op.register_autograd(_backward, setup_context=_setup)


def unit(x: Tensor) -> Tensor:
    """``x / ||x||`` along the last axis as the fused op ``spheretorch::unit`` (equation in the
    module docstring); ``x`` ``(..., d)`` floating point, result in ``x``'s dtype."""
    return _unit_op(x)
