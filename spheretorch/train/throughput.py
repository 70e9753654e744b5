"""Throughput: tokens per second, model FLOPs per second and utilization (MFU).

Training FLOPs per token follow the PaLM appendix (as nanoGPT's ``estimate_mfu``)::

    F = 6 N + 12 L T d

``N``: parameters of the matrix products (every ``nn.Linear`` weight, a tied one once; token
embeddings are lookups and count nothing), ``L`` layers, ``T`` context length, ``d`` model
width; the ``12 L T d`` term is attention's scores and weighted sum (forward and backward, the
causal mask not discounted). ``MFU = F * tokens/s / peak``, with the peak dense bf16 (or TF32)
throughput of a known GPU, or ``$SPHERETORCH_PEAK_TFLOPS``; on a CPU the peak is unknown and
only the achieved FLOP/s is reported.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

__all__ = ["PEAK_ENV", "TIMING_FIELDS", "flops_per_token", "peak_flops", "throughput"]

PEAK_ENV = "SPHERETORCH_PEAK_TFLOPS"
#: the fields of a metrics row that depend on the machine's speed (and, ``steady``: on where
#: a process started, its first steps being untimed warm-up), not on the run's numbers
TIMING_FIELDS = ("elapsed_s", "ms_per_step", "tokens_per_s", "tflops_per_s", "mfu", "steady")

# Dense (no sparsity) peak TFLOP/s from the vendors' data sheets: (bf16/fp16, tf32).
_GPU_PEAKS = {
    "H200": (989.0, 494.0),
    "H100 SXM": (989.0, 494.0),
    "H100 NVL": (835.0, 418.0),
    "H100 PCIe": (756.0, 378.0),
    "H100": (989.0, 494.0),  # other H100 names (e.g. "H100 80GB HBM3") are the SXM part
    "A100": (312.0, 156.0),
    "A10G": (70.0, 35.0),
    "A10": (125.0, 62.5),
    "L40S": (362.0, 183.0),
    "L40": (181.0, 90.5),
    "L4": (121.0, 60.0),
}


def flops_per_token(model: nn.Module, n_layer: int, seq_len: int, d_model: int) -> int:
    """``6 N + 12 L T d``: training FLOPs per token (see the module docstring)."""
    seen: set[int] = set()
    n = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            n += module.weight.numel()
    return 6 * n + 12 * n_layer * seq_len * d_model


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """``(peak FLOP/s or None, where it comes from)`` for training in ``dtype`` on ``device``."""
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV]) * 1e12, f"${PEAK_ENV}"
    if device.type != "cuda":
        return None, f"peak of {device.type} unknown"
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32) in _GPU_PEAKS.items():
        if key in name:
            if dtype in (torch.bfloat16, torch.float16):
                return half * 1e12, f"{name} dense bf16 peak {half:g} TFLOP/s"
            return tf32 * 1e12, f"{name} dense TF32 peak {tf32:g} TFLOP/s"
    return None, f"peak of {name} unknown (set ${PEAK_ENV})"


def throughput(tokens: int, seconds: float, flops_token: int, peak: float | None) -> dict[str, Any]:
    """``tokens_per_s``, ``tflops_per_s`` (achieved) and ``mfu`` (``None`` without a peak)."""
    tps = tokens / seconds if seconds > 0 else 0.0
    flops = tps * flops_token
    return {
        "tokens_per_s": round(tps, 1),
        "tflops_per_s": round(flops / 1e12, 6),
        "mfu": round(flops / peak, 5) if peak else None,
    }
