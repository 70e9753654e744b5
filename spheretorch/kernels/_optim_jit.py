r"""The Triton source of :mod:`spheretorch.kernels.optim` (the host side, tables and
launches, and the description of what each kernel computes live there).

This module is loaded by :func:`spheretorch.kernels.optim._jit` twice at most, once with
Triton's interpreter on (for CPU tensors: the tests run every kernel this way) and once
compiled (CUDA tensors), so the mode follows the tensors' device rather than the
environment at import time. Kept to what compiles on a GPU: compile-time constants,
masked loads and stores, int64 offsets.
"""

import triton
import triton.language as tl


# Reductions are tl.reduce with triton's own combine functions rather than tl.sum / tl.max:
# those are jit functions of triton.language, decorated in whichever mode (interpreter or
# compiler) was active when triton was first imported, which need not be this module's; the
# combine functions are only referred to (the interpreter recognises them and reduces with
# numpy, the compiler inlines them, exactly as tl.sum / tl.max do).
@triton.jit
def _sum(x):
    """Per-row sums of a ``[BLOCK_R, BLOCK_N]`` tile."""
    return tl.reduce(x, 1, tl.standard._sum_combine)


@triton.jit
def _sinc(t):
    # sin(t)/t with its series below the threshold of spheretorch.sphere.sinc (exact to
    # the last ulp there: 0.25 in float32, 1e-2 in float64)
    if t.dtype == tl.float64:  # noqa: SIM108 (a compile-time branch)
        small = t < 0.01
    else:
        small = t < 0.25
    t2 = t * t
    series = 1 - t2 / 6 * (1 - t2 / 20 * (1 - t2 / 42))
    safe = tl.where(small, 1.0, t)
    return tl.where(small, series, tl.sin(safe) / safe)


@triton.jit
def _unless(mask, FOUND_INF):
    """``mask`` where the 0-d ``*FOUND_INF`` is zero, else all false (the device-side
    skip). The flag is broadcast to ``mask``'s shape before the ``&``."""
    flag = tl.load(FOUND_INF).to(tl.float32) + tl.full(mask.shape, 0.0, tl.float32)
    return mask & (flag == 0)


