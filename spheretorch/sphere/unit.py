"""The hot-path normalizer :func:`unit`: ``normalize(x, -1, on_zero="keep")`` with a cheaper
hand-written backward (the models call it several times per block)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .checks import upcast

__all__ = ["unit"]


class _Unit(torch.autograd.Function):
    r"""``y = x / ||x||`` (last axis); backward :math:`(g - y \langle g, y\rangle) / \|x\|`.

    Three kernels backwards where autograd through ``x / x.norm()`` runs about six. Computed in
    the compute dtype (fp32 for half inputs: chained normalizations compound bf16 error); an
    opaque Function also keeps ``torch.compile`` from re-fusing it in low precision. Under
    ``create_graph`` the backward rebuilds ``y`` and ``1/||x||`` from ``x`` so that second
    derivatives are right.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        y, r = _unit_parts(upcast(x))
        ctx.save_for_backward(x, y, r)
        # Never return ``y.to(x.dtype)`` when the dtypes agree: that no-op conversion hands
        # back ``y`` itself, and torch 2.11's compiler then gives the Function's input a zero
        # gradient (docs/transformers.md, "torch.compile and custom autograd Functions").
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        x, y, r = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: y and r must be functions of x
            y, r = _unit_parts(upcast(x))
        gf = g.to(y.dtype)
        gx = (gf - y * (gf * y).sum(-1, keepdim=True)) * r
        return gx if gx.dtype == g.dtype else gx.to(g.dtype)


def _unit_parts(xf: Tensor) -> tuple[Tensor, Tensor]:
    tiny = torch.finfo(xf.dtype).tiny
    r = torch.rsqrt((xf * xf).sum(-1, keepdim=True).clamp_min(tiny))
    return xf * r, r


def unit(x: Tensor) -> Tensor:
    """``x / ||x||`` along the last axis: the values of
    ``spheretorch.sphere.normalize(x, -1, on_zero="keep")`` (fp32 norms for half inputs, zero
    rows stay zero), with a cheaper fused backward."""
    return _Unit.apply(x)
