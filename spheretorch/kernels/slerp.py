r"""``spheretorch::slerp_residual``: nGPT's slerp residual rule as one op, forward and backward.

.. math::

    h' = \mathrm{Norm}\big(\exp_a(P_a(\alpha \odot \log_a b))\big),\quad a = \mathrm{Norm}(h),\
    b = \mathrm{Norm}(f)

for states ``h`` and block outputs ``f`` ``(..., d)`` and step sizes ``alpha`` ``(d,)``
(``residual_rule="slerp"`` of :class:`~spheretorch.models.NGPT`). The formulas, the readable
definition and the hand-written backward live in :mod:`spheretorch.sphere.residual`; this module
registers the op (the definition's PyTorch lines on CPU, the Triton kernels on CUDA) and holds
the kernels, which follow those lines one for one. Float32 math for half inputs, float64 for
float64; results in the inputs' dtypes; the op saves only ``h``, ``f`` and ``alpha``.

The kernels compute ``atan`` from the basic operations (Triton's interpreter has none, and
CUDA's ``libdevice`` one would tie the kernels to one backend): with ``m`` in ``[0, 1]``,
``atan(m) = pi/4 + atan((m - 1)/(m + 1))`` above ``tan(pi/8)``, then the alternating series of
``atan(x)/x`` in ``x^2 <= 0.172`` (20 terms: truncation below float64's last ulp).
"""

from __future__ import annotations

from torch import Tensor

from ..sphere.residual import (
    slerp_residual_backward_reference,
    slerp_residual_forward,
    slerp_residual_reference,
)
from .backend import triton_available
from .residual import check_residual_args, residual_op

__all__ = ["slerp_residual"]


# ----------------------------------------------------------------------------- Triton
# Both kernels evaluate the forward's lines of sphere/residual.py in the same order; the
# backward kernel then runs slerp_residual_backward_reference's lines for its row.

