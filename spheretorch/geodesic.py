r"""Geodesic residual operations: moving a point on the sphere towards another.

Three interchangeable update rules, from cheapest to exact:

* :func:`nlerp` -- linear interpolation then normalisation (nGPT's residual update). A
  retraction of the exact move; it follows the same great circle but not at constant speed.
* :func:`slerp` -- exact geodesic interpolation,
  :math:`\mathrm{slerp}(a, b; t) = \exp_a(t \log_a b)
  = \frac{\sin((1-t)\theta)}{\sin\theta} a + \frac{\sin(t\theta)}{\sin\theta} b`.
* :func:`geodesic_update` -- the residual step used by the models, with a per-coordinate
  step size (nGPT's "eigen learning rates") and a choice of rule.

All functions take any leading/trailing batch shape with the sphere axis at ``dim`` and are
differentiable everywhere, including ``a == b`` (identity) and ``a == -b`` (the deterministic
direction :func:`spheretorch.sphere.antipodal_direction` at ``a``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from . import sphere

__all__ = ["geodesic_update", "nlerp", "slerp"]

Rule = Literal["nlerp", "slerp"]


def _check_pair(a: Tensor, b: Tensor, dim: int, check: bool) -> int:
    sphere.check_floating(a, "a")
    sphere.check_floating(b, "b")
    sphere.check_same_shape(a, b, "a and b")
    dim = sphere.check_sphere_dim(a, dim, min_size=2)
    if check:
        sphere.check_unit(a, dim, "a")
        sphere.check_unit(b, dim, "b")
    return dim


def _as_weight(t: float | Tensor, a: Tensor, dim: int, name: str = "t") -> Tensor | float:
    """Validate an interpolation weight: a float, or a tensor that broadcasts against ``a``."""
    if isinstance(t, Tensor):
        sphere.check_floating(t, name)
        try:
            shape = torch.broadcast_shapes(t.shape, a.shape)
        except RuntimeError as err:
            raise ValueError(
                f"{name} of shape {tuple(t.shape)} does not broadcast against points of shape "
                f"{tuple(a.shape)}"
            ) from err
        if shape != a.shape:
            raise ValueError(
                f"{name} of shape {tuple(t.shape)} would broadcast the points of shape "
                f"{tuple(a.shape)} to {tuple(shape)}; give it at most a's dimensions"
            )
        return t
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(t).__name__}")
    return float(t)


def slerp(a: Tensor, b: Tensor, t: float | Tensor, dim: int = -1, *, check: bool = False) -> Tensor:
    r"""Spherical linear interpolation along the shortest geodesic from ``a`` to ``b``.

    .. math:: \mathrm{slerp}(a, b; t) = \cos(t\theta)\, a + t\,\mathrm{sinc}(t\theta)\,\log_a b,
        \qquad \theta = d(a, b)

    which equals :math:`\frac{\sin((1-t)\theta)}{\sin\theta} a +
    \frac{\sin(t\theta)}{\sin\theta} b` and stays finite (with exact derivatives) at
    :math:`\theta = 0`.

    Args:
        a, b: unit vectors along ``dim``, same shape ``(..., d, ...)``.
        t: float, or tensor broadcasting against ``a`` with the sphere axis of size 1 (or the
            full ``d`` for per-coordinate weights, which leaves the great circle and is then
            re-normalised). ``t`` outside ``[0, 1]`` extrapolates along the same great circle.
        dim: the sphere axis.
        check: raise ``ValueError`` unless ``a`` and ``b`` are unit along ``dim``
            (:func:`spheretorch.sphere.check_unit`; one host sync). Without it, non-unit
            inputs give a unit result that is not the geodesic between their directions.

    Returns:
        Tensor shaped like ``a``, unit norm along ``dim``.
    """
    dim = _check_pair(a, b, dim, check)
    return _geodesic_step(a, b, _as_weight(t, a, dim), dim)


def _geodesic_step(a: Tensor, b: Tensor, t: float | Tensor, dim: int) -> Tensor:
    r""":math:`\mathrm{Norm}(\exp_a(P_a(t \odot \log_a b)))`, no checks.

    For ``t`` constant along ``dim`` the projection is the identity and
    :math:`\exp_a(t\log_a b) = \cos(t\theta) a + t\,\mathrm{sinc}(t\theta) \log_a b`.
    """
    _, log = sphere.geodesic_frame(a, b, dim)
    au = sphere.upcast(a)
    step = (sphere.upcast(t) if isinstance(t, Tensor) else t) * log
    if isinstance(t, Tensor) and t.dim() >= a.dim() - dim and t.shape[dim - a.dim()] != 1:
        # A per-coordinate t tilts the step out of the tangent space; project it back.
        step = step - (step * au).sum(dim, keepdim=True) * au
    cos_n, sinc_n = sphere.cos_sinc_sq((step * step).sum(dim, keepdim=True))
    out = cos_n * au + sinc_n * step
    return sphere.normalize(out, dim, on_zero="keep").to(a.dtype)


def _lerp_normalize(a: Tensor, b: Tensor, t: float | Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``(Norm(a + t (b - a)), degenerate)`` in the compute dtype, no checks (hot path)."""
    au, bu = sphere.upcast(a), sphere.upcast(b)
    if isinstance(t, Tensor):
        # torch.lerp needs one dtype: promote (a float64 t with float32 points computes in
        # float64, as slerp does), the result is cast back to a's dtype by the callers.
        ct = torch.promote_types(au.dtype, sphere.upcast(t).dtype)
        y = torch.lerp(au.to(ct), bu.to(ct), t.to(ct))
    else:
        y = au + t * (bu - au)
    n = torch.linalg.vector_norm(y, dim=dim, keepdim=True)
    degenerate = n <= 16 * torch.finfo(n.dtype).eps
    return y / torch.where(degenerate, torch.ones_like(n), n), degenerate


