r"""``spheretorch::geonorm_step``: GeoNorm's residual update as one op, forward and backward.

For states ``x`` and block outputs ``g`` ``(..., d)`` and the scalars ``a``, ``b``
(``spheretorch/models/geonorm.py`` explains each line):

.. math::

    r &= \|x\|,\ \hat x = x/r,\ v = g - \langle \hat x, g\rangle \hat x,\
        \rho = r \text{ or a fixed radius},\ z = \|v\|/\rho \\
    P &= \min(\phi(z), c)/z \quad (\phi(z) = z \text{ or } \arctan z),\qquad
    T = \min(\delta\,(a P + b/z)\, z,\ c)/z \\
    \theta &= T z,\qquad x' = r\,\mathrm{Norm}\big(\cos\theta\ \hat x +
        \mathrm{sinc}\,\theta\ (T/\rho)\, v\big)

(the bias term is dropped where ``|v|`` is at round-off, ``|v| <= 16 eps |g|``). The
backward is the chain rule through those lines (:func:`geonorm_step_backward_reference`,
written out so that the op saves only ``x`` and ``g``); ``a`` and ``b`` get the sums over rows.
:func:`geonorm_step_reference` is the readable definition and the autograd oracle of the tests.
The Triton kernels cover every option (both angles, clamp or none, own or fixed radius, any
``a``, ``b``); they compute ``atan`` from the basic operations (Triton's interpreter has no
``atan``): ``atan(z) = pi/2 - atan(1/z)`` above 1, ``pi/4 + atan((z - 1)/(z + 1))`` above
``tan(pi/8)``, then the alternating series of ``atan(x)/x`` in ``x^2 <= 0.172`` (20 terms,
below float64's last ulp), as :mod:`.slerp` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import sphere
from ..sphere.checks import compute_dtype
from .backend import triton_available
from .rowwise import (
    as_rows,
    autocast_off,
    backward_entry,
    block_and_warps,
    jit,
    reduce_programs,
    reference_vjp,
    use_triton,
)
from .unit import project_rows_

__all__ = ["geonorm_step", "geonorm_step_backward_reference", "geonorm_step_reference"]


def _series_small(dtype: torch.dtype) -> float:
    # the threshold of spheretorch.sphere.series, below which the Taylor series are used
    return 1e-2 if dtype == torch.float64 else 0.25


def geonorm_step_reference(
    x: Tensor,
    g: Tensor,
    a: Tensor | float,
    b: Tensor | float = 0.0,
    *,
    decay: float = 1.0,
    clamp: float | None = None,
    angle: str = "linear",
    radius: float | None = None,
) -> Tensor:
    r"""One GeoNorm update of the states ``x`` ``(..., d)`` by the block outputs ``g``.

    ``x' = |x| exp_xhat(theta v / |v|)`` with ``theta`` as in the module docstring;
    ``radius=None`` compares ``g`` at the state's own norm, a float at that fixed radius.
    Written as ``expmap(xhat, (theta / z) (v / rho))``, ``z = |v| / rho``, with ``theta / z``
    smooth at ``z = 0``: finite values and gradients there, even with a bias; the step's norm
    ``|theta|`` is handed to :func:`~spheretorch.sphere.expmap` (``norm_u``). Computed in
    float32 for half types; returns ``x``'s dtype, norm ``|x|``.
    """
    dt = compute_dtype(x.dtype)
    xf, gf = x.to(dt), g.to(dt)
    a = a.to(dt) if isinstance(a, Tensor) else a
    b = b.to(dt) if isinstance(b, Tensor) else b
    r = sphere.norm(xf)
    xhat = sphere.unit(xf)
    v = sphere.project(xhat, gf)
    vn = sphere.norm(v)
    rho = r.clamp_min(torch.finfo(dt).tiny) if radius is None else radius
    z = vn / rho
    # v at round-off level (a radial g) has no direction: the bias's move is dropped there.
    pos = vn > 16 * torch.finfo(dt).eps * sphere.norm(gf.detach())
    zs = torch.where(pos, z, 1.0)
    per_z = sphere.atanc_sq(z * z) if angle == "atan" else 1.0  # phi(z) / z, smooth at 0
    if clamp is not None:  # theta0 = min(phi(z), c)
        per_z = torch.where(per_z * z > clamp, clamp / zs, per_z)
    # theta / z = delta (a theta0 / z + b / z): smooth at z = 0 but for the bias's part
    theta_per_z = decay * (a * per_z + torch.where(pos, b / zs, 0.0))
    if clamp is not None:  # theta = min(delta (a theta0 + b), c)
        theta_per_z = torch.where(theta_per_z * z > clamp, clamp / zs, theta_per_z)
    # |u| = |theta| is known: expmap skips the reduction and the squared-norm series
    u = (theta_per_z / rho) * v
    return (sphere.expmap(xhat, u, norm_u=theta_per_z * z) * r).to(x.dtype)


def _dot(p: Tensor, q: Tensor) -> Tensor:
    return torch.linalg.vecdot(p, q, dim=-1).unsqueeze(-1)


@dataclass
class _Parts:
    """The forward's intermediates (per-row scalars keep the last axis, size 1)."""

    xf: Tensor
    gf: Tensor
    r: Tensor
    rinv: Tensor
    xh: Tensor
    c: Tensor
    v: Tensor
    vn: Tensor
    rho: Tensor
    z: Tensor
    pos: Tensor
    zs: Tensor
    w: Tensor
    w_small: Tensor
    zz: Tensor | None
    p0: Tensor
    clamp1: Tensor | None
    p: Tensor
    clamp2: Tensor | None
    t: Tensor
    k: Tensor
    theta: Tensor
    cos_t: Tensor
    sinc_t: Tensor
    th_small: Tensor
    ry: Tensor
    yh: Tensor


