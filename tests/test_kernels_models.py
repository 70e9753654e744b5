"""The models' fused sphere ops (spheretorch.kernels: unit, nlerp_residual, slerp_residual,
rope_unit, geonorm_step): each Triton kernel against its PyTorch reference through Triton's
interpreter (tiny shapes), each op's hand-written backward against autograd through the reference,
float64 gradchecks at the edge cases, ``torch.library.opcheck``, and compiled-vs-eager
gradients of nGPT and GeoNorm with the ops in place."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spheretorch import sphere
from spheretorch.geodesic import geodesic_update, slerp
from spheretorch.kernels import BACKEND_ENV, triton_available
from spheretorch.kernels.geodesic_step import geonorm_step, geonorm_step_reference
from spheretorch.kernels.residual import nlerp_residual, nlerp_residual_reference
from spheretorch.kernels.rope import rope_unit, rope_unit_reference
from spheretorch.kernels.slerp import slerp_residual
from spheretorch.kernels.unit import unit, unit_reference
from spheretorch.models import NGPT, GeoNormGPT, make_config
from spheretorch.models.layers import Rotary
from spheretorch.sphere.residual import slerp_residual_reference

from .strategies import angles, close, pair_at

CLAMP = math.pi / 4
TABLES = (4, 4)  # the RoPE case's cos/sin tables (T, d_k / 2): inputs never differentiated
# float32/bfloat16 tolerance: a few ulps of the compute dtype (float32) on unit-size values,
# plus the output rounding for bfloat16
TOL = {torch.float64: 1e-13, torch.float32: 2e-6, torch.bfloat16: 1e-2}


def _cases(dtype: torch.dtype, seed: int = 0) -> dict[str, tuple]:
    """One argument tuple per op (tensors requiring grad), with edge rows inside."""
    gen = torch.Generator().manual_seed(seed)
    wide = torch.float64 if dtype == torch.float64 else torch.float32

    def rnd(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dt)

    x = rnd(3, 4, 12)
    x[0, 0] = 0  # a zero row stays zero
    h, f = rnd(3, 4, 12) * 2, rnd(3, 4, 12)
    f[0, 0] = h[0, 0]  # h == f
    f[0, 1] = -h[0, 1]  # h == -f
    f[0, 2] = h[0, 2] + 1e-5 * rnd(12)  # a tiny angle
    h[1, 0], f[1, 0] = 1.0, -1.0  # antipodal with alpha = 1/2 below: the chord's zero
    alpha = torch.rand(12, generator=gen, dtype=torch.float64).to(wide)
    alpha_half = torch.full((12,), 0.5, dtype=wide)
    rot = Rotary(8, 4).to(wide)
    qk = rnd(2, 4, 4, 8)
    q_scale = (torch.rand(2, 8, generator=gen, dtype=torch.float64) + 0.5).to(wide)
    xs, gs = rnd(3, 4, 12) * 0.3, rnd(3, 4, 12) * 0.1
    gs[0, 0] = 0.7 * xs[0, 0]  # radial update: v = 0
    gs[0, 1] = xs[0, 1] + 1e-4 * rnd(12)  # a tiny step
    gs[0, 2] = 10 * rnd(12)  # both clamps active
    ab = torch.tensor([1.1], dtype=wide), torch.tensor([0.3], dtype=wide)
    # slerp: the edge angles in row 0, the exactly antipodal pair in row 1 (not smooth there)
    hs, fs = rnd(3, 4, 12) * 2, rnd(3, 4, 12)
    fs[0, 0] = 0.5 * hs[0, 0]  # theta = 0
    fs[0, 1] = hs[0, 1] + 1e-8 * rnd(12)  # tiny: theta ~ 1e-8
    fs[0, 2] = -hs[0, 2] + 1e-3 * rnd(12)  # near pi
    fs[0, 3] -= (fs[0, 3] @ hs[0, 3]) / (hs[0, 3] @ hs[0, 3]) * hs[0, 3]  # theta = pi/2
    fs[1, 0] = -hs[1, 0]  # theta = pi: the antipodal direction
    return {
        "unit": (x,),
        "nlerp": (h, f, alpha),
        "nlerp_half": (h, f, alpha_half),
        "slerp": (hs, fs, alpha),
        "slerp_0": (hs, fs, torch.zeros(12, dtype=wide)),  # alpha = 0: Norm(h)
        "slerp_1": (hs, fs, torch.ones(12, dtype=wide)),  # alpha = 1: Norm(f)
        "rope": (qk, rot.cos, rot.sin, q_scale),
        "geonorm": (xs, gs, *ab),
    }


GEO_OPTIONS = [
    {"decay": 0.5, "clamp": CLAMP},
    {"decay": 1.0, "clamp": None, "radius": 2.0},
    {"decay": 1 / 3, "clamp": CLAMP, "angle": "atan"},
    {"decay": 1.0, "clamp": None, "angle": "atan"},  # atan unclamped: z > 1 rows too
]


def _fused_and_reference(name: str, options: dict | None = None):
    if name == "unit":
        return unit, unit_reference
    if name.startswith("nlerp"):
        return nlerp_residual, nlerp_residual_reference
    if name.startswith("slerp"):
        return slerp_residual, slerp_residual_reference
    if name == "rope":
        return rope_unit, rope_unit_reference
    kw = options or {}
    return (
        lambda *t: geonorm_step(*t, **kw),
        lambda *t: geonorm_step_reference(*t, **kw),
    )


def _run(fn, args, grad_seed: int = 1):
    args = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
    out = fn(*args)
    gen = torch.Generator().manual_seed(grad_seed)
    g = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    wrt = [a for a in args if a.requires_grad and a.dim() and a.shape != TABLES]
    grads = torch.autograd.grad(out, wrt, g, allow_unused=True)
    return out.detach(), grads


def _assert_close(got, want, tol: float, what: str) -> None:
    got, want = got.double(), want.double()
    scale = max(1.0, float(want.abs().max()))
    err = float((got - want).abs().max())
    assert err <= tol * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


def _compare(
    name: str, dtype: torch.dtype, options: dict | None = None, device: str = "cpu"
) -> None:
    """The fused path is as accurate as the reference: both against the reference in float64
    on the same inputs, the fused error at most twice the reference's plus a few ulps (some
    rows are ill-conditioned on purpose: a tiny step's direction, the clamp edges)."""
    fused, ref = _fused_and_reference(name, options)
    args = [a.to(device) for a in _cases(dtype)[name]]
    out, grads = _run(fused, args)
    out_ref, grads_ref = _run(ref, args)
    exact, grads_exact = _run(ref, [a.double() for a in args])
    assert out.dtype == args[0].dtype
    parts = [("forward", out, out_ref, exact, TOL[dtype])]
    for i, (gf, gr, ge) in enumerate(zip(grads, grads_ref, grads_exact)):
        assert gf.dtype == gr.dtype
        parts.append((f"gradient {i}", gf, gr, ge, 10 * TOL[dtype]))
    for what, got, want, truth, tol in parts:
        ref_err = float((want.double() - truth).abs().max())
        _assert_close(got, truth, tol + 2 * ref_err, f"{name} {what}")


