"""Transformers as thin consumers of spheretorch: ``GPT``, ``NGPT``, ``GeoNormGPT``.

All three take a :class:`TransformerConfig` (or their own subclass of it: ``GPTConfig``,
``NGPTConfig``, ``GeoNormConfig``) and return ``(logits, loss)`` from
``forward(idx, targets=None)``; ``hidden_states(idx)`` gives the state before the first block
and after every residual update, ``(2 * n_layer + 1, B, T, d)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .base import LanguageModel
from .config import TransformerConfig
from .geonorm import GeoNormConfig, GeoNormGPT
from .gpt import GPT, GPTConfig
from .ngpt import NGPT, NGPTConfig

MODELS: dict[str, type[LanguageModel]] = {"gpt": GPT, "ngpt": NGPT, "geonorm": GeoNormGPT}


def _model_class(name: str) -> type[LanguageModel]:
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None


def make_config(name: str, **fields: Any) -> TransformerConfig:
    """The config of model ``name`` from keyword fields, e.g.
    ``make_config("ngpt", vocab_size=65, seq_len=64, n_layer=4, n_head=4, d_model=128,
    alpha_init=0.1)``. A field that model does not have raises a one-line ``ValueError``
    naming it and listing that model's own options."""
    cls = _model_class(name).config_class
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in fields if k not in known]
    if unknown:
        base = {f.name for f in dataclasses.fields(TransformerConfig)}
        own = ", ".join(k for k in known if k not in base) or "none"
        raise ValueError(f"model {name!r} has no option {unknown[0]!r} (its options: {own})")
    return cls(**fields)


# v0.1 saved one config holding every model's fields; these GeoNorm fields did not exist yet.
_V01_FIELDS = {"norm_position", "residual_rule", "update_decay"}
_V01_GEONORM = {"geo_clamp": None, "geo_bias": False, "geo_radius": "fixed"}


def config_from_dict(name: str, d: dict[str, Any]) -> TransformerConfig:
    """Inverse of ``config.to_dict()`` for model ``name`` (strict, as :func:`make_config`).

    Also reads a v0.1 checkpoint's config, which held every model's fields: the other models'
    fields are dropped, and GeoNorm gets v0.1's equations (no clamp, no bias, fixed radius).
    """
    if set(d) >= _V01_FIELDS:
        own = {f.name for f in dataclasses.fields(_model_class(name).config_class)}
        d = {k: v for k, v in d.items() if k in own}
        if name == "geonorm":
            d = {**_V01_GEONORM, **d}
    return make_config(name, **d)


def build_model(name: str, config: TransformerConfig) -> LanguageModel:
    """Build ``"gpt"``, ``"ngpt"`` or ``"geonorm"`` from ``config``."""
    return _model_class(name)(config)


__all__ = [
    "GPT",
    "MODELS",
    "NGPT",
    "GPTConfig",
    "GeoNormConfig",
    "GeoNormGPT",
    "LanguageModel",
    "NGPTConfig",
    "TransformerConfig",
    "build_model",
    "config_from_dict",
    "make_config",
]
