"""The non-finite decision on the device (``Trainer.device_skip``, on by itself on CUDA with an
optimizer that takes ``found_inf``): no host read per step, the skip done by the optimizer,
divergence still caught (at the next host read, naming the same steps).

On the CPU the path is forced (torch's fused AdamW takes ``found_inf`` on the CPU too), so it
is tested where CI runs; on CUDA it is the default and must not synchronize at all.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from spheretorch.train import Trainer
from spheretorch.train.checkpoints import load_checkpoint
from spheretorch.train.errors import TrainingDiverged
from spheretorch.train.trainer import HOST_READ_INTERVAL

from .test_train import _HostReads, poison_loss, quick


def device_trainer(
    device: torch.device, out: Path | None = None, model: str = "gpt", **kw: object
) -> Trainer:
    t = Trainer(quick(model, device=device.type, **kw), out)
    # fused AdamW, and spheretorch's optimizers (tests/test_optim_gradscaler.py)
    assert getattr(t.optimizer, "_step_supports_amp_scaling", False)
    assert t.device_skip == (device.type == "cuda")
    t.device_skip = True
    return t


def test_skip_on_the_device_equals_the_host_decision(device: torch.device) -> None:
    dev, host = device_trainer(device), Trainer(quick("gpt", device=device.type))
    host.device_skip = False
    for t in (dev, host):
        poison_loss(t, {2, 3})
        losses = [t.train_step(*t.batch(t.step)) for _ in range(6)]
        assert [math.isnan(float(x)) for x in losses] == [False] * 2 + [True] * 2 + [False] * 2
    dev.read_host_state()
    assert dev.skipped_steps == host.skipped_steps == 2 and dev.bad_in_a_row == 0
    assert dev.last_loss == pytest.approx(host.last_loss, rel=1e-6)
    for a, b in zip(dev.model.parameters(), host.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    steps = [s["step"] for s in dev.optimizer.state.values()]
    assert all(float(s) == 4 for s in steps)  # Adam's t not advanced by the skipped steps


def test_no_host_read_between_intervals(device: torch.device) -> None:
    t = device_trainer(device, steps=30)
    t.train_step(*t.batch(0))
    poison_loss(t, {3})
    with _HostReads() as mode:
        for _ in range(HOST_READ_INTERVAL - 2):
            t.train_step(*t.batch(t.step))
    assert mode.reads == 0
    with _HostReads() as mode:
        t.read_host_state()
    assert mode.reads <= 1 and t.skipped_steps == 1


def test_divergence_is_caught_at_the_next_read_naming_the_same_steps(tmp_path: Path) -> None:
    t = device_trainer(torch.device("cpu"), tmp_path, steps=30, max_bad_steps=3)
    poison_loss(t, {12, 14, 15, 16, 17})  # as tests/test_train.py: 14, 15, 16 in a row
    with pytest.raises(TrainingDiverged) as exc:
        t.train()
    assert str(exc.value) == (
        "gpt: non-finite loss or gradients at 3 steps in a row (steps 15-17); stopping. "
        "Lower --lr or raise --max-bad-steps; the last checkpoint is untouched"
    )
    assert t.step == 20  # the read after step 17
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 10


def test_a_run_with_device_skip_resumes_exactly(tmp_path: Path) -> None:
    full = device_trainer(torch.device("cpu"), steps=20)
    poison_loss(full, {5})
    full.train()
    first = device_trainer(torch.device("cpu"), tmp_path, steps=20)
    poison_loss(first, {5})
    first.train(stop_after=10)
    again = Trainer(quick("gpt", steps=20), tmp_path, resume=True)
    again.device_skip = True
    again.train()
    assert again.skipped_steps == full.skipped_steps == 1
    for a, b in zip(again.model.parameters(), full.model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("model", "optim"),
    [
        ("gpt", "adamw"),
        ("ngpt", "renorm"),
        ("ngpt", "riemannian"),
        ("geonorm", None),
        ("ngpt", "sphere_muon"),
        ("ngpt", "adamh"),
    ],
)
def test_cuda_steps_do_not_synchronize(cuda: torch.device, model: str, optim: str | None) -> None:
    """Steps between host reads: no synchronizing CUDA call at all (torch's sync debug mode
    raises on one: ``.item()``, a pageable copy, ``nonzero``, ...), for each model's recipe
    as the trainer builds it on CUDA: the sphere optimizers' Triton kernels, the Muon family
    (capturable) and the models' fused ops included, while the schedule changes the learning
    rate at every step."""
    kw = {} if optim is None else {"optim": optim}
    t = Trainer(quick(model, device="cuda", steps=30, **kw))
    assert t.device_skip
    for _ in range(2):
        t.train_step(*t.batch(t.step))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(HOST_READ_INTERVAL - 3):
            t.train_step(*t.batch(t.step))
    finally:
        torch.cuda.set_sync_debug_mode("default")
