"""``TransformerConfig``: one dataclass shared by ``GPT``, ``NGPT`` and ``GeoNormGPT``.

Fields that only one model reads are grouped and named after it; the others ignore them, so one
config can build all three models for a fair comparison.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["DECAYS", "TransformerConfig"]

DECAYS = ("none", "inverse", "inverse_sqrt", "linear")


@dataclass
class TransformerConfig:
    """Shape and options of a decoder-only transformer.

    Shared:
        vocab_size, seq_len (maximum context), n_layer, n_head, d_model: the usual sizes;
        ``d_model`` must be divisible by ``n_head`` and the head size must be even (RoPE).
        d_mlp: hidden size of the SwiGLU MLP, ``None`` -> ``4 * d_model`` (the nGPT paper's
            baseline uses 4d for both models).
        dropout: attention/residual dropout probability (0 in every preset).
        rope_base: RoPE frequency base.

    GPT (and GeoNormGPT, which keeps GPT's parametrisation):
        norm_position: ``"pre"`` (pre-RMSNorm, the paper's baseline) or ``"post"`` (classic
            Post-LN: ``x <- Norm(x + f(x))``).
        init_std: std of every matrix (0.02); output projections get ``init_std / sqrt(2L)``.
        norm_eps: RMSNorm epsilon.
        tie_embeddings: share input and output embeddings (off: the paper ties neither model).

    NGPT:
        residual_rule: ``"nlerp"`` (the paper: LERP then normalize) or ``"slerp"`` (exact geodesic).
        alpha_init, alpha_scale: eigen learning rates ``alpha_A``, ``alpha_M`` (init 0.05, scale
            ``None`` -> ``1/sqrt(d_model)``), see the scale trick in :class:`ScaledVector`.
        sqk_init, sqk_scale: ``s_qk`` (1, ``None`` -> ``1/sqrt(d_model)``).
        suv_init, suv_scale: ``s_u`` and ``s_v`` (1, 1).
        sz_init, sz_scale: logit scale ``s_z`` (1, ``None`` -> ``1/sqrt(d_model)``).

    GeoNormGPT:
        update_decay: layer-wise decay of the update angle, ``"none"``, ``"inverse"`` (1/(l+1)),
            ``"inverse_sqrt"`` (1/sqrt(l+1)) or ``"linear"`` ((L-l)/L), l = 0..L-1.
        geo_angle: ``"atan"`` (default: angle ``atan(||v||/r)``, bounded by pi/2) or
            ``"linear"`` (angle ``||v||/r``, the exponential map of the tangent update itself).
        geo_step_init, geo_step_scale: learnable per-update step multiplier ``s`` (scale trick,
            stored as ``geo_step_scale``, used as ``init``); ``s = 1`` with no decay makes the
            geodesic step rotate by exactly the angle that ``Norm(x + v)`` would.
    """

    vocab_size: int
    seq_len: int
    n_layer: int
    n_head: int
    d_model: int
    d_mlp: int | None = None
    dropout: float = 0.0
    rope_base: float = 10000.0
    # GPT
    norm_position: Literal["pre", "post"] = "pre"
    init_std: float = 0.02
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    # nGPT
    residual_rule: Literal["nlerp", "slerp"] = "nlerp"
    alpha_init: float = 0.05
    alpha_scale: float | None = None
    sqk_init: float = 1.0
    sqk_scale: float | None = None
    suv_init: float = 1.0
    suv_scale: float = 1.0
    sz_init: float = 1.0
    sz_scale: float | None = None
    # GeoNorm
    update_decay: Literal["none", "inverse", "inverse_sqrt", "linear"] = "inverse_sqrt"
    geo_angle: Literal["linear", "atan"] = "atan"
    geo_step_init: float = 1.0
    geo_step_scale: float | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TransformerConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        if self.head_dim % 2:
            raise ValueError(
                f"the head size d_model/n_head = {self.head_dim} must be even for RoPE"
            )
        if self.d_mlp is None:
            self.d_mlp = 4 * self.d_model
        if isinstance(self.d_mlp, bool) or not isinstance(self.d_mlp, int) or self.d_mlp <= 0:
            raise ValueError(f"TransformerConfig.d_mlp must be a positive int, got {self.d_mlp!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        choices = {
            "norm_position": ("pre", "post"),
            "residual_rule": ("nlerp", "slerp"),
            "update_decay": DECAYS,
            "geo_angle": ("linear", "atan"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"TransformerConfig.{name} must be one of {', '.join(allowed)}; "
                    f"got {getattr(self, name)!r}"
                )
        for name in ("init_std", "norm_eps", "rope_base"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TransformerConfig.{name} must be > 0, got {getattr(self, name)}")
        base = 1.0 / math.sqrt(self.d_model)
        for name in ("alpha_scale", "sqk_scale", "sz_scale", "geo_step_scale"):
            if getattr(self, name) is None:
                setattr(self, name, base)
            if not getattr(self, name) > 0:
                raise ValueError(f"TransformerConfig.{name} must be > 0, got {getattr(self, name)}")

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
            raise ValueError(f"unknown TransformerConfig fields: {', '.join(unknown)}")
        return cls(**d)

    def decay(self, layer: int) -> float:
        """GeoNorm's layer-wise update decay factor for layer ``layer`` (0-based)."""
        kind, n = self.update_decay, self.n_layer
        if kind == "none":
            return 1.0
        if kind == "inverse":
            return 1.0 / (layer + 1)
        if kind == "inverse_sqrt":
            return 1.0 / math.sqrt(layer + 1)
        return (n - layer) / n  # linear
