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
from hypothesis import given, settings
from hypothesis import strategies as hs

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


@triton_missing
@pytest.mark.parametrize(
    "make",
    [
        lambda ps: AdamH(ps, lr=0.05, capturable=True),  # moments fused into the kernels
        lambda ps: AdamH(ps, lr=0.05, capturable=True, angular=True, angle_per="tensor"),
        lambda ps: SphereMuon(ps, lr=0.1, ns_dtype=None, capturable=True),
    ],
    ids=["adamh", "adamh-angular-tensor", "sphere-muon"],
)
def test_triton_muon_family_skip_on_the_device_changes_nothing(make, monkeypatch):
    """The Triton path of AdamH (its moments written by the kernels) and SphereMuon with
    ``capturable``: a non-finite gradient at step 2 is skipped on the device (parameters,
    moments, step counters restored bitwise), the run equal to one without that step."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(backend.BACKEND_ENV, "triton")
    monkeypatch.setattr("spheretorch.kernels.optim.MAX_ROW", 16)  # whole tensors: 2 passes
    runs = {}
    for skip in (True, False):
        ps = _muon_family_params(torch.float64)
        opt = make(ps)
        for t in range(4):
            if t == 2 and not skip:
                continue
            g = torch.Generator().manual_seed(10 + t)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if t == 2:
                ps[0].grad[0, 0] = float("nan")
            opt.step()
        runs[skip] = (ps, opt)
    (ps_s, opt_s), (ps_r, opt_r) = runs[True], runs[False]
    with pytest.warns(st.optim.NonfiniteGradientWarning):
        assert opt_s.skipped_steps == 1
    for a, b in zip(ps_s, ps_r):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)
        for key, value in opt_r.state[b].items():
            if key != "angle":
                torch.testing.assert_close(opt_s.state[a][key], value, rtol=1e-12, atol=1e-12)


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
    # (adam: AdamH's moments fused, the direction's place holding the gradients)
    for xdt, ddt, cd, per_tensor, pass_norms, hyperball, project, adam in (
        ("bf16", "bf16", "fp32", True, True, False, True, False),
        ("fp32", "bf16", "fp32", True, False, False, True, False),
        ("fp64", "fp64", "fp64", False, False, False, True, False),
        ("bf16", "fp32", "fp32", False, False, True, False, False),
        ("bf16", "bf16", "fp32", True, True, False, True, True),
        ("fp32", "fp32", "fp32", False, False, True, False, True),
    ):
        types = {"X": f"*{xdt}", "D": f"*{ddt}", "NORMS": f"*{cd}", "RMS": f"*{cd}"}
        types |= {"ANGLE": f"*{cd}", **tiles, "HYPER": f"*{cd}", "LR": "*fp32", "SIZE": "i32"}
        types |= {"M": f"*{cd}", "V": f"*{cd}", "STEP": "*fp32", "EPS": f"*{cd}"}
        flags = dict(PASS_NORMS=pass_norms, PER_TENSOR=per_tensor, LR_TENSOR=True)
        flags |= dict(HYPERBALL=hyperball, PROJECT=project, MEASURE=True, ADAM=adam)
        flags |= dict(UPDATE=pass_norms or not per_tensor, MAXIMIZE=adam, STEP_TENSOR=adam)
        cases.append((mod._rows_step_kernel, types, {**block, **flags}))
    # the whole-tensor spheres' two passes (step and renormalisation)
    for xdt, ddt, cd, has_d, hyperball, adam in (
        ("bf16", "bf16", "fp32", True, True, False),
        ("fp64", "fp64", "fp64", True, False, False),
        ("fp32", "fp32", "fp32", False, False, False),
        ("bf16", "bf16", "fp32", True, True, True),
        ("fp64", "fp64", "fp64", True, False, True),
    ):
        adam_types = {"M": f"*{cd}", "V": f"*{cd}", "STEP": "*fp32"}
        types = {"X": f"*{xdt}", "D": f"*{ddt}", "PARTIALS": f"*{cd}", **tiles}
        types |= {**adam_types, "HYPER": f"*{cd}", "EPS": f"*{cd}"}
        consts = {"N_INFO": 4, "BLOCK": 4096, "HAS_D": has_d, "ADAM": adam}
        consts |= {"MAXIMIZE": adam, "STEP_TENSOR": adam}
        cases.append((mod._whole_sums_kernel, types, consts))
        types = {"X": f"*{xdt}", "D": f"*{ddt}", "SUMS": f"*{cd}", "ANGLE": f"*{cd}", **tiles}
        types |= {"HYPER": f"*{cd}", "LR": "*fp32", **adam_types, "EPS": f"*{cd}"}
        consts = {"N_INFO": 4, "BLOCK": 4096, "RENORM": not has_d, "HYPERBALL": hyperball}
        consts |= {"PROJECT": not hyperball, "LR_TENSOR": True, "MEASURE": has_d}
        consts |= {"ADAM": adam, "STEP_TENSOR": adam}
        cases.append((mod._whole_step_kernel, types, consts))
    for fn, types, consts in cases:
        sig, constexprs = _signature(types, consts)
        out = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=target)
        assert "ptx" in out.asm


# ----------------------------------------------------------------------------- the Muon family


def _whole(x: torch.Tensor, radius: float) -> torch.nn.Parameter:
    """``SphereParameter(x, dim=None)`` of radius ``radius`` (x scaled to it first)."""
    return st.SphereParameter(x * (radius / x.double().norm()).to(x.dtype), dim=None)


def _muon_family_params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Row spheres of two shapes (three of one: a stack), one of radius 2, column spheres
    (a tall and a wide matrix: the polar factor in the parameter's layout or copied), a
    middle axis, whole-tensor spheres (two of 12 values and radii 2.5 and 0.5: one row each;
    two of 20 values, a tall and a wide matrix: the two-pass kernels where ``MAX_ROW`` is
    16) and a Euclidean matrix."""
    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    return [
        *(st.SphereParameter(r(4, 6), dim=1) for _ in range(3)),
        st.SphereParameter(r(5, 3), dim=1),
        _sphere(r(3, 7), 1, radius=2.0),
        st.SphereParameter(r(6, 3), dim=0),
        st.SphereParameter(r(3, 6), dim=0),
        _sphere(r(2, 4, 3), 1),
        *(_whole(r(*shape), radius) for shape, radius in (((3, 4), 2.5), ((3, 4), 0.5))),
        *(_whole(r(*shape), radius) for shape, radius in (((5, 4), 1.5), ((4, 5), 0.8))),
        torch.nn.Parameter(r(4, 5)),
    ]


