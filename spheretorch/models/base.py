"""What the three models share around their blocks: embedding, loss, hidden states, sampling."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TransformerConfig

__all__ = ["LanguageModel"]


class LanguageModel(nn.Module):
    """Base class: ``embed -> blocks -> head``; subclasses define the three parts.

    Every block is called as ``block(h, record)`` and appends its hidden state after each
    residual update to ``record`` when that is a list, so :meth:`hidden_states` (and
    ``spheretorch.analysis.trajectory``) see ``2 * n_layer + 1`` states.
    """

    config: TransformerConfig
    blocks: nn.ModuleList

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
        self.config = config

    # -- parts -------------------------------------------------------------------------------
    def embed(self, idx: Tensor) -> Tensor:
        raise NotImplementedError

    def head(self, h: Tensor) -> Tensor:
        raise NotImplementedError

    # -- API ---------------------------------------------------------------------------------
    def _check_idx(self, idx: Tensor) -> None:
        if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.dtype != torch.long:
            what = (
                f"{idx.dtype} tensor of shape {tuple(idx.shape)}"
                if isinstance(idx, Tensor)
                else type(idx).__name__
            )
            raise ValueError(f"idx must be a (batch, time) tensor of int64 token ids, got {what}")
        if idx.shape[1] > self.config.seq_len:
            raise ValueError(
                f"sequence length {idx.shape[1]} exceeds the model's seq_len={self.config.seq_len}"
            )

    def trunk(self, idx: Tensor, record: list[Tensor] | None = None) -> Tensor:
        """Hidden states after the last block, ``(B, T, d)``; fills ``record`` if given."""
        self._check_idx(idx)
        h = self.embed(idx)
        if record is not None:
            record.append(h)
        for block in self.blocks:
            h = block(h, record)
        return h

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``(logits (B, T, vocab_size), loss)``; ``loss`` is the mean cross-entropy in fp32
        against ``targets`` (B, T), or ``None`` without targets."""
        logits = self.head(self.trunk(idx))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits, loss

    def hidden_states(self, idx: Tensor) -> Tensor:
        """``(S, B, T, d)``: the state entering the first block and after every residual update
        (``S = 2 * n_layer + 1``)."""
        record: list[Tensor] = []
        self.trunk(idx, record)
        return torch.stack(record)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` (B, T); context cropped to
        ``seq_len``. ``temperature == 0`` means greedy decoding."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                ctx = idx[:, -self.config.seq_len :]
                logits = self(ctx)[0][:, -1, :].float()
                if temperature <= 0:
                    nxt = logits.argmax(-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None and top_k < logits.shape[-1]:
                        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    probs = torch.softmax(logits, dim=-1)
                    nxt = torch.multinomial(probs, 1, generator=generator)
                idx = torch.cat((idx, nxt), dim=1)
        finally:
            self.train(was_training)
        return idx

    def extra_repr(self) -> str:
        c = self.config
        return f"n_layer={c.n_layer}, d_model={c.d_model}, n_head={c.n_head}, d_mlp={c.d_mlp}"

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups: matrices (2-D, not on the sphere) get ``weight_decay``; vectors
        (gains, scales) and sphere parameters get none."""
        decay, no_decay = [], []
        for p in self.parameters():
            if not p.requires_grad:
                continue
            on_sphere = getattr(p, "sphere_dim", None) is not None
            (decay if p.dim() >= 2 and not on_sphere else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}]
        groups.append({"params": no_decay, "weight_decay": 0.0})
        return [g for g in groups if g["params"]]
