"""The hot-path normalizer :func:`unit`: ``normalize(x, -1, on_zero="keep")`` as one fused op.

``spheretorch::unit`` (:mod:`spheretorch.kernels.unit`) is a ``torch.library`` custom op:
``torch.compile`` treats it as opaque (so it cannot re-fuse the normalization in low precision,
pytorch issue 168126), the profiler names it, and it runs a Triton kernel on CUDA and its
PyTorch reference elsewhere. Its backward, :math:`(g - y \\langle g, y\\rangle) / \\|x\\|`, is
one more fused op; under ``create_graph`` it is differentiated through the reference instead.
"""

from __future__ import annotations

from ..kernels.unit import unit

__all__ = ["unit"]
