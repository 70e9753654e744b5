"""Launch geometry shared by the row-wise model kernels (one program per row of ``d`` values).

The model's sphere operations (:mod:`.unit`, :mod:`.residual`, :mod:`.slerp`, :mod:`.rope`,
:mod:`.geodesic_step`) all act on the last axis of ``(..., d)`` tensors. Each is a custom op
(``spheretorch::``) whose PyTorch reference runs on CPU and whose Triton kernel runs on CUDA
(:func:`~spheretorch.kernels.backend_for`). This module holds what they share: the 2-D row view,
the block size and warp count, the lazy ``triton.jit`` (so that ``TRITON_INTERPRET`` is read
when a kernel first runs, not when spheretorch is imported), and the double-backward rule.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .backend import Backend, backend_for

__all__ = [
    "as_rows",
    "autocast_off",
    "backward_entry",
    "block_and_warps",
    "jit",
    "reduce_programs",
    "reference_vjp",
    "use_triton",
]


def use_triton(x: Tensor) -> bool:
    """Whether the op on ``x`` runs its Triton kernel (else the PyTorch reference)."""
    return backend_for(x.device) is Backend.TRITON


def as_rows(x: Tensor) -> Tensor:
    """``x`` ``(..., d)`` as a 2-D ``(rows, d)`` tensor with unit stride along ``d`` (a view
    when the layout allows, else a copy)."""
    x2 = x.reshape(x.numel() // max(1, x.shape[-1]), x.shape[-1])
    return x2 if x2.stride(-1) == 1 or x2.shape[-1] == 1 else x2.contiguous()


def block_and_warps(d: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` for rows of ``d`` values: the whole row in one block."""
    block = max(16, 1 << (d - 1).bit_length())
    return block, 1 if block <= 256 else 4 if block <= 2048 else 8 if block <= 8192 else 16


def reduce_programs(rows: int, device: torch.device) -> tuple[int, int]:
    """``(programs, rows_per_program)`` for a kernel that also sums a per-row quantity over
    rows (the gradient of a shared vector): a few programs per multiprocessor, each taking a
    contiguous block of rows and writing one partial sum. ``rows_per_program`` is a Triton
    compile-time constant (one variant per training shape)."""
    target = (
        4 * torch.cuda.get_device_properties(device).multi_processor_count
        if (device.type == "cuda")
        else 4
    )
    per = max(1, -(-rows // target))
    return max(1, -(-rows // per)), per


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _jitted(fn: Callable[..., Any], interpret: bool) -> Any:
    import triton

    return triton.jit(fn)


def jit(fn: Callable[..., Any]) -> Any:
    """``triton.jit(fn)``, built on first use: Triton fixes interpreter-or-compiler when it
    decorates, and the tests turn the interpreter on after spheretorch is imported."""
    return _jitted(fn, _interpreter_on())


def reference_vjp(
    reference: Callable[..., Tensor], inputs: Sequence[Tensor], grad: Tensor
) -> tuple[Tensor | None, ...]:
    """Vector-Jacobian product through the readable reference, differentiable again.

    Used by the ops' backward under ``create_graph=True`` (higher derivatives), where the
    fused backward (a custom op without a backward of its own) would cut the graph. The
    ``inputs`` are the op's saved inputs, still attached to the caller's graph.
    """
    wrt = [i for i, t in enumerate(inputs) if t.requires_grad]
    out: list[Tensor | None] = [None] * len(inputs)
    if not wrt:
        return tuple(out)
    with torch.enable_grad():
        y = reference(*inputs)
        grads = torch.autograd.grad(
            y, [inputs[i] for i in wrt], grad, create_graph=True, allow_unused=True
        )
    for i, gi in zip(wrt, grads):
        out[i] = gi
    return tuple(out)


def backward_entry(
    op: Callable[..., Any], impl: Callable[..., Any], grad: Tensor
) -> Callable[..., Any]:
    """What an op's backward calls: the backward custom op while anything traces (opaque in a
    compiled backward graph), its implementation directly in plain eager (the same code
    without a second trip through the dispatcher, about 50 us a call on CPU).

    Tracing is recognized by any of: dynamo compiling, a tensor subclass as the gradient
    (AOTAutograd's functional/fake tensors; torch 2.11 traces the backward outside dynamo), an
    active dispatch mode (``make_fx``)."""
    tracing = (
        torch.compiler.is_compiling()
        or type(grad) is not torch.Tensor
        or torch._C._len_torch_dispatch_stack() > 0
    )
    return op if tracing else impl


def autocast_off(x: Tensor) -> contextlib.AbstractContextManager[Any]:
    """Autocast off for ``x``'s device inside an op's PyTorch implementation: the op computes in
    float32 by design, and autocast would run its dot products (``linalg.vecdot``) in bfloat16
    (a custom op's implementation still sees the caller's autocast state)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()
