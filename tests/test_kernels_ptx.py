"""Every Triton kernel the models' ops launch compiles for an H100/H200 (sm_90), without a GPU.

The interpreter tests (tests/test_kernels_models.py) check the kernels' arithmetic on CPU, but
the interpreter accepts constructs the compiler rejects (and type-checks nothing). Here each op
runs forward and backward on its Triton path with CPU tensors while the launches are
recorded instead of run; every recorded kernel, with the argument types and
compile-time constants of that launch, is then compiled by Triton down to PTX for sm_90. The
launches are recorded, not listed by hand, so a new kernel or a new dtype path is covered as
soon as an op uses it. The same for the sphere steps of SphereMuon and AdamH
(:mod:`spheretorch.kernels.optim`; the other optimizers' kernels are compiled from a list in
tests/test_optim_kernels.py).
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

from spheretorch.kernels import geodesic_step, residual, rope, triton_available
from spheretorch.kernels import unit as unit_module

from .test_kernels_models import GEO_OPTIONS, OPS, _cases, _fused_and_reference, _run

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

#: the modules whose ops launch kernels through ``rowwise.jit``
LAUNCHERS = (unit_module, residual, rope, geodesic_step)  # residual: the slerp op too
POINTER = {
    torch.float64: "*fp64",
    torch.float32: "*fp32",
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
    torch.int64: "*i64",
    torch.int32: "*i32",
}


def _record(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, tuple, dict]]:
    """Replace the ops' ``jit`` so that ``jit(fn)[grid](*args, **kw)`` records the launch."""
    launches: list[tuple[Any, tuple, dict]] = []

    class Recorder:
        def __init__(self, fn: Any) -> None:
            self.fn = fn

        def __getitem__(self, grid: Any) -> Any:
            return lambda *args, **kw: launches.append((self.fn, args, kw))

    for module in LAUNCHERS:
        monkeypatch.setattr(module, "jit", Recorder)
        # the Triton path on CPU tensors (the backend switch wants the interpreter there)
        monkeypatch.setattr(module, "use_triton", lambda x: True)
    return launches


