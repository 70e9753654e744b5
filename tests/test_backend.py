"""The fused-backend switch (spheretorch.kernels.backend)."""

import pytest

from spheretorch.kernels import BACKEND_ENV, Backend, backend_for, triton_available


def test_auto_is_torch_on_cpu(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert backend_for("cpu") is Backend.TORCH


def test_torch_forced(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert backend_for("cpu") is Backend.TORCH


def test_bad_value_is_one_line(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match="auto, triton, torch"):
        backend_for("cpu")


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend_for("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend_for("cpu") is Backend.TRITON
