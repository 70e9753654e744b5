"""Hypothesis strategies and fixtures shared by the geometry tests (test_sphere, test_geodesic)."""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from spheretorch import sphere as S

F64 = torch.float64
# Absolute tolerances for the property tests, per dtype (float32 computes in float32).
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}
MARGIN = 0.1  # expmap/logmap are inverse for ||u|| < pi; stay this far away from pi.


@st.composite
def layouts(draw, min_d: int = 2, dtypes=(torch.float32, torch.float64)):
    """(shape, dim, dtype, seed): 1-4 axes, batch sizes incl. 1, ``dim`` anywhere (+/-)."""
    ndim = draw(st.integers(1, 4))
    shape = [draw(st.sampled_from([1, 2, 3, 4])) for _ in range(ndim)]
    axis = draw(st.integers(0, ndim - 1))
    shape[axis] = draw(st.sampled_from(sorted({min_d, 2, 3, 5, 16} - set(range(min_d)))))
    dim = axis if draw(st.booleans()) else axis - ndim
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    return tuple(shape), dim, dtype, seed


angles = st.one_of(
    st.sampled_from([0.0, 1e-9, 1e-6, 1e-3, math.pi / 2, math.pi - MARGIN]),
    st.floats(0.0, math.pi - MARGIN),
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def frame(shape, dim, seed, dtype=F64):
    """A random point ``x`` and a random unit tangent ``w`` at ``x`` (float64, then cast)."""
    g = gen(seed)
    x = S.normalize(torch.randn(shape, dtype=F64, generator=g), dim)
    w = S.normalize(S.project(x, torch.randn(shape, dtype=F64, generator=g), dim), dim)
    return x.to(dtype), w.to(dtype)


def pair_at(theta: float, shape=(5,), dim=-1, seed=0, dtype=F64):
    """``(x, y, w)`` with ``y = cos(theta) x + sin(theta) w`` in every slice (exactly ``x``
    for theta=0)."""
    x, w = frame(shape, dim, seed)
    y = x.clone() if theta == 0 else math.cos(theta) * x + math.sin(theta) * w
    return x.to(dtype), y.to(dtype), w.to(dtype)


def close(a, b, atol, rtol=0.0):
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol)