@triton_missing
@pytest.mark.parametrize(
    "make",
    [
        lambda ps: SphereMuon(ps, lr=0.1, ns_dtype=None, measure_angle=True),
        lambda ps: SphereMuon(ps, lr=0.1, angle_per="sphere", ns_dtype=None),
        lambda ps: SphereMuon(ps, lr=torch.tensor(0.1, dtype=torch.float64), capturable=True),
        lambda ps: AdamH(ps, lr=0.05, angular=True, measure_angle=True),
        lambda ps: AdamH(ps, lr=0.05, angular=True, angle_per="tensor", ordering="riemannian"),
        lambda ps: SphereMuon(ps, lr=0.1, ordering="renorm", ns_dtype=None),
        lambda ps: AdamH(ps, lr=0.05, measure_angle=True),  # hyperball, unprojected ("renorm")
        lambda ps: AdamH(ps, lr=torch.tensor(0.05, dtype=torch.float64), ordering="oblique"),
        lambda ps: AdamH(
            ps,
            lr=torch.tensor(0.05, dtype=torch.float64),
            capturable=True,
            angular=True,
            angle_per="tensor",
            maximize=True,
            measure_angle=True,
        ),
    ],
    ids=[
        "muon-tensor-measure",
        "muon-sphere",
        "muon-bf16-tensor-lr",
        "adamh-sphere-measure",
        "adamh-tensor",
        "muon-renorm",
        "adamh-hyperball-measure",
        "adamh-hyperball-oblique",
        "adamh-capturable-tensor-maximize",
    ],
)
@pytest.mark.parametrize("dtype", ["f64", "f32"])
def test_triton_sphere_steps_equal_the_reference(make, dtype, monkeypatch):
    """SphereMuon's and AdamH's steps (angular, hyperball; measured angles) by the Triton
    kernels (interpreted) against their one reference,
    :func:`spheretorch.optim.sphere_steps.sphere_step` (the torch path): row, column and
    middle-axis spheres by :func:`spheretorch.kernels.optim.sphere_rows_step_`, whole-tensor
    spheres as one row or, above ``MAX_ROW`` (16 here, so that tiny tensors take it), by
    the two passes of :func:`spheretorch.kernels.optim.sphere_whole_step_`; with
    ``ordering="renorm"``, the renormalisation kernels against ``sphere.normalize``. AdamH
    (orderings ``"renorm"``/``"oblique"``) takes its moments in the kernels too
    (:class:`~spheretorch.kernels.optim.AdamMoments`: device step counters with
    ``capturable``, ``maximize``, the two-pass per-tensor angle): its moments are compared as
    well. With the Triton backend forced, no set of parameters falls back to the torch step."""
    from spheretorch.kernels import optim as kernels
    from spheretorch.optim._hybrid import HybridOptimizer

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels, "MAX_ROW", 16)
    dt, rtol = DTYPES[dtype]
    results, opts = {}, {}
    calls: list[str] = []
    names = ("sphere_rows_step_", "sphere_whole_step_", "renormalize_", "renormalize_whole_")
    fused: list[str] = []  # the launches that took AdamH's moments
    for name in names:
        fn = getattr(kernels, name)

        def record(*a, _fn=fn, _n=name, **k):
            calls.append(_n)
            if k.get("adam") is not None:
                fused.append(_n)
            return _fn(*a, **k)

        monkeypatch.setattr(kernels, name, record)
    torch_step = HybridOptimizer._torch_step
    for name in ("torch", "triton"):
        monkeypatch.setenv(backend.BACKEND_ENV, name)
        if name == "triton":  # every set of sphere parameters takes a kernel
            monkeypatch.setattr(HybridOptimizer, "_torch_step", staticmethod(_no_torch_step))
        ps = _muon_family_params(dt)
        opt = make(ps)
        for t in range(3):
            g = torch.Generator().manual_seed(10 + t)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(dt)
            opt.step()
        results[name], opts[name] = ps, opt
    monkeypatch.setattr(HybridOptimizer, "_torch_step", torch_step)
    renorm = opts["torch"].param_groups[0].get("ordering") == "renorm" and isinstance(
        opts["torch"], SphereMuon
    )
    expected = {"renormalize_", "renormalize_whole_"} if renorm else set(names[:2])
    assert expected <= set(calls), calls
    group = opts["torch"].param_groups[0]
    if isinstance(opts["torch"], AdamH) and group["ordering"] != "riemannian":
        assert set(fused) == set(names[:2]), fused  # rows and whole tensors, fused
    else:
        assert not fused
    for a, b in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=rtol)
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer", "step"):  # AdamH: fused
            if key in opts["torch"].state[b]:
                want = opts["torch"].state[b][key]
                torch.testing.assert_close(opts["triton"].state[a][key], want, rtol=rtol, atol=rtol)
        if "angle" in opts["torch"].state[b]:
            angle = opts["triton"].state[a]["angle"]
            assert angle.dtype == opts["torch"].state[b]["angle"].dtype
            torch.testing.assert_close(angle, opts["torch"].state[b]["angle"], rtol=rtol, atol=rtol)
    if opts["torch"].param_groups[0]["measure_angle"]:
        assert all("angle" in opts["triton"].state[p] for p in results["triton"][:-1])