OPS = ["unit", "nlerp", "nlerp_half", "slerp", "slerp_0", "slerp_1", "rope", "geonorm"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", OPS)
def test_op_equals_its_reference_on_cpu(name: str, dtype: torch.dtype) -> None:
    """The op (reference forward, hand-written backward) vs autograd through the reference."""
    for options in GEO_OPTIONS if name == "geonorm" else [None]:
        _compare(name, dtype, options)


# Triton decides interpreter-or-GPU when it is imported (its own tl.sum etc. are decorated
# then), so the interpreter tests need a process that set TRITON_INTERPRET=1 before anything
# imported Triton: this one if the suite runs that way, else one subprocess running them.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_interpreter = pytest.mark.skipif(
    not (INTERPRETED and triton_available()), reason="needs TRITON_INTERPRET=1 at start-up"
)


@pytest.mark.skipif(INTERPRETED or not triton_available(), reason="runs them directly")
def test_triton_kernels_in_an_interpreter_process() -> None:
    """Runs this file's interpreter tests (``-k triton``) in a process started with
    ``TRITON_INTERPRET=1``."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider"]
    run = subprocess.run(
        [*cmd, __file__, "-k", "triton and not interpreter_process and not cuda"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", OPS)
def test_triton_kernel_equals_the_reference(monkeypatch, name: str, dtype: torch.dtype) -> None:
    """Each Triton kernel, forward and backward, through Triton's interpreter on CPU."""
    monkeypatch.setenv(BACKEND_ENV, "triton")
    for options in GEO_OPTIONS if name == "geonorm" else [None]:
        _compare(name, dtype, options)


