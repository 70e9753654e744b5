"""Parity of the optimizers: loop vs foreach, vs geoopt, vs torch's Adam/AdamW/SGD."""

from __future__ import annotations

import itertools

import pytest
import torch

import spheretorch as st
from spheretorch.optim import RenormAdam, RiemannianAdam, RiemannianSGD, _native
from spheretorch.optim import _functional as optim_functional
from spheretorch.optim import renorm_adam as renorm_adam_module

try:  # the oracle of two tests; the rest of the file runs without it (e.g. on a GPU machine)
    import geoopt
except ImportError:  # pragma: no cover - geoopt is a dev dependency
    geoopt = None
needs_geoopt = pytest.mark.skipif(geoopt is None, reason="geoopt is not installed")

F64 = torch.float64

# (shape, sphere_dim or None): rows, columns, a 3-d axis, several small same-shaped tensors
# (stacked reductions), a lone small one and Euclidean tensors.
LAYOUT = [
    ((5, 7), -1),
    ((6, 4), 0),
    ((2, 5, 3), 1),
    ((4, 8), -1),
    ((4, 8), -1),
    ((4, 8), -1),
    ((3, 8), 0),
    ((7,), None),
    ((3, 3), None),
]


def make_params(seed: int, dtype=F64, layout=LAYOUT):
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape, dim in layout:
        data = torch.randn(shape, generator=g, dtype=dtype)
        out.append(
            st.SphereParameter(data, dim=dim) if dim is not None else torch.nn.Parameter(data)
        )
    return out


def grads_for(params, seed: int, step: int):
    g = torch.Generator().manual_seed(7919 + 1000 * seed + step)  # not the params seed
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def run(params, opt, seed: int, steps: int = 8):
    for t in range(steps):
        for p, g in zip(params, grads_for(params, seed, t)):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in params]


def assert_lists_close(a, b, rtol=1e-10, atol=1e-12):
    for i, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=f"tensor {i}")


def assert_bitwise(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"tensor {i}: max diff {(x - y).abs().max().item()}"


def assert_on_sphere(params, tol=1e-12):
    for p in params:
        d = st.sphere_dim_of(p)
        if d is not None:
            n = torch.linalg.vector_norm(p.detach().double(), dim=d)
            assert (n - 1).abs().max().item() <= tol


@pytest.fixture
def small_buckets(monkeypatch):
    """Force several CPU buckets so bucketing is exercised by small test tensors."""
    monkeypatch.setattr(optim_functional, "CPU_BUCKET_BYTES", 300)
    monkeypatch.setattr(renorm_adam_module, "RENORM_BUCKET_BYTES", 300)


ADAM_OPTIONS = list(
    itertools.product(
        [False, True],  # amsgrad
        [False, True],  # maximize
        ["row", "coordinate"],
        ["project", "exp"],
        [(0.0, False), (0.1, False), (0.1, True)],  # weight decay, decoupled
    )
)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("amsgrad,maximize,second_moment,retraction,wd", ADAM_OPTIONS)
def test_riemannian_adam_loop_vs_foreach(
    seed, amsgrad, maximize, second_moment, retraction, wd, small_buckets
):
    results = []
    for foreach in (False, True):
        params = make_params(seed)
        opt = RiemannianAdam(
            params,
            lr=0.05,
            amsgrad=amsgrad,
            maximize=maximize,
            second_moment=second_moment,
            retraction=retraction,
            weight_decay=wd[0],
            decoupled_weight_decay=wd[1],
            foreach=foreach,
        )
        results.append(run(params, opt, seed))
        assert_on_sphere(params)
    assert_lists_close(*results)


SGD_OPTIONS = list(
    itertools.product(
        [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.0, True), (0.8, 0.3, False)],
        [False, True],  # maximize
        ["project", "exp"],
        [0.0, 0.1],  # weight decay
    )
)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mom,maximize,retraction,wd", SGD_OPTIONS)
def test_riemannian_sgd_loop_vs_foreach(seed, mom, maximize, retraction, wd, small_buckets):
    momentum, dampening, nesterov = mom
    results = []
    for foreach in (False, True):
        params = make_params(seed)
        opt = RiemannianSGD(
            params,
            lr=0.1,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            maximize=maximize,
            retraction=retraction,
            weight_decay=wd,
            foreach=foreach,
        )
        results.append(run(params, opt, seed))
        assert_on_sphere(params)
    assert_lists_close(*results)


# ------------------------------------------------------------------------------ vs geoopt


