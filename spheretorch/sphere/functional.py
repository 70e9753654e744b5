r"""Geometry of the unit hypersphere :math:`S^{d-1} = \{x \in \mathbb{R}^d : \|x\| = 1\}`.

Every function takes tensors of any shape; ``dim`` selects the axis holding the :math:`d`
coordinates of each point, the other axes are batch axes. ``dim`` may also be a tuple of
adjacent axes (flattened into one sphere per index of the other axes, e.g. ``(1, 2, 3)`` puts
each output filter of a conv weight on one sphere) or ``None`` (the whole tensor is one point:
the Frobenius sphere), through :func:`.layout.sphere_layout`'s one ``(outer, size, inner)``
view. ``radius`` (keyword, default 1) makes the sphere :math:`\{\|x\| = r\}`: points,
tangent vectors and distances scale with :math:`r`, angles do not. Points are unit vectors along
``dim`` (:func:`.normalize` puts them there; pass ``check=True`` to the functions of two
points to have that verified); tangent vectors at ``x`` satisfy :math:`\langle x, u\rangle = 0`.
Angles come from ``atan2``, removable singularities from series, half types are computed in
float32, and antipodal pairs use :func:`.antipodal_direction` (details: docs/geometry.md).
"""

from __future__ import annotations

import operator
from typing import Literal

import torch
from torch import Tensor

from .checks import (
    check_floating,
    check_same_shape,
    check_sphere_dim,
    check_sphere_dims,
    compute_dtype,
)
from .checks import upcast as _up
from .layout import sphere_layout
from .series import atanc_sq, cos_sinc_sq, sinc, sqrt0
from .unit import unit

__all__ = [
    "angle",
    "antipodal_direction",
    "check_radius",
    "check_unit",
    "dist",
    "expmap",
    "geodesic_frame",
    "inner",
    "logmap",
    "norm",
    "normalize",
    "project",
    "random",
    "retract",
    "transport",
    "unit_atol",
]

ZeroPolicy = Literal["raise", "fixed", "keep"]
#: sphere axes: one axis, a tuple of adjacent axes, or None (the whole tensor)
Dims = int | tuple[int, ...] | None


def _is_tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


# ----------------------------------------------------------------------------- sphere axes


def _flat(axes: tuple[int, ...], *ts: Tensor) -> tuple[list[Tensor], torch.Size]:
    """``ts`` broadcast together and seen as ``(outer, size, inner)`` (sphere axis 1), with the
    broadcast shape: how every function handles a tuple of axes (``None`` = all axes)."""
    if len(ts) > 1:
        ts = tuple(torch.broadcast_tensors(*ts))
    shape = ts[0].shape
    lay = sphere_layout(shape, axes)
    return [t.reshape(lay.outer, lay.size, lay.inner) for t in ts], shape


def _reduced(shape: torch.Size, axes: tuple[int, ...], keepdim: bool) -> tuple[int, ...]:
    """``shape`` with the sphere ``axes`` reduced (kept as size 1 with ``keepdim``)."""
    if keepdim:
        return tuple(1 if i in axes else n for i, n in enumerate(shape))
    return tuple(n for i, n in enumerate(shape) if i not in axes)


def check_radius(radius: float, name: str = "radius") -> float:
    """``radius`` as a positive finite float, or a one-line ``ValueError`` naming it."""
    if isinstance(radius, bool) or not isinstance(radius, (int, float)):
        raise TypeError(f"{name} must be a positive float, got {type(radius).__name__}")
    r = float(radius)
    if not (r > 0 and r < float("inf")):
        raise ValueError(f"{name} must be a positive finite float, got {radius!r}")
    return r


# ----------------------------------------------------------------------------- primitives


def inner(x: Tensor, y: Tensor, dim: Dims = -1, keepdim: bool = True) -> Tensor:
    r""":math:`\langle x, y \rangle` summed along ``dim``, in the compute dtype."""
    if dim is None or isinstance(dim, (tuple, list)):
        dim = check_sphere_dims(torch.broadcast_tensors(x, y)[0], dim)
    return (_up(x) * _up(y)).sum(dim=dim, keepdim=keepdim)