@needs_interpreter
@pytest.mark.parametrize("rows", [1, 10])
def test_triton_slerp_with_a_partial_last_program(monkeypatch, rows: int) -> None:
    """10 rows on 4 programs of 3: the backward's padding rows (masked, their dalpha terms
    dropped); 1 row: one program."""
    monkeypatch.setenv(BACKEND_ENV, "triton")
    gen = torch.Generator().manual_seed(rows)
    h, f = (torch.randn(rows, 12, generator=gen, dtype=torch.float64) for _ in range(2))
    alpha = torch.rand(12, generator=gen, dtype=torch.float64)
    out, grads = _run(slerp_residual, (h, f, alpha))
    want, want_grads = _run(slerp_residual_reference, (h, f, alpha))
    _assert_close(out, want, 1e-14, "forward")
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        _assert_close(g, w, 1e-13, f"gradient {i}")


@pytest.mark.cuda  # in the GPU check's test lane (pytest -m cuda)
@pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(), reason="no CUDA")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", OPS)
def test_triton_kernel_on_cuda_equals_the_reference(name: str, dtype: torch.dtype) -> None:
    """The compiled Triton kernels on a real GPU (the default backend on CUDA tensors)."""
    for options in GEO_OPTIONS if name == "geonorm" else [None]:
        _compare(name, dtype, options, device="cuda")


def _gpu_compiler_available() -> bool:
    if INTERPRETED or not triton_available():
        return False
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        return False
    import importlib.util

    return importlib.util.find_spec("triton.backends.nvidia") is not None


# The signature of each new kernel launch (bf16 block outputs, float32 states: autocast).
_ROWS = {"stride_h": "i64", "stride_f": "i64", "d": "i32"}
_GEO = {"stride_x": "i64", "stride_g": "i64", "d": "i32"}
_GEO_CONST = dict(DECAY=0.5, CLAMP=0.0, HAS_CLAMP=False, RADIUS=1.0, OWN=True, ATAN=True)
OFFLINE_KERNELS = {
    "slerp_fwd": (
        "slerp", "_slerp_fwd_kernel",
        {"H": "*fp32", "F": "*bf16", "A": "*fp32", "OUT": "*fp32", **_ROWS}, {},
    ),
    "slerp_bwd": (
        "slerp", "_slerp_bwd_kernel",
        {"G": "*fp32", "H": "*fp32", "F": "*bf16", "A": "*fp32", "DH": "*fp32", "DF": "*bf16",
         "DA_PART": "*fp32", "stride_g": "i64", "n_rows": "i32", **_ROWS},
        {"PER": 4},
    ),
    "geonorm_atan_fwd": (
        "geodesic_step", "_geo_fwd_kernel",
        {"X": "*fp32", "GG": "*bf16", "AB": "*fp32", "OUT": "*fp32", **_GEO}, _GEO_CONST,
    ),
    "geonorm_atan_bwd": (
        "geodesic_step", "_geo_bwd_kernel",
        {"GR": "*fp32", "X": "*fp32", "GG": "*bf16", "AB": "*fp32", "DX": "*fp32", "DG": "*bf16",
         "DAB_PART": "*fp32", "stride_gr": "i64", "n_rows": "i32", **_GEO},
        {**_GEO_CONST, "PER": 4},
    ),
}  # fmt: skip


@pytest.mark.skipif(not _gpu_compiler_available(), reason="needs Triton's NVIDIA backend")
@pytest.mark.parametrize("kernel", list(OFFLINE_KERNELS))
def test_kernel_compiles_for_a_gpu_without_one(kernel: str) -> None:
    """The interpreter runs kernel code as NumPy and accepts what the GPU compiler may refuse:
    compile the slerp and atan kernels to an sm_90 cubin (Triton's bundled ptxas, no GPU
    needed), float32 math with bf16 inputs at d = 768's block."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name, signature, consts = OFFLINE_KERNELS[kernel]
    fn = triton.jit(getattr(importlib.import_module(f"spheretorch.kernels.{module}"), name))
    consts = {**consts, "BLOCK": 1024, "F64": False}
    full = {n: signature.get(n, "constexpr") for n in fn.arg_names}
    assert set(full) - set(signature) == set(consts), "signature and constants cover the args"
    src = ASTSource(fn, full, constexprs=consts)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert len(compiled.asm["cubin"]) > 0


@given(
    theta=angles,
    t=st.floats(0.0, 1.0),
    d=st.sampled_from([2, 3, 16]),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.1, 10.0),
)
def test_slerp_residual_is_slerp_between_the_normalized_inputs(theta, t, d, seed, scale) -> None:
    """A constant alpha = t: the geodesic from Norm(h) to Norm(f) at constant speed (slerp is
    checked against scipy in test_geodesic.py), whatever the inputs' norms."""
    x, y, _ = pair_at(theta, shape=(3, d), seed=seed)
    out = slerp_residual(scale * x, 2.0 * y, torch.full((d,), t, dtype=torch.float64))
    close(out, slerp(x, y, t), 1e-12)
    close(sphere.norm(out), torch.ones(3, 1, dtype=torch.float64), 1e-15)
    close(sphere.angle(x, out), t * sphere.angle(x, y), 1e-9)


