r"""Geometry of the unit hypersphere :math:`S^{d-1} = \{x \in \mathbb{R}^d : \|x\| = 1\}`.

Every function works on tensors of any shape; ``dim`` selects the axis that holds the
:math:`d` coordinates of each point, all other axes are batch axes. Points are assumed to be
unit vectors along ``dim`` (use :func:`normalize` to put them there); tangent vectors at ``x``
satisfy :math:`\langle x, u \rangle = 0`.

Numerical policy
----------------
* Angles come from ``atan2(||sin part||, cos part)``, never ``acos`` of a clamped dot product,
  so they are accurate near 0 and near :math:`\pi` and have finite gradients everywhere.
* Functions with a removable singularity (:math:`\sin\theta/\theta`, :math:`\theta/\sin\theta`)
  switch to their Taylor series below a dtype-dependent threshold, inside ``torch.where`` with
  sanitised inputs so that neither branch produces a NaN gradient.
* Reductions (norms, inner products) and angle functions are computed in float32 for
  float16/bfloat16 inputs; results are cast back to the input dtype.
* Antipodal pairs (:math:`y = -x`) have no unique geodesic. The deterministic choice used by
  :func:`logmap`, :func:`transport` and :mod:`spheretorch.geodesic` is the tangent direction
  :func:`antipodal_direction`: the basis vector :math:`e_j` with the smallest :math:`|x_j|`
  (first such index), projected onto the tangent space and normalised.

This module is the small manifold interface the optimizers use: :func:`project`,
:func:`retract`, :func:`expmap` and :func:`transport`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "angle",
    "antipodal_direction",
    "check_sphere_dim",
    "compute_dtype",
    "dist",
    "expmap",
    "inner",
    "logmap",
    "norm",
    "normalize",
    "project",
    "random",
    "retract",
    "sinc",
    "transport",
    "unit",
]

ZeroPolicy = Literal["raise", "fixed", "keep"]
_LOW_PRECISION = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- validation


def check_floating(x: Tensor, name: str) -> None:
    """Raise ``TypeError`` unless ``x`` is a floating-point tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must have a floating-point dtype (float16, bfloat16, float32, float64), "
            f"got {x.dtype}"
        )