def norm(x: Tensor, dim: Dims = -1, keepdim: bool = True) -> Tensor:
    r""":math:`\|x\|_2` along ``dim``, accumulated in the compute dtype (float32 for half types)."""
    if dim is None or isinstance(dim, (tuple, list)):
        dim = check_sphere_dims(x, dim)
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


#: largest accepted | ||x|| - 1 | for ``check=True``: a few hundred ulp of the storage dtype
_UNIT_ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def unit_atol(dtype: torch.dtype) -> float:
    """The default tolerance of :func:`check_unit` for points stored in ``dtype``."""
    return _UNIT_ATOL.get(dtype, 1e-5)


def check_unit(
    x: Tensor, dim: Dims = -1, name: str = "x", atol: float | None = None, *, radius: float = 1.0
) -> None:
    """Raise a one-line ``ValueError`` naming the first slice of ``x`` along ``dim`` whose norm
    is not ``radius`` within ``atol * radius`` (default :func:`unit_atol`). One host sync."""
    axes = check_sphere_dims(x, dim)
    r = check_radius(radius)
    if isinstance(axes, tuple) or r != 1.0:
        tol = unit_atol(x.dtype) if atol is None else atol
        off = float((norm(x, axes) / r - 1).abs().amax())
        if not off <= tol:
            raise ValueError(
                f"{name} must lie on the sphere of radius {r:g} along dim={axes}: its norm is "
                f"off by a factor {off:.3g} (tolerance {tol:g}; normalize it first)"
            )
        return
    dim = axes
    tol = unit_atol(x.dtype) if atol is None else atol
    off = (norm(x, dim) - 1).abs()
    bad = ~(off <= tol)  # NaN counts as bad
    if not bool(bad.any()):
        return
    first = tuple(int(i) for i in bad.nonzero()[0])
    shown = ", ".join(":" if k == dim else str(i) for k, i in enumerate(first))
    raise ValueError(
        f"{name} must be unit vectors along dim={dim}: {name}[{shown}] has norm "
        f"{float(norm(x, dim)[first]):.6g} (tolerance {tol:g}; normalize it first)"
    )


def _check_points(check: bool, dim: Dims, radius: float = 1.0, **points: Tensor) -> None:
    if check:
        for name, x in points.items():
            check_unit(x, dim, name, radius=radius)


def _unit_basis(x: Tensor, dim: int) -> Tensor:
    """The fixed point e_0 along ``dim`` (first coordinate 1), broadcast to ``x``'s shape."""
    e = torch.zeros_like(x)
    e.narrow(dim, 0, 1).fill_(1)
    return e


# ----------------------------------------------------------------------------- normalize


