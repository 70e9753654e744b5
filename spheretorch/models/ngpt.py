"""``NGPT``: the normalized transformer (Loshchilov et al., arXiv 2410.01131).

Every embedding and matrix row along ``d_model`` and every hidden state is a unit vector. Each
block proposes a point on the sphere and the hidden state moves part of the way towards it:

    h_A = Norm(ATTN(h));   h <- Norm(Norm(h) + alpha_A * (h_A - Norm(h)))
    h_M = Norm(MLP(h));    h <- Norm(Norm(h) + alpha_M * (h_M - Norm(h)))
    logits = s_z * (E_out h)

so ``L`` layers are ``2L`` steps of an optimizer on the sphere with trained per-coordinate step
sizes ``alpha`` ("eigen learning rates"). The residual step is one fused op:
:func:`spheretorch.kernels.residual.nlerp_residual` (``nlerp`` as published) or
:func:`spheretorch.kernels.slerp.slerp_residual` (``slerp``, an option: the exact geodesic
step, :func:`spheretorch.geodesic.geodesic_update`'s rule); RoPE, the per-head norm and
``s_qk`` are :func:`spheretorch.kernels.rope.rope_unit`.
Forward and gradients equal NVIDIA's reference code (with its RoPE repaired, see
docs/transformers.md) to float64 round-off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.residual import nlerp_residual
from ..kernels.rope import rope_unit
from ..kernels.slerp import slerp_residual
from ..parameter import renormalize_, sphere_, sphere_dim_of
from .base import LanguageModel
from .config import TransformerConfig
from .layers import MLP, CausalSelfAttention, ScaledVector

__all__ = ["NGPT", "NGPTConfig"]


@dataclass
class NGPTConfig(TransformerConfig):
    """:class:`TransformerConfig` plus nGPT's options (scale trick:
    :class:`~spheretorch.models.layers.ScaledVector`).

    * ``residual_rule``: ``"nlerp"`` (the paper: LERP then normalize) or ``"slerp"`` (exact
      geodesic).
    * ``alpha_init``, ``alpha_scale``: eigen learning rates ``alpha_A``, ``alpha_M`` (init
      0.05, scale ``None`` -> ``1/sqrt(d_model)``).
    * ``sqk_init``, ``sqk_scale``: ``s_qk`` (1, ``None`` -> ``1/sqrt(d_model)``).
    * ``suv_init``, ``suv_scale``: ``s_u`` and ``s_v`` (1, 1).
    * ``sz_init``, ``sz_scale``: logit scale ``s_z`` (1, ``None`` -> ``1/sqrt(d_model)``).
    """

    residual_rule: Literal["nlerp", "slerp"] = "nlerp"
    alpha_init: float = 0.05
    alpha_scale: float | None = None
    sqk_init: float = 1.0
    sqk_scale: float | None = None
    suv_init: float = 1.0
    suv_scale: float = 1.0
    sz_init: float = 1.0
    sz_scale: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_choice("residual_rule", ("nlerp", "slerp"))
        self._default_scale("alpha_scale", "sqk_scale", "sz_scale")
        self._check_positive("suv_scale")


class NormalizedAttention(CausalSelfAttention):
    """nGPT attention: q, k unit per head after RoPE, times ``s_qk``; softmax scale ``sqrt(d_k)``
    (q.k is a cosine times ``s_qk^2``)."""

    def __init__(self, cfg: NGPTConfig) -> None:
        super().__init__(cfg)
        self.s_qk = ScaledVector(cfg.d_model, cfg.sqk_init, cfg.sqk_scale)

    def query_key(self, qk: Tensor) -> tuple[Tensor, Tensor, float | None]:
        s = self.s_qk().view(self.n_head, self.head_dim)
        # q.k = sum_i s_i^2 qhat_i khat_i: s_qk^2 and sqrt(d_k) go on q alone (one multiply
        # instead of three; same function, same gradients). RoPE, the per-head norm and this
        # scale are one fused op (spheretorch::rope_unit).
        qk = rope_unit(qk, *self.rotary.tables(qk.shape[1]), s * s * math.sqrt(self.head_dim))
        return qk[:, :, : self.n_head], qk[:, :, self.n_head :], 1.0


class NormalizedMLP(MLP):
    """nGPT MLP: ``u <- s_u * u``, ``v <- s_v * sqrt(d) * v`` before SwiGLU."""

    def __init__(self, cfg: NGPTConfig) -> None:
        super().__init__(cfg)
        self.s_u = ScaledVector(self.d_mlp, cfg.suv_init, cfg.suv_scale)
        self.s_v = ScaledVector(self.d_mlp, cfg.suv_init, cfg.suv_scale)
        self.v_gain = math.sqrt(cfg.d_model)

    def up_weight(self) -> Tensor:
        # s * (W x) == (s[:, None] * W) x: scale the (2 d_mlp, d) weight rows instead of the
        # (B, T, 2 d_mlp) activations (and their gradients), far fewer multiplies.
        suv = torch.cat((self.s_u(), self.s_v() * self.v_gain))
        return self.up.weight * suv[:, None]


class NBlock(nn.Module):
    """One nGPT layer: two steps on the sphere towards the attention and MLP proposals."""

    def __init__(self, cfg: NGPTConfig) -> None:
        super().__init__()
        self.rule = cfg.residual_rule
        self.attn, self.mlp = NormalizedAttention(cfg), NormalizedMLP(cfg)
        self.alpha_a = ScaledVector(cfg.d_model, cfg.alpha_init, cfg.alpha_scale)
        self.alpha_m = ScaledVector(cfg.d_model, cfg.alpha_init, cfg.alpha_scale)

    def forward(self, h: Tensor, record: list[Tensor] | None = None) -> Tensor:
        for f, alpha in ((self.attn, self.alpha_a), (self.mlp, self.alpha_m)):
            # The step starts from Norm(h), as in the reference's Block.forward: equal values
            # (h is unit), but the first attention sees the raw embedding row and keeps the
            # radial part of its gradient. |alpha|: a step size is non-negative (reference).
            # one fused op either way: both norms, the step, the final norm
            residual = nlerp_residual if self.rule == "nlerp" else slerp_residual
            h = residual(h, f(h), alpha().abs())
            if record is not None:
                record.append(h)
        return h


class NGPT(LanguageModel):
    """nGPT as published: sphere weights, scaling vectors, no norms, biases or tying.

    Sphere parameters (:class:`spheretorch.SphereParameter`, renormalized by
    :class:`spheretorch.optim.RenormAdam` after every step): ``tok_emb`` and ``lm_head``
    ``(V, d)``, ``qkv`` ``(3d, d)`` and MLP ``up`` ``(2 d_mlp, d)`` along ``dim=1``; attention
    ``proj`` ``(d, d)`` and MLP ``down`` ``(d, d_mlp)`` along ``dim=0``. Init ``N(0, 1/sqrt(d))``
    then projected. Scaling vectors (scale trick,
    :class:`~spheretorch.models.layers.ScaledVector`): ``alpha_A``, ``alpha_M`` (d), ``s_qk``
    (d, per-head view), ``s_u``, ``s_v`` (d_mlp), ``s_z`` (V).
    The forward pass never renormalizes weights (the optimizer keeps them unit); the input
    state is the raw embedding row, and hidden states are unit after every update.
    """

    config_class = NGPTConfig

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        c = self.config
        with self._rng_untouched():  # reset_parameters alone draws, as after a meta build
            self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
            self.blocks = nn.ModuleList(NBlock(c) for _ in range(c.n_layer))
            self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
            self.s_z = ScaledVector(c.vocab_size, c.sz_init, c.sz_scale)
        self.reset_parameters()

    def sphere_weights(self) -> list[tuple[nn.Module, int]]:
        """``(module, dim)``: each ``module.weight`` lives on the sphere along ``dim``."""
        out: list[tuple[nn.Module, int]] = [(self.tok_emb, 1)]
        for b in self.blocks:
            out += [(b.attn.qkv, 1), (b.attn.proj, 0), (b.mlp.up, 1), (b.mlp.down, 0)]
        return [*out, (self.lm_head, 1)]

    @torch.no_grad()
    def init_weights(self) -> None:
        for module, dim in self.sphere_weights():
            module.weight.normal_(0.0, 1.0 / math.sqrt(self.config.d_model))
            if sphere_dim_of(module.weight) == dim:
                renormalize_(module.weight)
            else:  # first call, or after to_empty (which drops the class): projects too
                sphere_(module, "weight", dim=dim)

    def embed(self, idx: Tensor) -> Tensor:
        return self.tok_emb(idx)

    def head(self, h: Tensor) -> Tensor:
        # s_z * (E_out h) == (s_z[:, None] * E_out) h: scale the (V, d) weight, not the logits.
        return F.linear(h, self.lm_head.weight * self.s_z()[:, None])
