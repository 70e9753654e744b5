"""The sphere optimizers take a caller's skip decision (torch's GradScaler protocol:
``_step_supports_amp_scaling``, ``found_inf`` and ``grad_scale`` set on the optimizer), so that
a GradScaler or the trainer's device-side check decides without a host read per step."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import spheretorch as st
from spheretorch.optim import RenormAdam, RiemannianAdam, RiemannianSGD
from spheretorch.train import Trainer

from .test_device_skip import device_trainer
from .test_train import poison_loss, quick

OPTIMIZERS = {
    "riemannian_adam": lambda ps: RiemannianAdam(ps, lr=1e-2),
    "renorm_adam": lambda ps: RenormAdam(ps, lr=1e-2),
    "riemannian_sgd": lambda ps: RiemannianSGD(ps, lr=1e-1, momentum=0.9),
}


def _params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [
        st.SphereParameter(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1),
        torch.nn.Parameter(torch.randn(4, dtype=torch.float64, generator=g)),
    ]


def _loss(ps: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    return (ps[0] * target).sum() + (ps[1] ** 2).sum()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_grad_scaler_steps_equal_unscaled_steps_and_skip_on_inf(name: str) -> None:
    target = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref_ps, ps = _params(), _params()
    ref, opt = OPTIMIZERS[name](ref_ps), OPTIMIZERS[name](ps)
    assert opt._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    for step in range(4):
        ref.zero_grad()
        _loss(ref_ps, target).backward()
        opt.zero_grad()
        scaler.scale(_loss(ps, target)).backward()
        if step == 2:  # an overflow: GradScaler says skip, nothing moves
            ps[1].grad[0] = float("inf")
            before = [p.detach().clone() for p in ps]
            state = copy.deepcopy(opt.state_dict()["state"])
            scaler.step(opt)
            scaler.update()
            for b, p in zip(before, ps):
                assert torch.equal(b, p)
            assert str(opt.state_dict()["state"]) == str(state)
            continue
        ref.step()
        scaler.step(opt)
        scaler.update()
        for a, b in zip(ref_ps, ps):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert opt.skipped_steps == 0  # the caller decided and counts (GradScaler, the trainer)
    assert not hasattr(opt, "found_inf")  # GradScaler removes what it set


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_found_inf_overrides_the_nonfinite_policy(name: str) -> None:
    """A caller's ``found_inf`` decides: skip on 1, step on 0, no warning, no count."""
    ps = _params()
    opt = OPTIMIZERS[name](ps)
    opt.nonfinite = "ignore"
    for p in ps:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in ps]
    opt.found_inf, opt.grad_scale = torch.ones(()), None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, ps))
    opt.found_inf = torch.zeros(())
    opt.step()
    assert not torch.equal(before[1], ps[1])
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("optim", ["renorm", "riemannian"])
def test_trainer_device_side_skip_with_sphere_optimizers(optim: str) -> None:
    """The trainer's device path (default on CUDA) with nGPT's recipes, forced on the CPU:
    the same parameters as the host decision, the same skipped steps."""
    dev = device_trainer(torch.device("cpu"), model="ngpt", optim=optim)
    host = Trainer(quick("ngpt", optim=optim))
    host.device_skip = False
    for t in (dev, host):
        poison_loss(t, {2, 3})
        for _ in range(6):
            t.train_step(*t.batch(t.step))
    dev.read_host_state()
    assert dev.skipped_steps == host.skipped_steps == 2
    for a, b in zip(dev.model.parameters(), host.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