def check_sphere_dim(x: Tensor, dim: int, name: str = "dim") -> int:
    """Return ``dim`` as a non-negative axis of ``x`` or raise a ``ValueError`` naming it."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{name} must be an int, got {type(dim).__name__}")
    if x.dim() == 0:
        raise ValueError(
            f"a point on the sphere needs at least one axis; got a 0-d tensor ({name})"
        )
    if not -x.dim() <= dim < x.dim():
        raise ValueError(
            f"{name}={dim} is out of range for a tensor of shape {tuple(x.shape)} "
            f"(expected -{x.dim()} <= {name} < {x.dim()})"
        )
    return dim % x.dim()


def check_same_shape(a: Tensor, b: Tensor, names: str) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` have the same shape."""
    if a.shape != b.shape:
        raise ValueError(
            f"{names} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions are accumulated in: float32 for half/bfloat16, else ``dtype``."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _up(x: Tensor) -> Tensor:
    return x.to(compute_dtype(x.dtype))


def _is_tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


# ----------------------------------------------------------------------------- primitives


def inner(x: Tensor, y: Tensor, dim: int = -1, keepdim: bool = True) -> Tensor:
    r""":math:`\langle x, y \rangle` summed along ``dim``, in the compute dtype."""
    return (_up(x) * _up(y)).sum(dim=dim, keepdim=keepdim)


def norm(x: Tensor, dim: int = -1, keepdim: bool = True) -> Tensor:
    r""":math:`\|x\|_2` along ``dim``, accumulated in the compute dtype (float32 for half types)."""
    return torch.linalg.vector_norm(x, dim=dim, keepdim=keepdim, dtype=compute_dtype(x.dtype))


def _scaled_norm(x: Tensor, dim: int) -> Tensor:
    r""":func:`norm` (keepdim) computed as :math:`m \|x / m\|`, :math:`m = \max |x_i|`.

    Exact where the plain sum of squares underflows or overflows the compute dtype (float32:
    norms below ~1e-19 or above ~1e19); twice the work, so only used on the slow path.
    """
    xu = _up(x)
    m = xu.abs().amax(dim=dim, keepdim=True)
    m = torch.where((m == 0) | ~torch.isfinite(m), torch.ones_like(m), m)
    return m * torch.linalg.vector_norm(xu / m, dim=dim, keepdim=True)


def _bad_norm(n: Tensor) -> Tensor:
    return (n == 0) | ~torch.isfinite(n)


def _checked_norm(x: Tensor, n: Tensor, dim: int) -> Tensor:
    """Return ``n`` (the norms of ``x`` along ``dim``), or raise naming the first bad slice.

    One host sync when all is well; when a norm is 0 or non-finite, they are recomputed with
    :func:`_scaled_norm` so that a sum of squares that merely under- or overflowed is rescued
    and only a true zero, NaN or inf raises.
    """
    if not bool(_bad_norm(n).any()):
        return n
    n = _scaled_norm(x, dim)
    bad = _bad_norm(n)
    if not bool(bad.any()):
        return n
    first = tuple(int(i) for i in bad.nonzero()[0])
    idx = (*first[:dim], slice(None), *first[dim + 1 :])
    shown = ", ".join(":" if isinstance(i, slice) else str(i) for i in idx)
    if bool(n[first] == 0):
        what = "zero norm (pass on_zero='fixed' to map zero slices to a fixed point)"
    else:
        what = "non-finite values (NaN or inf)"
    raise ValueError(
        f"cannot normalize a tensor of shape {tuple(x.shape)} along dim={dim}: "
        f"the slice x[{shown}] has {what}"
    )


def _series_threshold(dtype: torch.dtype) -> float:
    # Below this the Taylor series used are exact to the last ulp (sinc: truncation z^8 / 9!)
    # while the closed forms' derivatives would lose digits to cancellation.
    return 1e-2 if dtype == torch.float64 else 0.25


def sinc(theta: Tensor) -> Tensor:
    r"""Unnormalised sinc :math:`\sin\theta / \theta` with :math:`\mathrm{sinc}(0) = 1`.

    Smooth (all derivatives exact) at 0: the series
    :math:`1 - \theta^2/6 + \theta^4/120 - \theta^6/5040` is used for small :math:`|\theta|`.
    """
    small = theta.abs() < _series_threshold(theta.dtype)
    safe = torch.where(small, torch.ones_like(theta), theta)
    t2 = theta * theta
    series = 1 - t2 / 6 * (1 - t2 / 20 * (1 - t2 / 42))
    return torch.where(small, series, torch.sin(safe) / safe)


def _sqrt0(z2: Tensor) -> Tensor:
    r""":math:`\sqrt{z_2}` for :math:`z_2 \ge 0` with a finite (zero) gradient at 0."""
    pos = z2 > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, z2, torch.ones_like(z2))), 0.0)