@needs_geoopt
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
def test_riemannian_adam_matches_geoopt(seed, amsgrad, foreach):
    """Default RiemannianAdam == geoopt.optim.RiemannianAdam on geoopt.Sphere, step by step."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (3, 4, 9), (1, 3)]
    data = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
    ours = [st.SphereParameter(d.clone(), dim=-1) for d in data]
    theirs = [st.to_geoopt(p) for p in ours]
    o1 = RiemannianAdam(ours, lr=0.03, amsgrad=amsgrad, foreach=foreach)
    o2 = geoopt.optim.RiemannianAdam(theirs, lr=0.03, amsgrad=amsgrad)
    for t in range(25):
        for a, b, gr in zip(ours, theirs, grads_for(ours, seed, t)):
            a.grad, b.grad = gr.clone(), gr.clone()
        o1.step()
        o2.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-13)
    for a, b in zip(ours, theirs):
        s1, s2 = o1.state[a], o2.state[b]
        torch.testing.assert_close(s1["exp_avg"], s2["exp_avg"], rtol=1e-11, atol=1e-13)
        # geoopt stores the per-row second moment broadcast to the full shape
        torch.testing.assert_close(
            s1["exp_avg_sq"].expand_as(s2["exp_avg_sq"]), s2["exp_avg_sq"], rtol=1e-11, atol=0
        )


@needs_geoopt
@pytest.mark.parametrize("foreach", [False, True])
def test_riemannian_sgd_matches_geoopt_without_momentum(foreach):
    g = torch.Generator().manual_seed(3)
    ours = [st.SphereParameter(torch.randn(4, 6, generator=g, dtype=F64), dim=-1)]
    theirs = [st.to_geoopt(ours[0])]
    o1 = RiemannianSGD(ours, lr=0.2, foreach=foreach)
    o2 = geoopt.optim.RiemannianSGD(theirs, lr=0.2)
    for t in range(10):
        gr = grads_for(ours, 3, t)[0]
        ours[0].grad, theirs[0].grad = gr.clone(), gr.clone()
        o1.step()
        o2.step()
    torch.testing.assert_close(ours[0].detach(), theirs[0].detach(), rtol=1e-12, atol=1e-13)


def test_riemannian_sgd_first_momentum_step_is_torchs_not_geoopts():
    """torch starts the buffer at the first (Riemannian) gradient, without dampening."""
    x = st.SphereParameter(torch.randn(3, 5, dtype=F64), dim=-1)
    g = torch.randn(3, 5, dtype=F64)
    x.grad = g.clone()
    x0 = x.detach().clone()
    opt = RiemannianSGD([x], lr=0.1, momentum=0.9, dampening=0.5)
    opt.step()
    rg = st.sphere.project(x0, g)
    torch.testing.assert_close(x.detach(), st.sphere.retract(x0, -0.1 * rg))
    buf = opt.state[x]["momentum_buffer"]
    torch.testing.assert_close(buf, st.sphere.project(x.detach(), rg))


# ------------------------------------------------------------------------------ vs torch


EUCLID = [((5, 7), None), ((3,), None), ((2, 3, 4), None)]
MIXED = [*EUCLID, ((4, 6), -1), ((6, 2), 0)]


def _euclidean(params):
    return [p for p in params if st.sphere_dim_of(p) is None]


def _assert_euclidean_steps_match(ours, opt, ref, ref_opt, seed: int, steps: int = 6) -> None:
    """Step ``opt`` (over ``ours``) and torch's ``ref_opt`` (over copies ``ref`` of the
    Euclidean params) on the same gradients; the Euclidean params must stay bitwise equal."""
    for t in range(steps):
        gs = grads_for(ours, seed, t)
        for p, g in zip(ours, gs):
            p.grad = g
        for p, g in zip(ref, [g for p, g in zip(ours, gs) if st.sphere_dim_of(p) is None]):
            p.grad = g.clone()
        opt.step()
        ref_opt.step()
    assert_bitwise([p.detach() for p in _euclidean(ours)], [p.detach() for p in ref])


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("layout", [EUCLID, MIXED], ids=["euclidean", "mixed"])
@pytest.mark.parametrize(
    "amsgrad,maximize,wd,decoupled",
    [
        (False, False, 0.0, False),
        (True, False, 0.0, False),
        (False, True, 0.1, False),
        (False, False, 0.1, True),
        (True, True, 0.05, True),
    ],
)
@pytest.mark.parametrize("cls", [RiemannianAdam, RenormAdam])
def test_adam_on_euclidean_params_is_torch_adam(
    cls, foreach, layout, amsgrad, maximize, wd, decoupled
):
    """Euclidean parameters get exactly torch.optim.Adam / AdamW, bitwise (float32)."""
    ours = make_params(5, torch.float32, layout)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in _euclidean(ours)]
    kw = dict(lr=0.01, amsgrad=amsgrad, maximize=maximize, weight_decay=wd, foreach=foreach)
    if cls is RenormAdam:
        kw["fused"] = False
    opt = cls(ours, decoupled_weight_decay=decoupled, **kw)
    kw.pop("fused", None)
    torch_cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    ref_opt = torch_cls(ref, **kw)
    _assert_euclidean_steps_match(ours, opt, ref, ref_opt, seed=5)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("layout", [EUCLID, MIXED], ids=["euclidean", "mixed"])
@pytest.mark.parametrize(
    "momentum,dampening,nesterov,wd,maximize",
    [
        (0.0, 0.0, False, 0.0, False),
        (0.9, 0.0, False, 0.0, False),
        (0.9, 0.0, True, 0.1, False),
        (0.8, 0.3, False, 0.1, True),
    ],
)
def test_sgd_on_euclidean_params_is_torch_sgd(
    foreach, layout, momentum, dampening, nesterov, wd, maximize
):
    ours = make_params(6, torch.float32, layout)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in _euclidean(ours)]
    kw = dict(
        lr=0.05,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=wd,
        maximize=maximize,
        foreach=foreach,
    )
    opt = RiemannianSGD(ours, **kw)
    ref_opt = torch.optim.SGD(ref, **kw)
    _assert_euclidean_steps_match(ours, opt, ref, ref_opt, seed=6)


RENORM_LAYOUT = [
    ((6, 16), -1),
    ((16, 6), 0),
    ((4, 8), -1),
    ((4, 8), -1),
    ((3, 5, 4), 1),
    ((16,), None),
    ((4, 4), None),
]


def _manual_renorm(params, dims, exact=False, everywhere=False):
    """``p / p.norm(dim)``; ``exact``: along strided axes (``everywhere``: along all axes)
    the float64 result rounded once."""
    with torch.no_grad():
        for p, d in zip(params, dims):
            if d is not None:
                if exact and (everywhere or p.stride(d) != 1):
                    p64 = p.double()
                    p.copy_(p64 / p64.norm(dim=d, keepdim=True))
                else:
                    p.div_(p.norm(dim=d, keepdim=True))


def _within_one_ulp(a, b):
    ulp = (torch.nextafter(b.abs(), torch.tensor(float("inf"))) - b.abs()).abs()
    assert ((a - b).abs() <= ulp).all(), ((a - b).abs() / ulp).max()


@pytest.mark.parametrize(
    "impl",
    [dict(fused=False, foreach=False), dict(fused=False, foreach=True), dict(fused=True), {}],
    ids=["single", "foreach", "fused", "default"],
)
@pytest.mark.parametrize(
    "amsgrad,maximize,wd,decoupled",
    [
        (False, False, 0.0, False),
        (True, True, 0.0, False),
        (False, False, 0.1, False),
        (False, False, 0.1, True),
    ],
)
def test_renorm_adam_is_torch_adam_plus_renormalization(
    impl, amsgrad, maximize, wd, decoupled, small_buckets
):
    """Single-tensor path: bitwise torch's Adam followed by ``p.div_(p.norm(dim,
    keepdim=True))``. Foreach/fused: the Adam part (moments, steps) bitwise, and every step
    within 1 ulp of that (of the exactly rounded renormalisation along strided axes, and along
    every axis on the fused CPU path)."""
    ours = make_params(7, torch.float32, RENORM_LAYOUT)
    dims = [st.sphere_dim_of(p) for p in ours]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(lr=0.02, amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=decoupled)
    opt = RenormAdam(ours, weight_decay=wd, **impl, **kw)
    torch_impl = impl or dict(foreach=True)  # RenormAdam's default on CPU
    groups = [
        {"params": [p for p, d in zip(ref, dims) if d is None], "weight_decay": wd},
        {"params": [p for p, d in zip(ref, dims) if d is not None], "weight_decay": 0.0},
    ]
    ref_opt = torch.optim.Adam(groups, **torch_impl, **kw)
    for t in range(6):
        gs = grads_for(ours, 7, t)
        for p, q, g in zip(ours, ref, gs):
            p.grad, q.grad = g, g.clone()
        opt.step()
        ref_opt.step()
        single = impl.get("foreach") is False
        # the fused CPU path renormalises with the correctly rounded norm on every axis
        fused_cpu = impl.get("fused", False) and _native.library() is not None
        _manual_renorm(ref, dims, exact=not single, everywhere=fused_cpu)
        for p, q in zip(ours, ref):
            if single:
                assert torch.equal(p.detach(), q.detach())
            else:
                # Along strided axes the multi-tensor renormalisation sums squares in
                # float64 (torch's CPU vector_norm there is ~10x slower and several ulp
                # off): compare with the exactly rounded renormalisation there, with
                # p.norm elsewhere, re-synchronising so every step starts from one point.
                _within_one_ulp(p.detach(), q.detach())
                with torch.no_grad():
                    q.copy_(p)
        for p, q in zip(ours, ref):  # the Adam part (moments, steps) is bitwise torch's
            for key, value in ref_opt.state[q].items():
                assert torch.equal(opt.state[p][key], value), key
    assert_on_sphere(ours, tol=1e-6)
