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
    X, D, NORMS, RMS, TILES, INFO, HYPER, LR, SIZE,
    N_INFO: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    PASS_NORMS: tl.constexpr, PER_TENSOR: tl.constexpr, LR_TENSOR: tl.constexpr,
    HYPERBALL: tl.constexpr, PROJECT: tl.constexpr,
):  # fmt: skip
    """A step of :func:`spheretorch.optim.sphere_steps.sphere_step` on the rows of X (radius
    r) along -D, in place; d_T = P_x d (``PROJECT``) or d.

    ``HYPERBALL=False`` (``rule="angular"``, ``PROJECT`` on): ``PASS_NORMS`` only writes
    NORMS[row] <- |d_T| (for the RMS over a tensor); else x <- r normalize(cos(theta) x -
    r sin(theta) d_T / |d_T|) with theta = lr (rows whose d_T is zero stay) or,
    ``PER_TENSOR``, lr |d_T| / RMS[t]. ``HYPERBALL=True``: x <- r normalize(x - lr r d_T /
    |d_T|)."""
    t, info, rows, elem, rmask, mask = _tile(TILES, INFO, N_INFO, SIZE, BLOCK_R, BLOCK_N)
    cd = HYPER.dtype.element_ty
    radius = tl.load(HYPER + 5 + t)
    x_ptr = X + tl.load(info + 2) + elem
    x = tl.load(x_ptr, mask=mask, other=0.0).to(cd)
    d = tl.load(D + tl.load(info + 3) + elem, mask=mask, other=0.0).to(cd)
    if PROJECT:
        xh = x / radius
        dt = d - _sum(xh * d)[:, None] * xh
    else:
        dt = d
    n = tl.sqrt(_sum(dt * dt))
    if PASS_NORMS:
        tl.store(NORMS + tl.load(info + 4) + rows, n, mask=rmask)
    else:
        tiny = tl.load(HYPER + 3)  # the smallest normal number of the compute dtype
        lr = tl.load(HYPER)
        if LR_TENSOR:
            lr = tl.load(LR).to(cd)
        if HYPERBALL:
            y = x - dt * (lr * radius / tl.maximum(n, tiny))[:, None]
        else:
            if PER_TENSOR:
                theta = lr * n / tl.maximum(tl.load(RMS + t), tiny)
            else:
                theta = tl.where(n > 0, lr, 0.0)
            unit = dt / tl.maximum(n, tiny)[:, None]
            y = tl.cos(theta)[:, None] * x - (radius * tl.sin(theta))[:, None] * unit
        # rows past the end of a tensor (masked, all zero) divide by 1, not 0
        y = y / tl.where(rmask, tl.sqrt(_sum(y * y)), 1.0)[:, None] * radius
        tl.store(x_ptr, y.to(X.dtype.element_ty), mask=mask)
