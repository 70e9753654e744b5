"""``TransformerConfig``: the sizes every model shares. Each model's own options live in a
subclass beside the model (``GPTConfig``, ``NGPTConfig``, ``GeoNormConfig``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["TransformerConfig"]


@dataclass
class TransformerConfig:
    """Shape of a decoder-only transformer (the fields all three models read).

    * ``vocab_size``, ``seq_len`` (maximum context), ``n_layer``, ``n_head``, ``d_model``: the
      usual sizes; ``d_model`` must be divisible by ``n_head`` and the head size must be even
      (RoPE).
    * ``d_mlp``: hidden size of the SwiGLU MLP, ``None`` -> ``4 * d_model`` (the nGPT paper's
      baseline uses 4d for both models).
    * ``dropout``: attention/residual dropout probability (0 in every preset).
    * ``rope_base``: RoPE frequency base.

    Passed as is to ``GPT``/``NGPT``/``GeoNormGPT``, it gets that model's default options.
    Optional fields also accept the text ``"none"`` (what ``--set d_mlp=none`` passes).
    """

    vocab_size: int
    seq_len: int
    n_layer: int
    n_head: int
    d_model: int
    d_mlp: int | None = None
    dropout: float = 0.0
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str) and value.lower() == "none" and "None" in str(f.type):
                setattr(self, f.name, None)
            elif isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{type(self).__name__}.{f.name} must be finite, got {value}")
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model"):
            self._check_positive_int(name)
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        if self.head_dim % 2:
            raise ValueError(
                f"the head size d_model/n_head = {self.head_dim} must be even for RoPE"
            )
        if self.d_mlp is None:
            self.d_mlp = 4 * self.d_model
        self._check_positive_int("d_mlp")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        self._check_positive("rope_base")

    # -- helpers for the models' own configs ---------------------------------------------------
    def _check_positive_int(self, name: str) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{type(self).__name__}.{name} must be a positive int, got {value!r}")

    def _check_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{type(self).__name__}.{name} must be > 0, got {value!r}")

    def _check_choice(self, name: str, allowed: tuple[Any, ...]) -> None:
        value = getattr(self, name)
        if not any(type(value) is type(a) and value == a for a in allowed):
            shown = ", ".join(str(a) for a in allowed)
            raise ValueError(f"{type(self).__name__}.{name} must be one of {shown}; got {value!r}")

    def _default_scale(self, *names: str) -> None:
        """``None`` -> ``1/sqrt(d_model)`` (nGPT's base scale), then check ``> 0``."""
        for name in names:
            if getattr(self, name) is None:
                setattr(self, name, 1.0 / math.sqrt(self.d_model))
        self._check_positive(*names)

    # -- API ---------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON- and ``torch.load(weights_only=True)``-friendly)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransformerConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise a ``ValueError`` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
        return cls(**d)
