"""The compile check: with ``--compile`` the first step compares compiled and eager gradients.

A deliberately broken "compiled" module stands in for a compiler fault: its loss is exactly
the eager one, its gradient for one parameter is not (as torch 2.11's zero gradients were).
No real compile runs here (fast); tests/test_compile_parity.py compiles for real.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from spheretorch.cli import main
from spheretorch.train import TrainConfig, Trainer
from spheretorch.train.compile_check import CompiledGradientMismatch

TINY = {"n_layer": 1, "n_head": 2, "d_model": 32, "seq_len": 16}
BROKEN = "blocks.0.mlp.up.weight"


def config(model: str = "gpt", **kw: object) -> TrainConfig:
    base = dict(model=model, preset="smoke", steps=4, eval_interval=4, eval_batches=1)
    return TrainConfig(**{**base, "batch_size": 4, "model_options": dict(TINY), **kw})


def broken(forward, model: torch.nn.Module, name: str = BROKEN):
    """``forward`` with the same loss, bit for bit, but ``name``'s gradient off by ones."""
    weight = dict(model.named_parameters())[name]

    def run(x, y):
        logits, loss = forward(x, y)
        local = getattr(weight, "to_local", None)  # FSDP2's DTensor parameter
        s = (local() if local is not None else weight).sum()
        return logits, loss + (s - s.detach())  # adds 0 to the loss, 1 to each gradient

    return run


def params(t: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in t.model.parameters()]


def test_broken_compiled_gradients_stop_before_the_first_step() -> None:
    t = Trainer(config(compile=True))
    assert dict(t.model.named_parameters())[BROKEN] is not None
    t.forward_model = broken(t.eager_forward_model, t.model)
    before = params(t)
    with pytest.raises(CompiledGradientMismatch) as exc:
        t.train()
    message = str(exc.value)
    assert message.startswith(f"torch.compile computes wrong gradients: parameter {BROKEN} is ")
    assert "float32 round-off allows 0.001" in message and "\n" not in message
    assert "--compile-check eager" in message
    assert t.step == 0 and not t.optimizer.state  # no optimizer step was taken
    assert all(torch.equal(a, b) for a, b in zip(before, t.model.parameters()))
    assert isinstance(exc.value, ValueError)  # a UserError: the CLI's exit status 2


def test_eager_policy_warns_and_trains_eager_from_the_first_step() -> None:
    t = Trainer(config(compile=True, compile_check="eager"))
    t.forward_model = t.eval_model = broken(t.eager_forward_model, t.model)
    ref = Trainer(config())
    with pytest.warns(RuntimeWarning, match=f"parameter {BROKEN} .* training eager instead"):
        t.train_step(*t.batch(0))
    ref.train_step(*ref.batch(0))
    assert t.forward_model is t.eager_forward_model and t.eval_model is t.eager_forward_model
    # the first update used the eager gradients: the same weights as an eager run
    assert all(torch.equal(a, b) for a, b in zip(params(t), ref.model.parameters()))
    summary = t.train()
    check = summary["compile_check"]
    assert check["ok"] is False and check["worst_param"] == BROKEN and check["policy"] == "eager"


@pytest.mark.parametrize("model", ["ngpt", "geonorm"])
def test_a_correct_compiled_module_passes_and_its_gradients_are_used(model: str) -> None:
    t = Trainer(config(model, compile=True))
    eager = t.eager_forward_model
    t.forward_model = lambda x, y: eager(x, y)  # the "compiled" module: right gradients
    ref = Trainer(config(model))
    t.train_step(*t.batch(0))
    ref.train_step(*ref.batch(0))
    assert t.compile_check["ok"] and t.compile_check["worst_error"] == 0.0
    assert t.compile_s is not None and t.compile_s >= 0
    assert all(torch.equal(a, b) for a, b in zip(params(t), ref.model.parameters()))


def test_off_does_not_check() -> None:
    t = Trainer(config(compile=True, compile_check="off"))
    t.forward_model = broken(t.eager_forward_model, t.model)
    t.train_step(*t.batch(0))
    assert t.compile_check is None and t.step == 1


def test_bad_compile_check_value_is_a_user_error() -> None:
    with pytest.raises(ValueError, match="unknown compile-check 'sometimes'; choose error, eager"):
        config(compile_check="sometimes").resolve()


def _broken_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.compile`` replaced by one that breaks a gradient (and compiles nothing)."""

    def compile(module, *args, **kwargs):
        model = getattr(module, "module", module)
        return broken(module, model)

    monkeypatch.setattr(torch, "compile", compile)


def test_cli_exit_status_2_with_one_line_or_eager_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _broken_compile(monkeypatch)
    args = ["train", "--model", "gpt", "--preset", "smoke", "--steps", "3", "--no-progress"]
    args += ["--device", "cpu", "--compile"] + [f"--set={k}={v}" for k, v in TINY.items()]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[1].startswith(  # err[0]: the run's header line
        f"spheretorch: error: torch.compile computes wrong gradients: parameter {BROKEN} is "
    )
    with pytest.warns(RuntimeWarning, match="training eager instead"):
        code = main([*args, "--out", str(tmp_path / "b"), "--compile-check", "eager"])
    assert code == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_the_check_holds_in_distributed_runs(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One rank (gloo) in this process: the check runs on the wrapped model."""
    env = {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for k, v in {**env, "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(k, v)
    t = Trainer(config(compile=True, device="cpu"), tmp_path, distributed=mode)
    try:
        t.forward_model = broken(t.eager_forward_model, t.model)
        with pytest.raises(CompiledGradientMismatch, match=f"parameter {BROKEN} is "):
            t.train()
        assert t.step == 0
    finally:
        t.close()
    assert "WORLD_SIZE" in os.environ
