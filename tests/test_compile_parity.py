"""Compiled against eager gradients, per parameter, for GPT, NGPT and GeoNormGPT, in float32
and bf16 autocast, on every device present (the CPU; CUDA where there is one).

The fault this guards against (torch 2.11): a compiled model whose loss equals eager's while
the gradients of everything upstream of a custom autograd Function are zero
(docs/transformers.md, "torch.compile and custom autograd Functions"). A loss comparison
cannot see it; a per-parameter gradient comparison can. The same comparison is the trainer's
``--compile-check`` (:mod:`spheretorch.train.compile_check`).

Backend: inductor on CUDA (what ``--compile`` runs there); ``aot_eager`` on the CPU, which
traces exactly as inductor does (Dynamo, then AOTAutograd's joint graph: where the torch 2.11
fault lives) without the minutes of C++ compilation per model that would not fit the suite's
budget; inductor's CPU code is checked per parameter by tests/test_compile_bf16.py (float32).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from spheretorch.models import MODELS, build_model, make_config
from spheretorch.sphere import unit
from spheretorch.train.compile_check import grad_errors, grad_parity, tolerance

TINY = dict(vocab_size=31, seq_len=16, n_layer=2, n_head=2, d_model=32)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


#: every model with its defaults, and the options that take another fused op: nGPT's slerp
#: rule (spheretorch::slerp_residual) and GeoNorm's atan angle at a fixed radius, no clamp
VARIANTS = [(name, {}) for name in MODELS] + [
    ("ngpt", {"residual_rule": "slerp"}),
    ("geonorm", {"geo_angle": "atan", "geo_radius": "fixed", "geo_clamp": None}),
]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(
    ("name", "options"),
    VARIANTS,
    ids=[n + "".join(f"-{v}" for v in o.values()) for n, o in VARIANTS],
)
def test_compiled_gradients_equal_eager_per_parameter(
    name: str, options: dict, dtype: str, device: torch.device
) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(name, make_config(name, **TINY, **options)).to(device)
    x = torch.randint(0, TINY["vocab_size"], (4, TINY["seq_len"]), device=device)
    y = torch.randint(0, TINY["vocab_size"], (4, TINY["seq_len"]), device=device)
    compiled = torch.compile(model, backend="inductor" if device.type == "cuda" else "aot_eager")
    amp = DTYPES[dtype]

    def loss_of(m):
        def run():
            with _autocast(device, amp):
                return m(x, y)[1]

        return run

    checked = grad_parity(model, loss_of(model), loss_of(compiled), amp)
    parity = checked.parity
    assert len(parity.errors) == len(list(model.parameters()))  # every parameter compared
    assert torch.allclose(checked.compiled_loss, checked.eager_loss, rtol=1e-2 if amp else 1e-5)
    assert parity.ok, parity.message()
    assert parity.tolerance == tolerance(amp)


def test_a_zero_or_scaled_gradient_is_caught_and_round_off_is_not() -> None:
    g = torch.randn(8, 8, dtype=torch.float64)
    rows = [("a", g, g.float().double()), ("b", g, torch.zeros_like(g)), ("c", g, 0.6 * g)]
    rows += [("d", g, None), ("e", torch.zeros(3), torch.zeros(3))]
    errors = grad_errors(rows)
    assert errors["a"] < 1e-7 and errors["b"] == 1.0 and errors["c"] == pytest.approx(0.4)
    assert errors["d"] == float("inf") and errors["e"] == 0.0
    assert tolerance(torch.float32) < 0.01 and tolerance(torch.bfloat16) < 0.4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unit_under_compile_gives_its_input_a_gradient(dtype: torch.dtype) -> None:
    """The minimal case of the torch 2.11 fault: ``unit`` of a computed tensor, compiled
    (its forward once returned ``y.to(x.dtype)``, the same tensor, and the compiled input
    gradient was zero). backend "eager": the fault is in Dynamo's tracing of the Function, no
    inductor compile needed."""
    torch.manual_seed(0)
    w = torch.randn(6, 6, requires_grad=True)
    x = torch.randn(4, 6)

    def f(w: torch.Tensor) -> torch.Tensor:
        return (unit((x @ w).to(dtype)).float() * torch.arange(6.0)).sum()

    (eager,) = torch.autograd.grad(f(w), w)
    torch._dynamo.reset()
    (compiled,) = torch.autograd.grad(torch.compile(f, backend="eager")(w), w)
    assert eager.norm() > 0
    torch.testing.assert_close(compiled, eager, rtol=1e-6 if dtype == torch.float32 else 0, atol=0)