@triton.jit
def _tile(TILES, INFO, N_INFO: tl.constexpr, SIZE, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tensor index, sphere indices, element offsets and masks of this program's tile."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(TILES + 2 * pid)
    s0 = tl.load(TILES + 2 * pid + 1)
    info = INFO + t * N_INFO
    count = tl.load(info)
    inner = tl.load(info + 1)
    rows = s0 + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    outer_i = rows // inner
    base = outer_i * SIZE * inner + (rows - outer_i * inner)
    elem = base[:, None] + cols[None, :] * inner
    rmask = rows < count
    mask = rmask[:, None] & (cols < SIZE)[None, :]
    return t, info, rows, elem, rmask, mask


@triton.jit
def _retract(x, u, m, rmask, EXP: tl.constexpr, HAS_M: tl.constexpr):
    """``(R_x(u), m moved there)`` on the unit sphere, per row of the tile: projective
    retraction + projection, or exponential map + parallel transport (the formulas of
    :func:`spheretorch.sphere.foreach.expmap_`)."""
    if EXP:
        n = tl.sqrt(_sum(u * u))
        sinc_n = _sinc(n)
        if HAS_M:
            k = _sum(u * m)
            half = _sinc(n * 0.5)
            m = m - (0.5 * half * half * k)[:, None] * u
            m = m - (k * sinc_n)[:, None] * x
        y = tl.cos(n)[:, None] * x + sinc_n[:, None] * u
    else:
        y = x + u
    # rows past the end of a tensor (masked, all zero) divide by 1, not 0
    y = y / tl.where(rmask, tl.sqrt(_sum(y * y)), 1.0)[:, None]
    if HAS_M and not EXP:
        m = m - _sum(y * m)[:, None] * y
    return y, m


@triton.jit
def _adam_direction(
    g_ptr, m_ptr, v_ptr, mask, step, HYPER, EPS, cd,
    UPDATE: tl.constexpr, MAXIMIZE: tl.constexpr,
):  # fmt: skip
    """AdamH's direction up to scale, d = m / (sqrt(v) / sqrt(1 - beta2^t) + eps) (the
    host's ``adam_directions(up_to_scale=True)``), HYPER = (lr, beta1, beta2, tiny, ...),
    EPS[0] = eps. ``UPDATE``: the moments first take the gradient (m <- lerp(m, g, 1 - beta1)
    as torch's lerp, v <- beta2 v + (1 - beta2) g^2) and are stored; else (a second pass
    over the same values) they are read as stored."""
    m = tl.load(m_ptr, mask=mask, other=0.0).to(cd)
    v = tl.load(v_ptr, mask=mask, other=0.0).to(cd)
    beta2 = tl.load(HYPER + 2)
    if UPDATE:
        g = tl.load(g_ptr, mask=mask, other=0.0).to(cd)
        if MAXIMIZE:
            g = -g
        w1 = (1 - tl.load(HYPER + 1)).to(cd)
        m = tl.where(w1 < 0.5, m + w1 * (g - m), g - (g - m) * (1 - w1))  # torch's lerp
        v = v * beta2.to(cd) + g * g * (1 - beta2).to(cd)
        tl.store(m_ptr, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr, v.to(v_ptr.dtype.element_ty), mask=mask)
    bc2_sqrt = tl.sqrt(1 - tl.exp(step * tl.log(beta2))).to(cd)
    return m / (tl.sqrt(v) / bc2_sqrt + tl.load(EPS).to(cd))


@triton.jit
def _direction(
    D, M, V, STEP, HYPER, EPS, info, elem, mask, cd,
    ADAM: tl.constexpr, UPDATE: tl.constexpr, MAXIMIZE: tl.constexpr,
    STEP_TENSOR: tl.constexpr,
):  # fmt: skip
    """The direction of a Muon-family step at ``elem``: read from D (INFO column 3), or,
    ``ADAM``, AdamH's from its moments (:func:`_adam_direction`: D holds the gradients, M
    and V the moments, columns 5 and 6; the step counters STEP, column 7, with
    ``STEP_TENSOR``, else HYPER[4])."""
    if ADAM:
        if STEP_TENSOR:  # noqa: SIM108 (a compile-time branch)
            step = tl.load(STEP + tl.load(info + 7)).to(cd)
        else:
            step = tl.load(HYPER + 4)
        return _adam_direction(
            D + tl.load(info + 3) + elem, M + tl.load(info + 5) + elem,
            V + tl.load(info + 6) + elem, mask, step, HYPER, EPS, cd, UPDATE, MAXIMIZE,
        )  # fmt: skip
    return tl.load(D + tl.load(info + 3) + elem, mask=mask, other=0.0).to(cd)


@triton.jit
def _adam_kernel(
    X, G, M, V, VMAX, STEP, TILES, INFO, HYPER, LR, FOUND_INF, SIZE,
    N_INFO: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    MAXIMIZE: tl.constexpr, ROW: tl.constexpr, EXP: tl.constexpr, AMSGRAD: tl.constexpr,
    LR_TENSOR: tl.constexpr, STEP_TENSOR: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
):  # fmt: skip
    t, info, rows, elem, rmask, mask = _tile(TILES, INFO, N_INFO, SIZE, BLOCK_R, BLOCK_N)
    cd = M.dtype.element_ty  # the compute dtype (moments are kept in it)
    wmask = mask
    wrow = rmask
    if HAS_FOUND_INF:
        wmask = _unless(mask, FOUND_INF)
        wrow = _unless(rmask, FOUND_INF)
    # hyper-parameters: float64 scalars, per-tensor step and radius
    lr = tl.load(HYPER)
    beta1 = tl.load(HYPER + 1)
    beta2 = tl.load(HYPER + 2)
    eps = tl.load(HYPER + 3).to(cd)
    if LR_TENSOR:
        lr = tl.load(LR).to(tl.float64)
    if STEP_TENSOR:  # noqa: SIM108 (a compile-time branch)
        step = tl.load(STEP + tl.load(info + 7)).to(tl.float64)
    else:
        step = tl.load(HYPER + 4)
    radius = tl.load(HYPER + 5 + t)
    bc1 = 1 - tl.exp(step * tl.log(beta1))
    bc2_sqrt = tl.sqrt(1 - tl.exp(step * tl.log(beta2))).to(cd)
    neg_step = (-lr / bc1 / radius).to(cd)  # the step in unit-sphere coordinates
    inv_r = (1 / radius).to(cd)

    x = tl.load(X + tl.load(info + 2) + elem, mask=mask, other=0.0).to(cd) * inv_r
    g = tl.load(G + tl.load(info + 3) + elem, mask=mask, other=0.0).to(cd)
    if MAXIMIZE:
        g = -g
    rg = g - _sum(x * g)[:, None] * x
    m_ptr = M + tl.load(info + 4) + elem
    m = tl.load(m_ptr, mask=mask, other=0.0)
    w1 = (1 - beta1).to(cd)
    m = tl.where(w1 < 0.5, m + w1 * (rg - m), rg - (rg - m) * (1 - w1))  # torch's lerp
    b2 = beta2.to(cd)
    if ROW:
        v_ptr = V + tl.load(info + 5) + rows
        v = tl.load(v_ptr, mask=rmask, other=0.0) * b2 + _sum(rg * rg) * (1 - b2)
        tl.store(v_ptr, v, mask=wrow)
        if AMSGRAD:
            vmax_ptr = VMAX + tl.load(info + 6) + rows
            v = tl.maximum(tl.load(vmax_ptr, mask=rmask, other=0.0), v)
            tl.store(vmax_ptr, v, mask=wrow)
        coef = neg_step / (tl.sqrt(v) / bc2_sqrt + eps)
        u = m * coef[:, None]
    else:
        v_ptr = V + tl.load(info + 5) + elem
        v = tl.load(v_ptr, mask=mask, other=0.0) * b2 + rg * rg * (1 - b2)
        tl.store(v_ptr, v, mask=wmask)
        if AMSGRAD:
            vmax_ptr = VMAX + tl.load(info + 6) + elem
            v = tl.maximum(tl.load(vmax_ptr, mask=mask, other=0.0), v)
            tl.store(vmax_ptr, v, mask=wmask)
        u = m / (tl.sqrt(v) / bc2_sqrt + eps) * neg_step
        u = u - _sum(x * u)[:, None] * x  # m / denom is not tangent
    y, m = _retract(x, u, m, rmask, EXP, True)
    x_ptr = X + tl.load(info + 2) + elem
    tl.store(x_ptr, (y * radius.to(cd)).to(X.dtype.element_ty), mask=wmask)
    tl.store(m_ptr, m, mask=wmask)


@triton.jit
def _sgd_kernel(
    X, G, B, TILES, INFO, HYPER, LR, FOUND_INF, SIZE,
    N_INFO: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    MAXIMIZE: tl.constexpr, EXP: tl.constexpr, MOMENTUM: tl.constexpr, FIRST: tl.constexpr,
    NESTEROV: tl.constexpr, LR_TENSOR: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
):  # fmt: skip
    t, info, _, elem, rmask, mask = _tile(TILES, INFO, N_INFO, SIZE, BLOCK_R, BLOCK_N)
    cd = HYPER.dtype.element_ty  # float32 or float64: the compute dtype
    wmask = mask
    if HAS_FOUND_INF:
        wmask = _unless(mask, FOUND_INF)
    lr = tl.load(HYPER)
    if LR_TENSOR:
        lr = tl.load(LR).to(cd)
    momentum = tl.load(HYPER + 1)
    dampening = tl.load(HYPER + 2)
    radius = tl.load(HYPER + 5 + t)
    inv_r = 1 / radius
    x = tl.load(X + tl.load(info + 2) + elem, mask=mask, other=0.0).to(cd) * inv_r
    g = tl.load(G + tl.load(info + 3) + elem, mask=mask, other=0.0).to(cd)
    if MAXIMIZE:
        g = -g
    rg = g - _sum(x * g)[:, None] * x
    d = rg
    b = rg
    if MOMENTUM:
        b_ptr = B + tl.load(info + 4) + elem
        if not FIRST:  # torch: the first buffer is the gradient itself
            b = tl.load(b_ptr, mask=mask, other=0.0) * momentum + rg * (1 - dampening)
        d = rg + momentum * b if NESTEROV else b
    y, b = _retract(x, d * (-lr * inv_r), b, rmask, EXP, MOMENTUM)
    tl.store(X + tl.load(info + 2) + elem, (y * radius).to(X.dtype.element_ty), mask=wmask)
    if MOMENTUM:
        tl.store(b_ptr, b, mask=wmask)


@triton.jit
def _renorm_kernel(
    X, G, OUT, TILES, INFO, HYPER, FOUND_INF, SIZE,
    N_INFO: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    PROJECT: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
):  # fmt: skip
    """``PROJECT=False``: x <- r x / |x| in place; ``True``: OUT <- g - <x, g> x / r^2."""
    t, info, _, elem, rmask, mask = _tile(TILES, INFO, N_INFO, SIZE, BLOCK_R, BLOCK_N)
    cd = HYPER.dtype.element_ty
    radius = tl.load(HYPER + 5 + t)
    x_ptr = X + tl.load(info + 2) + elem
    x = tl.load(x_ptr, mask=mask, other=0.0).to(cd)
    if PROJECT:
        g = tl.load(G + tl.load(info + 3) + elem, mask=mask, other=0.0).to(cd)
        out = g - (_sum(x * g) / (radius * radius))[:, None] * x
        tl.store(OUT + tl.load(info + 4) + elem, out.to(OUT.dtype.element_ty), mask=mask)
    else:
        wmask = mask
        if HAS_FOUND_INF:
            wmask = _unless(mask, FOUND_INF)
        y = x * (radius / tl.where(rmask, tl.sqrt(_sum(x * x)), 1.0))[:, None]
        tl.store(x_ptr, y.to(X.dtype.element_ty), mask=wmask)


@triton.jit
def _nonfinite_kernel(G, INFO, TILES, FLAG, BLOCK: tl.constexpr):
    """FLAG <- 1 if some element of a gradient is NaN or infinite (each read once); one
    program per ``BLOCK`` values of one gradient (TILES: gradient, first value)."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(TILES + 2 * pid)
    start = tl.load(TILES + 2 * pid + 1)
    numel = tl.load(INFO + 2 * t)
    base = G + tl.load(INFO + 2 * t + 1)
    idx = start + tl.arange(0, BLOCK).to(tl.int64)
    g = tl.load(base + idx, mask=idx < numel, other=0.0)
    a = tl.abs(g)
    # NaN: g != g; an infinity: the one nonzero value with a + a == a (comparisons and one
    # addition in the gradient's own dtype: no cast can turn a finite value infinite)
    bad = ((g != g) | ((a == a + a) & (a != 0))).to(tl.int32)
    tl.atomic_max(FLAG, tl.reduce(bad, 0, tl.standard._elementwise_max))


@triton.jit
def _rows_step_kernel(
    X, D, NORMS, RMS, ANGLE, TILES, INFO, HYPER, LR, SIZE, M, V, STEP, EPS,
    N_INFO: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    PASS_NORMS: tl.constexpr, PER_TENSOR: tl.constexpr, LR_TENSOR: tl.constexpr,
    HYPERBALL: tl.constexpr, PROJECT: tl.constexpr, MEASURE: tl.constexpr,
    ADAM: tl.constexpr, UPDATE: tl.constexpr, MAXIMIZE: tl.constexpr,
    STEP_TENSOR: tl.constexpr,
):  # fmt: skip
    """A step of :func:`spheretorch.optim.sphere_steps.sphere_step` on the spheres of X (rows
    or interleaved columns, radius r) along -D, in place; d_T = P_x d (``PROJECT``) or d.

    ``HYPERBALL=False`` (``rule="angular"``, ``PROJECT`` on): ``PASS_NORMS`` only writes
    NORMS[sphere] <- |d_T| (for the RMS over a tensor); else x <- r normalize(cos(theta) x -
    r sin(theta) d_T / |d_T|) with theta = lr (spheres whose d_T is zero stay) or,
    ``PER_TENSOR``, lr |d_T| / RMS[t]. ``HYPERBALL=True``: x <- r normalize(x - lr r d_T /
    |d_T|). normalize(y) = y / max(|y|, tiny) (``on_zero="keep"``).

    D lies like X (its element offsets). ``MEASURE``: ANGLE[t, s] <- (|y' - c x'|, c),
    c = <x', y'>, for the unit points x' = x / r before and y' after (the angle is their
    atan2, taken by the caller: :func:`spheretorch.optim.sphere_steps.step_angle`).

    ``ADAM`` (AdamH fused): d is Adam's direction up to scale from the moments
    (:func:`_direction`; ``UPDATE``: the moments updated on the way, in the first of the
    launches)."""
    t, info, rows, elem, rmask, mask = _tile(TILES, INFO, N_INFO, SIZE, BLOCK_R, BLOCK_N)
    cd = HYPER.dtype.element_ty
    radius = tl.load(HYPER + 5 + t)
    x_ptr = X + tl.load(info + 2) + elem
    x = tl.load(x_ptr, mask=mask, other=0.0).to(cd)
    d = _direction(D, M, V, STEP, HYPER, EPS, info, elem, mask, cd, ADAM, UPDATE, MAXIMIZE,
                   STEP_TENSOR)  # fmt: skip
    xh = x / radius
    dt = d - _sum(xh * d)[:, None] * xh if PROJECT else d
    n = tl.sqrt(_sum(dt * dt))
    if PASS_NORMS:
        tl.store(NORMS + tl.load(info + 4) + rows, n, mask=rmask)
    else:
        tiny = tl.load(HYPER + 3)  # the smallest normal number of the compute dtype
        lr = tl.load(HYPER)
        if LR_TENSOR:
            lr = tl.load(LR).to(cd)
        if HYPERBALL:
            # the unit direction first: lr * radius / max(n, tiny) overflows for
            # lr * radius >= 4, and a zero direction would give 0 * inf = NaN
            y = x - (dt / tl.maximum(n, tiny)[:, None]) * (lr * radius)
        else:
            if PER_TENSOR:
                theta = lr * n / tl.maximum(tl.load(RMS + t), tiny)
            else:
                theta = tl.where(n > 0, lr, 0.0)
            unit = dt / tl.maximum(n, tiny)[:, None]
            y = tl.cos(theta)[:, None] * x - (radius * tl.sin(theta))[:, None] * unit
        # rows past the end of a tensor (masked, all zero) divide by 1, not 0
        yh = y / tl.where(rmask, tl.maximum(tl.sqrt(_sum(y * y)), tiny), 1.0)[:, None]
        tl.store(x_ptr, (yh * radius).to(X.dtype.element_ty), mask=mask)
        if MEASURE:
            c = _sum(xh * yh)
            v = yh - c[:, None] * xh
            a_ptr = ANGLE + 2 * (t * tl.load(info) + rows)
            tl.store(a_ptr, tl.sqrt(_sum(v * v)), mask=rmask)
            tl.store(a_ptr + 1, c, mask=rmask)


@triton.jit
def _span(TILES, INFO, N_INFO: tl.constexpr, BLOCK: tl.constexpr):
    """Tensor index, first element, INFO row, flat element indices and mask of this program's
    ``BLOCK`` values of one whole tensor (INFO[0]: its number of values)."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(TILES + 2 * pid)
    start = tl.load(TILES + 2 * pid + 1)
    info = INFO + t * N_INFO
    idx = start + tl.arange(0, BLOCK).to(tl.int64)
    return pid, t, start, info, idx, idx < tl.load(info)


@triton.jit
def _whole_sums_kernel(
    X, D, PARTIALS, TILES, INFO, M, V, STEP, HYPER, EPS,
    N_INFO: tl.constexpr, BLOCK: tl.constexpr, HAS_D: tl.constexpr,
    ADAM: tl.constexpr, MAXIMIZE: tl.constexpr, STEP_TENSOR: tl.constexpr,
):  # fmt: skip
    """Pass 1 of a step (or renormalisation) of whole-tensor spheres: per program, over its
    ``BLOCK`` values, PARTIALS[pid] <- (sum x^2, sum x d, sum d^2) (``HAS_D=False``: the
    first only), in the compute dtype (PARTIALS' dtype). The caller sums them per tensor.
    ``ADAM``: d is AdamH's direction from the moments (:func:`_direction`), which this pass
    updates."""
    pid, _, _, info, idx, mask = _span(TILES, INFO, N_INFO, BLOCK)
    cd = PARTIALS.dtype.element_ty
    x = tl.load(X + tl.load(info + 2) + idx, mask=mask, other=0.0).to(cd)
    out = PARTIALS + 3 * pid
    tl.store(out, tl.reduce(x * x, 0, tl.standard._sum_combine))
    if HAS_D:
        d = _direction(D, M, V, STEP, HYPER, EPS, info, idx, mask, cd, ADAM, True, MAXIMIZE,
                       STEP_TENSOR)  # fmt: skip
        tl.store(out + 1, tl.reduce(x * d, 0, tl.standard._sum_combine))
        tl.store(out + 2, tl.reduce(d * d, 0, tl.standard._sum_combine))


@triton.jit
def _whole_step_kernel(
    X, D, SUMS, ANGLE, TILES, INFO, HYPER, LR, M, V, STEP, EPS,
    N_INFO: tl.constexpr, BLOCK: tl.constexpr, RENORM: tl.constexpr,
    HYPERBALL: tl.constexpr, PROJECT: tl.constexpr, LR_TENSOR: tl.constexpr,
    MEASURE: tl.constexpr, ADAM: tl.constexpr, STEP_TENSOR: tl.constexpr,
):  # fmt: skip
    """Pass 2: the step of :func:`spheretorch.optim.sphere_steps.sphere_step` (``whole=True``)
    from the sums of pass 1, SUMS[t] = (|x|^2, <x, d>, |d|^2), in place.

    ``RENORM``: x <- r x / max(|x|, tiny). Else, with x' = x / r (unit), P = |x'|^2,
    A = <x', d>, the tangent part d_T = d - a x' (a = A with ``PROJECT``, else 0) and
    n = |d_T|: the new point is r y / |y| with y = alpha x' + beta d,

    * angular (theta = lr, 0 where n = 0): y = cos(theta) x' - sin(theta) d_T / n, i.e.
      alpha = cos(theta) + sin(theta) a / n, beta = -sin(theta) / n;
    * hyperball: y = x' - lr d_T / n: alpha = 1 + lr a / n, beta = -lr / n.

    The norms come from the sums without another pass: with w = d - (A / P) x' (the part of
    d orthogonal to x', |w|^2 = |d|^2 - A^2 / P) and g = alpha + beta A / P (y = g x' + beta w),
    |y|^2 = g^2 P + beta^2 |w|^2 and n^2 = |w|^2 + (A (1 - P))^2 / P (``PROJECT``; else
    |d|^2). Exact in exact arithmetic; in floating point |w|^2 loses digits only when d is
    nearly radial (relative error ~ eps |d|^2 / |w|^2). ``MEASURE``: ANGLE[t] <- (s, c) with
    c = <x', y/|y|> = g P / |y| and s = |y/|y| - c x'| = sqrt(c^2 (1 - P)^2 / P
    + beta^2 |w|^2 / |y|^2) (the angle is atan2(s, c), taken by the caller), written by the
    tensor's first program."""
    _, t, start, info, idx, mask = _span(TILES, INFO, N_INFO, BLOCK)
    cd = HYPER.dtype.element_ty
    radius = tl.load(HYPER + 5 + t)
    tiny = tl.load(HYPER + 3)
    sxx = tl.load(SUMS + 3 * t)
    x_ptr = X + tl.load(info + 2) + idx
    x = tl.load(x_ptr, mask=mask, other=0.0).to(cd)
    if RENORM:
        y = x * (radius / tl.maximum(tl.sqrt(sxx), tiny))
    else:
        lr = tl.load(HYPER)
        if LR_TENSOR:
            lr = tl.load(LR).to(cd)
        p = tl.maximum(sxx / (radius * radius), tiny)
        a_full = tl.load(SUMS + 3 * t + 1) / radius
        w2 = tl.maximum(tl.load(SUMS + 3 * t + 2) - a_full * a_full / p, 0.0)
        if PROJECT:
            a = a_full
            off = a_full * (1 - p)
            n = tl.sqrt(w2 + off * off / p)
        else:
            a = a_full * 0.0
            n = tl.sqrt(tl.load(SUMS + 3 * t + 2))
        # beta = -k / n is never formed (it, and beta^2 |w|^2, overflow as n -> 0; a zero
        # direction would give 0 * inf = NaN): only ratios bounded by 1 times k
        inv_n = tl.where(n > 0, 1 / tl.maximum(n, tiny), 0.0)
        if HYPERBALL:
            k = lr
            alpha = 1 + lr * (a * inv_n)
        else:
            theta = tl.where(n > 0, lr, 0.0)
            k = tl.sin(theta)
            alpha = tl.cos(theta) + k * (a * inv_n)
        g = alpha - k * (a_full * inv_n) / p
        bw = k * (tl.sqrt(w2) * inv_n)  # |beta| |w|
        norm_y = tl.maximum(tl.sqrt(g * g * p + bw * bw), tiny)
        # (ADAM: the direction again, from the moments pass 1 stored)
        d = _direction(D, M, V, STEP, HYPER, EPS, info, idx, mask, cd, ADAM, False, False,
                       STEP_TENSOR)  # fmt: skip
        y = x * (alpha / norm_y) - (d * inv_n) * (radius * k / norm_y)
        if MEASURE:
            c = g * p / norm_y
            e = 1 - p
            s = tl.sqrt(c * c * e * e / p + bw * bw / (norm_y * norm_y))
            first = start == 0
            tl.store(ANGLE + 2 * t, s, mask=first)
            tl.store(ANGLE + 2 * t + 1, c, mask=first)
    tl.store(x_ptr, y.to(X.dtype.element_ty), mask=mask)