@triton_missing
@pytest.mark.parametrize("ordering", ["renorm", "oblique"])
def test_triton_fused_adamh_on_half_precision_keeps_float32_moments(ordering, monkeypatch):
    """AdamH fused into the kernels on bfloat16 parameters: float32 moments and math, bf16
    gradients read as they are; against the torch path (moments closely, parameters within
    bf16's rounding)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = {}
    for name in ("torch", "triton"):
        monkeypatch.setenv(backend.BACKEND_ENV, name)
        ps = _muon_family_params(torch.bfloat16)
        opt = AdamH(ps, lr=0.05, ordering=ordering)
        for t in range(3):
            g = torch.Generator().manual_seed(20 + t)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).bfloat16()
            opt.step()
        out[name] = (ps, opt)
    (ps_t, opt_t), (ps_k, opt_k) = out["torch"], out["triton"]
    for a, b in zip(ps_k, ps_t):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.detach().float(), b.detach().float(), rtol=2e-2, atol=2e-2)
        if st.sphere_dim_of(b) is None:
            continue  # the Euclidean matrix: torch's AdamW, moments in bf16 as torch keeps them
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt_k.state[a][key].dtype == torch.float32
            torch.testing.assert_close(
                opt_k.state[a][key], opt_t.state[b][key], rtol=1e-5, atol=1e-6
            )


def _no_torch_step(*args, **kwargs):
    raise AssertionError("a set of sphere parameters fell back to the torch step")


def _layout_params(dtype: torch.dtype, shape: tuple, dims, radius: float, n: int):
    """``n`` contiguous tensors of ``shape`` on spheres of ``radius`` along ``dims``."""
    from spheretorch.optim.sphere_steps import from_rows, rows

    lay = st.sphere.sphere_layout(shape, dims)
    g = torch.Generator().manual_seed(sum(shape) + n)
    out = []
    for _ in range(n):
        z = rows(torch.randn(shape, generator=g, dtype=torch.float64), lay)
        z = z * (radius / z.norm(dim=1, keepdim=True))
        out.append(from_rows(z, lay, torch.Size(shape)).contiguous().to(dtype))
    return lay, out


def _directions(shape: tuple, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Three directions of ``shape``: contiguous, reversed axes (a transposed view, as the
    polar factor of a tall matrix: copied into the parameter's layout), and for 3-D the
    first two axes swapped (another strided view; contiguous for 2-D)."""
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)

    out = [r(*shape), r(*shape[::-1]).permute(*reversed(range(len(shape))))]
    out.append(r(shape[1], shape[0], *shape[2:]).transpose(0, 1) if len(shape) == 3 else r(*shape))
    return out


