"""Tests for :mod:`spheretorch.sphere`: geometry on the unit sphere along any ``dim``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

from spheretorch import sphere as S

from .strategies import F64, TOL, angles, close, frame, gen, layouts, pair_at

# ----------------------------------------------------------------------------- helpers


def inner(a, b, dim):
    return (a.double() * b.double()).sum(dim)


def norms(a, dim):
    return a.double().norm(dim=dim)


# ----------------------------------------------------------------------------- properties


@given(layouts(min_d=1), st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 1e30]))
def test_normalize_gives_unit_norms(layout, scale):
    shape, dim, dtype, seed = layout
    x = torch.randn(shape, dtype=dtype, generator=gen(seed)) * scale
    y = S.normalize(x, dim)
    assert y.dtype == dtype and y.shape == x.shape
    close(norms(y, dim), torch.ones(()).expand(norms(y, dim).shape), TOL[dtype])
    # Same direction: x = ||x|| y (reference norm in float64, which cannot under/overflow).
    n = x.double().norm(dim=dim, keepdim=True)
    close(y.double() * (n / scale), x.double() / scale, 10 * TOL[dtype], 1e-5)


@given(layouts(min_d=1))
def test_project_gives_tangent_vectors_and_is_idempotent(layout):
    shape, dim, dtype, seed = layout
    g = gen(seed)
    x = S.normalize(torch.randn(shape, dtype=dtype, generator=g), dim)
    u = 3 * torch.randn(shape, dtype=dtype, generator=g)
    p = S.project(x, u, dim)
    assert p.dtype == dtype
    close(inner(x, p, dim), torch.zeros(inner(x, p, dim).shape), 4 * TOL[dtype])
    close(S.project(x, p, dim), p, 4 * TOL[dtype])
    # u - P_x u is parallel to x.
    r = u - p
    close(r, inner(x, r, dim).unsqueeze(dim).to(dtype) * x, 4 * TOL[dtype])


@given(layouts(), angles)
def test_expmap_logmap_are_inverse(layout, theta):
    shape, dim, dtype, seed = layout
    x, w = frame(shape, dim, seed, dtype)
    u = (theta * w.double()).to(dtype)
    y = S.expmap(x, u, dim)
    assert y.dtype == dtype
    close(norms(y, dim), torch.ones(norms(y, dim).shape), TOL[dtype])
    close(S.logmap(x, y, dim), u, TOL[dtype])
    # And the other way round: exp_x(log_x(y)) == y.
    close(S.expmap(x, S.logmap(x, y, dim), dim), y, TOL[dtype])


@given(layouts(), angles)
def test_dist_is_logmap_norm_symmetric_and_the_angle(layout, theta):
    shape, dim, dtype, seed = layout
    x, w = frame(shape, dim, seed)
    y = (math.cos(theta) * x + math.sin(theta) * w).to(dtype)
    x = x.to(dtype)
    d = S.dist(x, y, dim)
    assert d.dtype == dtype
    assert d.shape == x.sum(dim).shape
    close(d, norms(S.logmap(x, y, dim), dim), TOL[dtype])
    close(d, S.dist(y, x, dim), TOL[dtype])
    close(d, torch.full(d.shape, theta, dtype=F64), TOL[dtype])
    assert S.dist(x, y, dim, keepdim=True).shape == S.angle(x, y, dim).shape
    close(S.dist(x, x, dim), torch.zeros(d.shape), TOL[dtype])


@given(layouts(), angles)
def test_logmap_is_tangent_and_points_at_y(layout, theta):
    shape, dim, dtype, seed = layout
    x, w = frame(shape, dim, seed, dtype)
    y = S.expmap(x, (theta * w.double()).to(dtype), dim)
    lg = S.logmap(x, y, dim)
    assert lg.dtype == dtype
    close(inner(x, lg, dim), torch.zeros(inner(x, lg, dim).shape), TOL[dtype])


@given(layouts(), angles, st.floats(0.0, 2.0))
def test_transport_keeps_tangency_and_inner_products(layout, theta, scale):
    shape, dim, dtype, seed = layout
    x, w = frame(shape, dim, seed)
    y = math.cos(theta) * x + math.sin(theta) * w
    g = gen(seed + 1)
    v1 = scale * S.project(x, torch.randn(shape, dtype=F64, generator=g), dim)
    v2 = S.project(x, torch.randn(shape, dtype=F64, generator=g), dim)
    x, y, v1, v2 = (t.to(dtype) for t in (x, y, v1, v2))
    t1, t2 = S.transport(x, y, v1, dim), S.transport(x, y, v2, dim)
    assert t1.dtype == dtype
    zeros = torch.zeros(inner(y, t1, dim).shape)
    close(inner(y, t1, dim), zeros, TOL[dtype])
    close(inner(y, t2, dim), zeros, TOL[dtype])
    close(inner(t1, t2, dim), inner(v1, v2, dim), 4 * TOL[dtype])
    close(inner(t1, t1, dim), inner(v1, v1, dim), 4 * TOL[dtype])
    # Transporting back is the inverse.
    close(S.transport(y, x, t1, dim), v1, 4 * TOL[dtype])


def rotation_transport(x, y, v):
    """Independent formula: the rotation in the plane of x and y that maps x to y (dim=-1)."""
    c = (x * y).sum(-1, keepdim=True)
    e2 = y - c * x
    s = e2.norm(dim=-1, keepdim=True)
    e2 = e2 / s
    a1 = (v * x).sum(-1, keepdim=True)
    a2 = (v * e2).sum(-1, keepdim=True)
    rest = v - a1 * x - a2 * e2
    return rest + a1 * (c * x + s * e2) + a2 * (-s * x + c * e2)


@pytest.mark.parametrize("d", [2, 3, 7, 64])
def test_transport_equals_rotation_in_the_plane_of_x_and_y(d):
    g = gen(d)
    x = S.normalize(torch.randn(50, d, dtype=F64, generator=g))
    y = S.normalize(torch.randn(50, d, dtype=F64, generator=g))
    v = S.project(x, torch.randn(50, d, dtype=F64, generator=g))
    close(S.transport(x, y, v), rotation_transport(x, y, v), 1e-12)
    # The velocity of the geodesic is transported to the velocity at the end point.
    lg = S.logmap(x, y)
    close(S.transport(x, y, lg), -S.logmap(y, x), 1e-12)


@pytest.mark.parametrize("gap", [1e-3, 1e-5, 1e-7, 1e-9, 1e-11])
def test_transport_near_antipodal_matches_rotation(gap):
    # Close to y = -x the transport must still be the rotation, to the eps / gap that the
    # rounding of the inputs allows. 1 + <x, y> in the denominator lost eps / gap^2 (an O(1)
    # error at gap 1e-7), and an antipodal switch on it acted for gaps up to 8e-8.
    x, y, _ = pair_at(math.pi - gap, shape=(4, 6), seed=3)
    v = S.project(x, torch.randn(4, 6, dtype=F64))
    close(S.transport(x, y, v), rotation_transport(x, y, v), 5e-15 / gap)


def test_retract_is_second_order_approximation_of_expmap():
    # Pymanopt's check_retraction: the log-log slope of ||R_x(tu) - exp_x(tu)|| must be >= 2.
    x, w = frame((8, 5), -1, 11)
    u = w * torch.linspace(0.5, 2.0, 8, dtype=F64)[:, None]
    ts = np.logspace(-3, -1, 9)
    errs = np.array(
        [(S.retract(x, t * u) - S.expmap(x, t * u)).norm(dim=-1).max().item() for t in ts]
    )
    slope = np.polyfit(np.log(ts), np.log(errs), 1)[0]
    assert slope >= 2.0, slope
    assert abs(slope - 3.0) < 0.1, slope  # it is exactly third order
    # And the retraction is a retraction: R_x(0) = x, unit output.
    close(S.retract(x, torch.zeros_like(u)), x, 1e-15)
    close(S.retract(x, 10 * u).norm(dim=-1), torch.ones(8), 1e-12)


def test_expmap_wraps_around_and_stays_on_sphere():
    x, w = frame((3, 4), -1, 5)
    close(S.expmap(x, math.pi * w), -x, 1e-12)
    close(S.expmap(x, 2 * math.pi * w), x, 1e-12)
    y = S.expmap(x, 100.0 * w)
    close(y.norm(dim=-1), torch.ones(3), 1e-12)


def test_expmap_output_is_renormalized_for_repeated_use():
    x, w = frame((16, 9), -1, 6)
    y = x
    for _ in range(2000):
        y = S.expmap(y, S.project(y, 0.3 * w))
    close(y.norm(dim=-1), torch.ones(16), 1e-14)


# ----------------------------------------------------------------------------- oracle: geoopt


def test_geoopt_sphere_agrees_with_ours():
    geoopt = pytest.importorskip("geoopt")
    man = geoopt.Sphere()
    g = gen(7)
    for d in (2, 3, 17):
        x = S.normalize(torch.randn(40, d, dtype=F64, generator=g))
        u = S.project(x, torch.randn(40, d, dtype=F64, generator=g))
        u = u * (torch.rand(40, 1, dtype=F64, generator=g) * 3.0)  # norms in [0, 3)
        y = S.expmap(x, u)
        close(S.expmap(x, u), man.expmap(x, u), 1e-12)
        close(S.retract(x, u), man.retr(x, u), 1e-14)
        close(S.project(x, 5 * u + x), man.proju(x, 5 * u + x), 1e-13)
        # geoopt's transp is the projection onto the new tangent space, not parallel transport.
        close(S.project(y, u), man.transp(x, y, u), 1e-13)
        # geoopt's logmap/dist use acos of a dot product clamped at 1 - 1e-7: keep away from
        # the ends, where it is inaccurate, and compare at its accuracy.
        z = S.normalize(torch.randn(40, d, dtype=F64, generator=g))
        ok = (S.dist(x, z) > 0.01) & (S.dist(x, z) < math.pi - 0.01)
        close(S.logmap(x, z)[ok], man.logmap(x, z)[ok], 1e-9)
        close(S.dist(x, z)[ok], man.dist(x, z)[ok], 1e-9)


# ----------------------------------------------------------------------------- accuracy


def test_logmap_float32_is_accurate_across_the_series_switch():
    # The near-side factor theta/s = atan(z)/z with z = tan(theta) switches to a series below
    # z = 0.25 in float32; a truncated series was off by 1.5e-6 there (25 ulp).
    # The cancellation in y - <x, y> x alone costs ~1-2 ulp (6e-8) absolute; the old series
    # added 3.8e-7 at z = 0.249.
    errs = []
    for z in np.linspace(0.05, 0.5, 46):
        for seed in range(4):
            x, y, _ = pair_at(math.atan(z), shape=(6,), seed=seed, dtype=torch.float32)
            ref = S.logmap(x.double(), y.double())  # exact answer for the rounded inputs
            errs.append((S.logmap(x, y).double() - ref).norm().item())
    assert max(errs) < 1.5e-7, max(errs)


@pytest.mark.parametrize(
    ("dtype", "hi", "ulps"), [(torch.float32, 0.6, 1.25), (torch.float64, 0.05, 2.5)]
)
def test_series_helpers_are_accurate_to_the_last_ulp(dtype, hi, ulps):
    # cos, sinc and atan(z)/z as functions of z^2 (private helpers behind expmap, logmap and
    # slerp), across their series/closed-form switch. float64 references; in float64 the
    # reference's own rounding (1 ulp) is part of the bound.
    z2 = torch.linspace(1e-6, hi, 20001, dtype=F64).to(dtype) ** 2
    z = z2.double().sqrt().numpy()
    cos_n, sinc_n = S.cos_sinc_sq(z2)
    eps = torch.finfo(dtype).eps
    for name, got, ref in [
        ("cos", cos_n, np.cos(z)),
        ("sinc", sinc_n, np.sin(z) / z),
        ("atanc", S.atanc_sq(z2), np.arctan(z) / z),
    ]:
        assert got.dtype == dtype
        err = np.abs(got.double().numpy() - ref) / np.abs(ref) / eps
        assert err.max() <= ulps, (name, err.max(), z[err.argmax()])
    one = torch.zeros(1, dtype=dtype)
    assert S.cos_sinc_sq(one) == (1, 1) and S.atanc_sq(one) == 1


def test_angles_are_accurate_near_zero_and_near_pi():
    for gap in (1e-12, 1e-9, 1e-6, 1e-3):
        x, y, _ = pair_at(gap, shape=(3, 4), seed=1)
        close(S.dist(x, y), torch.full((3,), gap, dtype=F64), 1e-15 + 1e-10 * gap)
        x, y, _ = pair_at(math.pi - gap, shape=(3, 4), seed=1)
        close(S.dist(x, y), torch.full((3,), math.pi - gap, dtype=F64), 1e-15)
        # acos of a clamped dot product gets 1e-8 wrong at gap 1e-16..1e-8: not us.
    x, y, _ = pair_at(1e-6, shape=(3, 4), seed=1, dtype=torch.float32)
    close(S.dist(x, y), torch.full((3,), 1e-6), 2e-7)


def test_logmap_of_subnormal_cosine_is_not_zero():
    # <x, y> a positive subnormal: s / c overflows if the near branch is taken.
    x = torch.tensor([1.0, 0.0], dtype=F64)
    y = torch.tensor([5e-320, 1.0], dtype=F64)
    close(S.logmap(x, y), torch.tensor([0.0, math.pi / 2], dtype=F64), 1e-15)
    x32 = torch.tensor([1.0, 0.0])
    y32 = torch.tensor([1e-40, 1.0])
    close(S.logmap(x32, y32), torch.tensor([0.0, math.pi / 2]), 1e-6)


# ----------------------------------------------------------------------------- antipodes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_antipodal_logmap_is_pi_times_the_documented_direction(dtype):
    x = S.normalize(torch.randn(5, 4, 6, dtype=dtype), dim=1)
    y = -x
    lg = S.logmap(x, y, dim=1)
    w = S.antipodal_direction(x, dim=1)
    close(lg, math.pi * w, 1e-6 if dtype == torch.float32 else 1e-14)
    close(norms(lg, 1), torch.full((5, 6), math.pi), 1e-6)
    close(inner(x, lg, 1), torch.zeros(5, 6), 1e-6)
    close(S.dist(x, y, 1), torch.full((5, 6), math.pi), 1e-6)
    # The direction: e_j - x_j x normalised, j = argmin |x_j|.
    x0 = torch.tensor([0.6, -0.0, 0.8, 0.0], dtype=dtype)
    close(S.antipodal_direction(x0), torch.tensor([0.0, 1.0, 0.0, 0.0]), 0)
    close(S.expmap(x, lg, dim=1), y, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_antipodal_transport_flips_the_antipodal_direction(dtype):
    x = S.normalize(torch.randn(8, 5, dtype=dtype))
    v = S.project(x, torch.randn(8, 5, dtype=dtype))
    w = S.antipodal_direction(x)
    out = S.transport(x, -x, v)
    ref = v - 2 * (v * w).sum(-1, keepdim=True) * w
    close(out, ref, 1e-6)
    close(inner(out, out, -1), inner(v, v, -1), 1e-5)


# ----------------------------------------------------------------------------- gradients

EDGE_ANGLES = [0.0, 1e-8, 1e-5, 0.7, 2.0, math.pi - 1e-3]


def _req(*ts):
    return tuple(t.detach().clone().requires_grad_(True) for t in ts)


def test_gradcheck_normalize_and_project():
    x = torch.randn(3, 4, dtype=F64) * torch.tensor([[1e-3], [1.0], [30.0]], dtype=F64)
    (xr,) = _req(x)
    assert gradcheck(lambda a: S.normalize(a, 0), (xr,))
    assert gradcheck(lambda a: S.normalize(a, -1, on_zero="keep"), (xr,))
    assert gradcheck(lambda a: S.normalize(a, -1, on_zero="fixed"), (xr,))
    assert gradgradcheck(lambda a: S.normalize(a, 1), (xr,))
    assert gradgradcheck(S.unit, (xr,))  # the fused backward recomputes for create_graph
    xs, us = _req(S.normalize(x), torch.randn(3, 4, dtype=F64))
    assert gradcheck(lambda a, b: S.project(a, b, -1), (xs, us))
    assert gradgradcheck(lambda a, b: S.project(a, b, 0), (xs, us))


@pytest.mark.parametrize("theta", EDGE_ANGLES)
def test_gradcheck_retract_expmap_transport(theta):
    x, _, w = pair_at(theta, shape=(2, 4), seed=4)
    u = theta * w
    v = S.project(x, torch.randn(2, 4, dtype=F64))
    y = S.expmap(x, u)
    xr, ur, yr, vr = _req(x, u, y, v)
    assert gradcheck(lambda a, b: S.retract(a, b), (xr, ur))
    assert gradcheck(lambda a, b: S.expmap(a, b), (xr, ur))
    assert gradcheck(lambda a, b, c: S.transport(a, b, c), (xr, yr, vr))
    # Second order too, at u == 0 exactly: cos and sinc are taken as polynomials of ||u||^2
    # there (through ||u|| autograd's second derivative at 0 would be wrong).
    assert gradgradcheck(lambda a, b: S.expmap(a, b), (xr, ur))
    assert gradgradcheck(lambda a, b, c: S.transport(a, b, c), (xr, yr, vr))


@pytest.mark.parametrize("theta", [*EDGE_ANGLES, -0.7])
@pytest.mark.parametrize("dim", [-1, 0])
def test_expmap_with_known_norm_is_expmap(theta, dim):
    # A step of a known angle theta along a tangent v: u = (theta / |v|) v, |u| = |theta|.
    x, _, w = pair_at(theta, shape=(2, 4) if dim == -1 else (4, 2), dim=dim, seed=6)
    v = 0.3 * w + 1e-3 * S.project(x, torch.randn(x.shape, dtype=F64), dim)
    k = torch.tensor([theta, 0.5 * theta], dtype=F64) / S.norm(v, dim).flatten()
    k = k.view(S.norm(v, dim).shape)

    def step(a, b, c, known):
        return S.expmap(a, c * b, dim, norm_u=c * S.norm(b, dim) if known else None)

    xr, vr, kr = _req(x, v, k)
    close(step(xr, vr, kr, True), step(xr, vr, kr, False), 1e-15)
    assert gradcheck(lambda a, b, c: step(a, b, c, True), (xr, vr, kr))
    assert gradgradcheck(lambda a, b, c: step(a, b, c, True), (xr, vr, kr))
    for known in (True, False):  # same gradients as expmap's own |u|
        out = step(xr, vr, kr, known)
        grads = torch.autograd.grad(out, (xr, vr, kr), torch.ones_like(out))
        if known:
            ref = grads
    for got, want in zip(ref, grads, strict=True):
        close(got, want, 1e-12)
    x32, v32, k32 = x.float(), v.float(), k.float()
    close(step(x32, v32, k32, True), step(x32, v32, k32, False), 1e-6)


@pytest.mark.parametrize("theta", EDGE_ANGLES)
def test_gradcheck_logmap_and_dist(theta):
    x, y, _ = pair_at(theta, shape=(2, 5), seed=8)
    xr, yr = _req(x, y)
    assert gradcheck(lambda a, b: S.logmap(a, b), (xr, yr))
    if theta > 0:
        # dist = ||log_x y|| is a cone at x == y (like |t| at 0): not differentiable there;
        # the nearest smooth configurations are the tiny angles. Its curvature is 1/theta, so
        # finite differences need a step well below theta there.
        eps, atol = (1e-6, 1e-5) if theta > 1e-3 else (theta / 100, 1e-4)
        assert gradcheck(lambda a, b: S.dist(a, b), (xr, yr), eps=eps, atol=atol)
    assert gradgradcheck(lambda a, b: S.logmap(a, b), (xr, yr))
    # Along dim=0 as well.
    assert gradcheck(lambda a, b: S.logmap(a, b, dim=0), (xr.T.detach().requires_grad_(), yr.T))


@pytest.mark.parametrize(
    "theta",
    [0.0, 1e-8, 1e-3, 0.009, 0.0101, 0.2, 0.249, 0.251, 1.0, 3.0, -1e-8, -0.5, 10.0],
)
def test_gradcheck_sinc(theta):
    t = torch.tensor([theta, theta + 1e-9], dtype=F64, requires_grad=True)
    assert gradcheck(S.sinc, (t,))
    assert gradgradcheck(S.sinc, (t,))
    ref = torch.tensor([1.0 if x == 0 else math.sin(x) / x for x in t.tolist()], dtype=F64)
    close(S.sinc(t), ref, 1e-16, 2e-16)
    close(S.sinc(t.float()), ref, 0, 2e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("where", ["equal", "antipodal"])
def test_finite_values_and_gradients_at_degenerate_pairs(dtype, where):
    x = S.normalize(torch.randn(4, 6, dtype=dtype))
    y = x.clone() if where == "equal" else -x
    v = S.project(x, torch.randn(4, 6, dtype=dtype))
    fns = {
        "logmap": lambda a, b, c: S.logmap(a, b),
        "dist": lambda a, b, c: S.dist(a, b),
        "transport": lambda a, b, c: S.transport(a, b, c),
        "angle": lambda a, b, c: S.angle(a, b),
    }
    for name, fn in fns.items():
        a, b, c = _req(x, y, v)
        out = fn(a, b, c)
        assert torch.isfinite(out).all(), name
        (out * torch.randn_like(out)).sum().backward()
        for t in (a, b, c):
            assert t.grad is None or torch.isfinite(t.grad).all(), name
    # Also the tangent vector u == 0 for expmap and retract.
    a, u = _req(x, torch.zeros_like(x))
    out = S.expmap(a, u) + S.retract(a, u)
    out.sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(u.grad).all()
    close(u.grad, 2 * (torch.ones_like(x) - x * x.sum(-1, keepdim=True)), 1e-5)


# ----------------------------------------------------------------------------- batching


def _moved(fn, tensors, dim):
    moved = [t.movedim(dim, -1) for t in tensors]
    return fn(*moved, -1).movedim(-1, dim)


@pytest.mark.parametrize(
    ("shape", "dim"), [((5,), 0), ((2, 5), 0), ((5, 3, 2), 0), ((2, 5, 3), -2), ((2, 1, 3, 5), 3)]
)
def test_dim_anywhere_equals_movedim_to_last(shape, dim):
    g = gen(9)
    x = S.normalize(torch.randn(shape, dtype=F64, generator=g), dim)
    y = S.normalize(torch.randn(shape, dtype=F64, generator=g), dim)
    u = S.project(x, torch.randn(shape, dtype=F64, generator=g), dim)
    pairs = {
        "normalize": (lambda a, d: S.normalize(a, d), [3 * u]),
        "project": (lambda a, b, d: S.project(a, b, d), [x, u]),
        "retract": (lambda a, b, d: S.retract(a, b, d), [x, u]),
        "expmap": (lambda a, b, d: S.expmap(a, b, d), [x, u]),
        "logmap": (lambda a, b, d: S.logmap(a, b, d), [x, y]),
        "angle": (lambda a, b, d: S.angle(a, b, d), [x, y]),
        "transport": (lambda a, b, c, d: S.transport(a, b, c, d), [x, y, u]),
        "antipodal_direction": (lambda a, d: S.antipodal_direction(a, d), [x]),
    }
    for name, (fn, args) in pairs.items():
        got = fn(*args, dim)
        want = _moved(fn, args, dim)
        torch.testing.assert_close(got, want, atol=1e-15, rtol=0, msg=name)
    # dist reduces the axis.
    torch.testing.assert_close(S.dist(x, y, dim), S.dist(x.movedim(dim, -1), y.movedim(dim, -1)))
    # Batched equals one slice at a time.
    flat_x = x.movedim(dim, -1).reshape(-1, shape[dim])
    flat_y = y.movedim(dim, -1).reshape(-1, shape[dim])
    for i in range(flat_x.shape[0]):
        torch.testing.assert_close(
            S.logmap(flat_x[i], flat_y[i]),
            S.logmap(flat_x, flat_y)[i],
            atol=1e-15,
            rtol=0,
        )


# ----------------------------------------------------------------------------- half types


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_match_the_float32_computation(dtype):
    g = gen(12)
    x = S.normalize(torch.randn(6, 3, 32, generator=g), 1).to(dtype)
    y = S.normalize(torch.randn(6, 3, 32, generator=g), 1).to(dtype)
    u = S.project(x.float(), torch.randn(6, 3, 32, generator=g), 1).to(dtype)
    xf, yf, uf = x.float(), y.float(), u.float()
    big = 7 * u
    cases = {
        "normalize": (S.normalize(big, 1), S.normalize(big.float(), 1)),
        "project": (S.project(x, u, 1), S.project(xf, uf, 1)),
        "retract": (S.retract(x, u, 1), S.retract(xf, uf, 1)),
        "expmap": (S.expmap(x, u, 1), S.expmap(xf, uf, 1)),
        "logmap": (S.logmap(x, y, 1), S.logmap(xf, yf, 1)),
        "dist": (S.dist(x, y, 1), S.dist(xf, yf, 1)),
        "transport": (S.transport(x, y, u, 1), S.transport(xf, yf, uf, 1)),
        "antipodal_direction": (S.antipodal_direction(x, 1), S.antipodal_direction(xf, 1)),
    }
    for name, (got, ref) in cases.items():
        assert got.dtype == dtype, name
        # Computed in float32 and rounded once: equal to the float32 result cast back.
        torch.testing.assert_close(got, ref.to(dtype), atol=0, rtol=0, msg=name)
    assert S.norm(x, 1).dtype == torch.float32
    assert S.inner(x, y, 1).dtype == torch.float32


def test_half_normalize_survives_sum_of_squares_overflow():
    # 4096 * 300^2 = 3.7e8 overflows float16 (max 65504); the norm is accumulated in float32.
    x = torch.full((2, 4096), 300.0, dtype=torch.float16)
    y = S.normalize(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    close(y, torch.full((2, 4096), 1 / 64), 1e-5)
    close(y.float().norm(dim=-1), torch.ones(2), 2e-3)
    assert torch.isfinite(S.retract(y, 0 * y)).all()
    bf = torch.full((3, 100_000), 3.0e4, dtype=torch.bfloat16)
    close(S.normalize(bf).float().norm(dim=-1), torch.ones(3), 1e-2)


# ----------------------------------------------------------------------------- zero vectors


def test_normalize_raise_names_the_zero_slice_and_shape():
    x = torch.randn(2, 3, 4)
    x[1, :, 2] = 0
    with pytest.raises(ValueError, match=r"shape \(2, 3, 4\).*x\[1, :, 2\] has zero norm"):
        S.normalize(x, dim=1)
    x = torch.randn(3, 5)
    x[2] = 0
    with pytest.raises(ValueError, match=r"x\[2, :\] has zero norm"):
        S.normalize(x, dim=-1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_normalize_raise_rejects_non_finite_input(bad):
    x = torch.randn(3, 4, dtype=F64)
    x[1, 2] = bad
    with pytest.raises(ValueError, match=r"x\[1, :\] has non-finite values"):
        S.normalize(x)
    with pytest.raises(ValueError, match=r"x\[:, 2\] has non-finite values"):
        S.normalize(x, dim=0)


def test_normalize_fixed_maps_zero_slices_to_e0_and_keep_keeps_zeros():
    x = torch.randn(3, 4, 2, dtype=F64)
    x[:, 1, 0] = 0
    out = S.normalize(x, dim=0, on_zero="fixed")
    torch.testing.assert_close(out[:, 1, 0], torch.tensor([1.0, 0.0, 0.0], dtype=F64))
    torch.testing.assert_close(out[:, 0, 1], x[:, 0, 1] / x[:, 0, 1].norm())
    assert torch.isfinite(out).all()
    kept = S.normalize(x, dim=0, on_zero="keep")
    assert (kept[:, 1, 0] == 0).all()
    assert torch.isfinite(kept).all()
    torch.testing.assert_close(kept[:, 2, 1], x[:, 2, 1] / x[:, 2, 1].norm())
    # Finite gradients through a zero slice, both modes.
    for mode in ("fixed", "keep"):
        xr = x.clone().requires_grad_()
        S.normalize(xr, 0, on_zero=mode).sum().backward()
        assert torch.isfinite(xr.grad).all(), mode
    # Half types too.
    z = torch.zeros(2, 3, dtype=torch.float16)
    assert (S.normalize(z, on_zero="fixed")[:, 0] == 1).all()
    assert (S.normalize(z, on_zero="keep") == 0).all()


def test_normalize_never_returns_a_silent_nan_for_zeros():
    z = torch.zeros(4, 3)
    for mode in ("fixed", "keep"):
        assert not torch.isnan(S.normalize(z, on_zero=mode)).any()
    with pytest.raises(ValueError):
        S.normalize(z)
    with pytest.raises(ValueError):
        S.normalize(torch.zeros(1))


# ----------------------------------------------------------------------------- random


def test_random_points():
    x = S.random(4, 3, 5, dim=1)
    assert x.shape == (4, 3, 5) and x.dtype == torch.get_default_dtype()
    close(x.norm(dim=1), torch.ones(4, 5), 1e-6)
    assert S.random((2, 7)).shape == (2, 7)
    assert S.random(torch.Size([2, 7])).shape == (2, 7)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        y = S.random(3, 8, dtype=dtype)
        assert y.dtype == dtype
        close(y.double().norm(dim=-1), torch.ones(3), 1e-2 if dtype != F64 else 1e-14)
    a = S.random(5, 6, generator=gen(1), dtype=F64)
    b = S.random(5, 6, generator=gen(1), dtype=F64)
    c = S.random(5, 6, generator=gen(2), dtype=F64)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_is_roughly_uniform():
    n, d = 20000, 3
    x = S.random(n, d, generator=gen(3), dtype=F64)
    # Mean of a uniform point is 0 (std of the sample mean is 1/sqrt(3n) ~ 0.004 per coord).
    assert x.mean(0).abs().max() < 0.025
    # Second moment E[x x^T] = I / d.
    close(x.T @ x / n, torch.eye(d, dtype=F64) / d, 0.02)
    # Archimedes: on S^2 each coordinate is uniform on [-1, 1].
    hist = torch.histc(x[:, 2], bins=10, min=-1, max=1) / n
    close(hist, torch.full((10,), 0.1, dtype=F64), 0.015)


# ----------------------------------------------------------------------------- bad input


def test_integer_dtypes_are_rejected():
    xi = torch.tensor([[1, 0], [0, 1]])
    xf = torch.eye(2)
    msg = "floating-point dtype"
    with pytest.raises(TypeError, match=f"x must have a {msg}.*torch.int64"):
        S.normalize(xi)
    with pytest.raises(TypeError, match=f"u must have a {msg}"):
        S.project(xf, xi)
    with pytest.raises(TypeError, match=msg):
        S.expmap(xi, xf)
    with pytest.raises(TypeError, match=msg):
        S.retract(xf, xi)
    with pytest.raises(TypeError, match=msg):
        S.logmap(xf, xi)
    with pytest.raises(TypeError, match=msg):
        S.dist(xi, xf)
    with pytest.raises(TypeError, match=f"x must have a {msg}"):
        S.transport(xi, xf, xf)
    with pytest.raises(TypeError, match=f"v must have a {msg}"):
        S.transport(xf, xf, xi)
    with pytest.raises(TypeError, match=r"random\(\) needs a floating-point dtype.*int32"):
        S.random(3, 4, dtype=torch.int32)
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor, got list"):
        S.normalize([1.0, 0.0])


def test_bad_dims_are_rejected():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"dim=2 is out of range for a tensor of shape \(2, 3\)"):
        S.normalize(x, dim=2)
    with pytest.raises(ValueError, match=r"dim=-3 is out of range.*-2 <= dim < 2"):
        S.project(x, x, dim=-3)
    with pytest.raises(ValueError, match="out of range"):
        S.logmap(x, x, dim=5)
    with pytest.raises(ValueError, match="out of range"):
        S.random(2, 3, dim=2)
    with pytest.raises(TypeError, match="dim must be an int, got float"):
        S.expmap(x, x, dim=1.0)
    with pytest.raises(TypeError, match="dim must be an int, got bool"):
        S.normalize(x, dim=True)
    with pytest.raises(ValueError, match=r"dim must be adjacent axes \(e\.g\. \(1, 2, 3\)\)"):
        S.dist(torch.randn(2, 3, 4), torch.randn(2, 3, 4), dim=(0, 2))
    with pytest.raises(TypeError, match="dim must be an int, a tuple of adjacent ints or None"):
        S.dist(x, x, dim=(0, 1.0))
    with pytest.raises(ValueError, match="needs at least one axis; got a 0-d tensor"):
        S.normalize(torch.tensor(1.0))


def test_mismatched_shapes_and_unknown_options_are_rejected():
    with pytest.raises(ValueError, match=r"x and y must have the same shape, got \(2, 3\) and"):
        S.logmap(torch.randn(2, 3), torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"on_zero must be 'raise', 'fixed' or 'keep', got 'nan'"):
        S.normalize(torch.randn(2, 3), on_zero="nan")


def test_a_sphere_needs_two_coordinates_and_a_shape():
    # S^0 (one coordinate) has no tangent directions: logmap could not keep |log| = dist
    one = torch.tensor([[1.0], [-1.0]])
    for make in (lambda: S.random(1), lambda: S.random(4, 1), lambda: S.random(4, 0)):
        with pytest.raises(ValueError, match=r"has size [01]; a sphere needs at least 2"):
            make()
    with pytest.raises(ValueError, match="a sphere needs at least 2 coordinates"):
        S.logmap(one, one.flip(0))
    with pytest.raises(ValueError, match="a sphere needs at least 2 coordinates"):
        S.antipodal_direction(one)
    for shape in ((), []):
        with pytest.raises(ValueError, match=r"random\(\) needs a shape with at least one axis"):
            S.random(*shape) if shape == () else S.random(shape)
    with pytest.raises(ValueError, match=r"random\(\) needs non-negative int sizes, got \(3, -1\)"):
        S.random(3, -1)
    with pytest.raises(ValueError, match=r"random\(\) needs non-negative int sizes"):
        S.random(3, 2.5)
    assert S.random(0, 3).shape == (0, 3)  # no points is fine; no coordinates is not
    # normalize and project keep working on any axis size >= 1 (they do not make a sphere)
    assert S.normalize(torch.tensor([[-2.0]])).item() == -1.0


def test_check_unit_option_rejects_non_unit_points():
    x, y = S.random(4, 5, generator=gen(0)), S.random(4, 5, generator=gen(1))
    # without check, non-unit inputs are outside the contract: dist(3x, 3y) != dist(x, y)
    assert not torch.allclose(S.dist(3 * x, 3 * y), S.dist(x, y))
    torch.testing.assert_close(S.dist(x, y, check=True), S.dist(x, y))
    with pytest.raises(
        ValueError, match=r"^y must be unit vectors along dim=1: y\[0, :\] has norm 3 "
    ):
        S.dist(x, 3 * y, check=True)
    with pytest.raises(ValueError, match=r"x must be unit vectors along dim=0: x\[:, 2\]"):
        S.logmap(x.T.clone().index_fill_(1, torch.tensor([2]), 0.5), y.T, dim=0, check=True)
    for fn in (S.angle, S.logmap):
        with pytest.raises(ValueError, match="must be unit vectors"):
            fn(2 * x, y, check=True)
    with pytest.raises(ValueError, match="must be unit vectors"):
        S.expmap(2 * x, S.project(x, y), check=True)
    with pytest.raises(ValueError, match="must be unit vectors"):
        S.transport(x, 2 * y, S.project(x, y), check=True)
    S.check_unit(x.half())  # the tolerance follows the dtype
    with pytest.raises(ValueError, match="has norm nan"):
        S.check_unit(torch.full((2, 3), float("nan")))


def test_public_series_and_policy_names():
    # the one half-precision policy: the set the models, optimizers and unit() share
    assert (torch.float16, torch.bfloat16) == S.UPCAST_DTYPES
    assert S.compute_dtype(torch.bfloat16) == torch.float32
    assert S.compute_dtype(torch.float64) == torch.float64
    z2 = torch.tensor([0.0, 1e-6, 4.0], dtype=torch.float64)
    torch.testing.assert_close(S.sqrt0(z2), z2.sqrt())
    torch.testing.assert_close(S.cos_sinc_sq(z2)[0], z2.sqrt().cos())