def _forward_parts(
    x: Tensor,
    g: Tensor,
    av: Tensor,
    bv: Tensor,
    decay: float,
    clamp: float | None,
    atan: bool,
    radius: float | None,
) -> _Parts:
    """The lines of :func:`geonorm_step_reference` with fused PyTorch calls (one pass over
    the rows each), keeping what the backward needs. ``av``, ``bv``: ``a``, ``b`` in the
    compute dtype."""
    dt = compute_dtype(x.dtype)
    tiny, eps, small = torch.finfo(dt).tiny, torch.finfo(dt).eps, _series_small(dt)
    xf, gf = x.to(dt), g.to(dt)
    s2 = _dot(xf, xf)
    r = torch.sqrt(s2)
    rinv = torch.rsqrt(s2.clamp_min(tiny))
    xh = xf * rinv
    c = _dot(xh, gf)
    v = torch.addcmul(gf, c, xh, value=-1)
    vn = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    rho = r.clamp_min(tiny) if radius is None else torch.full_like(r, radius)
    z = vn / rho
    pos = vn > 16 * eps * torch.linalg.vector_norm(gf, dim=-1, keepdim=True)
    zs = torch.where(pos, z, 1.0)
    w = z * z
    w_small = w < small * small
    zz = None
    if atan:
        zz = torch.sqrt(torch.where(w_small, 1.0, w))
        series = 1 - w * (1 / 3 - w * (1 / 5 - w * (1 / 7 - w * (1 / 9 - w / 11))))
        p0 = torch.where(w_small, series, torch.atan(zz) / zz)
    else:
        p0 = torch.ones_like(z)
    clamp1 = clamp2 = None
    p = p0
    if clamp is not None:
        clamp1 = p0 * z > clamp
        p = torch.where(clamp1, clamp / zs, p0)
    t = decay * (av * p + torch.where(pos, bv / zs, 0.0))
    if clamp is not None:
        clamp2 = t * z > clamp
        t = torch.where(clamp2, clamp / zs, t)
    k = t / rho
    theta = t * z
    th_small = theta.abs() < small
    th2 = theta * theta
    th_safe = torch.where(th_small, 1.0, theta)
    cos_t = torch.cos(theta)
    sinc_t = torch.where(
        th_small, 1 - th2 / 6 * (1 - th2 / 20 * (1 - th2 / 42)), torch.sin(th_safe) / th_safe
    )
    y = torch.addcmul(cos_t * xh, sinc_t * k, v)
    ry = torch.rsqrt(_dot(y, y).clamp_min(tiny))
    return _Parts(
        xf, gf, r, rinv, xh, c, v, vn, rho, z, pos, zs, w, w_small, zz, p0, clamp1, p, clamp2,
        t, k, theta, cos_t, sinc_t, th_small, ry, y.mul_(ry),
    )  # fmt: skip


