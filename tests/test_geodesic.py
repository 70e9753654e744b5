"""Tests for :mod:`spheretorch.geodesic`: slerp, nlerp and the residual update."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

from spheretorch import sphere as S
from spheretorch.geodesic import geodesic_update, nlerp, slerp

from .strategies import F64, MARGIN, TOL, angles, close, gen, layouts
from .strategies import pair_at as _pair_at

# ----------------------------------------------------------------------------- helpers

unit_t = st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(0.0, 1.0))


def pair_at(theta: float, shape=(5,), dim=-1, seed=0, dtype=F64):
    """``(a, b)`` at angle ``theta`` in every slice (``b`` is a copy of ``a`` for 0)."""
    return _pair_at(theta, shape, dim, seed, dtype)[:2]


def unit_norms(x, dim, atol):
    n = x.double().norm(dim=dim)
    close(n, torch.ones(n.shape), atol)


def _req(*ts):
    return tuple(t.detach().clone().requires_grad_(True) for t in ts)


# ----------------------------------------------------------------------------- properties


@given(layouts(), angles)
def test_slerp_endpoints(layout, theta):
    shape, dim, dtype, seed = layout
    a, b = pair_at(theta, shape, dim, seed, dtype)
    close(slerp(a, b, 0.0, dim), a, TOL[dtype])
    close(slerp(a, b, 1.0, dim), b, TOL[dtype])
    assert slerp(a, b, 0.3, dim).dtype == dtype


@given(layouts(), angles, unit_t)
def test_slerp_has_constant_speed_and_stays_on_sphere(layout, theta, t):
    shape, dim, dtype, seed = layout
    a, b = pair_at(theta, shape, dim, seed, dtype)
    p = slerp(a, b, t, dim)
    unit_norms(p, dim, TOL[dtype])
    full = S.dist(a, b, dim).double()
    close(S.dist(a, p, dim), t * full, TOL[dtype])
    close(S.dist(p, b, dim), (1 - t) * full, TOL[dtype])
    # It is the geodesic: exp_a(t log_a b).
    close(p, S.expmap(a, (t * S.logmap(a, b, dim).double()).to(dtype), dim), TOL[dtype])


@given(layouts(), angles, st.floats(-0.5, 1.5))
def test_slerp_t_as_tensor_equals_t_as_float(layout, theta, t):
    shape, dim, dtype, seed = layout
    a, b = pair_at(theta, shape, dim, seed, dtype)
    ref = slerp(a, b, t, dim)
    t_size1 = torch.full([1] * len(shape), t, dtype=dtype)
    torch.testing.assert_close(slerp(a, b, t_size1, dim), ref, atol=TOL[dtype], rtol=0)
    # Per-coordinate t that is constant along the sphere axis is the same move.
    torch.testing.assert_close(
        slerp(a, b, torch.full(shape, t, dtype=dtype), dim), ref, atol=TOL[dtype], rtol=0
    )
    unit_norms(ref, dim, TOL[dtype])


@given(layouts(), angles, unit_t)
def test_nlerp_follows_the_same_great_circle_as_slerp(layout, theta, t):
    shape, dim, dtype, seed = layout
    a, b = pair_at(theta, shape, dim, seed, dtype)
    p = nlerp(a, b, t, dim)
    assert p.dtype == dtype
    unit_norms(p, dim, TOL[dtype])
    # The angle nlerp covers: atan2(t sin(theta), 1 - t + t cos(theta)).
    th = S.dist(a, b, dim, keepdim=True).double()
    phi = torch.atan2(t * torch.sin(th), 1 - t + t * torch.cos(th))
    t_eff = torch.where(th > 1e-6, phi / th.clamp_min(1e-300), torch.full_like(th, t))
    tol = TOL[dtype] * (10 if dtype == torch.float32 else 1)  # |a + t (b - a)| >= 0.05 here
    close(p, slerp(a, b, t_eff.to(dtype), dim), tol)
    # Endpoints and the reference formula.
    close(nlerp(a, b, 0.0, dim), a, TOL[dtype])
    close(nlerp(a, b, 1.0, dim), b, TOL[dtype])
    ref = a.double() + t * (b.double() - a.double())
    close(p, ref / ref.norm(dim=dim, keepdim=True), tol)


@given(layouts(), angles, st.floats(-0.5, 1.5))
def test_geodesic_update_rules_match_nlerp_and_slerp(layout, theta, alpha):
    shape, dim, dtype, seed = layout
    h, target = pair_at(theta, shape, dim, seed, dtype)
    torch.testing.assert_close(
        geodesic_update(h, target, alpha, "slerp", dim), slerp(h, target, alpha, dim)
    )
    a_t = torch.full([1] * len(shape), alpha, dtype=dtype)
    torch.testing.assert_close(
        geodesic_update(h, target, a_t, "slerp", dim), slerp(h, target, alpha, dim)
    )
    if alpha != 0.5 or theta < math.pi - MARGIN:  # nlerp's antipodal guard aside
        torch.testing.assert_close(
            geodesic_update(h, target, alpha, dim=dim), nlerp(h, target, alpha, dim)
        )


@given(layouts(), angles)
def test_geodesic_update_per_coordinate_alpha(layout, theta):
    shape, dim, dtype, seed = layout
    h, target = pair_at(theta, shape, dim, seed, dtype)
    d = shape[dim]
    # nGPT's eigen learning rates: one per coordinate, broadcast along the batch axes.
    view = [1] * len(shape)
    view[dim] = d
    alpha = torch.linspace(0.05, 0.9, d, dtype=dtype).reshape(view)
    hd, td, ad = h.double(), target.double(), alpha.double()
    out = geodesic_update(h, target, alpha, "nlerp", dim)
    ref = hd + ad * (td - hd)
    close(out, ref / ref.norm(dim=dim, keepdim=True), 10 * TOL[dtype])
    out = geodesic_update(h, target, alpha, "slerp", dim)
    ref = S.expmap(hd, S.project(hd, ad * S.logmap(hd, td, dim), dim), dim)
    close(out, ref, 10 * TOL[dtype])
    unit_norms(out, dim, TOL[dtype])
    # slerp accepts the same per-coordinate weights.
    close(slerp(h, target, alpha, dim), out, TOL[dtype])


# ----------------------------------------------------------------------------- scipy oracle


def test_slerp_agrees_with_scipy_geometric_slerp():
    from scipy.spatial import geometric_slerp

    thetas = np.concatenate(
        [np.logspace(-9, np.log10(np.pi - 1e-3), 28), [0.3, 1.0, np.pi / 2, 2.0, 2.9, 3.1]]
    )
    ts = np.concatenate([np.linspace(-0.5, 1.5, 21), [1e-3, 0.3, 0.999]])
    worst = 0.0
    for d in (2, 3, 17, 256):
        for seed in (0, 1, 2):
            g = gen(100 * d + seed)
            a = S.normalize(torch.randn(d, dtype=F64, generator=g))
            w = S.normalize(S.project(a, torch.randn(d, dtype=F64, generator=g)))
            for theta in thetas:
                b = math.cos(theta) * a + math.sin(theta) * w
                b = b / b.norm()
                an, bn = a.numpy(), b.numpy()
                assert abs(np.linalg.norm(an) - 1) < 1e-9 and abs(np.linalg.norm(bn) - 1) < 1e-9
                ref = geometric_slerp(an, bn, ts, tol=1e-7)
                tt = torch.from_numpy(ts)[:, None]
                got = slerp(a.expand(len(ts), d), b.expand(len(ts), d), tt).numpy()
                err = np.abs(got - ref).max()
                worst = max(worst, err)
                assert err <= 1e-12, (d, seed, theta, err)
                # The same with the points along dim=0 and t broadcast along dim 1.
                got0 = slerp(
                    a[:, None].expand(d, len(ts)), b[:, None].expand(d, len(ts)), tt.T, dim=0
                )
                assert np.abs(got0.numpy().T - ref).max() <= 1e-12
    assert worst > 0  # the comparison did run


def test_scipy_antipodal_warning_and_our_deterministic_choice():
    from scipy.spatial import geometric_slerp

    a = torch.tensor([0.0, 0.6, 0.8], dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        geometric_slerp(a.numpy(), (-a).numpy(), np.linspace(0, 1, 3), tol=1e-7)
    # Ours is the great circle through the documented antipodal direction e_0.
    mid = slerp(a, -a, 0.5)
    close(mid, S.antipodal_direction(a), 1e-15)
    close(mid, torch.tensor([1.0, 0.0, 0.0], dtype=F64), 1e-15)
    close(slerp(a, -a, 1.0), -a, 1e-15)
    close(slerp(a, -a, 0.25), math.cos(math.pi / 4) * a + math.sin(math.pi / 4) * mid, 1e-15)


# ----------------------------------------------------------------------------- degenerate pairs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("where", ["equal", "antipodal"])
def test_finite_values_and_gradients_at_degenerate_pairs(dtype, where):
    a = S.normalize(torch.randn(3, 7, dtype=dtype))
    b = a.clone() if where == "equal" else -a
    per_coord = torch.linspace(0.1, 0.9, 7, dtype=dtype)
    fns = {
        "slerp": lambda x, y, t: slerp(x, y, 0.5),
        "slerp_t": lambda x, y, t: slerp(x, y, t[:1]),
        "slerp_tvec": lambda x, y, t: slerp(x, y, t),
        "nlerp": lambda x, y, t: nlerp(x, y, 0.5),
        "nlerp_t": lambda x, y, t: nlerp(x, y, t),
        "update_nlerp": lambda x, y, t: geodesic_update(x, y, t, "nlerp"),
        "update_nlerp_half": lambda x, y, t: geodesic_update(x, y, 0.5, "nlerp"),
        "update_slerp": lambda x, y, t: geodesic_update(x, y, t, "slerp"),
        "update_slerp_half": lambda x, y, t: geodesic_update(x, y, 0.5, "slerp"),
        "logmap": lambda x, y, t: S.logmap(x, y),
        "dist": lambda x, y, t: S.dist(x, y),
        "transport": lambda x, y, t: S.transport(x, y, t * S.project(x, y.flip(-1))),
    }
    for name, fn in fns.items():
        x, y, t = _req(a, b, per_coord)
        out = fn(x, y, t)
        assert torch.isfinite(out).all(), name
        (out * torch.randn_like(out)).sum().backward()
        for g in (x.grad, y.grad, t.grad):
            assert g is None or torch.isfinite(g).all(), name
    # The values themselves: identity at a == b, the documented direction at a == -b.
    if where == "equal":
        close(slerp(a, b, 0.3), a, 1e-6)
        close(nlerp(a, b, 0.3), a, 1e-6)
    else:
        w = S.antipodal_direction(a)
        close(slerp(a, b, 0.5), w, 1e-6)
        close(nlerp(a, b, 0.5), w, 1e-6)  # the chord passes through 0: guarded
        unit_norms(slerp(a, b, 0.3), -1, 1e-6)


def test_slerp_gradient_at_equal_points_is_the_linear_one():
    # slerp(a, b, t) ~ (1 - t) a + t b for b -> a: the Jacobians are (1 - t) P_a and t P_a
    # (tangent parts) plus the radial part of the ambient extension.
    a = S.normalize(torch.randn(4, 6, dtype=F64))
    x, y = _req(a, a)
    t = 0.3
    g = torch.randn(4, 6, dtype=F64)
    (slerp(x, y, t) * g).sum().backward()
    close(S.project(a, y.grad), t * S.project(a, g), 1e-12)
    close(S.project(a, x.grad), (1 - t) * S.project(a, g), 1e-12)


# ----------------------------------------------------------------------------- gradcheck

EDGE_ANGLES = [0.0, 1e-8, 1e-5, 0.7, 2.0, math.pi - 1e-3]


@pytest.mark.parametrize("theta", EDGE_ANGLES)
def test_gradcheck_slerp(theta):
    a, b = pair_at(theta, (2, 4), seed=5)
    x, y = _req(a, b)
    t_slice, t_coord = _req(
        torch.tensor([[0.3], [-0.4]], dtype=F64), torch.tensor([0.1, 0.5, 0.9, 1.3], dtype=F64)
    )
    assert gradcheck(lambda p, q: slerp(p, q, 0.3), (x, y))
    assert gradcheck(lambda p, q: slerp(p, q, 1.4), (x, y))
    assert gradcheck(lambda p, q, t: slerp(p, q, t), (x, y, t_slice))
    assert gradcheck(lambda p, q, t: slerp(p, q, t), (x, y, t_coord))
    assert gradgradcheck(lambda p, q, t: slerp(p, q, t), (x, y, t_slice))
    assert gradcheck(lambda p, q: slerp(p, q, 0.3, dim=0), (x.T.detach().requires_grad_(), y.T))


@pytest.mark.parametrize("theta", EDGE_ANGLES)
def test_gradcheck_nlerp_and_geodesic_update(theta):
    a, b = pair_at(theta, (2, 4), seed=6)
    x, y = _req(a, b)
    (alpha,) = _req(torch.tensor([0.05, 0.3, 0.5, 0.8], dtype=F64))
    assert gradcheck(lambda p, q: nlerp(p, q, 0.3), (x, y))
    assert gradcheck(lambda p, q, t: nlerp(p, q, t), (x, y, alpha))
    assert gradgradcheck(lambda p, q, t: nlerp(p, q, t), (x, y, alpha))
    for rule in ("nlerp", "slerp"):
        assert gradcheck(lambda p, q, t, r=rule: geodesic_update(p, q, t, r), (x, y, alpha))
        assert gradcheck(lambda p, q, r=rule: geodesic_update(p, q, 0.25, r), (x, y))
        assert gradgradcheck(lambda p, q, t, r=rule: geodesic_update(p, q, t, r), (x, y, alpha))


# ----------------------------------------------------------------------------- batching


@pytest.mark.parametrize(
    ("shape", "dim"), [((5,), 0), ((5, 3), 0), ((2, 5, 3), 1), ((2, 3, 5), -1), ((2, 1, 5, 3), -2)]
)
def test_dim_anywhere_equals_movedim_to_last(shape, dim):
    g = gen(4)
    a = S.normalize(torch.randn(shape, dtype=F64, generator=g), dim)
    b = S.normalize(torch.randn(shape, dtype=F64, generator=g), dim)
    t_shape = [1] * len(shape)
    t_shape[0] = shape[0] if dim % len(shape) != 0 else 1
    t = torch.rand(t_shape, dtype=F64, generator=g) * 2 - 0.5
    coord = [1] * len(shape)
    coord[dim] = shape[dim]
    alpha = torch.rand(coord, dtype=F64, generator=g)
    ops = {
        "slerp": lambda p, q, w, d: slerp(p, q, w, d),
        "nlerp": lambda p, q, w, d: nlerp(p, q, w, d),
        "update_slerp": lambda p, q, w, d: geodesic_update(p, q, w, "slerp", d),
        "update_nlerp": lambda p, q, w, d: geodesic_update(p, q, w, "nlerp", d),
    }
    for name, op in ops.items():
        for w in (0.3, t, alpha):
            got = op(a, b, w, dim)
            wm = w.movedim(dim, -1) if isinstance(w, torch.Tensor) else w
            want = op(a.movedim(dim, -1), b.movedim(dim, -1), wm, -1).movedim(-1, dim)
            torch.testing.assert_close(got, want, atol=1e-15, rtol=0, msg=name)
    # Batched equals one slice at a time.
    am, bm = a.movedim(dim, -1).reshape(-1, shape[dim]), b.movedim(dim, -1).reshape(-1, shape[dim])
    full = slerp(am, bm, 0.7)
    for i in range(am.shape[0]):
        torch.testing.assert_close(slerp(am[i], bm[i], 0.7), full[i], atol=1e-15, rtol=0)


# ----------------------------------------------------------------------------- half types


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_match_the_float32_computation(dtype):
    g = gen(8)
    a = S.normalize(torch.randn(4, 3, 64, generator=g), 1).to(dtype)
    b = S.normalize(torch.randn(4, 3, 64, generator=g), 1).to(dtype)
    af, bf = a.float(), b.float()
    alpha = torch.rand(1, 3, 1, generator=g)
    cases = {
        "slerp": (slerp(a, b, 0.3, 1), slerp(af, bf, 0.3, 1)),
        "slerp_t": (slerp(a, b, alpha, 1), slerp(af, bf, alpha, 1)),
        "nlerp": (nlerp(a, b, 0.3, 1), nlerp(af, bf, 0.3, 1)),
        "update_nlerp": (
            geodesic_update(a, b, alpha, dim=1),
            geodesic_update(af, bf, alpha, dim=1),
        ),
        "update_slerp": (
            geodesic_update(a, b, alpha, "slerp", 1),
            geodesic_update(af, bf, alpha, "slerp", 1),
        ),
    }
    for name, (got, ref) in cases.items():
        assert got.dtype == dtype, name
        torch.testing.assert_close(got, ref.to(dtype), atol=0, rtol=0, msg=name)


def test_weights_of_another_dtype_are_promoted():
    a, b = pair_at(0.8, (3, 5), dtype=torch.float32)
    t64 = torch.tensor([[0.3]], dtype=F64)
    for fn in (slerp, nlerp):
        out = fn(a, b, t64)
        assert out.dtype == torch.float32
        close(out, fn(a, b, 0.3), 1e-6)
    out = geodesic_update(a, b, t64, "nlerp")
    assert out.dtype == torch.float32
    close(out, nlerp(a, b, 0.3), 1e-6)
    # float16 points with a float32 weight (a parameter kept in float32).
    out = geodesic_update(a.half(), b.half(), torch.tensor([0.3]), "slerp")
    assert out.dtype == torch.float16


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    a, b = pair_at(0.5, (3, 4))
    with pytest.raises(ValueError, match=r"a and b must have the same shape, got \(3, 4\) and"):
        slerp(a, b[:2], 0.5)
    with pytest.raises(ValueError, match="a and b must have the same shape"):
        nlerp(a, b[:, :3], 0.5)
    with pytest.raises(ValueError, match=r"t of shape \(2,\) does not broadcast against points"):
        slerp(a, b, torch.rand(2, dtype=F64))
    with pytest.raises(ValueError, match=r"t of shape \(2, 3, 1\) would broadcast the points"):
        nlerp(a, b, torch.rand(2, 3, 1, dtype=F64))
    with pytest.raises(TypeError, match="t must be a float or a tensor, got str"):
        slerp(a, b, "0.5")
    with pytest.raises(TypeError, match="t must be a float or a tensor, got bool"):
        nlerp(a, b, True)
    with pytest.raises(TypeError, match="t must have a floating-point dtype"):
        slerp(a, b, torch.tensor([1]))
    with pytest.raises(TypeError, match="a must have a floating-point dtype"):
        slerp(torch.ones(3, 4, dtype=torch.int64), b, 0.5)
    with pytest.raises(TypeError, match="b must have a floating-point dtype"):
        nlerp(a, torch.ones(3, 4, dtype=torch.int32), 0.5)
    with pytest.raises(ValueError, match=r"dim=2 is out of range for a tensor of shape \(3, 4\)"):
        slerp(a, b, 0.5, dim=2)
    with pytest.raises(TypeError, match="dim must be an int, got float"):
        nlerp(a, b, 0.5, dim=-1.0)
    with pytest.raises(ValueError, match="rule must be 'nlerp' or 'slerp', got 'lerp'"):
        geodesic_update(a, b, 0.5, rule="lerp")
    for rule in ("nlerp", "slerp"):
        with pytest.raises(ValueError, match="dim=3 is out of range"):
            geodesic_update(a, b, 0.5, rule, dim=3)
    # An integer t is a valid float weight.
    torch.testing.assert_close(slerp(a, b, 1), b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_antipodal_geodesic_update_stays_on_the_sphere(dtype):
    x = S.random(6, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    for rule in ("nlerp", "slerp"):
        for alpha in (0.5, torch.full((5,), 0.5, dtype=dtype)):
            y = geodesic_update(x, -x, alpha, rule)
            assert y.dtype == dtype
            torch.testing.assert_close(
                y.double().norm(dim=-1), torch.ones(6, dtype=torch.float64), atol=1e-2, rtol=0
            )
    # nlerp's chord through the origin leaves h where it was (documented choice)
    assert torch.equal(geodesic_update(x, -x, 0.5), x)


def test_slerp_and_nlerp_check_option():
    a, b = S.random(3, 4), S.random(3, 4)
    torch.testing.assert_close(slerp(a, b, 0.3, check=True), slerp(a, b, 0.3))
    with pytest.raises(ValueError, match=r"^b must be unit vectors along dim=1: b\[0, :\]"):
        slerp(a, 3 * b, 0.3, check=True)
    with pytest.raises(ValueError, match=r"^a must be unit vectors"):
        nlerp(2 * a, b, 0.3, check=True)
    with pytest.raises(ValueError, match="a sphere needs at least 2 coordinates"):
        slerp(torch.ones(3, 1), torch.ones(3, 1), 0.5)