def _cos_sinc_sq(n2: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(cos(n), sinc(n))`` for :math:`n = \sqrt{n_2}`, from the squared norm :math:`n_2`.

    Below the series threshold both are polynomials in :math:`n_2 = \|u\|^2`, so they are
    smooth to every order in the vector :math:`u` at :math:`u = 0` (going through
    :math:`\|u\|` gives exact first but wrong second derivatives there). Truncation errors:
    :math:`n^{10}/10!` and :math:`n^8/9!`, below the last ulp.
    """
    thr = _series_threshold(n2.dtype)
    small = n2 < thr * thr
    n = torch.sqrt(torch.where(small, torch.ones_like(n2), n2))
    cos_series = 1 - n2 / 2 * (1 - n2 / 12 * (1 - n2 / 30 * (1 - n2 / 56)))
    sinc_series = 1 - n2 / 6 * (1 - n2 / 20 * (1 - n2 / 42))
    return (
        torch.where(small, cos_series, torch.cos(n)),
        torch.where(small, sinc_series, torch.sin(n) / n),
    )


def _atanc_sq(z2: Tensor) -> Tensor:
    r""":math:`\arctan(z)/z` for :math:`z = \sqrt{z_2}`, 1 at 0, a polynomial in :math:`z_2`
    below the threshold (smooth to every order at 0).

    The coefficients of this series decay only like :math:`1/(2k+1)`, so it needs six terms
    (truncation :math:`z^{12}/13`) to be exact to the last ulp below the threshold; four terms
    left a relative error of 1.5e-6 at :math:`z = 0.25` in float32.
    """
    thr = _series_threshold(z2.dtype)
    small = z2 < thr * thr
    z = torch.sqrt(torch.where(small, torch.ones_like(z2), z2))
    series = 1 - z2 * (1 / 3 - z2 * (1 / 5 - z2 * (1 / 7 - z2 * (1 / 9 - z2 / 11))))
    return torch.where(small, series, torch.atan(z) / z)


def _unit_basis(x: Tensor, dim: int) -> Tensor:
    """The fixed point e_0 along ``dim`` (first coordinate 1), broadcast to ``x``'s shape."""
    e = torch.zeros_like(x)
    e.narrow(dim, 0, 1).fill_(1)
    return e


# ----------------------------------------------------------------------------- normalize


def normalize(
    x: Tensor,
    dim: int = -1,
    *,
    on_zero: ZeroPolicy = "raise",
) -> Tensor:
    r"""Project onto the sphere: :math:`x / \|x\|` along ``dim``.

    Args:
        x: tensor of any shape ``(..., d, ...)``, floating point.
        dim: the sphere axis.
        on_zero: what to do with a slice of norm 0 (or a non-finite slice):

            * ``"raise"`` (default): raise ``ValueError`` naming the first bad slice. Costs one
              host synchronisation; skipped while compiling/tracing. Slices whose sum of
              squares underflows or overflows the compute dtype (float32: norm below ~1e-19 or
              above ~1e19) are detected on the same check and normalised with a rescaled norm.
            * ``"fixed"``: zero slices become the fixed point :math:`e_0` (first coordinate 1).
            * ``"keep"``: zero slices stay zero (:math:`x / \max(\|x\|, \text{tiny})`), no
              check at all. This is the hot-path choice inside models.

            ``"fixed"`` and ``"keep"`` never synchronise and do not rescale: a slice whose
            norm underflows the compute dtype counts as zero there.

    Returns:
        Tensor of the same shape and dtype with unit norm along ``dim``. The norm is computed in
        float32 for float16/bfloat16 input.
    """
    check_floating(x, "x")
    dim = check_sphere_dim(x, dim)
    n = norm(x, dim)
    if on_zero == "raise":
        if not _is_tracing():
            n = _checked_norm(x, n, dim)
        return (_up(x) / n).to(x.dtype)
    if on_zero == "fixed":
        zero = n == 0
        out = _up(x) / torch.where(zero, torch.ones_like(n), n)
        return torch.where(zero, _unit_basis(out, dim), out).to(x.dtype)
    if on_zero == "keep":
        return (_up(x) / n.clamp_min(torch.finfo(n.dtype).tiny)).to(x.dtype)
    raise ValueError(f"on_zero must be 'raise', 'fixed' or 'keep', got {on_zero!r}")


# ----------------------------------------------------------------------------- tangent space


def project(x: Tensor, u: Tensor, dim: int = -1) -> Tensor:
    r"""Orthogonal projection of ``u`` onto the tangent space at ``x``:
    :math:`P_x u = u - \langle x, u \rangle x`.

    Shapes: ``x`` and ``u`` broadcast; the result has ``u``'s dtype. This is also the
    Riemannian gradient of a function whose Euclidean gradient is ``u`` (egrad2rgrad).
    """
    check_floating(x, "x")
    check_floating(u, "u")
    dim = check_sphere_dim(x, dim)
    xu = _up(x)
    return (_up(u) - inner(xu, u, dim) * xu).to(u.dtype)


def retract(x: Tensor, u: Tensor, dim: int = -1) -> Tensor:
    r"""Projective retraction :math:`R_x(u) = (x + u) / \|x + u\|`.

    A second-order retraction: :math:`\|R_x(tu) - \exp_x(tu)\| = O(t^3)`. For a tangent ``u``
    the norm of ``x + u`` is at least 1, so no zero check is needed.
    """
    check_floating(x, "x")
    check_floating(u, "u")
    dim = check_sphere_dim(x, dim)
    return normalize(_up(x) + _up(u), dim, on_zero="keep").to(x.dtype)


def expmap(x: Tensor, u: Tensor, dim: int = -1) -> Tensor:
    r"""Exponential map :math:`\exp_x(u) = \cos(\|u\|)\,x + \mathrm{sinc}(\|u\|)\,u`.

    ``u`` must be tangent at ``x``. Exact for any step length (wraps around the sphere for
    :math:`\|u\| > \pi`); the result is re-normalised to stop drift under repeated use.
    """
    check_floating(x, "x")
    check_floating(u, "u")
    dim = check_sphere_dim(x, dim)
    xu, uu = _up(x), _up(u)
    cos_n, sinc_n = _cos_sinc_sq(inner(uu, uu, dim))
    y = cos_n * xu + sinc_n * uu
    return normalize(y, dim, on_zero="keep").to(x.dtype)


def _angle_parts(x: Tensor, y: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(c, v, s2, s, theta)``: cos part, sin part ``y - c x``, its squared norm, its norm
    (zero gradient at 0) and the angle, all in ``x``'s (compute) dtype."""
    c = inner(x, y, dim)
    v = y - c * x
    s2 = inner(v, v, dim)
    s = _sqrt0(s2)
    return c, v, s2, s, torch.atan2(s, c)


def angle(x: Tensor, y: Tensor, dim: int = -1) -> Tensor:
    r"""Angle between unit vectors, in :math:`[0, \pi]`, with ``dim`` kept as size 1:

    .. math:: \theta = \operatorname{atan2}(\|y - \langle x,y\rangle x\|, \langle x,y\rangle)
    """
    check_floating(x, "x")
    check_floating(y, "y")
    dim = check_sphere_dim(x, dim)
    return _angle_parts(_up(x), _up(y), dim)[4].to(x.dtype)


def antipodal_direction(x: Tensor, dim: int = -1) -> Tensor:
    r"""Deterministic unit tangent direction at ``x`` used when the geodesic is ambiguous.

    :math:`w = e_j - x_j x` with :math:`j = \arg\min_i |x_i|` (first index on ties), normalised.
    For :math:`d \ge 2`, :math:`\|w\|^2 = 1 - x_j^2 \ge 1 - 1/d > 0`.
    """
    dim = check_sphere_dim(x, dim)
    xu = _up(x)
    j = xu.abs().argmin(dim=dim, keepdim=True)
    xj = xu.gather(dim, j)
    e = torch.zeros_like(xu).scatter_(dim, j, 1.0)
    w = e - xj * xu
    return (w / norm(w, dim).clamp_min(torch.finfo(xu.dtype).tiny)).to(x.dtype)


def geodesic_frame(x: Tensor, y: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    r"""Shared core of :func:`logmap` and SLERP: ``(theta, log_x(y))`` in the compute dtype.

    With :math:`c = \langle x, y\rangle`, :math:`v = y - c x`, :math:`s = \|v\|`:

    * near side (:math:`c > s`, i.e. :math:`\theta < \pi/4`): :math:`\log_x y = (\theta / s) v`
      with :math:`\theta / s = \operatorname{atanc}(s/c)/c`, a function of :math:`s^2/c^2`
      that is smooth to every order through :math:`\theta = 0` (and :math:`s/c \le 1` cannot
      overflow, as it could for a tiny or subnormal :math:`c`);
    * far side (:math:`c \le s`): :math:`\theta\, v / s`, and :math:`\theta` times
      :func:`antipodal_direction` when :math:`s` is at rounding level (``y == -x``).

    ``theta`` keeps ``dim`` as size 1. Both branches see sanitised inputs, so gradients are
    finite everywhere.
    """
    xu, yu = _up(x), _up(y)
    c, v, s2, s, theta = _angle_parts(xu, yu, dim)
    near = c > s
    one = torch.ones_like(c)
    c_safe = torch.where(near, c, one)
    near_log = (_atanc_sq(s2 / (c_safe * c_safe)) / c_safe) * v
    tiny = s <= 16 * torch.finfo(s.dtype).eps
    s_safe = torch.where(near | tiny, one, s)
    u_far = torch.where(tiny, antipodal_direction(xu, dim), v / s_safe)
    return theta, torch.where(near, near_log, theta * u_far)


def logmap(x: Tensor, y: Tensor, dim: int = -1) -> Tensor:
    r"""Logarithmic map :math:`\log_x(y) = \theta v / \|v\|`, :math:`v = y - \langle x,y\rangle x`.

    The inverse of :func:`expmap` for :math:`\theta < \pi`; :math:`\|\log_x y\| = d(x, y)`.
    Near :math:`\theta = 0` the factor :math:`\theta/\|v\|` comes from a series, so the map and
    its gradient are smooth at ``x == y``. At ``y == -x`` it returns
    :math:`\pi \cdot` :func:`antipodal_direction`.
    """
    check_floating(x, "x")
    check_floating(y, "y")
    dim = check_sphere_dim(x, dim)
    check_same_shape(x, y, "x and y")
    return geodesic_frame(x, y, dim)[1].to(y.dtype)


def dist(x: Tensor, y: Tensor, dim: int = -1, keepdim: bool = False) -> Tensor:
    r"""Geodesic distance :math:`d(x, y) = \theta \in [0, \pi]` (the angle), ``dim`` reduced."""
    theta = angle(x, y, dim)
    return theta if keepdim else theta.squeeze(check_sphere_dim(x, dim))


def transport(x: Tensor, y: Tensor, v: Tensor, dim: int = -1) -> Tensor:
    r"""Parallel transport of the tangent vector ``v`` from ``x`` to ``y`` along the geodesic.

    .. math:: \Gamma_{x\to y}(v) = v - \frac{\langle y, v\rangle}{1 + \langle x, y\rangle}(x + y)
        = v - \frac{2\langle y, v\rangle}{\|x + y\|^2}(x + y)

    exact for unit ``x, y`` that are not antipodal (identity at ``x == y``). The second form is
    the one evaluated: near :math:`y = -x`, :math:`1 + \langle x, y\rangle` loses all its
    digits to cancellation (error :math:`\epsilon/\delta^2` at a gap :math:`\delta` from
    :math:`\pi`) while :math:`\|x + y\|^2` keeps them (error :math:`\epsilon/\delta`), and it
    is also well conditioned off the sphere. For antipodal pairs (:math:`\|x + y\|` at
    rounding level, the same test :func:`logmap` uses) it transports along the geodesic in the
    :func:`antipodal_direction` :math:`w`: :math:`v - 2\langle w, v\rangle w`. Preserves
    inner products between tangent vectors.
    """
    check_floating(x, "x")
    check_floating(y, "y")
    check_floating(v, "v")
    dim = check_sphere_dim(x, dim)
    xu, yu, vu = _up(x), _up(y), _up(v)
    xy = xu + yu
    m2 = inner(xy, xy, dim)
    anti = m2 <= (16 * torch.finfo(m2.dtype).eps) ** 2
    safe = torch.where(anti, torch.ones_like(m2), m2)
    regular = vu - (2 * inner(yu, vu, dim) / safe) * xy
    w = antipodal_direction(xu, dim)
    flipped = vu - 2 * inner(w, vu, dim) * w
    return torch.where(anti, flipped, regular).to(v.dtype)


def random(
    *shape: int,
    dim: int = -1,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Points drawn uniformly from the sphere along ``dim``: normalised standard Gaussians."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    if dtype is not None and not dtype.is_floating_point:
        # Checked before sampling: torch.randn's own error for an integer dtype is obscure.
        raise TypeError(
            f"random() needs a floating-point dtype (float16, bfloat16, float32, float64), "
            f"got {dtype}"
        )
    x = torch.randn(*shape, dtype=dtype, device=device, generator=generator)
    return normalize(x, dim, on_zero="fixed")


# ----------------------------------------------------------------------------- hot-path unit


class _Unit(torch.autograd.Function):
    r"""``y = x / ||x||`` (last axis) with a hand-written backward.

    Autograd through ``x / x.norm()`` runs about six full-size kernels backwards; the closed
    form :math:`\partial L/\partial x = (g - y \langle g, y\rangle) / \|x\|` needs three.
    Computed in fp32 for half inputs (chained normalizations compound bf16 error); an opaque
    Function also keeps ``torch.compile`` from re-fusing it in low precision.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        tiny = torch.finfo(xf.dtype).tiny
        r = torch.rsqrt((xf * xf).sum(-1, keepdim=True).clamp_min(tiny))
        y = xf * r
        ctx.save_for_backward(y, r)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        y, r = ctx.saved_tensors
        gf = g.to(y.dtype)
        return ((gf - y * (gf * y).sum(-1, keepdim=True)) * r).to(g.dtype)


def unit(x: Tensor) -> Tensor:
    """``x / ||x||`` along the last axis: the same values as
    ``spheretorch.sphere.normalize(x, -1, on_zero="keep")`` (fp32 norms for half inputs, zero
    rows stay zero), with a cheaper fused backward."""
    return _Unit.apply(x)
