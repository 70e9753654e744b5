"""Fused GPU kernels (Triton) for spheretorch's hot paths, with the choice of backend.

Each kernel has one readable PyTorch reference beside the formula it implements (in
:mod:`spheretorch.sphere` or the optimizer's reference update) and is tested against it; on
CPU tensors the Triton kernels run through Triton's interpreter (``TRITON_INTERPRET=1``).
:mod:`.backend` decides which implementation runs.
"""

from .backend import BACKEND_ENV, Backend, backend_for, triton_available

__all__ = ["BACKEND_ENV", "Backend", "backend_for", "triton_available"]
