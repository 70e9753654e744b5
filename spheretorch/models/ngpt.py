"""``NGPT``: the normalized transformer (Loshchilov et al., arXiv 2410.01131).

Every embedding and matrix row along ``d_model`` and every hidden state is a unit vector. Each
block proposes a point on the sphere and the hidden state moves part of the way towards it:

    h_A = Norm(ATTN(h));   h <- Norm(h + alpha_A * (h_A - h))
    h_M = Norm(MLP(h));    h <- Norm(h + alpha_M * (h_M - h))
    logits = s_z * (E_out h)

so ``L`` layers are ``2L`` steps of an optimizer on the sphere with trained per-coordinate step
sizes ``alpha`` ("eigen learning rates"). The residual step is
:func:`spheretorch.geodesic.geodesic_update` (``nlerp`` as published, ``slerp`` as an option).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..geodesic import geodesic_update
from ..parameter import sphere_
from .base import LanguageModel
from .config import TransformerConfig
from .layers import MLP, CausalSelfAttention, ScaledVector, unit


class NBlock(nn.Module):
    """One nGPT layer: two geodesic steps towards the attention and MLP proposals."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.rule = cfg.residual_rule
        self.attn, self.mlp = CausalSelfAttention(cfg, normalized=True), MLP(cfg, normalized=True)
        self.alpha_a = ScaledVector(cfg.d_model, cfg.alpha_init, cfg.alpha_scale)
        self.alpha_m = ScaledVector(cfg.d_model, cfg.alpha_init, cfg.alpha_scale)

    def forward(self, h: Tensor, record: list[Tensor] | None = None) -> Tensor:
        for f, alpha in ((self.attn, self.alpha_a), (self.mlp, self.alpha_m)):
            # |alpha| as in the authors' code: a step size is non-negative.
            h = geodesic_update(h, unit(f(h)), alpha().abs().to(h.dtype), self.rule)
            if record is not None:
                record.append(h)
        return h


class NGPT(LanguageModel):
    """nGPT exactly as published: sphere weights, scaling vectors, no norms, biases or tying.

    Sphere parameters (:class:`spheretorch.SphereParameter`, renormalized by
    :class:`spheretorch.optim.RenormAdam` after every step): ``tok_emb`` and ``lm_head``
    ``(V, d)``, ``qkv`` ``(3d, d)`` and MLP ``up`` ``(2 d_mlp, d)`` along ``dim=1``; attention
    ``proj`` ``(d, d)`` and MLP ``down`` ``(d, d_mlp)`` along ``dim=0``. Init ``N(0, 1/sqrt(d))``
    then projected. Scaling vectors (scale trick, :class:`ScaledVector`): ``alpha_A``,
    ``alpha_M`` (d), ``s_qk`` (d, per-head view), ``s_u``, ``s_v`` (d_mlp), ``s_z`` (V).
    The forward pass never renormalizes weights (the optimizer keeps them unit); hidden states
    are unit after every update, with norms computed in fp32.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.blocks = nn.ModuleList(NBlock(c) for _ in range(c.n_layer))
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.s_z = ScaledVector(c.vocab_size, c.sz_init, c.sz_scale)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = 1.0 / math.sqrt(self.config.d_model)
        sphere_(self.tok_emb, "weight", dim=1)
        sphere_(self.lm_head, "weight", dim=1)
        for block in self.blocks:
            sphere_(block.attn.qkv, "weight", dim=1)
            sphere_(block.mlp.up, "weight", dim=1)
            sphere_(block.attn.proj, "weight", dim=0)
            sphere_(block.mlp.down, "weight", dim=0)
        for p in self.parameters():
            if getattr(p, "sphere_dim", None) is not None:
                p.normal_(0.0, std)
                p.div_(p.norm(dim=p.sphere_dim, keepdim=True))

    def embed(self, idx: Tensor) -> Tensor:
        # Rows of tok_emb are unit already; the normalize is a no-op that keeps hidden states
        # on the sphere even when an ablation trains the embedding with a Euclidean optimizer.
        return unit(self.tok_emb(idx))

    def head(self, h: Tensor) -> Tensor:
        # s_z * (E_out h) == (s_z[:, None] * E_out) h: scale the (V, d) weight, not the logits.
        return F.linear(h, self.lm_head.weight * self.s_z()[:, None])
