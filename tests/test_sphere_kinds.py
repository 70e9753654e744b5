"""The sphere functions and SphereParameter on the other sphere kinds: a tuple of adjacent axes
(one sphere per index of the other axes, e.g. a conv filter) and ``dim=None`` (the whole tensor
on one sphere, the Frobenius sphere), each of any radius."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs
from torch import nn

from spheretorch import SphereParameter, renormalize_, sphere_, sphere_dim_of
from spheretorch import sphere as S

F64 = torch.float64


@hs.composite
def kinds(draw):
    """(shape, dims, radius, seed): 1-4 axes, dims a run of adjacent axes or None."""
    ndim = draw(hs.integers(1, 4))
    shape = tuple(draw(hs.sampled_from([1, 2, 3])) for _ in range(ndim))
    if draw(hs.booleans()):
        dims = None
        axes = tuple(range(ndim))
    else:
        first = draw(hs.integers(0, ndim - 1))
        last = draw(hs.integers(first, ndim - 1))
        axes = tuple(range(first, last + 1))
        dims = axes if draw(hs.booleans()) else tuple(a - ndim for a in axes)
    if math.prod(shape[a] for a in axes) < 2:  # a sphere needs two coordinates
        shape = tuple(3 if i == axes[0] else n for i, n in enumerate(shape))
    radius = draw(hs.sampled_from([1.0, 0.25, 3.0, 17.5]))
    return shape, dims, radius, draw(hs.integers(0, 2**31 - 1))


def flat_reference(shape, dims):
    """The same spheres by hand: move the sphere axes last and flatten them."""
    ndim = len(shape)
    axes = tuple(range(ndim)) if dims is None else tuple(sorted(d % ndim for d in dims))
    rest = [i for i in range(ndim) if i not in axes]

    def to_rows(t):
        return t.permute(*rest, *axes).reshape(*[shape[i] for i in rest], -1)

    def back(t):
        full = t.reshape(*[shape[i] for i in rest], *[shape[i] for i in axes])
        return full.permute(*[(rest + list(axes)).index(i) for i in range(ndim)])

    return to_rows, back


def point_and_tangent(shape, dims, radius, seed):
    g = torch.Generator().manual_seed(seed)
    x = S.normalize(torch.randn(shape, dtype=F64, generator=g), dims, radius=radius)
    u = S.project(x, torch.randn(shape, dtype=F64, generator=g), dims, radius=radius)
    return x, u


@settings(max_examples=60, deadline=None)
@given(kinds())
def test_functions_equal_the_flattened_last_axis_versions(kind):
    shape, dims, r, seed = kind
    to_rows, back = flat_reference(shape, dims)
    x, u = point_and_tangent(shape, dims, r, seed)
    y = S.expmap(x, 0.7 * u, dims, radius=r)
    xr, ur, yr = to_rows(x), to_rows(u), to_rows(y)
    torch.testing.assert_close(to_rows(S.normalize(3 * x, dims, radius=r)), xr)
    torch.testing.assert_close(y, back(S.expmap(xr, 0.7 * ur, -1, radius=r)))
    torch.testing.assert_close(
        S.logmap(x, y, dims, radius=r), back(S.logmap(xr, yr, -1, radius=r)), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(S.retract(x, u, dims, radius=r), back(S.retract(xr, ur, radius=r)))
    d = S.dist(x, y, dims, radius=r)
    torch.testing.assert_close(d.reshape(-1), S.dist(xr, yr, -1, radius=r).reshape(-1))
    v = S.transport(x, y, u, dims, radius=r)
    torch.testing.assert_close(v, back(S.transport(xr, yr, ur, -1, radius=r)))


@settings(max_examples=60, deadline=None)
@given(kinds())
def test_sphere_of_radius_r_properties(kind):
    shape, dims, r, seed = kind
    x, u = point_and_tangent(shape, dims, r, seed)
    n = S.norm(x, dims)
    torch.testing.assert_close(n, torch.full_like(n, r))
    S.check_unit(x, dims, radius=r)
    torch.testing.assert_close(S.inner(x, u, dims), torch.zeros_like(n), atol=1e-12 * r, rtol=0)
    # a step of length |u| < pi r turns by |u| / r and is inverted by logmap
    u = u * (2.5 * r / S.norm(u, dims).clamp_min(1e-300)).clamp(max=1.0)
    y = S.expmap(x, u, dims, radius=r)
    torch.testing.assert_close(S.norm(y, dims), torch.full_like(n, r))
    torch.testing.assert_close(S.dist(x, y, dims, keepdim=True, radius=r), S.norm(u, dims))
    torch.testing.assert_close(S.angle(x, y, dims, radius=r), S.norm(u, dims) / r)
    torch.testing.assert_close(S.logmap(x, y, dims, radius=r), u, atol=1e-10 * r, rtol=0)
    # transport keeps inner products and lands in the tangent space at y
    w = S.project(x, torch.randn(shape, dtype=F64), dims, radius=r)
    tu = S.transport(x, y, u, dims, radius=r)
    tw = S.transport(x, y, w, dims, radius=r)
    torch.testing.assert_close(S.inner(tu, tw, dims), S.inner(u, w, dims), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(S.inner(y, tw, dims), torch.zeros_like(n), atol=1e-10, rtol=0)


def test_dim_none_is_the_frobenius_sphere():
    w = torch.randn(4, 5, dtype=F64)
    torch.testing.assert_close(S.normalize(w, None, radius=2.0), 2 * w / w.norm())
    assert S.dist(w / w.norm(), -w / w.norm(), None).shape == ()
    assert S.dist(w, w, None, keepdim=True).shape == (1, 1)
    assert S.angle(w, w, (0, 1)).shape == (1, 1)
    assert S.norm(torch.randn(2, 3, 4), (1, 2)).shape == (2, 1, 1)
    x = S.random(3, 4, dim=None, radius=5.0, generator=torch.Generator().manual_seed(0))
    assert abs(float(x.norm()) - 5.0) < 1e-5


@pytest.mark.parametrize("dims", [None, (1, 2), (0, 1)])
@pytest.mark.parametrize("theta", [0.0, 1e-9, 1e-4, 1.0, math.pi - 1e-3])
def test_gradcheck_at_edge_angles(dims, theta):
    """float64 gradcheck of expmap/logmap/dist/transport on the tuple and whole-tensor spheres
    of radius 2, with the second point at angle theta from the first (0: the same point)."""
    r = 2.0
    x, u = point_and_tangent((2, 3, 2), dims, r, seed=3)
    unit_u = u / S.norm(u, dims)
    y = S.expmap(x, theta * r * unit_u, dims, radius=r)
    if theta == 0.0:
        y = x.clone()
    x, y, u = (t.detach().requires_grad_() for t in (x, y, u))
    assert torch.autograd.gradcheck(
        lambda a, b: S.expmap(a, S.project(a, b, dims, radius=r), dims, radius=r), (x, u)
    )
    assert torch.autograd.gradcheck(lambda a, b: S.retract(a, b, dims, radius=r), (x, u))
    assert torch.autograd.gradcheck(lambda a, b: S.transport(a, b, u, dims, radius=r), (x, y))
    if theta < 3:  # the log is not smooth at the antipode (cut locus): test_antipodal_...
        assert torch.autograd.gradcheck(lambda a, b: S.logmap(a, b, dims, radius=r), (x, y))
    if 0 < theta < 3:
        # dist is a cone at x == y (not differentiable there); curvature 1/theta: finite
        # differences need a step well below theta (as in test_sphere)
        eps, atol = (1e-6, 1e-5) if theta > 1e-3 else (theta / 100, 1e-4)
        assert torch.autograd.gradcheck(
            lambda a, b: S.dist(a, b, dims, radius=r), (x, y), eps=eps, atol=atol
        )


def test_antipodal_pair_is_finite_on_whole_tensor_sphere():
    x = S.normalize(torch.randn(3, 4, dtype=F64), None, radius=2.0).requires_grad_()
    y = -x.detach()
    log = S.logmap(x, y, None, radius=2.0)
    torch.testing.assert_close(S.norm(log, None), torch.full((1, 1), 2 * math.pi, dtype=F64))
    log.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_bad_sphere_axes_and_radii_are_named():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"dim must be adjacent axes"):
        S.normalize(x, (0, 2))
    with pytest.raises(ValueError, match=r"dim names an axis twice"):
        S.normalize(x, (1, 1))
    with pytest.raises(ValueError, match=r"dim=3 is out of range"):
        S.normalize(x, (2, 3))
    with pytest.raises(ValueError, match=r"radius must be a positive finite float, got -1"):
        S.normalize(x, None, radius=-1)
    with pytest.raises(ValueError, match=r"radius must be a positive finite float, got inf"):
        S.retract(x, x, None, radius=math.inf)
    with pytest.raises(ValueError, match=r"needs at least one axis; got a 0-d tensor"):
        S.normalize(torch.tensor(2.0), None)
    with pytest.raises(ValueError, match=r"sphere needs at least 2"):
        S.expmap(torch.ones(1, 1), torch.ones(1, 1), None)
    with pytest.raises(ValueError, match=r"must lie on the sphere of radius 2"):
        S.check_unit(torch.ones(2, 3), None, radius=2.0, atol=1e-3)
    S.check_unit(torch.ones(2, 2), None, radius=2.0)  # norm of ones(2, 2) is 2


# ----------------------------------------------------------------------------- SphereParameter


class Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.filters = SphereParameter(torch.randn(4, 3, 2, 2), dim=(1, 2, 3))
        self.ball = SphereParameter(3.0 * torch.randn(5, 6), dim=None)
        self.vec = SphereParameter(torch.randn(7), dim=None)


def test_whole_tensor_parameter_keeps_its_norm_as_radius():
    x = torch.randn(5, 6, dtype=F64)
    p = SphereParameter(x, dim=None)
    assert p.sphere_dim == (0, 1) and sphere_dim_of(p) == (0, 1)
    assert p.sphere_radius == pytest.approx(float(x.norm()), rel=1e-15)
    torch.testing.assert_close(p.data, x)  # already on its own sphere
    q = SphereParameter(x, dim=None, radius=2.0)
    torch.testing.assert_close(q.data.norm(), torch.tensor(2.0, dtype=F64))
    v = SphereParameter(torch.tensor([3.0, 4.0]), dim=None)
    assert v.sphere_dim == 0 and v.sphere_radius == pytest.approx(5.0)
    assert "radius=5" in repr(v)


def test_tuple_dims_put_each_filter_on_the_unit_sphere():
    x = torch.randn(4, 3, 2, 2)
    p = SphereParameter(x, dim=(-3, -2, -1))
    assert p.sphere_dim == (1, 2, 3) and p.sphere_radius == 1.0
    n = p.detach().flatten(1).norm(dim=1)
    torch.testing.assert_close(n, torch.ones(4))
    assert SphereParameter(x, dim=(2,)).sphere_dim == 2  # one axis is the int kind
    with pytest.raises(ValueError, match="dim must be adjacent axes"):
        SphereParameter(x, dim=(1, 3))
    with pytest.raises(ValueError, match="radius"):
        SphereParameter(x, dim=None, radius=0.0)
    with pytest.raises(ValueError, match=r"takes its radius from the data's norm, which is 0"):
        SphereParameter(torch.zeros(2, 2), dim=None)


def _same(q, p):
    assert type(q) is SphereParameter
    assert q.sphere_dim == p.sphere_dim and q.sphere_radius == p.sphere_radius
    assert torch.equal(q.detach(), p.detach())


@pytest.mark.parametrize("weights_only", [True, False])
def test_kinds_survive_copies_saves_and_moves(weights_only):
    m = Conv()
    for p in m.parameters():
        _same(copy.deepcopy(p), p)
        _same(pickle.loads(pickle.dumps(p)), p)
        buf = io.BytesIO()
        torch.save(p, buf)
        buf.seek(0)
        _same(torch.load(buf, weights_only=weights_only), p)
    m2 = copy.deepcopy(m).to(torch.float64)
    assert m2.ball.sphere_radius == m.ball.sphere_radius and m2.filters.sphere_dim == (1, 2, 3)
    state = m.state_dict()
    fresh = Conv()
    fresh.load_state_dict(state)
    for a, b in zip(fresh.parameters(), m.parameters()):
        _same(a, b)  # bitwise: on the sphere already


def test_load_state_dict_and_renormalize_use_each_radius():
    m = Conv()
    state = {k: 1.5 * v for k, v in m.state_dict().items()}
    fresh = Conv()
    with pytest.warns(UserWarning, match=r"'filters' has slices off the unit sphere"):
        fresh.load_state_dict(state)
    # one sphere of its own radius: the loaded norm is the radius (bitwise, no warning)
    assert torch.equal(fresh.ball.detach(), state["ball"])
    assert fresh.ball.sphere_radius == pytest.approx(float(state["ball"].norm()))
    torch.testing.assert_close(fresh.filters.detach().flatten(1).norm(dim=1), torch.ones(4))
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(0.5)
    assert renormalize_(m) == 3
    torch.testing.assert_close(m.ball.detach().norm(), torch.tensor(m.ball.sphere_radius))
    torch.testing.assert_close(m.vec.detach().norm(), torch.tensor(m.vec.sphere_radius))
    torch.testing.assert_close(m.filters.detach().flatten(1).norm(dim=1), torch.ones(4))


def test_sphere_takes_the_new_kinds():
    conv = sphere_(nn.Conv2d(3, 4, 2), dim=(1, 2, 3))
    assert conv.weight.sphere_dim == (1, 2, 3)
    lin = nn.Linear(6, 5)
    norm = float(lin.weight.detach().norm())
    sphere_(lin, dim=None)
    assert lin.weight.sphere_radius == pytest.approx(norm)


def test_to_geoopt_refuses_the_kinds_geoopt_lacks():
    pytest.importorskip("geoopt")
    from spheretorch import to_geoopt

    for p in Conv().parameters():
        with pytest.raises(ValueError, match=r"geoopt\.Sphere is the unit sphere along the last"):
            to_geoopt(p)