def _geo_torch(
    x: Tensor,
    g: Tensor,
    a: Tensor,
    b: Tensor,
    decay: float,
    clamp: float | None,
    atan: bool,
    radius: float | None,
) -> Tensor:
    """The op's PyTorch implementation of :func:`geonorm_step_reference` (scalar a, b)."""
    dt = compute_dtype(x.dtype)
    q = _forward_parts(x, g, a.to(dt), b.to(dt), decay, clamp, atan, radius)
    return q.yh.mul_(q.r).to(x.dtype)


def geonorm_step_backward_reference(
    grad: Tensor,
    x: Tensor,
    g: Tensor,
    a: Tensor,
    b: Tensor,
    decay: float,
    clamp: float | None,
    atan: bool,
    radius: float | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dg, da, db)`` of :func:`geonorm_step_reference` for scalar ``a``, ``b``: the
    chain rule through its lines, in reverse (``a``, ``b`` of shape ``(1,)``)."""
    dt = compute_dtype(x.dtype)
    tiny = torch.finfo(dt).tiny
    av, bv = a.to(dt), b.to(dt)
    q = _forward_parts(x, g, av, bv, decay, clamp, atan, radius)
    G = grad.to(dt)
    # out = r yh, yh = Norm(y): <G r, yh> = r dr, so dy = (r / |y|) (G - yh dr)
    dr = _dot(G, q.yh)
    dy = torch.addcmul(G, q.yh, dr, value=-1).mul_(q.r * q.ry)
    # y = cos(theta) xh + sinc(theta) k v
    dxh = q.cos_t * dy
    dcos, dyv = _dot(dy, q.xh), _dot(dy, q.v)
    dv = dy.mul_(q.sinc_t * q.k)
    dsinc, dk = q.k * dyv, q.sinc_t * dyv
    theta, th2 = q.theta, q.theta * q.theta
    dsinc_dth = torch.where(
        q.th_small,
        theta * (-1 / 3 + th2 / 30 - th2 * th2 / 840),
        (q.cos_t - q.sinc_t) / torch.where(q.th_small, 1.0, theta),
    )
    dth = -torch.sin(theta) * dcos + dsinc_dth * dsinc
    # theta = t z, k = t / rho
    dt_ = q.z * dth + dk / q.rho
    dz = q.t * dth
    drho = -q.k / q.rho * dk
    zs2 = q.zs * q.zs
    dt0 = dt_
    if q.clamp2 is not None:  # t = c / z where clamped
        dz = dz + torch.where(q.clamp2 & q.pos, -clamp / zs2 * dt_, 0.0)
        dt0 = torch.where(q.clamp2, 0.0, dt_)
    # t = decay (a p + b / z)
    da = (decay * q.p * dt0).sum()
    db = torch.where(q.pos, decay / q.zs * dt0, 0.0).sum()
    dp = decay * av * dt0
    dz = dz + torch.where(q.pos, -decay * bv / zs2 * dt0, 0.0)
    dp0 = dp
    if q.clamp1 is not None:  # p = c / z where clamped
        dz = dz + torch.where(q.clamp1 & q.pos, -clamp / zs2 * dp, 0.0)
        dp0 = torch.where(q.clamp1, 0.0, dp)
    if q.zz is not None:  # d/dz atan(z)/z, via the series in w = z^2 below the threshold
        w = q.w
        dseries = -1 / 3 + w * (2 / 5 - w * (3 / 7 - w * (4 / 9 - w * 5 / 11)))
        dz = dz + dp0 * torch.where(q.w_small, 2 * q.z * dseries, (1 / (1 + w) - q.p0) / q.zz)
    # z = |v| / rho, rho = max(|x|, tiny) (own radius)
    dvn = dz / q.rho
    if radius is None:
        drho = drho - q.z / q.rho * dz
        dr = dr + torch.where(q.r >= tiny, drho, 0.0)
    pos_vn = q.vn > 0
    dv.addcmul_(q.v, torch.where(pos_vn, dvn / torch.where(pos_vn, q.vn, 1.0), 0.0))
    # v = g - <xh, g> xh
    dc = -_dot(dv, q.xh)
    dxh.addcmul_(dv, q.c, value=-1).addcmul_(q.gf, dc)
    dg = dv.addcmul_(q.xh, dc)
    # r = |x|, xh = x / |x|
    dx = project_rows_(dxh, q.xh, q.rinv)
    pos_r = q.r > 0
    dx.addcmul_(q.xf, torch.where(pos_r, dr / torch.where(pos_r, q.r, 1.0), 0.0))
    return (
        dx.to(x.dtype),
        dg.to(g.dtype),
        da.reshape(a.shape).to(a.dtype),
        db.reshape(b.shape).to(b.dtype),
    )


# ----------------------------------------------------------------------------- Triton
# DECAY, CLAMP and RADIUS are compile-time constants: Triton passes Python floats as float32
# scalars, and the float64 kernels (the tests' oracle runs) need them exact; a model compiles
# one variant per layer's decay. ATAN: phi(z) = atan(z) (else z).

if triton_available():
    import triton.language as tl

    def _geo_fwd_kernel(
        X, GG, AB, OUT, stride_x, stride_g, d,
        DECAY: tl.constexpr, CLAMP: tl.constexpr, HAS_CLAMP: tl.constexpr,
        RADIUS: tl.constexpr, OWN: tl.constexpr, ATAN: tl.constexpr, BLOCK: tl.constexpr,
        F64: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < d
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        g = tl.load(GG + row * stride_g + cols, mask=mask, other=0.0)
        a = tl.load(AB)
        b = tl.load(AB + 1)
        if F64:
            x, g, a, b = x.to(tl.float64), g.to(tl.float64), a.to(tl.float64), b.to(tl.float64)
            tiny = 2.2250738585072014e-308
            eps16 = 3.552713678800501e-15
            small = 0.01
            dec = tl.full((), DECAY, tl.float64)
            cl = tl.full((), CLAMP, tl.float64)
            rad = tl.full((), RADIUS, tl.float64)
        else:
            x, g, a, b = x.to(tl.float32), g.to(tl.float32), a.to(tl.float32), b.to(tl.float32)
            tiny = 1.1754943508222875e-38
            eps16 = 1.9073486328125e-06
            small = 0.25
            dec = tl.full((), DECAY, tl.float32)
            cl = tl.full((), CLAMP, tl.float32)
            rad = tl.full((), RADIUS, tl.float32)
        s2 = tl.sum(x * x, axis=0)
        r = tl.sqrt(s2)
        xh = x / tl.sqrt(tl.maximum(s2, tiny))
        c = tl.sum(xh * g, axis=0)
        v = g - c * xh
        vn = tl.sqrt(tl.sum(v * v, axis=0))
        rho = tl.maximum(r, tiny) if OWN else rad
        z = vn / rho
        pos = vn > eps16 * tl.sqrt(tl.sum(g * g, axis=0))
        zs = tl.where(pos, z, 1.0)
        if ATAN:  # p0 = atan(z) / z
            inv = z > 1.0
            z1 = tl.where(inv, 1.0 / tl.where(inv, z, 1.0), z)  # in [0, 1]
            red = z1 > 0.41421356237309503  # tan(pi/8)
            x1 = tl.where(red, (z1 - 1.0) / (z1 + 1.0), z1)
            w2 = x1 * x1
            ser = w2 * 0.0 + 1.0 / 39.0
            for k in tl.static_range(19):  # Horner: atan(x)/x = sum_k (-x^2)^k / (2k + 1)
                ser = 1.0 / (37 - 2 * k) - w2 * ser
            at1 = tl.where(red, 0.7853981633974483 + x1 * ser, z1 * ser)  # atan(z1)
            p0 = tl.where(
                inv, (1.5707963267948966 - at1) / tl.where(inv, z, 1.0),
                tl.where(red, at1 / tl.where(red, z1, 1.0), ser),
            )  # fmt: skip
        else:
            p0 = 1.0
        p = tl.where(p0 * z > cl, cl / zs, p0) if HAS_CLAMP else p0
        t = dec * (a * p + tl.where(pos, b / zs, 0.0))
        if HAS_CLAMP:
            t = tl.where(t * z > cl, cl / zs, t)
        k = t / rho
        th = t * z
        th2 = th * th
        th_small = tl.abs(th) < small
        th_safe = tl.where(th_small, 1.0, th)
        cos_t = tl.cos(th)
        sinc_t = tl.where(
            th_small, 1.0 - th2 / 6.0 * (1.0 - th2 / 20.0 * (1.0 - th2 / 42.0)),
            tl.sin(th_safe) / th_safe,
        )  # fmt: skip
        y = cos_t * xh + (sinc_t * k) * v
        yh = y / tl.sqrt(tl.maximum(tl.sum(y * y, axis=0), tiny))
        tl.store(OUT + row * d + cols, (yh * r).to(OUT.dtype.element_ty), mask=mask)

    def _geo_bwd_kernel(
        GR, X, GG, AB, DX, DG, DAB_PART, stride_gr, stride_x, stride_g, n_rows,
        PER: tl.constexpr, d,
        DECAY: tl.constexpr, CLAMP: tl.constexpr, HAS_CLAMP: tl.constexpr,
        RADIUS: tl.constexpr, OWN: tl.constexpr, ATAN: tl.constexpr, BLOCK: tl.constexpr,
        F64: tl.constexpr,
    ):  # fmt: skip
        # Each program takes rows pid * PER ... pid * PER + PER - 1 and writes one partial
        # (da, db).
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        col_mask = cols < d
        a = tl.load(AB)
        b = tl.load(AB + 1)
        if F64:
            a, b = a.to(tl.float64), b.to(tl.float64)
            tiny = 2.2250738585072014e-308
            eps16 = 3.552713678800501e-15
            small = 0.01
            dec = tl.full((), DECAY, tl.float64)
            cl = tl.full((), CLAMP, tl.float64)
            rad = tl.full((), RADIUS, tl.float64)
        else:
            a, b = a.to(tl.float32), b.to(tl.float32)
            tiny = 1.1754943508222875e-38
            eps16 = 1.9073486328125e-06
            small = 0.25
            dec = tl.full((), DECAY, tl.float32)
            cl = tl.full((), CLAMP, tl.float32)
            rad = tl.full((), RADIUS, tl.float32)
        da = a * 0.0
        db = a * 0.0
        for i in range(0, PER):
            row = pid.to(tl.int64) * PER + i
            valid = row < n_rows
            mask = col_mask & ((cols * 0 + row) < n_rows)  # a vector: older interpreters
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
            g = tl.load(GG + row * stride_g + cols, mask=mask, other=0.0)
            gr = tl.load(GR + row * stride_gr + cols, mask=mask, other=0.0)
            if F64:
                x, g, gr = x.to(tl.float64), g.to(tl.float64), gr.to(tl.float64)
            else:
                x, g, gr = x.to(tl.float32), g.to(tl.float32), gr.to(tl.float32)
            # forward, as in _geo_fwd_kernel
            s2 = tl.sum(x * x, axis=0)
            r = tl.sqrt(s2)
            rinv = 1.0 / tl.sqrt(tl.maximum(s2, tiny))
            xh = x * rinv
            c = tl.sum(xh * g, axis=0)
            v = g - c * xh
            vn = tl.sqrt(tl.sum(v * v, axis=0))
            rho = tl.maximum(r, tiny) if OWN else rad
            z = vn / rho
            pos = vn > eps16 * tl.sqrt(tl.sum(g * g, axis=0))
            zs = tl.where(pos, z, 1.0)
            if ATAN:
                inv = z > 1.0
                z1 = tl.where(inv, 1.0 / tl.where(inv, z, 1.0), z)
                red = z1 > 0.41421356237309503
                x1 = tl.where(red, (z1 - 1.0) / (z1 + 1.0), z1)
                w2 = x1 * x1
                ser = w2 * 0.0 + 1.0 / 39.0
                for k in tl.static_range(19):
                    ser = 1.0 / (37 - 2 * k) - w2 * ser
                at1 = tl.where(red, 0.7853981633974483 + x1 * ser, z1 * ser)
                p0 = tl.where(
                    inv, (1.5707963267948966 - at1) / tl.where(inv, z, 1.0),
                    tl.where(red, at1 / tl.where(red, z1, 1.0), ser),
                )  # fmt: skip
            else:
                p0 = 1.0
            if HAS_CLAMP:
                clamp1 = p0 * z > cl
                p = tl.where(clamp1, cl / zs, p0)
            else:
                p = p0
            t = dec * (a * p + tl.where(pos, b / zs, 0.0))
            if HAS_CLAMP:
                clamp2 = t * z > cl
                t = tl.where(clamp2, cl / zs, t)
            k = t / rho
            th = t * z
            th2 = th * th
            th_small = tl.abs(th) < small
            th_safe = tl.where(th_small, 1.0, th)
            cos_t = tl.cos(th)
            sin_t = tl.sin(th)
            sinc_t = tl.where(
                th_small, 1.0 - th2 / 6.0 * (1.0 - th2 / 20.0 * (1.0 - th2 / 42.0)),
                tl.sin(th_safe) / th_safe,
            )  # fmt: skip
            y = cos_t * xh + (sinc_t * k) * v
            ry = 1.0 / tl.sqrt(tl.maximum(tl.sum(y * y, axis=0), tiny))
            yh = y * ry
            # backward (geonorm_step_backward_reference, line by line)
            dr = tl.sum(gr * yh, axis=0)
            gy = gr * r
            dy = ry * (gy - yh * tl.sum(gy * yh, axis=0))
            dxh = cos_t * dy
            dcos = tl.sum(dy * xh, axis=0)
            dyv = tl.sum(dy * v, axis=0)
            dv = (sinc_t * k) * dy
            dsinc = k * dyv
            dk = sinc_t * dyv
            dsinc_dth = tl.where(
                th_small, -th / 3.0 + th * th2 / 30.0 - th * th2 * th2 / 840.0,
                (cos_t - sinc_t) / th_safe,
            )  # fmt: skip
            dth = -sin_t * dcos + dsinc_dth * dsinc
            dt_ = z * dth + dk / rho
            dz = t * dth
            drho = -k / rho * dk
            zs2 = zs * zs
            if HAS_CLAMP:
                dz += tl.where(clamp2 & pos, -cl / zs2 * dt_, 0.0)
                dt0 = tl.where(clamp2, 0.0, dt_)
            else:
                dt0 = dt_
            da += tl.where(valid, dec * p * dt0, 0.0)  # padding rows may be NaN: masked
            db += tl.where(valid & pos, dec / zs * dt0, 0.0)
            dp = dec * a * dt0
            dz += tl.where(pos, -dec * b / zs2 * dt0, 0.0)
            if HAS_CLAMP:
                dz += tl.where(clamp1 & pos, -cl / zs2 * dp, 0.0)
                dp0 = tl.where(clamp1, 0.0, dp)
            else:
                dp0 = dp
            if ATAN:  # d/dz atan(z)/z, via the series in w = z^2 below the threshold
                w = z * z
                w_small = w < small * small
                dser = -1.0 / 3.0 + w * (
                    2.0 / 5.0 - w * (3.0 / 7.0 - w * (4.0 / 9.0 - w * 5.0 / 11.0))
                )
                dz += dp0 * tl.where(
                    w_small, 2.0 * z * dser, (1.0 / (1.0 + w) - p0) / tl.where(w_small, 1.0, z)
                )
            dvn = dz / rho
            if OWN:
                drho = drho - z / rho * dz
                dr += tl.where(r >= tiny, drho, 0.0)
            dv += dvn * tl.where(vn > 0, v / tl.where(vn > 0, vn, 1.0), 0.0)
            dc = -tl.sum(dv * xh, axis=0)
            dxh = dxh - c * dv + dc * g
            dg = dv + dc * xh
            dx = dr * tl.where(r > 0, x / tl.where(r > 0, r, 1.0), 0.0)
            dx += rinv * (dxh - xh * tl.sum(dxh * xh, axis=0))
            tl.store(DX + row * d + cols, dx.to(DX.dtype.element_ty), mask=mask)
            tl.store(DG + row * d + cols, dg.to(DG.dtype.element_ty), mask=mask)
        tl.store(DAB_PART + 2 * pid.to(tl.int64), da)
        tl.store(DAB_PART + 2 * pid.to(tl.int64) + 1, db)


def _consts(decay: float, clamp: float | None, atan: bool, radius: float | None) -> dict[str, Any]:
    return {
        "ATAN": bool(atan),
        "DECAY": float(decay),
        "CLAMP": 0.0 if clamp is None else float(clamp),
        "HAS_CLAMP": clamp is not None,
        "RADIUS": 1.0 if radius is None else float(radius),
        "OWN": radius is None,
    }


def _geo_triton(
    x: Tensor,
    g: Tensor,
    ab: Tensor,
    decay: float,
    clamp: float | None,
    atan: bool,
    radius: float | None,
) -> Tensor:
    x2, g2 = as_rows(x), as_rows(g)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if out.numel():
        block, warps = block_and_warps(x2.shape[1])
        jit(_geo_fwd_kernel)[(x2.shape[0],)](
            x2, g2, ab, out, x2.stride(0), g2.stride(0), x2.shape[1],
            BLOCK=block, F64=ab.dtype == torch.float64, num_warps=warps,
            **_consts(decay, clamp, atan, radius),
        )  # fmt: skip
    return out.view(x.shape)


def _geo_backward_triton(
    grad: Tensor,
    x: Tensor,
    g: Tensor,
    ab: Tensor,
    decay: float,
    clamp: float | None,
    atan: bool,
    radius: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    gr2, x2, g2 = as_rows(grad), as_rows(x), as_rows(g)
    rows, d = x2.shape
    dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    dg = torch.empty(g2.shape, dtype=g.dtype, device=g.device)
    programs, per = reduce_programs(rows, x.device)
    partial = torch.zeros(programs, 2, dtype=ab.dtype, device=x.device)
    if rows and d:
        block, warps = block_and_warps(d)
        jit(_geo_bwd_kernel)[(programs,)](
            gr2, x2, g2, ab, dx, dg, partial, gr2.stride(0), x2.stride(0), g2.stride(0),
            rows, per, d, BLOCK=block, F64=ab.dtype == torch.float64, num_warps=warps,
            **_consts(decay, clamp, atan, radius),
        )  # fmt: skip
    return dx.view(x.shape), dg.view(g.shape), partial.sum(0)


# ----------------------------------------------------------------------------- the ops


def _pack(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``[a, b]`` in the compute dtype (a device tensor: no host round trip)."""
    return torch.cat((a.reshape(1), b.reshape(1))).to(compute_dtype(x.dtype))


