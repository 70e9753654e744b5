"""``nonfinite="skip"`` is never silent: a warning on the first skipped step, and again when
10 steps in a row were skipped (then at 20, 40, ...), on the host-side and the device-side
(fused / capturable) paths alike; the device-side one without a synchronisation per step."""

from __future__ import annotations

import warnings

import pytest
import torch

import spheretorch as st
from spheretorch.optim import NonfiniteGradientWarning, RenormAdam, RiemannianAdam, RiemannianSGD
from spheretorch.optim import optimizer as optimizer_module

N = optimizer_module.WARN_AFTER_CONSECUTIVE_SKIPS


def _params():
    g = torch.Generator().manual_seed(0)
    return [
        st.SphereParameter(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=1),
        torch.nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64)),
    ]


def _steps(opt, params, n, bad=True):
    caught = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(n):
            for p in params:
                p.grad = torch.ones_like(p)
            if bad:
                params[1].grad[0] = float("nan")
            opt.step()
        caught = [x for x in w if issubclass(x.category, NonfiniteGradientWarning)]
    return caught


FLAGS = [{}, {"fused": True}, {"capturable": True}]


@pytest.mark.parametrize("flags", FLAGS, ids=["host", "fused", "capturable"])
@pytest.mark.parametrize("cls", [RiemannianAdam, RenormAdam, RiemannianSGD])
def test_every_step_skipped_warns_first_and_after_runs(cls, flags, monkeypatch):
    if cls is RiemannianSGD and "capturable" in flags:
        pytest.skip("torch's SGD has no capturable flag")
    monkeypatch.setattr(optimizer_module, "SKIP_CHECK_EVERY", 5)
    params = _params()
    opt = cls(params, lr=0.1, **flags)
    before = [p.detach().clone() for p in params]
    caught = _steps(opt, params, 45)
    assert opt.skipped_steps == 45
    messages = [str(w.message) for w in caught]
    assert "skipped a step because a gradient is not finite" in messages[0]
    if not flags:  # decided on the host: the warning names the parameter
        assert "param_groups[0]['params'][1]" in messages[0]
    runs = [m for m in messages if "steps were all skipped" in m]
    # 10, 20, 40 in a row (the device-side path learns of them every 5 steps)
    assert [int(m.split("the last ")[1].split()[0]) for m in runs] == [10, 20, 40]
    for p, q in zip(params, before):
        assert torch.equal(p.detach(), q)  # frozen, and now the user knows


def test_no_warning_without_skips_and_a_new_run_starts_over():
    params = _params()
    opt = RiemannianAdam(params, lr=0.1)
    assert _steps(opt, params, 5, bad=False) == []
    first = _steps(opt, params, N)
    assert len(first) == 2  # the first skip, then N in a row
    _steps(opt, params, 1, bad=False)  # the run ends
    again = _steps(opt, params, N)
    assert [str(w.message) for w in again] == [
        f"RiemannianAdam: the last {N} steps were all skipped for non-finite gradients: "
        "nothing is training"
    ]


def test_ignore_and_raise_do_not_warn():
    params = _params()
    assert _steps(RiemannianAdam(params, lr=0.1, nonfinite="ignore"), params, 12) == []


def test_device_side_counters_are_not_read_every_step(monkeypatch):
    """Between the periodic checks the host never reads the device-side counters."""
    reads = []
    params = _params()
    opt = RiemannianAdam(params, lr=0.1, fused=True)
    real = optimizer_module.SphereOptimizer._check_device_skips

    def spy(self):
        reads.append(1)
        return real(self)

    monkeypatch.setattr(optimizer_module.SphereOptimizer, "_check_device_skips", spy)
    _steps(opt, params, 2 * optimizer_module.SKIP_CHECK_EVERY + 3)
    assert len(reads) == 2
