"""What the three models share around their blocks: token checks, loss, hidden states, sampling."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..parameter import sphere_dim_of
from ..sphere import compute_dtype
from .config import TransformerConfig

__all__ = ["LanguageModel"]


def _next_token(
    logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> Tensor:
    """(B, V) logits -> (B, 1) token ids: greedy at ``temperature == 0``, else drawn from
    ``softmax((logits - max) / temperature)`` over the ``top_k`` largest."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # shifted first: the largest is exactly 0 and stays 0 (even where the temperature rounds
    # to 0 in float32), the others go to -inf at worst, so at least one probability is
    # exp(0) = 1 and none is NaN
    shifted = logits - logits.amax(-1, keepdim=True)
    z = torch.where(shifted == 0, 0.0, shifted / temperature)
    return torch.multinomial(torch.softmax(z, dim=-1), 1, generator=generator)


class LanguageModel(nn.Module):
    """Base class: ``embed -> blocks -> head``; subclasses define the three parts.

    ``config_class`` is the model's own config (a :class:`TransformerConfig` subclass); a plain
    ``TransformerConfig`` is accepted and given that model's default options. Every block is
    called as ``block(h, record)`` and appends its hidden state after each residual update to
    ``record`` when that is a list, so :meth:`hidden_states` (and
    ``spheretorch.analysis.trajectory``) see ``2 * n_layer + 1`` states.
    """

    config_class: type[TransformerConfig] = TransformerConfig
    config: Any
    blocks: nn.ModuleList

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        if type(config) is TransformerConfig:
            config = self.config_class(**dataclasses.asdict(config))
        elif not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__} (or a plain "
                f"TransformerConfig), got {type(config).__name__}"
            )
        self.config = config

    # -- parts -------------------------------------------------------------------------------
    def embed(self, idx: Tensor) -> Tensor:
        raise NotImplementedError

    def head(self, h: Tensor) -> Tensor:
        raise NotImplementedError

    def init_weights(self) -> None:
        """Initialise the model's matrices (the small parts reset themselves)."""
        raise NotImplementedError

    @staticmethod
    def _rng_untouched() -> contextlib.AbstractContextManager[Any]:
        """Restores the random state of the CPU (and of the default CUDA device) on exit: the
        layers' own default initializations, which :meth:`reset_parameters` overwrites, then
        draw nothing, so an eager build consumes the generator exactly as a meta-device build
        followed by ``reset_parameters()`` does (same seed, same weights)."""
        device = torch.get_default_device()
        cuda = [device] if device.type == "cuda" else []
        return torch.random.fork_rng(devices=cuda, device_type="cuda")

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise every parameter and the RoPE tables in place, e.g. after building on the
        meta device and ``to_empty``."""
        for m in self.modules():
            if m is not self and not isinstance(m, (nn.Linear, nn.Embedding)):
                reset = getattr(m, "reset_parameters", None)
                if reset is not None:
                    reset()
        self.init_weights()

    # -- API ---------------------------------------------------------------------------------
    @staticmethod
    def _check_token_tensor(idx: Tensor) -> None:
        if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.dtype != torch.long:
            what = (
                f"{idx.dtype} tensor of shape {tuple(idx.shape)}"
                if isinstance(idx, Tensor)
                else type(idx).__name__
            )
            raise ValueError(f"idx must be a (batch, time) tensor of int64 token ids, got {what}")

    def _check_idx(self, idx: Tensor) -> None:
        self._check_token_tensor(idx)
        if idx.shape[1] > self.config.seq_len:
            raise ValueError(
                f"sequence length {idx.shape[1]} exceeds the model's seq_len={self.config.seq_len}"
            )
        if idx.numel() == 0:
            raise ValueError(f"idx holds no tokens (shape {tuple(idx.shape)})")
        # On CPU an out-of-range id raises IndexError in the lookup itself: ``trunk`` turns it
        # into this error at no cost to a valid step. Elsewhere (a CUDA lookup asserts on the
        # device) one reduction and one host sync, outside training only, never while compiling.
        if self.training or idx.device.type == "cpu" or idx.is_meta:
            return
        if not torch.compiler.is_compiling():
            self._check_ids(idx)

    def _check_ids(self, idx: Tensor) -> None:
        lo, hi = torch.aminmax(idx)
        if bool((lo < 0) | (hi >= self.config.vocab_size)):
            raise ValueError(
                f"token ids must be in [0, {self.config.vocab_size}) (vocab_size), got ids "
                f"from {int(lo)} to {int(hi)}"
            )

    def trunk(self, idx: Tensor, record: list[Tensor] | None = None) -> Tensor:
        """Hidden states after the last block, ``(B, T, d)``; fills ``record`` if given."""
        self._check_idx(idx)
        try:
            h = self.embed(idx)
        except IndexError:
            self._check_ids(idx)  # raises the one-line error when an id is out of range
            raise
        if record is not None:
            record.append(h)
        for block in self.blocks:
            h = block(h, record)
        return h

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``(logits (B, T, vocab_size), loss)``; ``loss`` is the mean cross-entropy against
        ``targets`` (B, T) in the model's dtype (float32 for half types), or ``None``."""
        logits = self.head(self.trunk(idx))
        if targets is None:
            return logits, None
        flat = logits.flatten(0, 1).to(compute_dtype(logits.dtype))
        return logits, F.cross_entropy(flat, targets.flatten())

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
        vocab_limit: int | None = None,
    ) -> Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` (B, T), T >= 1: returns
        (B, T + max_new_tokens). Options as for :meth:`generate_stream`."""
        tokens = self.generate_stream(
            idx, max_new_tokens, temperature, top_k, generator, vocab_limit
        )
        out = idx.new_empty(idx.shape[0], idx.shape[1] + max_new_tokens)  # no cat per token
        out[:, : idx.shape[1]] = idx
        for t, nxt in enumerate(tokens, start=idx.shape[1]):
            out[:, t : t + 1] = nxt
        return out

    def generate_stream(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        vocab_limit: int | None = None,
    ) -> Iterator[Tensor]:
        r"""Yield ``max_new_tokens`` sampled tokens after ``idx`` (B, T), T >= 1, one (B, 1)
        tensor at a time; the context is the last ``seq_len`` tokens.

        ``temperature == 0`` is greedy decoding; otherwise tokens are drawn from
        :math:`\mathrm{softmax}((z - \max z) / \tau)` in float64 (float32 on MPS, which has
        none), the largest logit kept at exactly 0: any temperature from the smallest positive
        double (effectively greedy) to huge ones (effectively uniform) gives a valid
        distribution. ``top_k`` keeps the k most likely tokens (``None`` or k >= vocabulary:
        all; ties at the k-th logit are kept).
        ``vocab_limit`` samples only ids below it (a tokenizer smaller than the embedding).
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise TypeError(f"max_new_tokens must be an int, got {type(max_new_tokens).__name__}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)) or (
            temperature < 0
        ):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        for name, value in (("top_k", top_k), ("vocab_limit", vocab_limit)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        self._check_token_tensor(idx)
        if idx.shape[1] == 0:
            raise ValueError(
                f"generate needs a prompt of at least one token per row, got shape "
                f"{tuple(idx.shape)}"
            )
        return self._stream(idx, max_new_tokens, float(temperature), top_k, generator, vocab_limit)

    def _stream(
        self,
        idx: Tensor,
        n: int,
        temperature: float,
        top_k: int | None,
        generator: torch.Generator | None,
        vocab_limit: int | None,
    ) -> Iterator[Tensor]:
        was_training = self.training
        self.eval()
        ctx = idx[:, -self.config.seq_len :]
        wide = torch.float32 if idx.device.type == "mps" else torch.float64  # MPS: no float64
        try:
            for _ in range(n):
                with torch.no_grad():
                    logits = self(ctx)[0][:, -1, :vocab_limit].to(wide)
                nxt = _next_token(logits, temperature, top_k, generator)
                keep = max(ctx.shape[1] + 1 - self.config.seq_len, 0)
                ctx = torch.cat((ctx[:, keep:], nxt), dim=1)
                yield nxt
        finally:
            self.train(was_training)

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
            on_sphere = sphere_dim_of(p) is not None
            (decay if p.dim() >= 2 and not on_sphere else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}]
        groups.append({"params": no_decay, "weight_decay": 0.0})
        return [g for g in groups if g["params"]]
