r"""nGPT's slerp residual step, :math:`h' = \mathrm{Norm}(\exp_a(P_a(\alpha \odot \log_a b)))`,
as a readable definition and its hand-written backward (the formulas of
``spheretorch::slerp_residual``, :mod:`spheretorch.kernels.slerp`).

For states ``h`` and block outputs ``f`` of shape ``(..., d)`` and step sizes ``alpha`` of shape
``(d,)``, line by line (:func:`~spheretorch.sphere.geodesic_frame`,
:func:`~spheretorch.sphere.cos_sinc_sq`):

.. math::

    a &= \mathrm{Norm}(h),\ b = \mathrm{Norm}(f),\ c = \langle a, b\rangle,\ v = b - c a,\
        s = \|v\|,\ \theta = \mathrm{atan2}(s, c) \\
    \ell &= \log_a b = \begin{cases}
        (\operatorname{atanc}(s/c)/c)\, v & c > s \quad (\theta < \pi/4) \\
        (\theta/s)\, v & c \le s,\ s > 16\epsilon \\
        \theta\, w(a) & \text{otherwise } (b = -a:\ w = \text{the antipodal direction})
    \end{cases} \\
    u &= \alpha \odot \ell - \langle \alpha \odot \ell, a\rangle a,\ n^2 = \|u\|^2,\qquad
    h' = \mathrm{Norm}(\cos(n)\, a + \mathrm{sinc}(n)\, u)

``h`` and ``f`` are normalized inside (as NVIDIA's reference does for the nlerp rule), so the
gradients keep their radial parts. For ``alpha`` constant along ``d`` this is
:func:`spheretorch.geodesic.slerp` from ``Norm(h)`` towards ``Norm(f)`` with ``t = alpha``;
a per-coordinate ``alpha`` tilts the step out of the tangent space and ``P_a`` projects it
back (:func:`spheretorch.geodesic.geodesic_update`, ``rule="slerp"``). Computed in the wider
compute dtype of ``h`` and ``f`` (float32 for half types), returned in ``h``'s dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .checks import compute_dtype
from .functional import antipodal_direction, geodesic_frame, inner, normalize
from .series import atanc_sq, cos_sinc_sq

__all__ = [
    "slerp_residual_backward_reference",
    "slerp_residual_forward",
    "slerp_residual_reference",
]


def _ct(h: Tensor, f: Tensor) -> torch.dtype:
    return torch.promote_types(compute_dtype(h.dtype), compute_dtype(f.dtype))


def _unit(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(x r, r)``, ``r = rsqrt(max(|x|^2, tiny))``: ``spheretorch::unit``'s definition."""
    r = torch.rsqrt((x * x).sum(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny))
    return x * r, r


def slerp_residual_reference(h: Tensor, f: Tensor, alpha: Tensor) -> Tensor:
    """The definition (module docstring), differentiable by autograd; ``h``, ``f``
    ``(..., d)``, ``alpha`` ``(d,)``."""
    ct = _ct(h, f)
    a, b = _unit(h.to(ct))[0], _unit(f.to(ct))[0]
    _, log = geodesic_frame(a, b, a.dim() - 1)
    step = alpha.to(ct) * log
    step = step - inner(step, a) * a  # P_a: a per-coordinate alpha tilts the step
    cos_n, sinc_n = cos_sinc_sq(inner(step, step))
    return normalize(cos_n * a + sinc_n * step, -1, on_zero="keep").to(h.dtype)


def _series_small(dtype: torch.dtype) -> float:
    # spheretorch.sphere.series's threshold (the series' derivatives must switch with them)
    return 1e-2 if dtype == torch.float64 else 0.25


def _dot(p: Tensor, q: Tensor) -> Tensor:
    return torch.linalg.vecdot(p, q, dim=-1).unsqueeze(-1)


def _inv_norm(x: Tensor) -> Tensor:
    tiny = torch.finfo(x.dtype).tiny
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(tiny**0.5).reciprocal_()


