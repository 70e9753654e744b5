"""Plain building blocks of all three models: RMSNorm, a scaled vector, RoPE, causal attention,
SwiGLU MLP. nGPT's variants (``ngpt.py``) override one small method each."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..sphere import compute_dtype
from .config import TransformerConfig

__all__ = ["MLP", "CausalSelfAttention", "RMSNorm", "Rotary", "ScaledVector"]


class RMSNorm(nn.Module):
    r""":math:`y = g \odot x / \sqrt{\mathrm{mean}(x^2) + \epsilon}`, computed in fp32."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(d))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``x`` ``(..., d)`` over its last axis."""
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight).to(x.dtype)


class ScaledVector(nn.Module):
    """A trainable vector with nGPT's "scale trick".

    Stored as ``scale * ones(n)`` and read as ``param * (init / scale)``: at initialisation it
    equals ``init``, and with Adam (whose steps are about ``lr`` in size, whatever the
    parameter's magnitude) its effective learning rate is ``lr * init / scale``.
    ``scale == init`` is a plain parameter.
    """

    def __init__(self, n: int, init: float, scale: float) -> None:
        super().__init__()
        self.init, self.scale = float(init), float(scale)
        self.param = nn.Parameter(torch.empty(n))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.param, self.scale)

    def forward(self) -> Tensor:
        """The vector as used: ``param * init / scale``."""
        return self.param * (self.init / self.scale)


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half form) for heads of size ``head_dim``.

    The cos/sin tables are computed in float64 and stored in the model's dtype (float32 for
    half types, in which the rotation is also computed). They are a function of the shape, not
    state: recomputed after every cast or move (``model.double()``, ``to_empty``) and by
    ``reset_parameters()``.
    """

    def __init__(self, head_dim: int, seq_len: int, base: float = 10000.0) -> None:
        super().__init__()
        self.head_dim, self.seq_len, self.base = head_dim, seq_len, base
        self.register_buffer("cos", torch.empty(seq_len, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(seq_len, head_dim // 2), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.cos.is_meta:
            return
        d = self.cos.device
        inv_freq = self.base ** -(
            torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=d) / self.head_dim
        )
        angles = torch.outer(torch.arange(self.seq_len, dtype=torch.float64, device=d), inv_freq)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        super()._apply(fn, recurse)
        dtype = compute_dtype(self.cos.dtype)
        self.cos, self.sin = self.cos.to(dtype), self.sin.to(dtype)
        self.reset_parameters()
        return self

    def tables(self, t: int) -> tuple[Tensor, Tensor]:
        """``(cos, sin)`` of shape ``(t, head_dim / 2)`` for positions ``0..t-1``."""
        return self.cos[:t], self.sin[:t]

    def forward(self, x: Tensor) -> Tensor:
        """Rotate ``x`` of shape ``(B, T, heads, head_dim)`` by its positions ``0..T-1``."""
        t, half = x.shape[1], x.shape[-1] // 2
        dtype = compute_dtype(x.dtype)
        cos, sin = (table[:, None, :].to(dtype) for table in self.tables(t))
        xf = x.to(dtype)
        x1, x2 = xf[..., :half], xf[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    r"""Multi-head causal self-attention with RoPE:
    :math:`y = W_o\,\mathrm{softmax}(q k^\top / \sqrt{d_k}) v` per head.

    ``qkv`` is one fused ``(3d, d)`` matrix (rows = q, k, v output neurons) and ``proj`` the
    ``(d, d)`` output projection; ``F.scaled_dot_product_attention`` does the rest.
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim, self.dropout = cfg.n_head, cfg.head_dim, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.seq_len, cfg.rope_base)

    def query_key(self, qk: Tensor) -> tuple[Tensor, Tensor, float | None]:
        """``(q, k, softmax scale)`` from the ``[q, k]`` heads ``(B, T, 2 heads, d_k)`` before
        RoPE; ``None`` is SDPA's ``1/sqrt(d_k)``."""
        qk = self.rotary(qk)  # q and k rotated as one tensor: one RoPE call instead of two
        return qk[:, :, : self.n_head], qk[:, :, self.n_head :], None

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, d) -> (B, T, d)``."""
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.n_head, self.head_dim)
        q, k, scale = self.query_key(qkv[:, :, :2].reshape(b, t, 2 * self.n_head, self.head_dim))
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            qkv[:, :, 2].transpose(1, 2),
            is_causal=True,
            dropout_p=self.dropout if self.training else 0.0,
            scale=scale,
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    """SwiGLU MLP: ``down(u * silu(v))`` with ``[u, v] = up(x)`` (one fused ``(2 d_mlp, d)``)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        assert cfg.d_mlp is not None  # resolved by TransformerConfig
        self.d_mlp = cfg.d_mlp
        self.up = nn.Linear(cfg.d_model, 2 * cfg.d_mlp, bias=False)
        self.down = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def up_weight(self) -> Tensor:
        """The ``(2 d_mlp, d)`` matrix that makes ``[u, v]``."""
        return self.up.weight

    def forward(self, x: Tensor) -> Tensor:
        """``(..., d) -> (..., d)``."""
        u, v = F.linear(x, self.up_weight()).split(self.d_mlp, dim=-1)
        return self.drop(self.down(u * F.silu(v)))