@triton_missing
@pytest.mark.parametrize("dtype", ["f64", "f32", "bf16"])
def test_triton_sphere_step_kernels_equal_sphere_step(dtype, monkeypatch):
    """:func:`~spheretorch.kernels.optim.sphere_rows_step_` (rows, columns, a middle axis)
    and :func:`~spheretorch.kernels.optim.sphere_whole_step_` (whole tensors of 150 and 153
    values: three programs each, so the sums cross programs) against
    :func:`~spheretorch.optim.sphere_steps.sphere_step` with ``measure=True``: points and
    measured angles (a whole tensor also 10% off its sphere), for every rule (angular per
    sphere / per tensor, hyperball projected or not), a float and a 0-d tensor lr,
    radius != 1, directions contiguous or strided views (copied). bfloat16: parameters and
    directions in bfloat16, float32 math."""
    from spheretorch.kernels import optim as kernels
    from spheretorch.optim.sphere_steps import rows, sphere_step

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    dt, tol = {"bf16": (torch.bfloat16, 1e-2), **DTYPES}[dtype]
    rules = [("angular", True, "sphere"), ("angular", True, "tensor"),
             ("hyperball", True, "sphere"), ("hyperball", False, "sphere")]  # fmt: skip
    for i, (rule, project, per) in enumerate(rules):
        lr = 0.3 if i % 2 else torch.tensor(0.3, dtype=torch.float64)
        for shape, dims in (((5, 7), 1), ((6, 5), 0), ((2, 4, 3), 1)):
            lay, xs = _layout_params(dt, shape, dims, 2.5, 3)
            ds = _directions(shape, dt, seed=i)
            out = [x.clone() for x in xs]
            angle = kernels.sphere_rows_step_(
                out, ds, lay, [2.5] * 3, lr, rule=rule, project=project,
                per_tensor=per == "tensor", measure=True,
            )  # fmt: skip
            ref, ref_angle = sphere_step(
                torch.cat([rows(x, lay) for x in xs]),
                torch.cat([rows(d, lay) for d in ds]),
                lr, radius=2.5, project=project, rule=rule, angle_per=per, measure=True,
                blocks=3,
            )  # fmt: skip
            got = torch.cat([rows(x, lay) for x in out])
            torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
            torch.testing.assert_close(angle, ref_angle, rtol=tol, atol=tol)
        if per == "tensor":
            continue  # one sphere per tensor: the same as per sphere
        for shape in ((10, 15), (9, 17)):  # the second: a tall polar factor, a transposed view
            radii = [2.5, 0.5]
            # the second 10% off its sphere (as drift leaves a point): the terms in 1 - |x/r|^2
            xs = [
                _whole(torch.randn(shape, dtype=torch.float64), r * s)
                for r, s in ((2.5, 1.0), (0.5, 1.1))
            ]
            xs = [x.detach().to(dt) for x in xs]
            ds = _directions(shape, dt, seed=10 + i)[:2]
            out = [x.clone() for x in xs]
            angle = kernels.sphere_whole_step_(
                out, ds, radii, lr, rule=rule, project=project, measure=True
            )
            for x, d, o, a, r in zip(xs, ds, out, angle, radii):
                ref, ref_angle = sphere_step(
                    x, d, lr, radius=r, whole=True, project=project, rule=rule, measure=True
                )
                torch.testing.assert_close(o, ref, rtol=tol, atol=tol)
                torch.testing.assert_close(a.reshape(1), ref_angle, rtol=tol, atol=tol)