@given(
    theta=angles,
    d=st.sampled_from([2, 3, 16]),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_slerp_residual_equals_the_composed_rule(theta, d, seed, dtype) -> None:
    """Per-coordinate alpha: the op equals geodesic_update(Norm(h), Norm(f), alpha, "slerp"),
    nGPT's step before the op (the op's values on CPU are unchanged beyond round-off)."""
    x, y, _ = pair_at(theta, shape=(3, d), seed=seed, dtype=dtype)
    alpha = torch.rand(d, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    want = geodesic_update(unit(3 * x), unit(y), alpha, "slerp")
    close(slerp_residual(3 * x, y, alpha), want, 1e-13 if dtype == torch.float64 else 2e-6)


def test_unit_zero_rows_and_dtypes() -> None:
    x = torch.zeros(2, 5)
    assert torch.equal(unit(x), x)
    b = torch.randn(4, 9, dtype=torch.bfloat16)
    assert unit(b).dtype == torch.bfloat16


@pytest.mark.parametrize("name", OPS)
def test_float64_gradcheck_of_the_op(name: str) -> None:
    """The hand-written backward of each op at its edge rows (gradgradcheck: the
    create_graph path through the reference)."""
    args = list(_cases(torch.float64)[name])
    if name == "unit":
        args[0] = args[0][1:]  # a zero row is not differentiable (x / max(|x|, tiny))
    if name == "nlerp_half":  # the chord's zeros (rows [0, 1], [1, 0]): a switch, not smooth
        args[0], args[1] = args[0][2:], args[1][2:]
    if name.startswith("slerp"):  # theta = pi exactly (row [1, 0]): a choice, not smooth
        args[0], args[1] = (torch.cat((t[:1], t[2:])) for t in args[:2])
    if name == "geonorm":  # no bias: its move is switched off at v = 0 (test_geonorm.py
        args[3] = torch.zeros_like(args[3])  # checks the bias near v = 0 through this op)
    fused, _ = _fused_and_reference(name, GEO_OPTIONS[0])
    inputs = [a.detach().clone().requires_grad_(a.dim() > 0 and a.shape != TABLES) for a in args]
    assert torch.autograd.gradcheck(fused, inputs)
    if name == "geonorm":  # second order: the rows away from v = 0 (the bias's switch)
        inputs = [t[1:] if t.dim() == 3 else t for t in inputs]
    if name.startswith("slerp"):  # near pi the third derivatives (~1/s^3) swamp the finite
        inputs = [t[:, [0, 1, 3]] if t.dim() == 3 else t for t in inputs]  # differences
    assert torch.autograd.gradgradcheck(fused, inputs)


@pytest.mark.parametrize("name", ["unit", "nlerp", "slerp", "rope", "geonorm"])
def test_opcheck(name: str) -> None:
    """torch.library.opcheck: schema, fake (meta) implementation, autograd registration."""
    args = [a.detach().clone() for a in _cases(torch.float32)[name]]
    for a in args:
        if a.shape != TABLES:
            a.requires_grad_()
    if name == "unit":
        op, call = torch.ops.spheretorch.unit.default, (args[0],)
    elif name == "nlerp":
        op, call = torch.ops.spheretorch.nlerp_residual.default, tuple(args)
    elif name == "slerp":
        op, call = torch.ops.spheretorch.slerp_residual.default, tuple(args)
    elif name == "rope":
        op, call = torch.ops.spheretorch.rope_unit.default, tuple(args)
    else:
        op = torch.ops.spheretorch.geonorm_step.default
        call = (*args, 0.5, CLAMP, False, None)
    torch.library.opcheck(op, call)


def test_bad_arguments_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match=r"alpha must have shape \(4,\)"):
        nlerp_residual(torch.randn(2, 4), torch.randn(2, 4), torch.rand(3))
    with pytest.raises(ValueError, match="same shape"):
        nlerp_residual(torch.randn(2, 4), torch.randn(2, 5), torch.rand(4))
    with pytest.raises(ValueError, match=r"alpha must have shape \(4,\)"):
        slerp_residual(torch.randn(2, 4), torch.randn(2, 4), torch.rand(3))
    with pytest.raises(ValueError, match="same shape"):
        slerp_residual(torch.randn(2, 4), torch.randn(2, 5), torch.rand(4))
    with pytest.raises(ValueError, match="size >= 2"):
        slerp_residual(torch.randn(2, 1), torch.randn(2, 1), torch.rand(1))
    with pytest.raises(ValueError, match="cos must have shape"):
        rope_unit(torch.randn(1, 3, 2, 4), torch.ones(2, 2), torch.ones(3, 2), torch.ones(1, 4))
    with pytest.raises(ValueError, match="q_scale must have shape"):
        rope_unit(torch.randn(1, 3, 2, 4), torch.ones(3, 2), torch.ones(3, 2), torch.ones(3, 4))
    with pytest.raises(ValueError, match="angle must be"):
        geonorm_step(torch.randn(2, 4), torch.randn(2, 4), 1.0, angle="acos")


TINY = {"vocab_size": 13, "seq_len": 8, "n_layer": 2, "n_head": 2, "d_model": 16}


def _grads(model: torch.nn.Module, idx: torch.Tensor, forward=None) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss = (model if forward is None else forward)(idx, idx)[1]
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


MODEL_OPTIONS = [
    (NGPT, {}),
    (NGPT, {"residual_rule": "slerp"}),
    (GeoNormGPT, {}),
    (GeoNormGPT, {"geo_angle": "atan", "geo_radius": "fixed", "geo_clamp": None}),
]


@needs_interpreter
@pytest.mark.parametrize(("cls", "options"), MODEL_OPTIONS)
def test_models_with_triton_kernels_equal_the_reference(monkeypatch, cls, options) -> None:
    """The whole model (float64) with every fused op on its Triton kernel (interpreter), for
    each residual rule and GeoNorm angle."""
    name = "ngpt" if cls is NGPT else "geonorm"
    torch.manual_seed(0)
    model = cls(make_config(name, **TINY, **options)).double()
    idx = torch.randint(0, 13, (2, 8))
    want = _grads(model, idx)
    monkeypatch.setenv(BACKEND_ENV, "triton")
    got = _grads(model, idx)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-12, msg=n)


