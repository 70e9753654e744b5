r"""``GeoNormGPT``: residual updates as exponential-map steps on the sphere (GeoNorm).

GeoNorm (arXiv 2601.22095) reads each attention and MLP output as an *update direction* for the
hidden state, replaces Pre-/Post-Norm by a geodesic step on the sphere, and decays the step
with depth like a learning-rate schedule. The paper's full text was not available to us; what
follows is **our reading** of its abstract and of secondary descriptions ("orthogonalize the
layer output against the hidden state, apply it through the Riemannian exponential map; every
hidden state keeps a constant norm"). It is GPT with one change per residual connection.

Equations (hidden state ``h`` a unit vector; the blocks see it at GPT's scale, radius
``r = sqrt(d)``, i.e. RMS 1, through the usual RMSNorm with its gain):

.. math::

    g &= f(\mathrm{RMSNorm}(h))                          && \text{block output (attention or MLP)}\\
    v &= g - \langle h, g\rangle h                     && \text{tangent part of the update}\\
    \theta &= s\,\delta(l)\,\phi(\|v\| / r)              && \text{step angle}\\
    h' &= \exp_h(\theta\, v / \|v\|) = \cos\theta\, h + \sin\theta\, v/\|v\|

* ``phi`` (``geo_angle``): ``"atan"`` (default): ``phi(z) = atan(z) < pi/2``, the angle by
  which ``Norm(x + v)`` would rotate ``x``, so that with ``s = 1`` and no decay the step lands
  exactly where Post-Norm of the tangent update lands (GeoNorm "unifies" Pre- and Post-Norm);
  ``"linear"``: ``phi(z) = z``, the exponential map of the tangent update ``v`` itself on the
  radius-``r`` sphere (unbounded angle).
* ``delta(l)`` (``update_decay``), l = 0..L-1 the layer: ``none`` (1), ``inverse`` (1/(l+1)),
  ``inverse_sqrt`` (1/sqrt(l+1), the rate at which Pre-Norm's growing residual stream shrinks
  its relative updates), ``linear`` ((L-l)/L).
* ``s``: a learnable scalar per update (2L of them, scale trick, init ``geo_step_init``).
* The input state is ``h_0 = Norm(E[idx])``; the output is GPT's head, ``W_out RMSNorm(h_L)``.

Everything else (embeddings, attention, SwiGLU MLP, init 0.02 with output projections scaled
by ``1/sqrt(2L)``, AdamW with weight decay) is GPT's. Angles are computed in fp32 and the
removable singularity at ``v = 0`` is handled by smooth series (no NaN gradient).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..sphere import _atanc_sq, sinc
from .config import TransformerConfig
from .gpt import GPT
from .layers import MLP, CausalSelfAttention, RMSNorm, ScaledVector, unit


def geonorm_step(h: Tensor, g: Tensor, k: Tensor | float, radius: float, angle: str) -> Tensor:
    """Move the unit state ``h`` along the tangent part of ``g`` by the GeoNorm angle.

    ``k = s * decay(l)``; ``radius`` is the scale at which ``g`` is compared with ``h``.
    Equal to ``sphere.expmap(h, theta * v / ||v||)``, written out so that the coefficient
    ``sin(theta) / ||v||`` stays smooth at ``v = 0``. Returns a unit tensor like ``h``.
    """
    hf, gf = h.float(), g.float()
    v = gf - (hf * gf).sum(-1, keepdim=True) * hf
    z = torch.linalg.vector_norm(v, dim=-1, keepdim=True) / radius
    if angle == "atan":
        theta = k * torch.atan(z)
        per_z = k * _atanc_sq(z * z)  # theta / z, smooth at 0 (the geometry's series)
    else:
        theta = k * z
        per_z = k * torch.ones_like(z)
    # sin(theta) / ||v|| = sinc(theta) * (theta / z) / r
    out = torch.cos(theta) * hf + (sinc(theta) * per_z / radius) * v
    return unit(out).to(h.dtype)  # re-project: no drift over many layers


class GeoBlock(nn.Module):
    """A GPT block whose two residual additions are GeoNorm geodesic steps."""

    def __init__(self, cfg: TransformerConfig, layer: int) -> None:
        super().__init__()
        self.norm_a, self.norm_m = (
            RMSNorm(cfg.d_model, cfg.norm_eps),
            RMSNorm(cfg.d_model, cfg.norm_eps),
        )
        self.attn, self.mlp = CausalSelfAttention(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.decay = cfg.decay(layer)
        self.radius = math.sqrt(cfg.d_model)
        self.angle = cfg.geo_angle
        self.s_a = ScaledVector(1, cfg.geo_step_init, cfg.geo_step_scale)
        self.s_m = ScaledVector(1, cfg.geo_step_init, cfg.geo_step_scale)

    def forward(self, h: Tensor, record: list[Tensor] | None = None) -> Tensor:
        for norm, f, s in ((self.norm_a, self.attn, self.s_a), (self.norm_m, self.mlp, self.s_m)):
            g = self.drop(f(norm(h)))
            h = geonorm_step(h, g, s() * self.decay, self.radius, self.angle)
            if record is not None:
                record.append(h)
        return h


class GeoNormGPT(GPT):
    """GPT with GeoNorm residual updates (see the module docstring for the equations).

    Parameters are GPT's plus ``2 * n_layer`` step scalars ``s``; the hidden state is a unit
    vector before the first block and after every update.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        self.blocks = nn.ModuleList(GeoBlock(config, layer) for layer in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()
        for module in self.modules():
            if isinstance(module, ScaledVector):
                module.param.fill_(module.scale)

    def embed(self, idx: Tensor) -> Tensor:
        return unit(self.drop(self.tok_emb(idx)))
