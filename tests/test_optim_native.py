"""The hand-written CPU kernels of the fused paths (``spheretorch/optim/_native.cpp``).

Oracles: the foreach path (torch ops, the formulas of the docstrings) for the optimizer
kernels; exact float64 arithmetic for the renormalisation; ``torch.isfinite`` for the
non-finite scan. The fallback (no compiler) and the on-disk cache are tested too.
"""

from __future__ import annotations

import copy
import itertools
import logging

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as hs

import spheretorch as st
from spheretorch.optim import RenormAdam, RiemannianAdam, RiemannianSGD, _native

pytestmark = pytest.mark.skipif(_native.library() is None, reason="no C++ compiler here")

RTOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def layout(dtype, seed=0):
    """Every slice layout the kernel distinguishes: last axis, first axis (strided), middle
    axis of a 3-d tensor, one-slice tensors, many small same-shaped ones; plus Euclidean."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, dtype=dtype, generator=g)

    return [
        st.SphereParameter(r(7, 37), dim=1),
        st.SphereParameter(r(33, 5), dim=0),
        st.SphereParameter(r(3, 9, 4), dim=1),
        st.SphereParameter(r(1, 16), dim=-1),
        *[st.SphereParameter(r(2, 8), dim=1) for _ in range(4)],
        torch.nn.Parameter(r(6, 3)),
    ]


def grads(params, seed):
    g = torch.Generator().manual_seed(1000 + seed)  # not layout's seed: g would be radial
    return [torch.randn(p.shape, dtype=p.dtype, generator=g) for p in params]


def assert_fused_equals_foreach(cls, kwargs, dtype, steps=4, lr_tensor=False):
    a = layout(dtype)
    b = copy.deepcopy(a)
    lr = kwargs.pop("lr")
    opt_a = cls(a, lr=lr, foreach=True, **kwargs)
    opt_b = cls(b, lr=torch.tensor(lr) if lr_tensor else lr, fused=True, **kwargs)
    for t in range(steps):
        for p, q, g in zip(a, b, grads(a, t)):
            p.grad, q.grad = g, g.clone()
        opt_a.step()
        opt_b.step()
    rtol = RTOL[dtype]
    for p, q in zip(a, b):
        torch.testing.assert_close(q, p, rtol=rtol, atol=rtol)
        for key, value in opt_a.state[p].items():
            if key != "step":  # moments of size ~|g|: round-off relative to their scale
                scale = float(value.abs().max()) if value.numel() else 1.0
                torch.testing.assert_close(opt_b.state[q][key], value, rtol=rtol, atol=rtol * scale)
            else:
                assert float(opt_b.state[q][key]) == float(value)
        d = st.sphere_dim_of(q)
        if d is not None:
            torch.testing.assert_close(q.norm(dim=d), torch.ones_like(q.norm(dim=d)))


ADAM_OPTIONS = [
    dict(second_moment=m, retraction=r, amsgrad=a, maximize=x)
    for m, r, a, x in itertools.product(
        ("row", "coordinate"), ("project", "exp"), *[(False, True)] * 2
    )
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("options", ADAM_OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_native_riemannian_adam_equals_foreach(options, dtype):
    """Every option of RiemannianAdam, every slice layout, both dtypes: fused (native kernel)
    equals the foreach path within float round-off, weight decay on the Euclidean part."""
    kwargs = dict(lr=0.05, weight_decay=0.01, **options)
    assert_fused_equals_foreach(RiemannianAdam, kwargs, dtype)


def test_native_riemannian_adam_takes_a_tensor_lr():
    assert_fused_equals_foreach(RiemannianAdam, dict(lr=0.05), torch.float32, lr_tensor=True)


SGD_OPTIONS = [
    dict(momentum=0.0),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.3, maximize=True),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.9, retraction="exp"),
    dict(momentum=0.0, retraction="exp", maximize=True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("options", SGD_OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_native_riemannian_sgd_equals_foreach(options, dtype):
    assert_fused_equals_foreach(RiemannianSGD, dict(lr=0.1, **options), dtype)


@pytest.mark.parametrize("cls", [RiemannianAdam, RiemannianSGD, RenormAdam])
def test_native_step_with_a_nonfinite_gradient_changes_nothing(cls):
    params = layout(torch.float32)
    opt = cls(params, lr=0.1, fused=True, **({"momentum": 0.9} if cls is RiemannianSGD else {}))
    for p, g in zip(params, grads(params, 0)):
        p.grad = g
    opt.step()
    before = copy.deepcopy((params, opt.state_dict()))
    for p, g in zip(params, grads(params, 1)):
        p.grad = g
    params[2].grad[1, 8, 3] = float("inf")  # the last element of a strided slice
    opt.step()
    assert opt.skipped_steps == 1
    for p, q in zip(params, before[0]):
        assert torch.equal(p, q)
    for key, value in opt.state_dict()["state"].items():
        for name, t in value.items():
            assert torch.equal(t, before[1]["state"][key][name]), name


def test_native_kernels_bump_version_counters():
    """As torch's in-place ops: a step after a forward that saved the parameter makes its
    backward fail instead of using the new values silently."""
    p = st.SphereParameter(torch.randn(4, 8), dim=1)
    p.grad = torch.randn(4, 8)
    opt = RiemannianAdam([p], lr=0.1, fused=True)
    loss = (p * p).sum()
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ---------------------------------------------------------------------- renormalisation


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,dim", [((50, 300), 1), ((300, 50), 0), ((4, 70, 3), 1)])
def test_native_renormalize_is_within_an_ulp_of_the_exactly_rounded_one(shape, dim, dtype):
    """x times 1/|x| (float64 sum, rounded once): float32 within an ulp of the quotient
    computed in float64 and rounded once; float64 within two ulps of the quotient computed
    in extended precision (torch's own float64 x / |x| is up to ~7 ulps off there)."""
    x = torch.randn(shape, dtype=dtype) * 3
    if dtype == torch.float32:
        x64 = x.double()
        ref, bound = (x64 / x64.norm(dim=dim, keepdim=True)).to(dtype), 1
    elif np.finfo(np.longdouble).eps < 1e-18:  # x87 extended precision
        xl = x.numpy().astype(np.longdouble)
        ex = xl / np.sqrt((xl * xl).sum(axis=dim, keepdims=True))
        ref, bound = torch.from_numpy(ex.astype(np.float64)), 2
    else:
        ref, bound = x / x.norm(dim=dim, keepdim=True), 8
    _native.renormalize([x], [dim])
    ulp = torch.nextafter(ref.abs(), torch.tensor(float("inf"), dtype=dtype)) - ref.abs()
    assert ((x - ref).abs() <= bound * ulp).all()
    torch.testing.assert_close(x.norm(dim=dim), torch.ones_like(x.norm(dim=dim)))


def test_native_renormalize_keeps_everything_when_told():
    x = torch.randn(5, 6)
    y = x.clone()
    _native.renormalize([x], [1], keep=torch.ones((), dtype=torch.float32))
    assert torch.equal(x, y)


def test_fused_renorm_adam_parameters_are_the_exact_renormalisation_of_torch_adam():
    """Moments and steps bitwise torch Adam(fused=True); the parameter within an ulp of its
    result divided by the row norm (float64, rounded once)."""
    ours = [st.SphereParameter(torch.randn(64, 96), dim=1) for _ in range(3)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt, opt_ref = RenormAdam(ours, lr=0.05, fused=True), torch.optim.Adam(ref, lr=0.05, fused=True)
    for t in range(3):
        for p, q, g in zip(ours, ref, grads(ours, t)):
            p.grad, q.grad = g, g.clone()
        opt.step()
        opt_ref.step()
        with torch.no_grad():
            for q in ref:
                q.copy_(q.double() / q.double().norm(dim=1, keepdim=True))
        for p, q in zip(ours, ref):
            assert (p - q).abs().max() <= torch.finfo(torch.float32).eps
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(opt.state[p][key], opt_ref.state[q][key]), key
            with torch.no_grad():
                q.copy_(p)  # the same point for the next step


# ---------------------------------------------------------------------- non-finite scan

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@given(
    dtype=hs.sampled_from(DTYPES),
    sizes=hs.lists(hs.integers(1, 70_000), min_size=1, max_size=4),
    bad=hs.one_of(hs.none(), hs.sampled_from([float("nan"), float("inf"), -float("inf")])),
    where=hs.floats(0, 1),
    seed=hs.integers(0, 2**16),
)
def test_native_nonfinite_scan_is_exact(dtype, sizes, bad, where, seed):
    g = torch.Generator().manual_seed(seed)
    ts = [(torch.randn(n, generator=g) * 1e4).to(dtype) for n in sizes]
    ts[0][0] = torch.finfo(dtype).max  # huge but finite: a sum would overflow, not this test
    if bad is not None:
        t = ts[seed % len(ts)]
        t[min(t.numel() - 1, int(where * t.numel()))] = bad
    assert _native.nonfinite(ts) == (bad is not None)
    assert bool(st.optim._functional.nonfinite_flag(ts)) == (bad is not None)


# ---------------------------------------------------------------------- build, cache, fallback


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """``_native.library`` rebuilt under the test's environment, restored afterwards."""
    monkeypatch.setenv("SPHERETORCH_CACHE_DIR", str(tmp_path))
    _native.library.cache_clear()
    yield tmp_path
    _native.library.cache_clear()


def test_library_is_built_once_into_the_cache_and_reloaded(fresh_library, monkeypatch):
    assert _native.library() is not None
    built = list(fresh_library.glob("native-*.so"))
    assert len(built) == 1 and not list(fresh_library.glob("*.tmp*"))
    _native.library.cache_clear()
    monkeypatch.setattr(_native, "_compile", lambda *a: pytest.fail("compiled again"))
    assert _native.library() is not None


def test_without_a_compiler_fused_steps_fall_back_to_torch(fresh_library, monkeypatch, caplog):
    """No compiler (or a broken one): one warning, then the torch paths (here the
    RenormAdam renormalisation and the non-finite test; the compiled Riemannian kernels are
    covered in test_optim_contract)."""
    monkeypatch.setenv("CXX", "false")
    with caplog.at_level(logging.WARNING, logger="spheretorch.optim._native"):
        assert _native.library() is None
    assert "fall back to torch" in caplog.text
    assert not _native.usable([torch.ones(3)])
    a = layout(torch.float32)
    b = copy.deepcopy(a)
    opt_a, opt_b = RenormAdam(a, lr=0.05, foreach=True), RenormAdam(b, lr=0.05, fused=True)
    for t in range(2):
        for p, q, g in zip(a, b, grads(a, t)):
            p.grad, q.grad = g, g.clone()
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)


def test_native_can_be_switched_off(fresh_library, monkeypatch):
    monkeypatch.setenv("SPHERETORCH_NATIVE", "0")
    assert _native.library() is None


def test_an_unwritable_cache_falls_back_to_a_temporary_directory(fresh_library, monkeypatch):
    blocked = fresh_library / "not-a-directory"
    blocked.write_text("")
    monkeypatch.setenv("SPHERETORCH_CACHE_DIR", str(blocked))
    monkeypatch.setattr(_native.tempfile, "gettempdir", lambda: str(fresh_library / "tmp"))
    assert _native.library() is not None
    assert list((fresh_library / "tmp").glob("spheretorch-*/native-*.so"))