def normalize(
    x: Tensor,
    dim: Dims = -1,
    *,
    on_zero: ZeroPolicy = "raise",
    radius: float = 1.0,
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

        radius: the norm of the result (a sphere of radius :math:`r`: :math:`r x / \|x\|`).

    Returns:
        Tensor of the same shape and dtype with norm ``radius`` along ``dim``. The norm is
        computed in float32 for float16/bfloat16 input.
    """
    check_floating(x, "x")
    axes = check_sphere_dims(x, dim)
    r = check_radius(radius)
    if isinstance(axes, tuple):
        (xv,), shape = _flat(axes, x)
        return normalize(xv, 1, on_zero=on_zero, radius=r).reshape(shape)
    if r != 1.0:
        return (_up(normalize(x, axes, on_zero=on_zero)) * r).to(x.dtype)
    dim = axes
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


def project(x: Tensor, u: Tensor, dim: Dims = -1, *, radius: float = 1.0) -> Tensor:
    r"""Orthogonal projection of ``u`` onto the tangent space at ``x``:
    :math:`P_x u = u - \langle x, u \rangle x / r^2` (:math:`r` = ``radius``).

    Shapes: ``x`` and ``u`` broadcast; the result has ``u``'s dtype. This is also the
    Riemannian gradient of a function whose Euclidean gradient is ``u`` (egrad2rgrad).
    """
    check_floating(x, "x")
    check_floating(u, "u")
    axes = check_sphere_dims(x, dim)
    r = check_radius(radius)
    if isinstance(axes, tuple):
        (xv, uv), shape = _flat(axes, x, u)
        return project(xv, uv, 1, radius=r).reshape(shape)
    if r != 1.0:
        return project(_up(x) / r, u, axes)
    dim = axes
    xu = _up(x)
    return (_up(u) - inner(xu, u, dim) * xu).to(u.dtype)


def retract(x: Tensor, u: Tensor, dim: Dims = -1, *, radius: float = 1.0) -> Tensor:
    r"""Projective retraction :math:`R_x(u) = r (x + u) / \|x + u\|` (:math:`r` = ``radius``).

    A second-order retraction: :math:`\|R_x(tu) - \exp_x(tu)\| = O(t^3)`. For a tangent ``u``
    the norm of ``x + u`` is at least :math:`r`, so no zero check is needed.
    """
    check_floating(x, "x")
    check_floating(u, "u")
    axes = check_sphere_dims(x, dim)
    r = check_radius(radius)
    if isinstance(axes, tuple):
        (xv, uv), shape = _flat(axes, x, u)
        return retract(xv, uv, 1, radius=r).reshape(shape)
    if r != 1.0:
        return normalize(_up(x) + _up(u), axes, on_zero="keep", radius=r).to(x.dtype)
    dim = axes
    return normalize(_up(x) + _up(u), dim, on_zero="keep").to(x.dtype)


def expmap(
    x: Tensor,
    u: Tensor,
    dim: Dims = -1,
    *,
    check: bool = False,
    norm_u: Tensor | None = None,
    radius: float = 1.0,
) -> Tensor:
    r"""Exponential map :math:`\exp_x(u) = \cos(\|u\|)\,x + \mathrm{sinc}(\|u\|)\,u`.

    ``u`` must be tangent at ``x``. Exact for any step length (wraps around the sphere for
    :math:`\|u\| > \pi`); the result is re-normalised to stop drift under repeated use
    (with :func:`.unit`'s fused backward when ``dim`` is the last axis).
    ``check=True`` verifies that ``x`` is unit (:func:`check_unit`).

    ``norm_u``: :math:`\|u\|` along ``dim`` (kept as size 1) when the caller already knows
    it, e.g. a step of a known angle :math:`\theta` along a tangent :math:`v`,
    ``u = (theta / |v|) v``. Skips the reduction and evaluates ``cos``/``sinc`` of it directly;
    its sign does not matter (both are even). It must equal :math:`\|u\|` *as a function of
    the inputs* (computed from them, not detached) for the gradients to be those of
    :math:`\exp_x(u)`; it is not checked.

    On the sphere of radius :math:`r`: :math:`\exp_x(u) = r \exp_{x/r}(u/r)` (the angle
    turned is :math:`\|u\|/r`). With a tuple of axes or ``None``, ``norm_u`` has those axes
    kept as size 1.
    """
    check_floating(x, "x")
    check_floating(u, "u")
    axes = check_sphere_dims(x, dim, min_size=2)
    r = check_radius(radius)
    if isinstance(axes, tuple):
        _check_points(check, axes, x=x, radius=r)
        if norm_u is None:
            (xv, uv), shape = _flat(axes, x, u)
            return expmap(xv, uv, 1, radius=r).reshape(shape)
        (xv, uv, nv), shape = _flat(axes, x, u, norm_u)
        nv = nv[:, :1]  # broadcast back to one value per sphere
        return expmap(xv, uv, 1, norm_u=nv, radius=r).reshape(shape)
    if r != 1.0:
        _check_points(check, axes, x=x, radius=r)
        n = None if norm_u is None else _up(norm_u) / r
        y = expmap(_up(x) / r, _up(u) / r, axes, norm_u=n)
        return (y * r).to(x.dtype)
    dim = axes
    _check_points(check, dim, x=x)
    xu, uu = _up(x), _up(u)
    if norm_u is None:
        cos_n, sinc_n = cos_sinc_sq(inner(uu, uu, dim))
    else:
        n = _up(norm_u)
        cos_n, sinc_n = torch.cos(n), sinc(n)
    y = cos_n * xu + sinc_n * uu
    if dim == x.dim() - 1:
        return unit(y).to(x.dtype)
    return normalize(y, dim, on_zero="keep").to(x.dtype)


def _angle_parts(x: Tensor, y: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(c, v, s2, s, theta)``: cos part, sin part ``y - c x``, its squared norm, its norm
    (zero gradient at 0) and the angle, all in ``x``'s (compute) dtype."""
    c = inner(x, y, dim)
    v = y - c * x
    s2 = inner(v, v, dim)
    s = sqrt0(s2)
    return c, v, s2, s, torch.atan2(s, c)


def angle(
    x: Tensor, y: Tensor, dim: Dims = -1, *, check: bool = False, radius: float = 1.0
) -> Tensor:
    r"""Angle between unit vectors, in :math:`[0, \pi]`, with ``dim`` kept as size 1:

    .. math:: \theta = \mathrm{atan2}(\|y - \langle x,y\rangle x\|, \langle x,y\rangle)

    Defined for unit ``x`` and ``y`` only (for others it is not the angle between their
    directions); ``check=True`` raises ``ValueError`` on non-unit input (:func:`check_unit`).
    On a sphere of radius :math:`r` (``radius``), the angle between :math:`x/r` and :math:`y/r`.
    """
    check_floating(x, "x")
    check_floating(y, "y")
    axes = check_sphere_dims(x, dim)
    r = check_radius(radius)
    if isinstance(axes, tuple):
        _check_points(check, axes, radius=r, x=x, y=y)
        (xv, yv), shape = _flat(axes, x, y)
        return angle(xv, yv, 1, radius=r).reshape(_reduced(shape, axes, True))
    if r != 1.0:
        _check_points(check, axes, radius=r, x=x, y=y)
        return angle(_up(x) / r, _up(y) / r, axes).to(x.dtype)
    dim = axes
    _check_points(check, dim, x=x, y=y)
    return _angle_parts(_up(x), _up(y), dim)[4].to(x.dtype)


def antipodal_direction(x: Tensor, dim: int = -1) -> Tensor:
    r"""Deterministic unit tangent direction at ``x`` used when the geodesic is ambiguous.

    :math:`w = e_j - x_j x` with :math:`j = \arg\min_i |x_i|` (first index on ties), normalised.
    For :math:`d \ge 2`, :math:`\|w\|^2 = 1 - x_j^2 \ge 1 - 1/d > 0`.
    """
    dim = check_sphere_dim(x, dim, min_size=2)
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
      :func:`antipodal_direction` when :math:`s` is at rounding level (``y == -x``); there
      :math:`\theta` depends on the inputs through :math:`c` only (the direction of :math:`v`
      is round-off, so its gradient through :math:`s` would be too: a deterministic choice).

    ``theta`` keeps ``dim`` as size 1. Both branches see sanitised inputs, so gradients are
    finite everywhere.
    """
    xu, yu = _up(x), _up(y)
    c, v, s2, s, theta = _angle_parts(xu, yu, dim)
    near = c > s
    one = torch.ones_like(c)
    c_safe = torch.where(near, c, one)
    near_log = (atanc_sq(s2 / (c_safe * c_safe)) / c_safe) * v
    tiny = s <= 16 * torch.finfo(s.dtype).eps
    s_safe = torch.where(near | tiny, one, s)
    u_far = torch.where(tiny, antipodal_direction(xu, dim), v / s_safe)
    theta_far = torch.where(tiny, torch.atan2(s.detach(), c), theta)  # equal values
    return theta, torch.where(near, near_log, theta_far * u_far)


def logmap(
    x: Tensor, y: Tensor, dim: Dims = -1, *, check: bool = False, radius: float = 1.0
) -> Tensor:
    r"""Logarithmic map :math:`\log_x(y) = \theta v / \|v\|`, :math:`v = y - \langle x,y\rangle x`.

    The inverse of :func:`expmap` for :math:`\theta < \pi`; :math:`\|\log_x y\| = d(x, y)`.
    Near :math:`\theta = 0` the factor :math:`\theta/\|v\|` comes from a series, so the map and
    its gradient are smooth at ``x == y``. At ``y == -x`` it returns
    :math:`\pi \cdot` :func:`antipodal_direction`. ``check=True``: verify unit inputs.
    On a sphere of radius :math:`r`: :math:`r \log_{x/r}(y/r)`.
    """
    check_floating(x, "x")
    check_floating(y, "y")
    axes = check_sphere_dims(x, dim, min_size=2)
    check_same_shape(x, y, "x and y")
    r = check_radius(radius)
    if isinstance(axes, tuple):
        _check_points(check, axes, radius=r, x=x, y=y)
        (xv, yv), shape = _flat(axes, x, y)
        return logmap(xv, yv, 1, radius=r).reshape(shape)
    if r != 1.0:
        _check_points(check, axes, radius=r, x=x, y=y)
        return (logmap(_up(x) / r, _up(y) / r, axes) * r).to(y.dtype)
    dim = axes
    _check_points(check, dim, x=x, y=y)
    return geodesic_frame(x, y, dim)[1].to(y.dtype)


def dist(
    x: Tensor,
    y: Tensor,
    dim: Dims = -1,
    keepdim: bool = False,
    *,
    check: bool = False,
    radius: float = 1.0,
) -> Tensor:
    r"""Geodesic distance :math:`d(x, y) = r\theta`, :math:`\theta \in [0, \pi]`
    (:func:`angle`, :math:`r` = ``radius``), ``dim`` reduced.

    For points on the sphere only; ``check=True`` raises ``ValueError`` on others.
    """
    theta = angle(x, y, dim, check=check, radius=radius)
    if radius != 1.0:
        theta = theta * float(radius)
    axes = check_sphere_dims(x, dim)
    if keepdim:
        return theta
    if isinstance(axes, tuple):
        return theta.reshape(_reduced(theta.shape, axes, False))
    return theta.squeeze(axes)


def transport(
    x: Tensor, y: Tensor, v: Tensor, dim: Dims = -1, *, check: bool = False, radius: float = 1.0
) -> Tensor:
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
    inner products between tangent vectors. ``check=True``: verify unit ``x`` and ``y``.
    On a sphere of radius :math:`r`: transport from :math:`x/r` to :math:`y/r`.
    """
    check_floating(x, "x")
    check_floating(y, "y")
    check_floating(v, "v")
    axes = check_sphere_dims(x, dim, min_size=2)
    r = check_radius(radius)
    if isinstance(axes, tuple):
        _check_points(check, axes, radius=r, x=x, y=y)
        (xv, yv, vv), shape = _flat(axes, x, y, v)
        return transport(xv, yv, vv, 1, radius=r).reshape(shape)
    if r != 1.0:
        _check_points(check, axes, radius=r, x=x, y=y)
        return transport(_up(x) / r, _up(y) / r, v, axes)
    dim = axes
    _check_points(check, dim, x=x, y=y)
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
    dim: Dims = -1,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    radius: float = 1.0,
) -> Tensor:
    r"""Points drawn uniformly from the sphere along ``dim``: normalised standard Gaussians.

    ``shape`` as for :func:`torch.randn` (sizes, or one tuple); at least one axis, and the
    sphere axis of size >= 2.
    """
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    sizes = tuple(shape)
    if not shape:
        raise ValueError(
            "random() needs a shape with at least one axis (the sphere axis), e.g. "
            "random(8) or random(4, 8); got none"
        )
    try:
        shape = tuple(operator.index(n) for n in shape if not isinstance(n, bool))
    except TypeError:
        shape = ()
    if len(shape) != len(sizes) or min(shape) < 0:
        raise ValueError(f"random() needs non-negative int sizes, got {sizes}")
    if dtype is not None and not dtype.is_floating_point:
        # Checked before sampling: torch.randn's own error for an integer dtype is obscure.
        raise TypeError(
            f"random() needs a floating-point dtype (float16, bfloat16, float32, float64), "
            f"got {dtype}"
        )
    check_sphere_dims(torch.empty(shape, device="meta"), dim, min_size=2)
    r = check_radius(radius)
    x = torch.randn(*shape, dtype=dtype, device=device, generator=generator)
    return normalize(x, dim, on_zero="fixed", radius=r)
