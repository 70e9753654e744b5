"""Fused GPU kernels (Triton) for spheretorch's hot paths, with the choice of backend.

Each kernel has one readable PyTorch reference beside the formula it implements (in
:mod:`spheretorch.sphere`, the optimizer's reference update, or the kernel's own module) and is
tested against it; on CPU tensors the Triton kernels run through Triton's interpreter
(``TRITON_INTERPRET=1``). :mod:`.backend` decides which implementation runs.

The models' sphere operations are ``torch.library`` custom ops (``spheretorch::``), one module
each: :mod:`.unit` (normalize the last axis), :mod:`.residual` (nGPT's residual step),
:mod:`.slerp` (its slerp rule), :mod:`.rope` (RoPE, per-head norm and query scale),
:mod:`.geodesic_step` (GeoNorm's step);
``kernels/rowwise.py`` holds their shared launch geometry.
"""

from .backend import BACKEND_ENV, Backend, backend_for, triton_available

__all__ = ["BACKEND_ENV", "Backend", "backend_for", "triton_available"]
