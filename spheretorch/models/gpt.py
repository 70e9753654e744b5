"""``GPT``: the nGPT paper's baseline (pre-RMSNorm, RoPE, SwiGLU), or classic Post-LN."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .base import LanguageModel
from .config import TransformerConfig
from .layers import MLP, CausalSelfAttention, RMSNorm

__all__ = ["GPT", "GPTConfig"]


@dataclass
class GPTConfig(TransformerConfig):
    """:class:`TransformerConfig` plus GPT's options.

    * ``norm_position``: ``"pre"`` (pre-RMSNorm, the paper's baseline) or ``"post"`` (classic
      Post-LN: ``x <- Norm(x + f(x))``).
    * ``init_std``: std of every matrix (0.02); output projections get ``init_std / sqrt(2L)``.
    * ``norm_eps``: RMSNorm epsilon.
    * ``tie_embeddings``: share input and output embeddings (off: the paper ties neither).
    """

    norm_position: Literal["pre", "post"] = "pre"
    init_std: float = 0.02
    norm_eps: float = 1e-6
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_choice("norm_position", ("pre", "post"))
        self._check_positive("init_std", "norm_eps")
        self._check_choice("tie_embeddings", (False, True))


class Block(nn.Module):
    """``x <- x + f(Norm(x))`` (pre) or ``x <- Norm(x + f(x))`` (post), f = attention, MLP."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.pre = cfg.norm_position == "pre"
        self.norm_a = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.norm_m = RMSNorm(cfg.d_model, cfg.norm_eps)
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
    Subclasses change the blocks and final norm through ``make_block`` and
    ``make_final_norm`` (see ``GeoNormGPT``).
    """

    config_class = GPTConfig

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        c = self.config
        with self._rng_untouched():  # reset_parameters alone draws, as after a meta build
            self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
            self.drop = nn.Dropout(c.dropout)
            self.blocks = nn.ModuleList(self.make_block(layer) for layer in range(c.n_layer))
            self.norm_f = self.make_final_norm()
            self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.config.tie_embeddings:  # (again after to_empty, which unties)
            self.lm_head.weight = self.tok_emb.weight
        super().reset_parameters()

    def make_block(self, layer: int) -> nn.Module:
        return Block(self.config)

    def make_final_norm(self) -> nn.Module:
        c = self.config
        return RMSNorm(c.d_model, c.norm_eps) if c.norm_position == "pre" else nn.Identity()

    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                is_out = name.endswith(("attn.proj.weight", "mlp.down.weight"))
                p.normal_(0.0, out_std if is_out else std)

    def embed(self, idx: Tensor) -> Tensor:
        return self.drop(self.tok_emb(idx))

    def head(self, h: Tensor) -> Tensor:
        return self.lm_head(self.norm_f(h))