@triton_missing
@pytest.mark.parametrize("dtype", ["f64", "f32"])
def test_triton_sphere_steps_with_zero_directions(dtype, monkeypatch):
    """A zero direction (a row whose gradient is zero, a whole layer's) leaves its sphere
    where it is, for every rule and a step as large as lr * r = 5, where lr * r / tiny would
    overflow: rows, columns and whole tensors, against the reference, all finite."""
    from spheretorch.kernels import optim as kernels
    from spheretorch.optim.sphere_steps import rows, sphere_step

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    dt, tol = DTYPES[dtype]
    for rule, project in (("hyperball", False), ("hyperball", True), ("angular", True)):
        for shape, dims in (((5, 7), 1), ((6, 5), 0)):
            lay, xs = _layout_params(dt, shape, dims, 2.5, 2)
            ds = [torch.randn(shape, dtype=torch.float64).to(dt) for _ in xs]
            rows(ds[0], lay)[1] = 0.0  # (a view for rows; columns: rows() copies)
            if dims == 0:
                ds[0][:, 1] = 0.0
            ds[1].zero_()
            out = [x.clone() for x in xs]
            kernels.sphere_rows_step_(
                out, ds, lay, [2.5] * 2, 2.0, rule=rule, project=project, per_tensor=False
            )
            ref, _ = sphere_step(
                torch.cat([rows(x, lay) for x in xs]), torch.cat([rows(d, lay) for d in ds]),
                2.0, radius=2.5, project=project, rule=rule,
            )  # fmt: skip
            got = torch.cat([rows(x, lay) for x in out])
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
            torch.testing.assert_close(out[1], xs[1], rtol=tol, atol=tol)
        x = _whole(torch.randn(9, 17, dtype=torch.float64), 2.5).detach().to(dt)
        out = [x.clone()]
        kernels.sphere_whole_step_(out, [torch.zeros_like(x)], [2.5], 5.0, rule=rule,
                                   project=project, measure=True)  # fmt: skip
        torch.testing.assert_close(out[0], x, rtol=tol, atol=tol)


