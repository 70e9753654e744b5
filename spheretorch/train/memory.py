"""How much memory a run needs, estimated before anything large is allocated.

A run that cannot fit would otherwise allocate until the machine runs out of memory (minutes
later, killed without a message, taking other processes' memory with it). The estimate is
deliberately simple and errs on the large side:

* parameters, gradients and Adam's two moments: :math:`16 P` bytes (float32);
* activations kept for backward, per layer (Korthikanti et al. 2022, eq. 2, for 16-bit
  values; twice that in float32): :math:`s b h (34 + 5 a s / h)` bytes for sequence length
  :math:`s`, batch :math:`b`, width :math:`h` and :math:`a` heads, plus the logits, their
  log-softmax and gradient, :math:`3 \\cdot 4 b s V` bytes;
* the fixed evaluation batches, held on the device: :math:`4 \\cdot 8 n b (s + 1)` bytes
  (inputs, targets and the index tensors that build them, int64).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..models import TransformerConfig
from .errors import UserError

__all__ = ["MemoryEstimate", "available_bytes", "check", "estimate"]

logger = logging.getLogger(__name__)

GiB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    state: int  # parameters, gradients, optimizer moments
    activations: int
    eval_batches: int

    @property
    def total(self) -> int:
        return self.state + self.activations + self.eval_batches

    def describe(self) -> str:
        return (
            f"{self.total / GiB:.1f} GiB (parameters and optimizer state "
            f"{self.state / GiB:.1f} GiB, activations {self.activations / GiB:.1f} GiB, "
            f"evaluation batches {self.eval_batches / GiB:.1f} GiB)"
        )


def estimate(
    cfg: TransformerConfig, batch_size: int, eval_batches: int, half_precision: bool
) -> MemoryEstimate:
    s, b, h, a, v = cfg.seq_len, batch_size, cfg.d_model, cfg.n_head, cfg.vocab_size
    d_mlp = cfg.d_mlp or 4 * h
    params = 2 * v * h + cfg.n_layer * (4 * h * h + 3 * h * d_mlp)
    per_layer = s * b * h * (34 + 5 * a * s / h) * (1 if half_precision else 2)
    activations = cfg.n_layer * per_layer + 3 * 4 * b * s * v
    return MemoryEstimate(16 * params, math.ceil(activations), 4 * 8 * eval_batches * b * (s + 1))


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device``: CUDA's free memory, else the system's ``MemAvailable``
    (Linux); ``None`` where unknown (then nothing is checked)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check(
    model_config: TransformerConfig,
    config: Any,
    device: torch.device,
    enforce: bool = True,
    eval_batches: int | None = None,
) -> None:
    """Warn when a GPU preset is about to run without a GPU; with ``enforce``, refuse
    (``UserError``, before anything is allocated) a run of the resolved ``config`` whose
    estimated memory exceeds what is free on ``device``. ``eval_batches``: the batches
    actually evaluated (``config.eval_batches`` capped by the split), if known."""
    if config.preset.startswith("gpu") and device.type != "cuda":
        logger.warning(
            "warning: preset %s is sized for a GPU; on %s it will be very slow (try "
            "--preset cpu-small)",
            config.preset,
            device.type,
        )
    if not enforce:
        return
    half = device.type == "cuda" and config.dtype in ("auto", "bfloat16")
    need = estimate(model_config, config.batch_size, eval_batches or config.eval_batches, half)
    free = available_bytes(device)
    if free is not None and need.total > free:
        raise UserError(
            f"this run needs about {need.describe()} of {device.type} memory, but "
            f"{free / GiB:.1f} GiB is available; lower --batch-size or --eval-batches, or "
            f"pass --no-memory-check (train) to try anyway"
        )
