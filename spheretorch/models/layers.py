"""Parts shared by GPT, NGPT and GeoNormGPT: RMSNorm, RoPE, causal attention, SwiGLU MLP.

The nGPT variants of attention and MLP differ from the baseline in a few lines, switched by
``normalized=True``: unit q/k per head scaled by ``s_qk`` with softmax scale ``sqrt(d_k)``, and
the ``s_u``/``s_v`` scalings of the SwiGLU inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TransformerConfig

__all__ = ["MLP", "CausalSelfAttention", "RMSNorm", "Rotary", "ScaledVector", "unit"]

from ..sphere import unit


class RMSNorm(nn.Module):
    r""":math:`y = g \odot x / \sqrt{\mathrm{mean}(x^2) + \epsilon}`, computed in fp32."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight).to(x.dtype)


class ScaledVector(nn.Module):
    """A trainable vector with nGPT's "scale trick".

    Stored as ``scale * ones(n)`` and read as ``param * (init / scale)``: at initialisation it
    equals ``init``, and with Adam (whose steps are about ``lr`` in size, whatever the
    parameter's magnitude) its effective learning rate is ``lr * init / scale``.
    """

    def __init__(self, n: int, init: float, scale: float) -> None:
        super().__init__()
        self.init, self.scale = float(init), float(scale)
        self.param = nn.Parameter(torch.full((n,), self.scale))

    def forward(self) -> Tensor:
        return self.param * (self.init / self.scale)


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half form) for heads of size ``head_dim``."""

    def __init__(self, head_dim: int, seq_len: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Rotate ``x`` of shape ``(B, T, heads, head_dim)`` by its positions ``0..T-1``."""
        t, half = x.shape[1], x.shape[-1] // 2
        cos = self.cos[:t, None, :].to(x.dtype)
        sin = self.sin[:t, None, :].to(x.dtype)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE and ``F.scaled_dot_product_attention``.

    ``qkv`` is one fused ``(3d, d)`` matrix (rows = q, k, v output neurons) and ``proj`` the
    ``(d, d)`` output projection. With ``normalized=True`` (nGPT) q and k are unit vectors per
    head after RoPE, scaled by ``s_qk``, and the softmax scale is ``sqrt(d_k)``.
    """

    def __init__(self, cfg: TransformerConfig, normalized: bool = False) -> None:
        super().__init__()
        self.n_head, self.head_dim, self.dropout = cfg.n_head, cfg.head_dim, cfg.dropout
        self.normalized = normalized
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.seq_len, cfg.rope_base)
        if normalized:
            self.s_qk = ScaledVector(cfg.d_model, cfg.sqk_init, cfg.sqk_scale)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.n_head, self.head_dim)
        qk = self.rotary(qkv[:, :, :2].reshape(b, t, 2 * self.n_head, self.head_dim))
        v = qkv[:, :, 2]
        if self.normalized:
            # q.k = sum_i s_i^2 qhat_i khat_i: apply s_qk^2 and the sqrt(d_k) softmax scale to q
            # alone (one multiply instead of three; same function, same gradients).
            qk = unit(qk)
            s = self.s_qk().view(self.n_head, self.head_dim)
            q = qk[:, :, : self.n_head] * (s * s * math.sqrt(self.head_dim)).to(qk.dtype)
            k = qk[:, :, self.n_head :]
            scale = 1.0
        else:
            q, k = qk[:, :, : self.n_head], qk[:, :, self.n_head :]
            scale = None  # 1/sqrt(d_k)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            dropout_p=self.dropout if self.training else 0.0,
            scale=scale,
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    """SwiGLU MLP: ``down(u * silu(v))`` with ``[u, v] = up(x)`` (one fused ``(2 d_mlp, d)``).

    With ``normalized=True`` (nGPT): ``u <- s_u * u`` and ``v <- s_v * sqrt(d) * v`` first,
    folded into the rows of ``up``'s weight.
    """

    def __init__(self, cfg: TransformerConfig, normalized: bool = False) -> None:
        super().__init__()
        d_mlp = cfg.d_mlp
        assert d_mlp is not None
        self.d_mlp, self.normalized = d_mlp, normalized
        self.up = nn.Linear(cfg.d_model, 2 * d_mlp, bias=False)
        self.down = nn.Linear(d_mlp, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)
        if normalized:
            self.s_u = ScaledVector(d_mlp, cfg.suv_init, cfg.suv_scale)
            self.s_v = ScaledVector(d_mlp, cfg.suv_init, cfg.suv_scale)
            self.v_gain = math.sqrt(cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        w = self.up.weight
        if self.normalized:
            # suv * (W x) == (suv[:, None] * W) x: scale the (2 d_mlp, d) weight rows instead of
            # the (B, T, 2 d_mlp) activations (and their gradients), far fewer multiplies.
            suv = torch.cat((self.s_u(), self.s_v() * self.v_gain))
            w = w * suv[:, None]
        u, v = F.linear(x, w).split(self.d_mlp, dim=-1)
        return self.drop(self.down(u * F.silu(v)))