if triton_available():
    import triton.language as tl

    def _slerp_fwd_kernel(
        H, F, A, OUT, stride_h, stride_f, d, BLOCK: tl.constexpr, F64: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < d
        h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0)
        f = tl.load(F + row * stride_f + cols, mask=mask, other=0.0)
        al = tl.load(A + cols, mask=mask, other=0.0)
        if F64:
            h, f, al = h.to(tl.float64), f.to(tl.float64), al.to(tl.float64)
            ra = 1.0 / tl.sqrt(tl.maximum(tl.sum(h * h, axis=0), 2.2250738585072014e-308))
            rb = 1.0 / tl.sqrt(tl.maximum(tl.sum(f * f, axis=0), 2.2250738585072014e-308))
            tiny = 2.2250738585072014e-308
            eps16 = 3.552713678800501e-15
            small = 0.01
        else:
            h, f, al = h.to(tl.float32), f.to(tl.float32), al.to(tl.float32)
            ra = 1.0 / tl.sqrt_rn(tl.maximum(tl.sum(h * h, axis=0), 1.1754943508222875e-38))
            rb = 1.0 / tl.sqrt_rn(tl.maximum(tl.sum(f * f, axis=0), 1.1754943508222875e-38))
            tiny = 1.1754943508222875e-38
            eps16 = 1.9073486328125e-06
            small = 0.25
        a = h * ra
        b = f * rb
        # geodesic_frame: c, v, s, theta = atan2(s, c) and atan(m)/m, m = min/max of s, |c|
        c = tl.sum(a * b, axis=0)
        v = b - c * a
        s2 = tl.sum(v * v, axis=0)
        s = tl.sqrt(s2)
        ac = tl.abs(c)
        hi = tl.maximum(s, ac)
        m = tl.minimum(s, ac) / tl.where(hi > 0, hi, 1.0)
        red = m > 0.41421356237309503  # tan(pi/8)
        x = tl.where(red, (m - 1.0) / (m + 1.0), m)
        w2 = x * x
        ser = w2 * 0.0 + 1.0 / 39.0
        for k in tl.static_range(19):  # Horner: atan(x)/x = sum_k (-x^2)^k / (2k + 1)
            ser = 1.0 / (37 - 2 * k) - w2 * ser
        at = tl.where(red, 0.7853981633974483 + x * ser, m * ser)  # atan(m)
        pm = tl.where(red, at / tl.where(red, m, 1.0), ser)  # atan(m) / m
        t1 = tl.where(s > ac, 1.5707963267948966 - at, at)
        theta = tl.where(c < 0, 3.141592653589793 - t1, t1)
        near = c > s
        c_safe = tl.where(near, c, 1.0)
        tiny_s = s <= eps16
        s_safe = tl.where(near | tiny_s, 1.0, s)
        coef_v = tl.where(near, pm / c_safe, tl.where(tiny_s, 0.0, theta / s_safe))
        coef_w = tl.where(near, 0.0, tl.where(tiny_s, theta, 0.0))
        # antipodal_direction: Norm(e_j - a_j a), j = argmin |a_i| (first on ties); |a_i| <= 1
        j = tl.argmin(tl.where(mask, tl.abs(a), 2.0), axis=0)
        ej = cols == j
        aj = tl.sum(tl.where(ej, a, 0.0), axis=0)
        qw = tl.where(ej, 1.0, 0.0) - aj * a
        w = qw / tl.maximum(tl.sqrt(tl.sum(qw * qw, axis=0)), tiny)
        log = coef_v * v + coef_w * w
        # the step, projected; exp_a; Norm
        step = al * log
        p = tl.sum(step * a, axis=0)
        u = step - p * a
        n2 = tl.sum(u * u, axis=0)
        n_small = n2 < small * small
        nn = tl.sqrt(tl.where(n_small, 1.0, n2))
        cos_n = tl.where(
            n_small, 1.0 - n2 / 2.0 * (1.0 - n2 / 12.0 * (1.0 - n2 / 30.0 * (1.0 - n2 / 56.0))),
            tl.cos(nn),
        )  # fmt: skip
        sinc_n = tl.where(
            n_small, 1.0 - n2 / 6.0 * (1.0 - n2 / 20.0 * (1.0 - n2 / 42.0)), tl.sin(nn) / nn
        )
        o = cos_n * a + sinc_n * u
        y = o / tl.maximum(tl.sqrt(tl.sum(o * o, axis=0)), tiny)
        tl.store(OUT + row * d + cols, y.to(OUT.dtype.element_ty), mask=mask)

    def _slerp_bwd_kernel(
        G, H, F, A, DH, DF, DA_PART, stride_g, stride_h, stride_f, n_rows, PER: tl.constexpr, d,
        BLOCK: tl.constexpr, F64: tl.constexpr,
    ):  # fmt: skip
        # Each program takes rows pid * PER ... pid * PER + PER - 1 and writes one partial
        # dalpha row.
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        col_mask = cols < d
        al = tl.load(A + cols, mask=col_mask, other=0.0)
        al = al.to(tl.float64 if F64 else tl.float32)
        acc = al * 0.0
        for i in range(0, PER):
            row = pid.to(tl.int64) * PER + i
            valid = (cols * 0 + row) < n_rows  # as a vector: older interpreters need it so
            mask = col_mask & valid
            h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0)
            f = tl.load(F + row * stride_f + cols, mask=mask, other=0.0)
            g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0)
            if F64:
                h, f, g = h.to(tl.float64), f.to(tl.float64), g.to(tl.float64)
                ra = 1.0 / tl.sqrt(tl.maximum(tl.sum(h * h, axis=0), 2.2250738585072014e-308))
                rb = 1.0 / tl.sqrt(tl.maximum(tl.sum(f * f, axis=0), 2.2250738585072014e-308))
                tiny = 2.2250738585072014e-308
                eps16 = 3.552713678800501e-15
                small = 0.01
            else:
                h, f, g = h.to(tl.float32), f.to(tl.float32), g.to(tl.float32)
                ra = 1.0 / tl.sqrt_rn(tl.maximum(tl.sum(h * h, axis=0), 1.1754943508222875e-38))
                rb = 1.0 / tl.sqrt_rn(tl.maximum(tl.sum(f * f, axis=0), 1.1754943508222875e-38))
                tiny = 1.1754943508222875e-38
                eps16 = 1.9073486328125e-06
                small = 0.25
            # forward, as in _slerp_fwd_kernel
            a = h * ra
            b = f * rb
            c = tl.sum(a * b, axis=0)
            v = b - c * a
            s2 = tl.sum(v * v, axis=0)
            s = tl.sqrt(s2)
            ac = tl.abs(c)
            hi = tl.maximum(s, ac)
            m = tl.minimum(s, ac) / tl.where(hi > 0, hi, 1.0)
            red = m > 0.41421356237309503
            x = tl.where(red, (m - 1.0) / (m + 1.0), m)
            w2 = x * x
            ser = w2 * 0.0 + 1.0 / 39.0
            for k in tl.static_range(19):
                ser = 1.0 / (37 - 2 * k) - w2 * ser
            at = tl.where(red, 0.7853981633974483 + x * ser, m * ser)
            pm = tl.where(red, at / tl.where(red, m, 1.0), ser)
            t1 = tl.where(s > ac, 1.5707963267948966 - at, at)
            theta = tl.where(c < 0, 3.141592653589793 - t1, t1)
            near = c > s
            c_safe = tl.where(near, c, 1.0)
            tiny_s = s <= eps16
            s_safe = tl.where(near | tiny_s, 1.0, s)
            coef_v = tl.where(near, pm / c_safe, tl.where(tiny_s, 0.0, theta / s_safe))
            coef_w = tl.where(near, 0.0, tl.where(tiny_s, theta, 0.0))
            j = tl.argmin(tl.where(mask, tl.abs(a), 2.0), axis=0)
            ej = cols == j
            aj = tl.sum(tl.where(ej, a, 0.0), axis=0)
            qw = tl.where(ej, 1.0, 0.0) - aj * a
            rq = 1.0 / tl.maximum(tl.sqrt(tl.sum(qw * qw, axis=0)), tiny)
            w = qw * rq
            log = coef_v * v + coef_w * w
            step = al * log
            p = tl.sum(step * a, axis=0)
            u = step - p * a
            n2 = tl.sum(u * u, axis=0)
            n_small = n2 < small * small
            n2_safe = tl.where(n_small, 1.0, n2)
            nn = tl.sqrt(n2_safe)
            cos_n = tl.where(
                n_small,
                1.0 - n2 / 2.0 * (1.0 - n2 / 12.0 * (1.0 - n2 / 30.0 * (1.0 - n2 / 56.0))),
                tl.cos(nn),
            )  # fmt: skip
            sinc_n = tl.where(
                n_small, 1.0 - n2 / 6.0 * (1.0 - n2 / 20.0 * (1.0 - n2 / 42.0)), tl.sin(nn) / nn
            )
            o = cos_n * a + sinc_n * u
            ro = 1.0 / tl.maximum(tl.sqrt(tl.sum(o * o, axis=0)), tiny)
            y = o * ro
            # backward (slerp_residual_backward_reference, line by line)
            do = (g - y * tl.sum(g * y, axis=0)) * ro
            dcos = tl.sum(do * a, axis=0)
            dsinc = tl.sum(do * u, axis=0)
            da = cos_n * do
            dcos_dn2 = tl.where(
                n_small, -0.5 + n2 * (1.0 / 12.0 - n2 * (1.0 / 240.0 - n2 / 10080.0)),
                -sinc_n / 2.0,
            )  # fmt: skip
            dsinc_dn2 = tl.where(
                n_small, -1.0 / 6.0 + n2 * (1.0 / 60.0 - n2 / 1680.0),
                (cos_n - sinc_n) / (2.0 * n2_safe),
            )  # fmt: skip
            du = sinc_n * do + (2.0 * (dcos * dcos_dn2 + dsinc * dsinc_dn2)) * u
            dp = -tl.sum(du * a, axis=0)
            dstep = du + dp * a
            da += dp * step - p * du
            acc += tl.where(valid, dstep * log, 0.0)  # padding rows may be NaN: masked
            dlog = al * dstep
            dv = coef_v * dlog
            dcoef_v = tl.sum(dlog * v, axis=0)
            dcoef_w = tl.sum(dlog * w, axis=0)
            dbig = tl.where(near, dcoef_v / c_safe, 0.0)
            dc = tl.where(near, -coef_v / c_safe * dcoef_v, 0.0)
            dtheta = tl.where(near, 0.0, tl.where(tiny_s, dcoef_w, dcoef_v / s_safe))
            ds = tl.where(near | tiny_s, 0.0, -theta / (s_safe * s_safe) * dcoef_v)
            q = s2 / (c_safe * c_safe)
            q_small = q < small * small
            dbig_dq = tl.where(
                q_small,
                -1.0 / 3.0 + q * (2.0 / 5.0 - q * (3.0 / 7.0 - q * (4.0 / 9.0 - q * 5.0 / 11.0))),
                (1.0 / (1.0 + q) - pm) / (2.0 * tl.where(q_small, 1.0, q)),
            )  # fmt: skip
            dq = dbig * dbig_dq
            ds2 = dq / (c_safe * c_safe)
            dc += -2.0 * q / c_safe * dq
            r2 = s2 + c * c
            r2 = tl.where(r2 > 0, r2, 1.0)
            ds += tl.where(tiny_s, 0.0, dtheta * c / r2)
            dc += -dtheta * s / r2
            dv += (2.0 * ds2 + tl.where(s > 0, ds / tl.where(s > 0, s, 1.0), 0.0)) * v
            dw = coef_w * dlog
            gq = (dw - w * tl.sum(dw * w, axis=0)) * rq
            da += tl.where(ej, -tl.sum(gq * a, axis=0), 0.0) - aj * gq
            dc += -tl.sum(dv * a, axis=0)
            da += dc * b - c * dv
            db = dv + dc * a
            dh = ra * (da - a * tl.sum(da * a, axis=0))
            df = rb * (db - b * tl.sum(db * b, axis=0))
            tl.store(DH + row * d + cols, dh.to(DH.dtype.element_ty), mask=mask)
            tl.store(DF + row * d + cols, df.to(DF.dtype.element_ty), mask=mask)
        tl.store(DA_PART + pid.to(tl.int64) * d + cols, acc, mask=col_mask)


_slerp_op = residual_op(
    "slerp_residual",
    (_slerp_fwd_kernel, _slerp_bwd_kernel) if triton_available() else None,
    slerp_residual_forward,
    slerp_residual_backward_reference,
    slerp_residual_reference,
)


def slerp_residual(h: Tensor, f: Tensor, alpha: Tensor) -> Tensor:
    """``Norm(exp_a(P_a(alpha * log_a b)))``, ``a = Norm(h)``, ``b = Norm(f)``, along the last
    axis (module docstring; :mod:`spheretorch.sphere.residual` for the lines).

    Args:
        h: states ``(..., d)``, ``d >= 2``, any norm (normalized inside).
        f: block outputs, same shape as ``h`` (normalized inside); its dtype may differ
            (bf16 autocast outputs with float32 states): the math runs in the wider one.
        alpha: step sizes, shape ``(d,)``, floating point.

    Returns:
        Unit rows, shaped and typed like ``h``.
    """
    check_residual_args(h, f, alpha)
    if h.dim() == 0 or h.shape[-1] < 2:
        raise ValueError(
            f"h must have a last axis of size >= 2 (a sphere with geodesics), got shape "
            f"{tuple(h.shape)}"
        )
    return _slerp_op(h, f, alpha)