def _arg_type(name: str, value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return POINTER[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"argument {name}: no Triton type for {type(value).__name__}")


def _compile_for_sm90(fn: Any, args: tuple, kw: dict) -> str:
    """Compile ``fn`` for the types of one recorded launch; returns the PTX."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jitted = triton.jit(fn)
    params = {p.name: p for p in jitted.params}
    values = dict(zip(jitted.arg_names, args)) | {k: v for k, v in kw.items() if k in params}
    signature: dict[str, str] = {}
    constexprs: dict[tuple[int, ...], Any] = {}
    for i, name in enumerate(jitted.arg_names):
        if params[name].is_constexpr:
            signature[name] = "constexpr"
            constexprs[(i,)] = values[name]
        else:
            signature[name] = _arg_type(name, values[name])
    src = ASTSource(fn=jitted, signature=signature, constexprs=constexprs)
    options = {"num_warps": kw.get("num_warps", 4)}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", OPS)
def test_every_launched_kernel_compiles_for_sm90(monkeypatch, name: str, dtype: torch.dtype):
    pytest.importorskip("triton.backends.nvidia", reason="triton without its CUDA backend")
    launches = _record(monkeypatch)
    for options in GEO_OPTIONS if name == "geonorm" else [None]:
        fused, _ = _fused_and_reference(name, options)
        _run(fused, list(_cases(dtype)[name]))
    kernels = {getattr(fn, "__name__", "?") for fn, _, _ in launches}
    assert any("fwd" in k for k in kernels) and any("bwd" in k for k in kernels), kernels
    seen = set()
    for fn, args, kw in launches:
        key = (fn, tuple(_arg_type("", a) if not isinstance(a, bool) else a for a in args),
               tuple(sorted((k, v) for k, v in kw.items())))  # fmt: skip
        if key in seen:
            continue
        seen.add(key)
        assert ".entry" in _compile_for_sm90(fn, args, kw), fn.__name__


def test_every_module_that_launches_row_kernels_is_recorded():
    """A new op module using ``rowwise.jit`` must join ``LAUNCHERS`` (else its kernels would
    not be compiled above)."""
    import importlib
    import pkgutil

    import spheretorch.kernels as package
    from spheretorch.kernels import rowwise

    users = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        if module is not rowwise and getattr(module, "jit", None) is rowwise.jit:
            users.add(module.__name__)
    assert users == {m.__name__ for m in LAUNCHERS}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_muon_family_kernel_compiles_for_sm90(monkeypatch, dtype: torch.dtype):
    """The Triton launches of SphereMuon's and AdamH's sphere steps (rows, columns, a middle
    axis, whole tensors as one row and in two passes, measured angles, per-tensor angles, the
    renormalisation; AdamH's moments fused, with host and device step counters), recorded
    with the Triton backend forced on CPU tensors (``MAX_ROW`` 16, so that tiny whole
    tensors take the two passes) and compiled for sm_90 with the argument types and
    constants of each launch."""
    pytest.importorskip("triton.backends.nvidia", reason="triton without its CUDA backend")
    from spheretorch.kernels import BACKEND_ENV
    from spheretorch.kernels import optim as kernels
    from spheretorch.optim import AdamH, SphereMuon

    from .test_optim_kernels import _muon_family_params

    compiled = kernels._jit(torch.device("cuda"))
    launches: list[tuple[Any, tuple, dict]] = []

    class Recorder:
        def __init__(self, fn: Any) -> None:
            self.fn = fn

        def __getitem__(self, grid: Any) -> Any:
            return lambda *args, **kw: launches.append((self.fn, args, kw))

    class Module:  # the compiled kernels' source functions, launches recorded
        def __getattr__(self, name: str) -> Recorder:
            return Recorder(getattr(compiled, name).fn)

    monkeypatch.setattr(kernels, "_jit", lambda device: Module())
    monkeypatch.setattr(kernels, "MAX_ROW", 16)
    lr = torch.tensor(0.1, dtype=torch.float64)
    makers = [
        lambda ps: SphereMuon(ps, lr=0.1, measure_angle=True),
        lambda ps: SphereMuon(ps, lr=lr, capturable=True, ordering="renorm"),
        lambda ps: AdamH(ps, lr=0.05, measure_angle=True),
        lambda ps: AdamH(ps, lr=lr, angular=True, angle_per="sphere", ordering="oblique"),
        lambda ps: AdamH(
            ps, lr=lr, capturable=True, angular=True, angle_per="tensor", maximize=True
        ),
    ]
    with monkeypatch.context() as m:  # the Triton path on CPU tensors while recording
        m.setenv(BACKEND_ENV, "triton")
        m.setenv("TRITON_INTERPRET", "1")
        for make in makers:
            ps = _muon_family_params(dtype)
            for p in ps:
                p.grad = torch.ones_like(p)
            make(ps).step()
    names = {fn.__name__ for fn, _, _ in launches}
    assert {"_rows_step_kernel", "_whole_sums_kernel", "_whole_step_kernel"} <= names, names
    for fn, args, kw in launches:  # the interpreter ignores an unknown keyword: checked here
        params = set(inspect.signature(fn).parameters)
        assert set(kw) - params <= {"num_warps", "num_stages"}, (fn.__name__, kw)
        assert len(args) + len(set(kw) & params) == len(params), fn.__name__
    assert "_renorm_kernel" in names, names
    fused = {fn.__name__ for fn, _, kw in launches if kw.get("ADAM")}  # AdamH's moments
    assert fused == {"_rows_step_kernel", "_whole_sums_kernel", "_whole_step_kernel"}, fused
    assert any(kw.get("ADAM") and kw.get("STEP_TENSOR") for _, _, kw in launches)
    seen = set()
    for fn, args, kw in launches:
        key = (fn, tuple(_arg_type("", a) if not isinstance(a, bool) else a for a in args),
               tuple(sorted((k, v) for k, v in kw.items())))  # fmt: skip
        if key in seen:
            continue
        seen.add(key)
        assert ".entry" in _compile_for_sm90(fn, args, kw), fn.__name__
