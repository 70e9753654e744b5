"""Which implementation runs a fused operation: Triton kernels or the PyTorch reference.

The one switch is the environment variable ``SPHERETORCH_FUSED_BACKEND``:

* ``auto`` (default): Triton on CUDA tensors when Triton imports; the reference (or the
  native CPU kernels, where an optimizer has them) elsewhere;
* ``triton``: Triton kernels on every device. On CPU tensors this needs Triton's interpreter
  (``TRITON_INTERPRET=1`` set before Triton is imported); the tests use it to check every
  kernel against its reference without a GPU;
* ``torch``: the PyTorch reference everywhere (for bisecting a suspected kernel fault).
"""

from __future__ import annotations

import enum
import functools
import importlib.util
import os

import torch

__all__ = ["BACKEND_ENV", "Backend", "backend_for", "requested_backend", "triton_available"]

#: environment variable that selects the fused backend
BACKEND_ENV = "SPHERETORCH_FUSED_BACKEND"


class Backend(enum.Enum):
    """The implementation a fused operation runs with."""

    TRITON = "triton"
    TORCH = "torch"


@functools.cache
def triton_available() -> bool:
    """Whether the ``triton`` package is importable (it is not on every CPU install)."""
    return importlib.util.find_spec("triton") is not None


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def requested_backend() -> str:
    """The value of :data:`BACKEND_ENV` (``auto``, ``triton`` or ``torch``), checked."""
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "triton", "torch"):
        raise ValueError(f"{BACKEND_ENV} must be one of auto, triton, torch; got {value!r}")
    return value


def backend_for(device: torch.device | str) -> Backend:
    """The backend for tensors on ``device`` under the current :data:`BACKEND_ENV`.

    Raises:
        RuntimeError: ``triton`` was requested but cannot run there (Triton missing, or a CPU
            device without ``TRITON_INTERPRET=1``), in one line naming the fix.
    """
    device = torch.device(device)
    choice = requested_backend()
    if choice == "torch":
        return Backend.TORCH
    if choice == "auto":
        usable = device.type == "cuda" and triton_available()
        return Backend.TRITON if usable else Backend.TORCH
    if not triton_available():
        raise RuntimeError(f"{BACKEND_ENV}=triton but Triton is not installed (pip install triton)")
    if device.type != "cuda" and not _interpreter_on():
        raise RuntimeError(
            f"{BACKEND_ENV}=triton on a {device.type} tensor needs Triton's interpreter: "
            "set TRITON_INTERPRET=1 before importing spheretorch"
        )
    return Backend.TRITON