@triton_missing
@pytest.mark.parametrize("dtype", ["f64", "f32"])
def test_triton_whole_renormalisation_equals_normalize(dtype, monkeypatch):
    """:func:`~spheretorch.kernels.optim.renormalize_whole_` (two passes, several programs
    per tensor) against :func:`spheretorch.sphere.normalize` (``on_zero="keep"``): radii
    != 1, and a zero tensor stays zero."""
    from spheretorch.kernels import optim as kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    dt, tol = DTYPES[dtype]
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(7, 23, generator=g, dtype=dt) * s for s in (0.1, 1.0, 30.0)]
    xs.append(torch.zeros(7, 23, dtype=dt))
    radii = [2.5, 1.0, 0.5, 3.0]
    out = [x.clone() for x in xs]
    kernels.renormalize_whole_(out, radii)
    for x, o, r in zip(xs, out, radii):
        ref = st.sphere.normalize(x.reshape(-1), on_zero="keep", radius=r).reshape(x.shape)
        torch.testing.assert_close(o, ref, rtol=tol, atol=tol)


@triton_missing
@settings(max_examples=25, deadline=None)
@given(
    rule=hs.sampled_from(["angular", "hyperball", "hyperball-unprojected"]),
    lr=hs.floats(0.0, 3.0),
    radius=hs.floats(0.1, 10.0),
    off=hs.floats(0.9, 1.1),
    scale=hs.just(0.0) | hs.floats(1e-3, 1e3),
    seed=hs.integers(0, 2**16),
)
def test_triton_whole_step_property(rule, lr, radius, off, scale, seed):
    """The two-pass whole-tensor step (its norms and the measured angle from three sums)
    equals :func:`~spheretorch.optim.sphere_steps.sphere_step` in float64 for any angle up
    to 3 rad, radius, direction size (zero included: no move, no NaN), and a point up to
    10% off its sphere."""
    from spheretorch.kernels import optim as kernels  # CPU tensors: interpreted
    from spheretorch.optim.sphere_steps import sphere_step

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(9, 17, generator=g, dtype=torch.float64)
    x = x * (radius * off / x.norm())
    d = torch.randn(9, 17, generator=g, dtype=torch.float64) * scale
    project = rule != "hyperball-unprojected"
    rule = rule.split("-")[0]
    out = x.clone()
    (angle,) = kernels.sphere_whole_step_([out], [d], [radius], lr, rule=rule, project=project,
                                          measure=True)  # fmt: skip
    ref, ref_angle = sphere_step(
        x, d, lr, radius=radius, whole=True, project=project, rule=rule, measure=True
    )
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10 * radius)
    torch.testing.assert_close(angle.reshape(1), ref_angle, rtol=1e-10, atol=1e-10)


