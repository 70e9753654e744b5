"""One harness: every implementation of every sphere update against its one reference.

(And the Triton kernels compiled, not interpreted, for an sm_90 target: no GPU needed.)

The reference of each optimizer is its single-tensor loop (``foreach=False``), written with
:mod:`spheretorch.sphere`. The implementations checked against it, over options x sphere
layouts (rows, columns, a middle axis, adjacent axes, the whole tensor of radius != 1) x
dtypes:

* ``foreach``: torch ``_foreach`` ops (the CPU default);
* ``fused``: the native C++ CPU kernel (where a compiler is present);
* ``fused-fallback``: ``fused=True`` where no kernel applies (native off): the foreach path,
  masked on the device for the non-finite skip;
* ``triton-foreach`` / ``triton-fused``: the Triton kernels of
  :mod:`spheretorch.kernels.optim`, forced with ``SPHERETORCH_FUSED_BACKEND=triton`` and run on
  CPU tensors by Triton's interpreter (the same kernels compile for CUDA).

Interpreter runs are slow (each program is a numpy loop), so shapes are tiny and each option
set runs on every layout at once (one launch per row length).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import spheretorch as st
from spheretorch.kernels import backend
from spheretorch.optim import AdamH, RenormAdam, RiemannianAdam, RiemannianSGD, SphereMuon, _native
from spheretorch.optim import _functional as F

triton_missing = pytest.mark.skipif(
    not backend.triton_available(), reason="triton is not installed"
)


def _sphere(x: torch.Tensor, dims, radius: float = 1.0) -> torch.nn.Parameter:
    """A parameter on a sphere of ``dims`` (an int, adjacent axes, or None = whole tensor)."""
    if isinstance(dims, int):
        return st.SphereParameter(x, dim=dims)
    p = st.SphereParameter(x.reshape(x.shape[0], -1), dim=1)  # any SphereParameter, re-shaped
    geo = F._geometry(tuple(x.shape), dims, radius)
    with torch.no_grad():
        rows = geo.rows(x.clone())
        rows = rows * (radius / rows.norm(dim=1, keepdim=True))
        p.data = rows.reshape(x.shape)
    p.sphere_dim = dims
    p.sphere_radius = radius
    return p


def make_params(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    return [
        _sphere(r(5, 7), 1),  # rows
        _sphere(r(6, 3), 0),  # columns (inner > 1)
        _sphere(r(2, 4, 3), 1),  # a middle axis
        _sphere(r(3, 2, 2, 2), (1, 2, 3)),  # adjacent axes: a conv filter per sphere
        _sphere(r(3, 4), None, radius=2.5),  # the whole tensor, radius 2.5
        torch.nn.Parameter(r(4)),  # Euclidean
    ]


def set_grads(params, seed: int, strided: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        if strided and p.dim() == 2:  # a transposed copy: same values, other strides
            grad = grad.t().contiguous().t()
        p.grad = grad


IMPLS = {
    "foreach": dict(foreach=True),
    "fused": dict(fused=True),
    "fused-fallback": dict(fused=True),
    "triton-foreach": dict(foreach=True),
    "triton-fused": dict(fused=True),
}

ADAM = [
    dict(lr=0.05),
    dict(lr=0.05, second_moment="coordinate", retraction="exp", amsgrad=True, maximize=True),
]
SGD = [
    dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.05, momentum=0.5, dampening=0.1, retraction="exp", maximize=True),
    dict(lr=0.05),
]
RENORM = [dict(lr=0.05), dict(lr=0.05, project_grad=True, amsgrad=True)]
CASES = (
    [(RiemannianAdam, o) for o in ADAM]
    + [(RiemannianSGD, o) for o in SGD]
    + [(RenormAdam, o) for o in RENORM]
)
IDS = [f"{c.__name__}-{'-'.join(f'{k}={v}' for k, v in o.items() if k != 'lr')}" for c, o in CASES]

#: (dtype, rtol) of each dtype checked
DTYPES = {"f64": (torch.float64, 1e-12), "f32": (torch.float32, 2e-6)}


@pytest.fixture
def impl(request, monkeypatch):
    """Select an implementation by the environment (backend) and the native switch."""
    name = request.param
    if name.startswith("triton"):
        if not backend.triton_available():
            pytest.skip("triton is not installed")
        monkeypatch.setenv(backend.BACKEND_ENV, "triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.setenv(backend.BACKEND_ENV, "torch")
    if name == "fused" and _native.library() is None:
        pytest.skip("no C++ compiler here")
    if name == "fused-fallback":
        monkeypatch.setattr(_native, "usable", lambda *a, **k: False)
    return name


def run(cls, kwargs, dtype, steps=3, nan_at=None, strided=False):
    params = make_params(dtype)
    opt = cls(params, **kwargs)
    for t in range(steps):
        set_grads(params, 10 + t, strided=strided)
        if t == nan_at:
            params[1].grad[0, 0] = float("nan")
        opt.step()
    return params, opt


@pytest.mark.parametrize("impl", list(IMPLS), indirect=True)
@pytest.mark.parametrize("cls,kwargs", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_implementation_equals_the_reference(impl, cls, kwargs, dtype, monkeypatch):
    if dtype == "f32" and impl in ("foreach", "fused-fallback"):
        pytest.skip("f64 covers the torch paths; f32 is for the kernels' arithmetic")
    dt, rtol = DTYPES[dtype]
    with monkeypatch.context() as m:  # the reference never takes a kernel
        m.setenv(backend.BACKEND_ENV, "torch")
        ref, _ = run(cls, dict(kwargs, foreach=False), dt)
    calls = []
    if impl.startswith("triton"):
        from spheretorch.kernels import optim as kernels

        for name in ("sphere_adam_", "sphere_sgd_", "renormalize_", "project"):
            fn = getattr(kernels, name)
            monkeypatch.setattr(
                kernels, name, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k)
            )
    out, _ = run(cls, dict(kwargs, **IMPLS[impl]), dt)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=rtol)
    for p in out[:5]:
        geo = F.sphere_of(p)
        norms = geo.rows(p.detach()).double().norm(dim=geo.axis)
        torch.testing.assert_close(norms, torch.full_like(norms, geo.radius), rtol=rtol, atol=0)
    if impl.startswith("triton"):
        assert calls, "the Triton kernels were not used"


@triton_missing
@pytest.mark.parametrize("cls,kwargs", [CASES[1], CASES[3], CASES[6]], ids=[IDS[1], IDS[3], IDS[6]])
def test_triton_half_precision_parameters_use_float32_math(cls, kwargs, monkeypatch):
    """bfloat16 parameters: float32 state and math, rounded once to bfloat16."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with monkeypatch.context() as m:
        m.setenv(backend.BACKEND_ENV, "torch")
        ref, _ = run(cls, dict(kwargs, foreach=False), torch.bfloat16)
    monkeypatch.setenv(backend.BACKEND_ENV, "triton")
    out, opt = run(cls, dict(kwargs, fused=True), torch.bfloat16)
    for a, b in zip(out, ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-2, atol=1e-2)
    if cls is not RenormAdam:  # RenormAdam keeps torch Adam's state, in the parameter's dtype
        for p in out[:5]:
            for value in opt.state[p].values():
                if torch.is_tensor(value) and value.dim():
                    assert value.dtype == torch.float32


