"""Checkpoints and faults: exact resume after an interruption, a write killed midway, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spheretorch.cli import main
from spheretorch.train import TrainConfig, Trainer, load_checkpoint
from spheretorch.train.throughput import TIMING_FIELDS

torch.set_num_threads(1)  # tiny models; avoid oversubscription under pytest-xdist

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def quick(model: str = "gpt", **kw) -> TrainConfig:
    return TrainConfig(model=model, preset="smoke", **{"steps": 30, "eval_interval": 10, **kw})


def rows(path: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock column."""
    out = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in out]


def test_checkpoint_holds_everything(tmp_path: Path) -> None:
    Trainer(quick("ngpt", steps=10), tmp_path).train()
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    expected = {"model", "optimizer", "scheduler", "rng", "data", "train_config"}
    assert expected | {"model_config", "tokenizer", "history", "loss_sum"} <= set(ckpt)
    assert ckpt["step"] == 10 and ckpt["data"] == {"seed": 0, "step": 10}
    assert set(ckpt["rng"]) >= {"torch", "numpy", "python"}
    assert ckpt["tokenizer"]["kind"] == "char" and len(ckpt["tokenizer"]["chars"]) == 65
    assert ckpt["train_config"]["max_bad_steps"] == 5


@pytest.mark.parametrize("model", ["gpt", "ngpt"])
def test_sigterm_between_evaluations_then_resume_is_bitwise(model: str, tmp_path: Path) -> None:
    """A signal at step 15 (between evaluations at 10 and 20) checkpoints step 15; resuming
    reproduces the uninterrupted run's metrics and weights exactly."""
    full = Trainer(quick(model), tmp_path / "full")
    full.train()

    part = Trainer(quick(model), tmp_path / "part", handle_signals=True)
    step = part.train_step

    def step_then_signal(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = step(x, y)
        if part.step == 15:
            os.kill(os.getpid(), signal.SIGTERM)  # handled: sets a flag, training stops
        return loss

    part.train_step = step_then_signal  # type: ignore[method-assign]
    summary = part.train()
    assert summary["interrupted"] == "SIGTERM" and summary["steps"] == 15
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    assert load_checkpoint(tmp_path / "part" / "checkpoint.pt")["step"] == 15
    assert [r["step"] for r in rows(tmp_path / "part")] == [10]

    torch.manual_seed(1234)  # resume must not depend on the process's RNG state
    resumed = Trainer(TrainConfig(model=model), tmp_path / "part", resume=True)
    assert resumed.step == 15
    assert resumed.train()["interrupted"] is None
    assert rows(tmp_path / "part") == rows(tmp_path / "full")
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


# A child process that writes a checkpoint through a file object that stops halfway through
# (a real torch.save stream, cut after 64 kB) and waits there to be SIGKILLed.
KILLED_WRITER = r"""
import os, sys, time
import spheretorch.distributed.checkpoint as ck  # where save_atomic lives
from spheretorch.train import TrainConfig, Trainer

class Stalling:
    def __init__(self, f):
        self.f, self.n = f, 0
    def write(self, b):
        self.n += len(b)
        out = self.f.write(b)
        if self.n > 65536:
            self.f.flush()
            print("stalled", flush=True)
            time.sleep(120)
        return out
    def __getattr__(self, name):
        return getattr(self.f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()

real_fdopen = os.fdopen
ck.os.fdopen = lambda fd, mode: Stalling(real_fdopen(fd, mode))
t = Trainer(TrainConfig(model="gpt", steps=20, stretch_schedule=True), sys.argv[1], resume=True)
t.train()
"""


def test_killed_mid_write_leaves_previous_checkpoint(tmp_path: Path) -> None:
    Trainer(quick("gpt", steps=10), tmp_path).train()
    path = tmp_path / "checkpoint.pt"
    before = path.read_bytes()
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "stalled", proc.stderr.read()
        temps = list(tmp_path.glob(".checkpoint.pt.*.tmp"))
        assert len(temps) == 1 and temps[0].stat().st_size > 65536  # a real partial write
    finally:
        proc.kill()  # SIGKILL: no cleanup code runs
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 10
    # the next run removes the orphaned temp file and resumes from the previous checkpoint
    t = Trainer(TrainConfig(steps=20, stretch_schedule=True), tmp_path, resume=True)
    assert t.step == 10
    t.train()
    assert not list(tmp_path.glob(".checkpoint.pt.*.tmp"))
    assert load_checkpoint(path)["step"] == 20


def test_cli_sigterm_saves_and_exits_then_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--model", "gpt", "--preset", "smoke", "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "spheretorch", *args, "--steps", "100000", "--eval-interval", "5"],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        metrics = out / "metrics.jsonl"
        for _ in range(1200):  # the first metrics line (up to 120 s on a loaded machine)
            if metrics.is_file() and metrics.read_text().strip():
                break
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    last = err.strip().splitlines()[-1]
    assert "interrupted by SIGTERM" in last and "continue with --resume" in last
    assert "Traceback" not in err
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] >= 5 and ckpt["train_config"]["steps"] == 100000
    stopped = ckpt["step"]
    assert main([*args, "--resume", "--steps", str(stopped + 5), "--stretch-schedule"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["step"] == stopped + 5


def test_second_sigint_stops_at_once(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs in the background
    t = Trainer(quick("gpt"), tmp_path, handle_signals=True)
    step = t.train_step

    def step_then_two_sigints(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = step(x, y)
        if t.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # first: finish the step, checkpoint, stop
            os.kill(os.getpid(), signal.SIGINT)  # second: KeyboardInterrupt right away
        return loss

    t.train_step = step_then_two_sigints  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        t.train()
    assert signal.getsignal(signal.SIGINT) is before  # restored
    assert not (tmp_path / "checkpoint.pt").exists()