@triton_missing
@pytest.mark.parametrize(
    "make",
    [
        lambda ps: RiemannianAdam(ps, lr=0.05, capturable=True),
        lambda ps: RenormAdam(ps, lr=0.05, capturable=True),
        lambda ps: SphereMuon(ps, lr=0.1, ns_dtype=None, capturable=True, measure_angle=True),
        lambda ps: AdamH(ps, lr=0.05, angular=True, angle_per="tensor", capturable=True),
    ],
    ids=["riemannian-adam", "renorm-adam", "sphere-muon", "adamh"],
)
def test_tables_built_while_a_cuda_graph_is_captured(make, monkeypatch):
    """A step captured in a CUDA graph, as the kernels' host side sees it (capture simulated:
    ``_capturing`` true, the page-locked arena a plain buffer; the kernels run through the
    interpreter). Gradients set to None before a capture, and a step's directions, are
    allocated in the capture at new addresses, so their tables are built then. Such tables
    are copied from the arena set aside before the capture (the only host-to-device copy a
    graph can record; nothing is allocated or page-locked during it), stay out of the cache
    (their contents exist only once the graph replays: an eager step must not read them),
    and whatever the graph reads (those and the cached tables it reuses) is kept alive for
    its replays. The captured step computes what the eager step does."""
    from spheretorch.kernels import optim as kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(backend.BACKEND_ENV, "triton")
    monkeypatch.setattr(kernels, "_CAPTURED", [])
    monkeypatch.setattr(kernels, "_register", lambda buf: None)
    monkeypatch.setattr(kernels, "_ARENAS", {})
    results = {}
    for mode in ("eager", "captured"):
        kernels._CACHE.clear()
        params = _muon_family_params(torch.float64)
        opt = make(params)
        for t in range(3):
            g = torch.Generator().manual_seed(10 + t)
            for p in params:  # new gradient tensors each step: new addresses
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if t < 2 or mode == "eager":
                opt.step()
                continue
            cached = dict(kernels._CACHE)
            arena = kernels._ARENAS[torch.device("cpu")] = kernels._Arena(1 << 16)
            with monkeypatch.context() as m:
                m.setattr(kernels, "_capturing", lambda device: True)
                m.setattr(kernels, "_Arena", None)  # nothing set aside during a capture
                opt.step()
            assert arena.used > 0, "no table was built in the capture"
            assert dict(kernels._CACHE) == cached, "a table built in a capture was cached"
            kept = {id(v) for v in kernels._CAPTURED}
            reused = [v for k, v in cached.items() if k[0] == "tiles"]
            assert reused and any(id(v) in kept for v in reused)
        results[mode] = params
    for a, b in zip(results["captured"], results["eager"]):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)


def test_a_capture_needs_the_arena_set_aside_before_it(monkeypatch):
    """No eager step on the device before the capture (no arena), or an arena too small:
    one clear error each, before anything is recorded."""
    from spheretorch.kernels import optim as kernels

    monkeypatch.setattr(kernels, "_ARENAS", {})
    monkeypatch.setattr(kernels, "_register", lambda buf: None)
    monkeypatch.setattr(kernels, "_capturing", lambda device: True)
    table = torch.arange(6, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="take one optimizer step on this device before"):
        kernels._to_device(table, torch.device("cpu"))
    kernels._ARENAS[torch.device("cpu")] = kernels._Arena(64)
    out = kernels._to_device(table, torch.device("cpu"))
    assert torch.equal(out, table)
    with pytest.raises(RuntimeError, match=r"raise spheretorch\.kernels\.optim\.ARENA_BYTES"):
        kernels._to_device(torch.arange(16, dtype=torch.int64), torch.device("cpu"))


def test_a_host_tensor_lr_is_refused_while_a_cuda_graph_is_captured(monkeypatch):
    """A Tensor ``lr`` on another device would need a pageable copy, which a graph cannot
    record: one clear error instead of CUDA's."""
    from spheretorch.kernels import optim as kernels

    monkeypatch.setattr(kernels, "_capturing", lambda device: True)
    with pytest.raises(ValueError, match=r"^lr: a Tensor lr must be on the parameters' device"):
        kernels._device_lr(torch.tensor(0.1), torch.device("meta"))
    assert kernels._device_lr(0.1, torch.device("meta")) == (0.1, False)
