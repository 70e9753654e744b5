"""Transformers as thin consumers of spheretorch: ``GPT``, ``NGPT``, ``GeoNormGPT``.

All three take a :class:`TransformerConfig` and return ``(logits, loss)`` from
``forward(idx, targets=None)``; ``hidden_states(idx)`` gives the state before the first block and
after every residual update, ``(2 * n_layer + 1, B, T, d)``.
"""

from .base import LanguageModel
from .config import TransformerConfig
from .geonorm import GeoNormGPT
from .gpt import GPT
from .ngpt import NGPT

MODELS = {"gpt": GPT, "ngpt": NGPT, "geonorm": GeoNormGPT}


def build_model(name: str, config: TransformerConfig) -> LanguageModel:
    """Build ``"gpt"``, ``"ngpt"`` or ``"geonorm"`` from ``config``."""
    try:
        cls = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None
    return cls(config)


__all__ = [
    "GPT",
    "MODELS",
    "NGPT",
    "GeoNormGPT",
    "LanguageModel",
    "TransformerConfig",
    "build_model",
]