@torch.library.custom_op("spheretorch::geonorm_step", mutates_args=())
def _geo_op(
    x: Tensor,
    g: Tensor,
    a: Tensor,
    b: Tensor,
    decay: float,
    clamp: float | None,
    atan: bool,
    radius: float | None,
) -> Tensor:
    if use_triton(x):
        return _geo_triton(x, g, _pack(x, a, b), decay, clamp, atan, radius)
    with autocast_off(x):
        return _geo_torch(x, g, a, b, decay, clamp, atan, radius).contiguous()


@_geo_op.register_fake
def _(x, g, a, b, decay, clamp, atan, radius):  # type: ignore[no-untyped-def]
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _geo_backward_impl(
    grad: Tensor,
    x: Tensor,
    g: Tensor,
    a: Tensor,
    b: Tensor,
    decay: float,
    clamp: float | None,
    atan: bool,
    radius: float | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if use_triton(x):
        dx, dg, dab = _geo_backward_triton(grad, x, g, _pack(x, a, b), decay, clamp, atan, radius)
        da = dab[0].to(a.dtype).reshape(a.shape).clone()  # outputs may not alias each other
        return dx, dg, da, dab[1].to(b.dtype).reshape(b.shape).clone()
    with autocast_off(x):
        dx, dg, da, db = geonorm_step_backward_reference(
            grad, x, g, a, b, decay, clamp, atan, radius
        )
    return dx.contiguous(), dg.contiguous(), da, db


@torch.library.custom_op("spheretorch::geonorm_step_backward", mutates_args=())
def _geo_backward_op(
    grad: Tensor,
    x: Tensor,
    g: Tensor,
    a: Tensor,
    b: Tensor,
    decay: float,
    clamp: float | None,
    atan: bool,
    radius: float | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _geo_backward_impl(grad, x, g, a, b, decay, clamp, atan, radius)


@_geo_backward_op.register_fake
def _(grad, x, g, a, b, decay, clamp, atan, radius):  # type: ignore[no-untyped-def]
    fmt = torch.contiguous_format
    return (
        torch.empty_like(x, memory_format=fmt),
        torch.empty_like(g, memory_format=fmt),
        torch.empty_like(a),
        torch.empty_like(b),
    )


def _setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, g, a, b, decay, clamp, atan, radius = inputs
    ctx.save_for_backward(x, g, a, b)
    ctx.options = (decay, clamp, atan, radius)


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    x, g, a, b = ctx.saved_tensors
    decay, clamp, atan, radius = ctx.options
    if torch.is_grad_enabled():  # create_graph: differentiable again through the reference

        def ref(x_: Tensor, g_: Tensor, a_: Tensor, b_: Tensor) -> Tensor:
            angle = "atan" if atan else "linear"
            return geonorm_step_reference(
                x_, g_, a_, b_, decay=decay, clamp=clamp, angle=angle, radius=radius
            )

        grads = reference_vjp(ref, (x, g, a, b), grad)
    else:
        bwd = backward_entry(_geo_backward_op, _geo_backward_impl, grad)
        grads = bwd(grad, x, g, a, b, decay, clamp, atan, radius)
    return (*grads, None, None, None, None)


_geo_op.register_autograd(_backward, setup_context=_setup)


def _scalar(t: Tensor | float, like: Tensor) -> Tensor | None:
    if isinstance(t, Tensor):
        return t if t.numel() == 1 else None
    return torch.full((1,), float(t), dtype=compute_dtype(like.dtype), device=like.device)


def geonorm_step(
    x: Tensor,
    g: Tensor,
    a: Tensor | float,
    b: Tensor | float = 0.0,
    *,
    decay: float = 1.0,
    clamp: float | None = None,
    angle: str = "linear",
    radius: float | None = None,
) -> Tensor:
    r"""One GeoNorm update of the states ``x`` ``(..., d)`` by the block outputs ``g``, with
    the contract of :func:`~spheretorch.kernels.geodesic_step.geonorm_step_reference`: the
    fused op ``spheretorch::geonorm_step`` when ``a`` and ``b`` are scalars (floats or
    one-element tensors); otherwise (per-row or per-coordinate ``a``, ``b``) the reference with
    autograd.
    """
    if angle not in ("linear", "atan"):
        raise ValueError(f"angle must be 'linear' or 'atan', got {angle!r}")
    if x.shape != g.shape:
        raise ValueError(
            f"x and g must have the same shape, got {tuple(x.shape)} and {tuple(g.shape)}"
        )
    at, bt = _scalar(a, x), _scalar(b, x)
    if at is None or bt is None or x.dim() == 0:
        return geonorm_step_reference(
            x, g, a, b, decay=decay, clamp=clamp, angle=angle, radius=radius
        )
    opt = (
        float(decay),
        None if clamp is None else float(clamp),
        angle == "atan",
        None if radius is None else float(radius),
    )
    return _geo_op(x, g, at, bt, *opt)
