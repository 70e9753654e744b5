"""Shared test configuration.

Hypothesis runs with a deterministic profile by default so the suite is fast and reproducible
(the same examples on every run and every machine). Set ``HYPOTHESIS_PROFILE=thorough`` for a
longer randomised search when changing the geometry code.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "spheretorch",
    derandomize=True,
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "thorough",
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "spheretorch"))


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global torch RNG state."""
    torch.manual_seed(0)


#: the devices a device-parametrized test runs on: the CPU always, CUDA where it is present
#: (skipped, not failed, elsewhere: CI has no GPU; ``make gpu-check`` runs the CUDA lane)
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available"),
        ],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Each device present (``DEVICES``); use it to run a test on the CPU and on CUDA."""
    return torch.device(request.param)


@pytest.fixture
def cuda() -> torch.device:
    """The GPU, for a test of a CUDA-only path (skipped where CUDA is not available)."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    return torch.device("cuda")


def _needs_cuda(item: pytest.Item) -> bool:
    """A test of a CUDA-only path: it takes the ``cuda`` fixture, or a ``skipif`` of its says
    it needs CUDA / a GPU (so a test written with its own ``skipif`` is not left out)."""
    if "cuda" in getattr(item, "fixturenames", ()):
        return True
    for mark in item.iter_markers("skipif"):
        reason = str(mark.kwargs.get("reason", "")).lower()
        if "cuda" in reason or "gpu" in reason:
            return True
    return False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests of CUDA-only paths (:func:`_needs_cuda`) belong to the CUDA lane (``-m cuda``)."""
    for item in items:
        if _needs_cuda(item):
            item.add_marker(pytest.mark.cuda)