@dataclass
class _Parts:
    """The forward's intermediates (per-row scalars keep the last axis, size 1)."""

    a: Tensor
    ra: Tensor
    b: Tensor
    rb: Tensor
    c: Tensor
    v: Tensor
    s2: Tensor
    s: Tensor
    theta: Tensor
    near: Tensor
    c_safe: Tensor
    q: Tensor
    big: Tensor
    tiny_s: Tensor
    s_safe: Tensor
    coef_v: Tensor
    w: Tensor | None  # the antipodal direction, where some row needs it
    coef_w: Tensor
    log: Tensor
    step: Tensor
    p: Tensor
    u: Tensor
    n2: Tensor
    cos_n: Tensor
    sinc_n: Tensor
    ro: Tensor
    y: Tensor


def _antipodal_needed(mask: Tensor) -> bool:
    # Only rows with b == -a (to round-off) use the antipodal direction. On CPU one look at
    # the mask skips its argmin/scatter passes; elsewhere it is computed without a host sync.
    return mask.device.type != "cpu" or bool(mask.any())


def _forward_parts(h: Tensor, f: Tensor, alpha: Tensor) -> _Parts:
    """The lines of :func:`slerp_residual_reference` with fused PyTorch calls (one pass over
    the rows each), keeping what the backward needs."""
    ct = _ct(h, f)
    eps = torch.finfo(ct).eps
    hf, ff = h.to(ct), f.to(ct)
    ra, rb = _inv_norm(hf), _inv_norm(ff)
    a, b = hf * ra, ff * rb
    # geodesic_frame
    c = _dot(a, b)
    v = torch.addcmul(b, a, c, value=-1)
    s2 = _dot(v, v)
    s = torch.sqrt(s2)
    theta = torch.atan2(s, c)
    near = c > s
    c_safe = torch.where(near, c, 1.0)
    q = s2 / (c_safe * c_safe)
    big = atanc_sq(q)
    tiny_s = s <= 16 * eps
    s_safe = torch.where(near | tiny_s, 1.0, s)
    coef_v = torch.where(near, big / c_safe, torch.where(tiny_s, 0.0, theta / s_safe))
    coef_w = torch.where(near | ~tiny_s, 0.0, theta)
    log = v * coef_v
    w = None
    if _antipodal_needed(coef_w != 0):
        w = antipodal_direction(a, a.dim() - 1)
        log.addcmul_(w, coef_w)
    # the step, P_a, exp_a, Norm
    step = log * alpha.to(ct)
    p = _dot(step, a)
    u = torch.addcmul(step, a, p, value=-1)
    n2 = _dot(u, u)
    cos_n, sinc_n = cos_sinc_sq(n2)
    o = torch.addcmul(a * cos_n, u, sinc_n)
    ro = _inv_norm(o)
    y = o.mul_(ro)
    return _Parts(
        a, ra, b, rb, c, v, s2, s, theta, near, c_safe, q, big, tiny_s, s_safe, coef_v, w,
        coef_w, log, step, p, u, n2, cos_n, sinc_n, ro, y,
    )  # fmt: skip


def slerp_residual_forward(h: Tensor, f: Tensor, alpha: Tensor) -> Tensor:
    """:func:`slerp_residual_reference` without autograd, in fused PyTorch calls (the op's
    implementation off CUDA)."""
    return _forward_parts(h, f, alpha).y.to(h.dtype)


