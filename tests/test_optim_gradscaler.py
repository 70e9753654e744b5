"""The sphere optimizers take a caller's skip decision (torch's GradScaler protocol:
``_step_supports_amp_scaling``, ``found_inf`` and ``grad_scale`` set on the optimizer), so that
a GradScaler or the trainer's device-side check decides without a host read per step."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import spheretorch as st
from spheretorch.optim import AdamH, RenormAdam, RiemannianAdam, RiemannianSGD, SphereMuon
from spheretorch.train import Trainer

from .test_device_skip import device_trainer
from .test_train import poison_loss, quick

OPTIMIZERS = {
    "riemannian_adam": lambda ps: RiemannianAdam(ps, lr=1e-2),
    "renorm_adam": lambda ps: RenormAdam(ps, lr=1e-2),
    "riemannian_sgd": lambda ps: RiemannianSGD(ps, lr=1e-1, momentum=0.9),
    # the Muon family: found_inf read on the host, or (capturable) the skip on the device
    "sphere_muon": lambda ps: SphereMuon(ps, lr=0.02),
    "sphere_muon_capturable": lambda ps: SphereMuon(ps, lr=0.02, capturable=True),
    "adamh": lambda ps: AdamH(ps, lr=1e-2),
    "adamh_capturable": lambda ps: AdamH(ps, lr=1e-2, capturable=True, measure_angle=True),
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


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: RiemannianAdam(ps, lr=1e-2, angular=True),
        lambda ps: RenormAdam(ps, lr=1e-2, ordering="oblique", angular=True),
        lambda ps: RiemannianSGD(ps, lr=1e-2, momentum=0.9, angular=True),
        lambda ps: AdamH(ps, lr=1e-2, angular=True, measure_angle=True, capturable=True),
        lambda ps: SphereMuon(ps, lr=1e-2, measure_angle=True, capturable=True),
    ],
)
def test_a_skipped_step_keeps_the_measured_angles(make) -> None:
    """``state["angle"]`` is the angle of the last step taken: a step skipped on
    ``found_inf`` (masked on the device) leaves it as it was, not the angle of the update
    computed from the bad gradient."""
    ps = _params()
    opt = make(ps)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    angle = opt.state[ps[0]]["angle"].clone()
    before = [p.detach().clone() for p in ps]
    for p in ps:
        p.grad = torch.full_like(p, float("nan"))
    opt.found_inf, opt.grad_scale = torch.ones(()), None
    opt.step()
    assert torch.equal(opt.state[ps[0]]["angle"], angle)
    assert all(torch.equal(b, p) for b, p in zip(before, ps))


@pytest.mark.parametrize(
    ("model", "optim", "capturable"),
    [
        ("ngpt", "renorm", False),
        ("ngpt", "riemannian", False),
        ("ngpt", "adamh", False),
        ("ngpt", "adamh", True),
        ("ngpt", "sphere_muon", False),
        ("ngpt", "sphere_muon", True),
        ("ngpt", "muon", True),
        ("gpt", "muon", False),
    ],
)
def test_trainer_device_side_skip_with_sphere_optimizers(
    model: str, optim: str, capturable: bool
) -> None:
    """The trainer's device path (default on CUDA) with nGPT's and the Muon family's recipes,
    forced on the CPU: the same parameters as the host decision, the same skipped steps.
    ``capturable``: the Muon family as the trainer builds it on CUDA (the skip on the
    device, no host read); without it they read ``found_inf`` on the host."""
    dev = device_trainer(torch.device("cpu"), model=model, optim=optim)
    host = Trainer(quick(model, optim=optim))
    host.device_skip = False
    if capturable:
        for group in dev.optimizer.param_groups:
            group["capturable"] = True
    for t in (dev, host):
        poison_loss(t, {2, 3})
        for _ in range(6):
            t.train_step(*t.batch(t.step))
    dev.read_host_state()
    assert dev.skipped_steps == host.skipped_steps == 2
    for a, b in zip(dev.model.parameters(), host.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for state in dev.optimizer.state.values():  # the skipped steps left no trace
        if "step" in state:
            assert float(state["step"]) == 4
