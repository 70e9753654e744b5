"""``GPT``: the nGPT paper's baseline (pre-RMSNorm, RoPE, SwiGLU), or classic Post-LN."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import LanguageModel
from .config import TransformerConfig
from .layers import MLP, CausalSelfAttention, RMSNorm


class Block(nn.Module):
    """``x <- x + f(Norm(x))`` (pre) or ``x <- Norm(x + f(x))`` (post), f = attention, MLP."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.pre = cfg.norm_position == "pre"
        self.norm_a, self.norm_m = (
            RMSNorm(cfg.d_model, cfg.norm_eps),
            RMSNorm(cfg.d_model, cfg.norm_eps),
        )
        self.attn, self.mlp = CausalSelfAttention(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, record: list[Tensor] | None = None) -> Tensor:
        for norm, f in ((self.norm_a, self.attn), (self.norm_m, self.mlp)):
            x = x + self.drop(f(norm(x))) if self.pre else norm(x + self.drop(f(x)))
            if record is not None:
                record.append(x)
        return x


class GPT(LanguageModel):
    """Decoder-only transformer baseline.

    * ``norm_position="pre"``: pre-RMSNorm blocks and a final RMSNorm (the paper's baseline).
    * ``norm_position="post"``: classic Post-LN, ``x <- Norm(x + f(x))``, no final norm.

    Init: every matrix ``N(0, 0.02)``, output projections (attention ``proj``, MLP ``down``)
    ``N(0, 0.02 / sqrt(2L))``; no biases; embeddings untied unless ``tie_embeddings``.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.norm_f = RMSNorm(c.d_model, c.norm_eps) if c.norm_position == "pre" else nn.Identity()
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.reset_parameters()
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std, out_std = (
            self.config.init_std,
            self.config.init_std / math.sqrt(2 * self.config.n_layer),
        )
        for name, p in self.named_parameters():
            if p.dim() < 2:
                p.fill_(1.0)  # RMSNorm gains
            elif name.endswith(("attn.proj.weight", "mlp.down.weight")):
                p.normal_(0.0, out_std)
            else:
                p.normal_(0.0, std)

    def embed(self, idx: Tensor) -> Tensor:
        return self.drop(self.tok_emb(idx))

    def head(self, h: Tensor) -> Tensor:
        return self.lm_head(self.norm_f(h))