def nlerp(a: Tensor, b: Tensor, t: float | Tensor, dim: int = -1, *, check: bool = False) -> Tensor:
    r"""Normalised linear interpolation :math:`\mathrm{Norm}(a + t (b - a))` (nGPT's update).

    ``t`` as in :func:`slerp`, and may also have the full size ``d`` along ``dim``
    (per-coordinate step sizes). It moves along the same great circle as :func:`slerp` but
    not at constant speed: the angle covered is
    :math:`\mathrm{atan2}(t \sin\theta, 1 - t + t\cos\theta)` instead of
    :math:`t\theta`. When the chord passes through the origin (``b == -a`` and ``t == 1/2``)
    the result is :func:`spheretorch.sphere.antipodal_direction` at ``a``, which is also
    :func:`slerp`'s answer there, instead of NaN. ``check`` as in :func:`slerp`.
    """
    dim = _check_pair(a, b, dim, check)
    t = _as_weight(t, a, dim)
    out, degenerate = _lerp_normalize(a, b, t, dim)
    out = torch.where(degenerate, sphere.antipodal_direction(sphere.upcast(a), dim), out)
    return out.to(a.dtype)


def geodesic_update(
    h: Tensor,
    target: Tensor,
    alpha: float | Tensor,
    rule: Rule = "nlerp",
    dim: int = -1,
) -> Tensor:
    r"""Residual step on the sphere: move ``h`` towards ``target`` by ``alpha``.

    * ``rule="nlerp"`` (nGPT eq. 10-11): :math:`h \leftarrow \mathrm{Norm}(h + \alpha
      \odot (h_{target} - h))`, a retraction of the exact step.
    * ``rule="slerp"``: :math:`h \leftarrow \mathrm{Norm}(\exp_h(P_h(\alpha \odot
      \log_h h_{target})))`; for a scalar ``alpha`` (or one of size 1 along ``dim``) this is
      exactly :func:`slerp` with ``t = alpha``.

    This is the models' hot path: it checks only ``dim`` (in Python, no tensor work). For
    ``"nlerp"``, a chord through the origin (``alpha == 1/2`` on every coordinate and an
    exactly antipodal target) leaves ``h`` where it is: cheaper than :func:`nlerp`'s
    antipodal direction, and still a unit vector.

    Args:
        h: hidden states ``(..., d)`` (unit along ``dim``).
        target: the block's proposal, same shape, unit along ``dim``.
        alpha: float or tensor broadcasting over ``h``; typically a vector of size ``d``
            (per-coordinate "eigen learning rates").
        rule: ``"nlerp"`` or ``"slerp"``.
        dim: the sphere axis.

    Returns:
        Tensor shaped and typed like ``h``, unit along ``dim``.
    """
    dim = sphere.check_sphere_dim(h, dim)
    if rule == "nlerp":
        out, degenerate = _lerp_normalize(h, target, alpha, dim)
        return torch.where(degenerate, sphere.upcast(h), out).to(h.dtype)
    if rule == "slerp":
        return _geodesic_step(h, target, alpha, dim)
    raise ValueError(f"rule must be 'nlerp' or 'slerp', got {rule!r}")