def slerp_residual_backward_reference(
    grad: Tensor, h: Tensor, f: Tensor, alpha: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dh, df, dalpha)`` of :func:`slerp_residual_reference`: the chain rule through its
    lines in reverse (every branch of :func:`~spheretorch.sphere.geodesic_frame` and of the
    series included), from the inputs alone (the op saves only ``h``, ``f``, ``alpha``)."""
    ct = _ct(h, f)
    small = _series_small(ct)
    al = alpha.to(ct)
    t = _forward_parts(h, f, alpha)
    a, b, u, v = t.a, t.b, t.u, t.v
    # y = o / |o|
    g = grad.to(ct)
    do = torch.addcmul(g, t.y, _dot(g, t.y), value=-1).mul_(t.ro)
    # o = cos(n) a + sinc(n) u, both functions of n^2
    dcos, dsinc = _dot(do, a), _dot(do, u)
    n2 = t.n2
    n_small = n2 < small * small
    n2_safe = torch.where(n_small, 1.0, n2)
    dcos_dn2 = torch.where(
        n_small, -0.5 + n2 * (1 / 12 - n2 * (1 / 240 - n2 / 10080)), -t.sinc_n / 2
    )
    dsinc_dn2 = torch.where(
        n_small, -1 / 6 + n2 * (1 / 60 - n2 / 1680), (t.cos_n - t.sinc_n) / (2 * n2_safe)
    )
    da = do * t.cos_n
    du = do.mul_(t.sinc_n).addcmul_(u, 2 * (dcos * dcos_dn2 + dsinc * dsinc_dn2))
    # u = step - <step, a> a
    dp = -_dot(du, a)
    da.addcmul_(du, t.p, value=-1).addcmul_(t.step, dp)
    dstep = du.addcmul_(a, dp)
    # step = alpha log
    d = a.shape[-1]
    dalpha = torch.linalg.vecdot(dstep.reshape(-1, d), t.log.reshape(-1, d), dim=0)
    dlog = dstep.mul_(al)
    # log = coef_v v + coef_w w
    dcoef_v = _dot(dlog, v)
    near, c_safe, s_safe, tiny_s, theta = t.near, t.c_safe, t.s_safe, t.tiny_s, t.theta
    dbig = torch.where(near, dcoef_v / c_safe, 0.0)
    dc = torch.where(near, -t.coef_v / c_safe * dcoef_v, 0.0)
    dtheta = torch.where(near | tiny_s, 0.0, dcoef_v / s_safe)
    ds = torch.where(near | tiny_s, 0.0, -theta / (s_safe * s_safe) * dcoef_v)
    if t.w is not None:  # w = Norm(e_j - a_j a), j = argmin |a_i|: where coef_w != 0
        w = t.w
        dtheta = dtheta + torch.where(near | ~tiny_s, 0.0, _dot(dlog, w))
        dw = dlog * t.coef_w
        j = a.abs().argmin(dim=-1, keepdim=True)
        aj = a.gather(-1, j)
        qw = torch.zeros_like(a).scatter_(-1, j, 1.0).addcmul_(a, aj, value=-1)
        tiny = torch.finfo(ct).tiny
        rq = torch.linalg.vector_norm(qw, dim=-1, keepdim=True).clamp_min(tiny).reciprocal()
        gq = dw.addcmul_(w, _dot(dw, w), value=-1).mul_(rq)
        da.addcmul_(gq, aj, value=-1).scatter_add_(-1, j, -_dot(gq, a))
    dv = dlog.mul_(t.coef_v)
    # big = atanc(sqrt(q)), q = s^2 / c^2 (near rows)
    q = t.q
    q_small = q < small * small
    q_safe = torch.where(q_small, 1.0, q)
    dbig_dq = torch.where(
        q_small,
        -1 / 3 + q * (2 / 5 - q * (3 / 7 - q * (4 / 9 - q * 5 / 11))),
        (1 / (1 + q) - t.big) / (2 * q_safe),
    )
    dq = dbig * dbig_dq
    ds2 = dq / (c_safe * c_safe)
    dc = dc - 2 * q / c_safe * dq
    # theta = atan2(s, c)
    c, s = t.c, t.s
    r2 = t.s2 + c * c
    r2 = torch.where(r2 > 0, r2, 1.0)
    ds = ds + torch.where(tiny_s, 0.0, dtheta * c / r2)  # b = -a: theta through c only
    dc = dc - dtheta * s / r2
    # s = |v| (zero gradient at 0), s^2 = <v, v>
    pos = s > 0
    dv.addcmul_(v, 2 * ds2 + torch.where(pos, ds / torch.where(pos, s, 1.0), 0.0))
    # v = b - c a, c = <a, b>
    dc = dc - _dot(dv, a)
    da.addcmul_(dv, c, value=-1).addcmul_(b, dc)
    db = dv.addcmul_(a, dc)
    # a = h ra, b = f rb
    dh = da.addcmul_(a, _dot(da, a), value=-1).mul_(t.ra)
    df = db.addcmul_(b, _dot(db, b), value=-1).mul_(t.rb)
    return dh.to(h.dtype), df.to(f.dtype), dalpha.to(alpha.dtype)
