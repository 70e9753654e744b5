r"""``GeoNormGPT``: residual updates as exponential-map steps on a sphere (GeoNorm).

GeoNorm (arXiv 2601.22095) reads each attention and MLP output as an *update direction* for the
hidden state, replaces Pre-/Post-Norm by a geodesic step on the sphere, and decays the step
with depth like a learning-rate schedule [paper, abstract]. The paper's method section was not
available; the default follows the most detailed public reading, a third-party implementation
citing the paper's Eq. 3-5 and Appendix D (``SeonghwanSeo/kfold``, class ``GeoNorm``)
[3rd party]; v0.1's choices remain options [ours]. It is GPT with one change per residual
connection. For a state ``x`` and a block output ``g = f(RMSNorm(x))``:

.. math::

    \rho &= \|x\| \text{ (own radius, [3rd party]) or } \sqrt{d}
        \text{ with unit } x \text{ ([ours], geo\_radius="fixed")}\\
    v &= g - \frac{\langle x, g\rangle}{\|x\|^2} x
        && \text{tangent part of the update [3rd party, paper]}\\
    \theta_0 &= \min(\phi(\|v\|/\rho), c)
        && \phi(z) = z \text{ [3rd party] or } \arctan z \text{ [ours]}\\
    \theta &= \min(\delta(l)\,(a\,\theta_0 + b), c)
        && \text{scalars } a = 1, b = 0 \text{ at init [3rd party]}\\
    x' &= \cos\theta\, x + \sin\theta\, \|x\|\, v/\|v\|
        && \text{the exponential map [paper, 3rd party]}

with the clamp ``c = pi/4`` [3rd party] (``geo_clamp=none``: no clamp [ours]) and the decay
``delta(l)`` (l = 0..L-1): ``inverse`` 1/(l+1) [3rd party default], ``inverse_sqrt``,
``linear`` (L-l)/L, ``none`` [paper lists schedules; names ours]. The state keeps the norm of
its embedding row; the head is GPT's ``W_out RMSNorm(x_L)`` [ours: the final norm is unknown].
Unknown: the final norm, whether attention and MLP have separate schedules, the paper's clamp.
At ``v = 0`` (to round-off) the direction is undefined and the bias does not move the state
(finite gradients) [ours; the reading adds eps = 1e-8 to ``|v|`` instead].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .. import sphere
from ..kernels.geodesic_step import geonorm_step
from .config import TransformerConfig
from .gpt import GPT
from .layers import MLP, CausalSelfAttention, RMSNorm, ScaledVector

__all__ = ["GeoNormConfig", "GeoNormGPT", "geonorm_step"]

DECAYS = ("inverse", "inverse_sqrt", "linear", "none")


@dataclass
class GeoNormConfig(TransformerConfig):
    """:class:`TransformerConfig` plus GeoNorm's options (defaults: the third-party reading).

    * ``update_decay``: ``"inverse"`` (1/(l+1)), ``"inverse_sqrt"`` (1/sqrt(l+1), v0.1's
      default), ``"linear"`` ((L-l)/L) or ``"none"``; l = 0..L-1.
    * ``geo_angle``: ``"linear"`` (``theta0 = ||v|| / rho``) or ``"atan"``
      (``atan(||v|| / rho)``, v0.1).
    * ``geo_clamp``: upper bound on theta0 and theta (pi/4); ``None`` (v0.1): no clamp.
    * ``geo_bias``: a learnable scalar bias b per update (init 0); v0.1 had none.
    * ``geo_radius``: ``"own"`` (the state keeps its embedding row's norm) or ``"fixed"``
      (v0.1: the embedding row normalized, unit states, g compared at radius sqrt(d)).
    * ``geo_step_init``, ``geo_step_scale``: the scalar a per update (init 1); a scale equal
      to the init is a plain scalar, ``None`` (v0.1) nGPT's scale trick with 1/sqrt(d_model)
      (effective learning rate x sqrt(d)).
    * ``init_std``, ``norm_eps``, ``tie_embeddings``: as in GPT's config (GPT's
      parametrisation).
    """

    update_decay: Literal["inverse", "inverse_sqrt", "linear", "none"] = "inverse"
    geo_angle: Literal["linear", "atan"] = "linear"
    geo_clamp: float | None = math.pi / 4
    geo_bias: bool = True
    geo_radius: Literal["own", "fixed"] = "own"
    geo_step_init: float = 1.0
    geo_step_scale: float | None = 1.0
    init_std: float = 0.02
    norm_eps: float = 1e-6
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_choice("update_decay", DECAYS)
        self._check_choice("geo_angle", ("linear", "atan"))
        self._check_choice("geo_radius", ("own", "fixed"))
        self._check_choice("geo_bias", (False, True))
        self._check_choice("tie_embeddings", (False, True))
        if self.geo_clamp is not None:
            self._check_positive("geo_clamp")
        self._default_scale("geo_step_scale")
        self._check_positive("init_std", "norm_eps")

    def decay(self, layer: int) -> float:
        """The layer-wise update decay ``delta(layer)`` (0-based layer)."""
        kind, n = self.update_decay, self.n_layer
        if kind == "inverse":
            return 1.0 / (layer + 1)
        if kind == "inverse_sqrt":
            return 1.0 / math.sqrt(layer + 1)
        if kind == "linear":
            return (n - layer) / n
        return 1.0


class GeoBlock(nn.Module):
    """A pre-RMSNorm block whose two residual additions are GeoNorm steps."""

    def __init__(self, cfg: GeoNormConfig, layer: int) -> None:
        super().__init__()
        self.norm_a = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.norm_m = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn, self.mlp = CausalSelfAttention(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.decay, self.clamp, self.angle = cfg.decay(layer), cfg.geo_clamp, cfg.geo_angle
        self.radius = math.sqrt(cfg.d_model) if cfg.geo_radius == "fixed" else None
        assert cfg.geo_step_scale is not None  # resolved by GeoNormConfig
        self.s_a = ScaledVector(1, cfg.geo_step_init, cfg.geo_step_scale)
        self.s_m = ScaledVector(1, cfg.geo_step_init, cfg.geo_step_scale)
        self.b_a = nn.Parameter(torch.zeros(1)) if cfg.geo_bias else None
        self.b_m = nn.Parameter(torch.zeros(1)) if cfg.geo_bias else None

    def reset_parameters(self) -> None:
        for b in (self.b_a, self.b_m):
            if b is not None:
                nn.init.zeros_(b)

    def forward(self, x: Tensor, record: list[Tensor] | None = None) -> Tensor:
        for norm, f, a, b in (
            (self.norm_a, self.attn, self.s_a, self.b_a),
            (self.norm_m, self.mlp, self.s_m, self.b_m),
        ):
            g = self.drop(f(norm(x)))
            x = geonorm_step(
                x,
                g,
                a(),
                0.0 if b is None else b,
                decay=self.decay,
                clamp=self.clamp,
                angle=self.angle,
                radius=self.radius,
            )
            if record is not None:
                record.append(x)
        return x


class GeoNormGPT(GPT):
    """GPT with GeoNorm residual updates (equations in the module docstring).

    Parameters are GPT's plus ``2 * n_layer`` step scalars ``a`` (and biases ``b``); the head
    always has GPT's final RMSNorm. With ``geo_radius="own"`` every state keeps the norm of
    its embedding row; with ``"fixed"`` every state is a unit vector.
    """

    config_class = GeoNormConfig

    def make_block(self, layer: int) -> nn.Module:
        return GeoBlock(self.config, layer)

    def make_final_norm(self) -> nn.Module:
        return RMSNorm(self.config.d_model, self.config.norm_eps)

    def embed(self, idx: Tensor) -> Tensor:
        h = super().embed(idx)
        return sphere.unit(h) if self.config.geo_radius == "fixed" else h