@pytest.mark.slow
@pytest.mark.parametrize("cls", [NGPT, GeoNormGPT])
def test_compiled_gradients_equal_eager_per_parameter(cls) -> None:
    """torch.compile treats the ops as opaque: same gradients, parameter by parameter."""
    name = "ngpt" if cls is NGPT else "geonorm"
    torch.manual_seed(0)
    model = cls(make_config(name, **{**TINY, "n_layer": 1}))  # one layer: compiles in half
    idx = torch.randint(0, 13, (2, 8))
    eager = _grads(model, idx)
    got = _grads(model, idx, torch.compile(model))
    for n in eager:
        torch.testing.assert_close(got[n], eager[n], rtol=1e-4, atol=1e-6, msg=n)
        assert got[n].abs().max() > 0 or eager[n].abs().max() == 0, n


@pytest.mark.parametrize("name", ["unit", "nlerp", "slerp", "rope", "geonorm"])
def test_autocast_does_not_lower_the_ops_precision(name: str) -> None:
    """Under bf16 autocast the ops still compute in float32 (their dot products included)."""
    fused, _ = _fused_and_reference(name, GEO_OPTIONS[0])
    args = _cases(torch.float32)[name]
    want, want_grads = _run(fused, args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_grads = _run(fused, args)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize(
    ("name", "op"),
    [
        ("unit", "unit"),
        ("nlerp", "nlerp_residual"),
        ("slerp", "slerp_residual"),
        ("rope", "rope_unit"),
        ("geonorm", "geonorm_step"),
    ],
)
def test_compile_keeps_the_ops_opaque_in_both_graphs(name: str, op: str) -> None:
    """Under torch.compile the forward graph calls the op and the backward graph its backward
    op (so inductor cannot re-fuse the normalizations in low precision)."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    backend = AotEagerAndRecordGraphs()
    fused, _ = _fused_and_reference(name, GEO_OPTIONS[0])
    args = [a.detach().clone() for a in _cases(torch.float32)[name]]
    for a in args:
        a.requires_grad_(a.shape != TABLES)
    torch.compile(fused, backend=backend, fullgraph=True)(*args).sum().backward()
    fw = "".join(g.code for g in backend.fw_graphs)
    bw = "".join(g.code for g in backend.bw_graphs)
    assert f"spheretorch.{op}.default" in fw
    assert f"spheretorch.{op}_backward.default" in bw