@pytest.mark.parametrize("impl", ["fused", "fused-fallback", "triton-fused"], indirect=True)
@pytest.mark.parametrize("cls,kwargs", [CASES[0], CASES[2], CASES[5]], ids=[IDS[0], IDS[2], IDS[5]])
def test_device_side_skip_changes_nothing(impl, cls, kwargs):
    """A non-finite gradient at step 2: the fused paths skip it on the device (nothing
    written: parameters, moments, step counters), equal to a run without that step."""
    dt = torch.float64
    skipped, opt = run(cls, dict(kwargs, fused=True), dt, steps=4, nan_at=2)
    assert opt.skipped_steps == 1
    params = make_params(dt)
    ref_opt = cls(params, **dict(kwargs, fused=True))
    for t in (0, 1, 3):
        set_grads(params, 10 + t)
        ref_opt.step()
    for a, b in zip(skipped, params):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)
    for a, b in zip(skipped, params):
        for key, value in ref_opt.state[b].items():
            torch.testing.assert_close(opt.state[a][key], value, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["fused", "fused-fallback", "triton-fused"], indirect=True)
@pytest.mark.parametrize("cls", [RiemannianAdam, RiemannianSGD, RenormAdam])
def test_fused_with_strided_gradients_runs_quietly_and_equals_the_reference(impl, cls):
    """``fused=True`` accepts any dense layout of gradient: a transposed (non-contiguous)
    gradient takes the same kernel (one contiguous copy) or the foreach path, never a
    compiler, and no warning is printed."""
    kwargs = dict(lr=0.05, **({"momentum": 0.9} if cls is RiemannianSGD else {}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, _ = run(cls, dict(kwargs, fused=True), torch.float64, strided=True)
    ref, _ = run(cls, dict(kwargs, foreach=False), torch.float64)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)


@triton_missing
def test_triton_nonfinite_scan_is_exact(monkeypatch):
    from spheretorch.kernels import optim as kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gs = [torch.zeros(3000), torch.zeros(7, 5, dtype=torch.float64), torch.ones(2)]
    assert float(kernels.nonfinite_flag(gs)) == 0.0
    for value in (float("nan"), float("inf"), -float("inf")):
        bad = copy.deepcopy(gs)
        bad[0][2999] = value  # the last element of the longest gradient
        assert float(kernels.nonfinite_flag(bad)) == 1.0
    big = [torch.full((2,), 3e38)]  # finite: the sum of squares would overflow, not the scan
    assert float(kernels.nonfinite_flag(big)) == 0.0


@triton_missing
def test_triton_tensor_lr_and_device_steps(monkeypatch):
    """A tensor learning rate and device step counters (capturable) are read by the kernel."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kwargs = dict(lr=torch.tensor(0.05, dtype=torch.float64), capturable=True)
    with monkeypatch.context() as m:
        m.setenv(backend.BACKEND_ENV, "torch")
        ref, _ = run(RiemannianAdam, dict(kwargs, foreach=False), torch.float64)
    monkeypatch.setenv(backend.BACKEND_ENV, "triton")
    out, _ = run(RiemannianAdam, kwargs, torch.float64)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["bf16", "transposed-param", "long-sphere"])
@pytest.mark.parametrize("cls", [RiemannianAdam, RiemannianSGD, RenormAdam])
def test_fused_accepts_every_layout_quietly(cls, case, monkeypatch):
    """Every combination ``fused=True`` accepts on CPU runs a kernel or the foreach path,
    equal to the reference and without a warning: half-precision parameters (no native
    half kernel), a non-contiguous parameter, a sphere longer than the Triton kernels hold."""
    monkeypatch.setenv(backend.BACKEND_ENV, "torch")
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if case == "bf16" else torch.float64
    if case == "transposed-param":
        data = torch.randn(7, 5, generator=g, dtype=dtype).t()  # (5, 7), strides (1, 5)
    elif case == "long-sphere":
        from spheretorch.kernels import optim as kernels

        data = torch.randn(2, kernels.MAX_ROW + 3, generator=g, dtype=dtype)
    else:
        data = torch.randn(5, 7, generator=g, dtype=dtype)

    def make():
        # a transposed parameter stays non-contiguous: SphereParameter keeps data's strides
        p = st.SphereParameter(data.clone(memory_format=torch.preserve_format), dim=1)
        return [p, torch.nn.Parameter(torch.randn(3, generator=g).to(dtype))]

    kwargs = dict(lr=0.05, **({"momentum": 0.9} if cls is RiemannianSGD else {}))
    a, b = make(), [copy.deepcopy(p) for p in make()]
    with torch.no_grad():
        b[1].copy_(a[1])
    opt_a, opt_b = cls(a, foreach=False, **kwargs), cls(b, fused=True, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in range(2):
            gg = torch.Generator().manual_seed(t)
            for p, q in zip(a, b):
                p.grad = torch.randn(p.shape, generator=gg).to(dtype)
                q.grad = p.grad.clone()
            opt_a.step()
            opt_b.step()
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-12
    for p, q in zip(a, b):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=tol, atol=tol)


def _signature(types: dict, constexprs: dict):
    sig = {**types, **{k: "constexpr" for k in constexprs}}
    names = list(sig)
    return sig, {(names.index(k),): v for k, v in constexprs.items()}


@triton_missing
def test_kernels_compile_for_a_cuda_target():
    """The kernels in compiled mode (not the interpreter) down to PTX for sm_90 (H100/H200),
    without a GPU: no interpreter-only construct, every dtype path type-checks."""
    import triton

    pytest.importorskip("triton.backends.nvidia", reason="triton without its CUDA backend")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from spheretorch.kernels import optim as kernels

    mod = kernels._jit(torch.device("cuda"))
    target = GPUTarget("cuda", 90, 32)
    tiles = {"TILES": "*i64", "INFO": "*i64"}
    block = {"N_INFO": 8, "BLOCK_R": 2, "BLOCK_N": 1024}
    cases = []
    for xdt, cd, row, exp in (("bf16", "fp32", True, True), ("fp64", "fp64", False, False)):
        types = {"X": f"*{xdt}", "G": f"*{xdt}", "M": f"*{cd}", "V": f"*{cd}", "VMAX": f"*{cd}"}
        types |= {"STEP": "*fp32", **tiles, "HYPER": "*fp64", "LR": "*fp32"}
        types |= {"FOUND_INF": "*fp32", "SIZE": "i32"}
        flags = dict(MAXIMIZE=True, ROW=row, EXP=exp, AMSGRAD=True, LR_TENSOR=True)
        flags |= dict(STEP_TENSOR=True, HAS_FOUND_INF=True)
        cases.append((mod._adam_kernel, types, {**block, **flags}))
    types = {"X": "*bf16", "G": "*bf16", "B": "*fp32", **tiles, "HYPER": "*fp32", "LR": "*fp32"}
    types |= {"FOUND_INF": "*fp32", "SIZE": "i32"}
    flags = dict(MAXIMIZE=False, EXP=True, MOMENTUM=True, FIRST=False, NESTEROV=True)
    cases.append((mod._sgd_kernel, types, {**block, **flags, "LR_TENSOR": False,
                                           "HAS_FOUND_INF": True}))  # fmt: skip
    types = {"X": "*fp32", "G": "*fp32", "OUT": "*fp32", **tiles, "HYPER": "*fp32"}
    types |= {"FOUND_INF": "*fp32", "SIZE": "i32"}
    for project in (True, False):
        cases.append((mod._renorm_kernel, types, {**block, "PROJECT": project,
                                                  "HAS_FOUND_INF": True}))  # fmt: skip
    types = {"G": "*fp16", "INFO": "*i64", "TILES": "*i64", "FLAG": "*i32"}
    cases.append((mod._nonfinite_kernel, types, {"BLOCK": 4096}))
    for xdt, ddt, cd, per_tensor, pass_norms, hyperball, project, strided in (
        ("bf16", "bf16", "fp32", True, True, False, True, True),
        ("fp32", "bf16", "fp32", True, False, False, True, False),
        ("fp64", "fp64", "fp64", False, False, False, True, True),
        ("bf16", "fp32", "fp32", False, False, True, False, False),
    ):
        types = {"X": f"*{xdt}", "D": f"*{ddt}", "NORMS": f"*{cd}", "RMS": f"*{cd}"}
        types |= {"ANGLE": f"*{cd}", **tiles, "HYPER": f"*{cd}", "LR": "*fp32", "SIZE": "i32"}
        flags = dict(PASS_NORMS=pass_norms, PER_TENSOR=per_tensor, LR_TENSOR=True)
        flags |= dict(HYPERBALL=hyperball, PROJECT=project, D_STRIDED=strided, MEASURE=True)
        cases.append((mod._rows_step_kernel, types, {**block, **flags}))
    # the whole-tensor spheres' two passes (step and renormalisation)
    for xdt, ddt, cd, has_d, strided in (
        ("bf16", "bf16", "fp32", True, True),
        ("fp64", "fp64", "fp64", True, False),
        ("fp32", "fp32", "fp32", False, False),
    ):
        types = {"X": f"*{xdt}", "D": f"*{ddt}", "PARTIALS": f"*{cd}", **tiles}
        consts = {"N_INFO": 7, "BLOCK": 4096, "HAS_D": has_d, "D_STRIDED": strided}
        cases.append((mod._whole_sums_kernel, types, consts))
        types = {"X": f"*{xdt}", "D": f"*{ddt}", "SUMS": f"*{cd}", "ANGLE": f"*{cd}", **tiles}
        types |= {"HYPER": f"*{cd}", "LR": "*fp32"}
        consts = {"N_INFO": 7, "BLOCK": 4096, "RENORM": not has_d, "HYPERBALL": strided}
        consts |= {"PROJECT": not strided, "LR_TENSOR": True, "D_STRIDED": strided}
        cases.append((mod._whole_step_kernel, types, {**consts, "MEASURE": has_d}))
    for fn, types, consts in cases:
        sig, constexprs = _signature(types, consts)
        out = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=target)
        assert "ptx" in out.asm


# ----------------------------------------------------------------------------- the Muon family


def _muon_family_params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Row spheres of two shapes (three of one: a stack), one of radius 2, a column sphere
    (the torch path) and a Euclidean matrix."""
    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    return [
        *(st.SphereParameter(r(4, 6), dim=1) for _ in range(3)),
        st.SphereParameter(r(5, 3), dim=1),
        _sphere(r(3, 7), 1, radius=2.0),
        st.SphereParameter(r(6, 3), dim=0),
        torch.nn.Parameter(r(4, 5)),
    ]


@triton_missing
@pytest.mark.parametrize(
    "make",
    [
        lambda ps: SphereMuon(ps, lr=0.1, ns_dtype=None),
        lambda ps: SphereMuon(ps, lr=0.1, angle_per="sphere", ns_dtype=None),
        lambda ps: SphereMuon(ps, lr=torch.tensor(0.1, dtype=torch.float64), capturable=True),
        lambda ps: AdamH(ps, lr=0.05, angular=True),
        lambda ps: AdamH(ps, lr=0.05, angular=True, angle_per="tensor", ordering="riemannian"),
        lambda ps: SphereMuon(ps, lr=0.1, ordering="renorm", ns_dtype=None),
        lambda ps: AdamH(ps, lr=0.05),  # the hyperball rule, unprojected (ordering="renorm")
        lambda ps: AdamH(ps, lr=torch.tensor(0.05, dtype=torch.float64), ordering="oblique"),
    ],
    ids=[
        "muon-tensor",
        "muon-sphere",
        "muon-bf16-tensor-lr",
        "adamh-sphere",
        "adamh-tensor",
        "muon-renorm",
        "adamh-hyperball",
        "adamh-hyperball-oblique",
    ],
)
@pytest.mark.parametrize("dtype", ["f64", "f32"])
def test_triton_sphere_steps_equal_the_reference(make, dtype, monkeypatch):
    """SphereMuon's and AdamH's steps (angular, hyperball) on row spheres by the Triton
    kernel (:func:`spheretorch.kernels.optim.sphere_rows_step_`, interpreted) against its one
    reference, :func:`spheretorch.optim.sphere_steps.sphere_step` (the torch path); with
    ``ordering="renorm"``, the renormalisation kernel against ``sphere.normalize``."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    dt, rtol = DTYPES[dtype]
    results = {}
    calls = []
    from spheretorch.kernels import optim as kernels

    for name in ("sphere_rows_step_", "renormalize_"):  # SphereMuon(ordering="renorm"): this
        fn = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _fn=fn, **k: calls.append(k) or _fn(*a, **k))
    for name in ("torch", "triton"):
        monkeypatch.setenv(backend.BACKEND_ENV, name)
        ps = _muon_family_params(dt)
        opt = make(ps)
        for t in range(3):
            g = torch.Generator().manual_seed(10 + t)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(dt)
            opt.step()
        results[name] = ps
    assert calls, "the kernel was not used"
    for a, b in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=rtol)
