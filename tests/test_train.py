"""Training: tokenizer, data, batches, schedule, checkpoints, metrics, exact resume."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from spheretorch.train import (
    CosineSchedule,
    Tokenizer,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    UserError,
    eval_batches,
    get_batch,
    load_checkpoint,
    load_data,
    load_model,
    save_atomic,
)
from spheretorch.train.throughput import TIMING_FIELDS

torch.set_num_threads(1)  # tiny models; avoid oversubscription under pytest-xdist


def quick(model: str, **kw) -> TrainConfig:
    return TrainConfig(model=model, preset="smoke", **{"steps": 30, "eval_interval": 10, **kw})


# -- tokenizer and data -----------------------------------------------------------------------


def test_char_tokenizer_round_trip_and_errors() -> None:
    tok = Tokenizer.from_text("hello, wörld\n")
    assert tok.vocab_size == len(set("hello, wörld\n"))
    assert tok.decode(tok.encode("world ö")) == "world ö"
    assert Tokenizer.from_state_dict(tok.state_dict()) == tok
    with pytest.raises(UserError, match="'z' is not in the model's vocabulary"):
        tok.encode("z")
    byte = Tokenizer("byte")
    assert byte.vocab_size == 256
    assert byte.decode(byte.encode("ünïcode")) == "ünïcode"


def test_builtin_data_split() -> None:
    data = load_data()
    assert data.name == "tinyshakespeare"
    assert data.tokenizer.vocab_size == 65
    n = len(data.train) + len(data.val)
    assert len(data.val) == int(n * 0.1)
    assert data.tokenizer.decode(data.train[:14].tolist()) == "First Citizen:"


def test_text_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_data(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"abc\xff\xfedef")
    with pytest.raises(UserError, match=r"not UTF-8 text \(invalid byte 0xff at offset 3\)"):
        load_data(bad)
    assert load_data(bad, "byte").tokenizer.vocab_size == 256  # bytes always work
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserError, match="empty"):
        load_data(empty)
    short = tmp_path / "short.txt"
    short.write_text("to be or not to be " * 3)
    with pytest.raises(UserError, match="too short"):
        load_data(short).check_fits(32)
    with pytest.raises(UserError, match="tokenizer"):
        load_data(short, "words")


def test_batches_are_a_function_of_seed_and_step() -> None:
    data = torch.arange(1000)
    x1, y1 = get_batch(data, 0, 5, 8, 16)
    x2, y2 = get_batch(data, 0, 5, 8, 16)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(y1, x1 + 1)  # next-token targets
    assert x1.shape == (8, 16)
    assert not torch.equal(get_batch(data, 0, 6, 8, 16)[0], x1)
    assert not torch.equal(get_batch(data, 1, 5, 8, 16)[0], x1)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(get_batch(data, 0, 5, 8, 16)[0], x1)
    shards = [get_batch(data, 0, 5, 8, 16, rank=r, world_size=2)[0] for r in range(2)]
    assert torch.equal(torch.cat([shards[0], shards[1]])[[0, 4, 1, 5, 2, 6, 3, 7]], x1)
    ev = eval_batches(data, 3, 4, 16)
    assert len(ev) == 3 and ev[0][0].shape == (4, 16)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(ev, eval_batches(data, 3, 4, 16)))


def test_cosine_schedule() -> None:
    s = CosineSchedule(1.0, total=100, warmup=10)
    assert s.lr_at(0) == pytest.approx(0.1)
    assert s.lr_at(9) == pytest.approx(1.0)
    assert s.lr_at(10) == pytest.approx(1.0)
    assert s.lr_at(55) == pytest.approx(0.5)
    assert s.lr_at(100) == pytest.approx(0.0)
    lrs = [s.lr_at(i) for i in range(10, 100)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))
    s2 = CosineSchedule(3.0, 5)
    s2.load_state_dict(s.state_dict())
    assert s2.lr_at(55) == s.lr_at(55)


def test_config_resolution_and_errors() -> None:
    g = quick("gpt").resolve()
    n = quick("ngpt").resolve()
    assert (g.optim, g.weight_decay, g.warmup_steps > 0) == ("adamw", 0.1, True)
    assert (n.optim, n.weight_decay, n.warmup_steps) == ("renorm", 0.0, 0)
    assert g.betas == n.betas == (0.9, 0.95) and g.grad_clip == 1.0
    for kw, match in [
        ({"model": "bert"}, "unknown model"),
        ({"preset": "huge"}, "unknown preset"),
        ({"steps": 0}, "steps"),
        ({"lr": -1.0}, "lr"),
        ({"optim": "sgd"}, "unknown optimizer"),
    ]:
        with pytest.raises(UserError, match=match):
            TrainConfig(**{"model": "gpt", "preset": "smoke", **kw}).resolve()


# -- checkpoints ------------------------------------------------------------------------------


def test_save_atomic_and_bad_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    save_atomic({"a": torch.ones(3)}, path)
    save_atomic({"a": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp files left
    with pytest.raises(UserError, match="not a spheretorch training checkpoint"):
        load_checkpoint(path)
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(path.read_bytes()[:50])
    with pytest.raises(UserError, match=f"cannot read checkpoint {truncated}"):
        load_checkpoint(truncated)
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")


# -- training ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt", "ngpt", "geonorm"])
def test_smoke_training_decreases_loss(model: str, tmp_path: Path) -> None:
    trainer = Trainer(TrainConfig(model=model, preset="smoke"), tmp_path)
    summary = trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == trainer.history
    assert rows[-1]["val_loss"] < math.log(65) - 1.0  # well below a uniform guess (4.17)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert summary["final_val_loss"] == rows[-1]["val_loss"]
    assert summary["steps"] == 60 and not summary["diverged"]
    if model == "ngpt":
        for p in trainer.model.parameters():
            if getattr(p, "sphere_dim", None) is not None:
                n = p.norm(dim=p.sphere_dim)
                assert torch.allclose(n, torch.ones_like(n), atol=1e-5)


def test_metrics_jsonl_format(tmp_path: Path) -> None:
    Trainer(quick("gpt", steps=25), tmp_path).train()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows] == [10, 20, 25]  # every eval_interval, and the last step
    for r in rows:
        assert set(r) == {"step", "train_loss", "val_loss", *TIMING_FIELDS}
        assert isinstance(r["step"], int)
        assert all(isinstance(r[k], float) for k in ("train_loss", "val_loss", "elapsed_s"))
    assert rows[0]["elapsed_s"] <= rows[1]["elapsed_s"] <= rows[2]["elapsed_s"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ms_per_step"] > 0 and summary["steps"] == 25


@pytest.mark.parametrize("model", ["gpt", "ngpt"])
def test_resume_is_bitwise_exact(model: str, tmp_path: Path) -> None:
    full = Trainer(quick(model), tmp_path / "full")
    full.train()
    part = Trainer(quick(model), tmp_path / "part")
    part.train(stop_after=20)  # interrupted after the checkpoint at step 20
    ckpt = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert ckpt["step"] == 20
    assert {"model", "optimizer", "scheduler", "rng", "data", "tokenizer"} <= set(ckpt)
    torch.manual_seed(999)  # resume must not depend on the process's RNG state
    resumed = Trainer(TrainConfig(model=model), tmp_path / "part", resume=True)
    assert resumed.step == 20
    resumed.train()

    def strip(path: Path) -> list[dict]:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]

    a, b = strip(tmp_path / "full" / "metrics.jsonl"), strip(tmp_path / "part" / "metrics.jsonl")
    assert a == b and len(a) == 3
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_resume_extends_steps_and_rejects_fewer(tmp_path: Path) -> None:
    Trainer(quick("gpt", steps=20), tmp_path).train()
    with pytest.raises(UserError, match="below the checkpoint"):
        Trainer(TrainConfig(steps=10), tmp_path, resume=True)
    with pytest.raises(UserError, match="does not match the checkpoint's model gpt"):
        Trainer(TrainConfig(model="ngpt"), tmp_path, resume=True)
    with pytest.raises(UserError, match="--stretch-schedule"):
        Trainer(TrainConfig(steps=30), tmp_path, resume=True)
    t = Trainer(TrainConfig(steps=30, stretch_schedule=True), tmp_path, resume=True)
    t.train()
    assert [r["step"] for r in t.history] == [10, 20, 30]
    with pytest.raises(UserError, match="checkpoint not found"):
        Trainer(TrainConfig(), tmp_path / "nothing", resume=True)


@pytest.mark.parametrize("optim", ["riemannian", "adamw"])
def test_optimizer_choice(optim: str) -> None:
    t = Trainer(quick("ngpt", optim=optim, steps=20))
    summary = t.train()
    assert summary["optim"] == optim and math.isfinite(summary["final_val_loss"])
    emb = t.model.tok_emb.weight
    unit = torch.allclose(emb.norm(dim=1), torch.ones(emb.shape[0]), atol=1e-5)
    assert unit == (optim != "adamw")  # plain AdamW lets sphere weights drift (an ablation)


def test_load_model_for_sampling(tmp_path: Path) -> None:
    Trainer(quick("geonorm", steps=10), tmp_path).train()
    model, tok, _ = load_model(tmp_path / "checkpoint.pt")
    out = model.generate(torch.tensor([tok.encode("ROMEO:")]), 10)
    assert len(tok.decode(out[0].tolist())) == 16


def test_custom_text_and_byte_tokenizer(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    t = Trainer(quick("gpt", data=str(text), steps=10))
    assert t.tokenizer.vocab_size == len(set(text.read_text()))
    t.train()
    b = Trainer(quick("gpt", data=str(text), tokenizer="byte", steps=10))
    assert b.model.config.vocab_size == 256
    b.train()


# -- non-finite steps -------------------------------------------------------------------------


def poison_loss(trainer: Trainer, bad_steps: set[int]) -> None:
    """Make the loss NaN at the given steps (the step counter before the update)."""
    forward = trainer.forward_model

    def forward_with_nan(x: torch.Tensor, y: torch.Tensor):
        logits, loss = forward(x, y)
        return logits, loss * math.nan if trainer.step in bad_steps else loss

    trainer.forward_model = forward_with_nan  # type: ignore[assignment]


def test_non_finite_loss_skips_the_update_and_counts_it() -> None:
    t = Trainer(quick("ngpt", steps=20))
    poison_loss(t, {3, 4})
    for _ in range(3):
        t.train_step(*t.batch(t.step))
    before = [p.detach().clone() for p in t.model.parameters()]
    opt_steps = [s["step"].clone() for s in t.optimizer.state.values() if "step" in s]
    loss = t.train_step(*t.batch(t.step))  # step 3: NaN loss
    assert math.isnan(loss.item()) and t.step == 4 and t.skipped_steps == 1
    assert all(torch.equal(p, q) for p, q in zip(before, t.model.parameters()))
    assert all(p.grad is None for p in t.model.parameters())
    after = [s["step"] for s in t.optimizer.state.values() if "step" in s]
    assert all(torch.equal(a, b) for a, b in zip(opt_steps, after))  # Adam's t not advanced
    summary = t.train()
    assert summary["skipped_steps"] == 2 and summary["steps"] == 20
    assert not summary["diverged"] and math.isfinite(summary["final_val_loss"])
    assert all(math.isfinite(r["train_loss"]) for r in t.history)  # skipped losses left out


def test_non_finite_gradient_is_skipped_too() -> None:
    t = Trainer(quick("gpt", steps=5, grad_clip=0.0))
    weight = t.model.lm_head.weight
    handle = weight.register_hook(lambda g: g * math.inf)
    before = weight.detach().clone()
    loss = t.train_step(*t.batch(0))
    handle.remove()
    assert math.isnan(loss.item()) and t.skipped_steps == 1  # loss finite, gradient not
    assert torch.equal(weight, before)
    t.train_step(*t.batch(1))
    assert t.skipped_steps == 1 and t.bad_in_a_row == 0 and not torch.equal(weight, before)


def test_too_many_non_finite_steps_in_a_row_stop_with_a_clear_error(tmp_path: Path) -> None:
    t = Trainer(quick("gpt", steps=30, max_bad_steps=3), tmp_path)
    poison_loss(t, {12, 14, 15, 16, 17})  # 12 alone is tolerated; 14, 15, 16 are 3 in a row
    with pytest.raises(TrainingDiverged) as exc:
        t.train()
    message = str(exc.value)
    assert message == (
        "gpt: non-finite loss or gradients at 3 steps in a row (steps 15-17); stopping. "
        "Lower --lr or raise --max-bad-steps; the last checkpoint is untouched"
    )
    assert t.skipped_steps == 4 and t.step == 17
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 10  # the last good one
    with pytest.raises(UserError, match="max-bad-steps must be a positive integer, got 0"):
        quick("gpt", max_bad_steps=0).resolve()


# -- one owner for non-finite steps, one host sync per step ------------------------------------


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts reads of tensor values by the host (``.item()``, ``bool(t)``, ... all reach
    ``_local_scalar_dense``), except of Adam's step counters (0-d float32 holding the step
    number, or stacked copies of them): torch keeps those on the CPU even when training on a
    GPU, so reading them costs no device sync."""

    def __init__(self) -> None:
        super().__init__()
        self.reads, self.counter_values = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            counter = t.dim() == 0 and t.dtype == torch.float32 and out in self.counter_values
            self.reads += not counter
        return out


@pytest.mark.parametrize(
    ("model", "optim"),
    [
        ("gpt", "adamw"),
        ("ngpt", "renorm"),
        ("ngpt", "riemannian"),
        ("ngpt", "sphere_muon"),  # the Muon family: capturable on CUDA
        ("ngpt", "adamh"),
        ("gpt", "muon"),
    ],
)
def test_host_syncs_per_step_zero_on_cuda_one_on_cpu_and_the_trainer_alone_checks(
    model: str, optim: str, device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CPU: one host read per step (the decision). CUDA: none (the decision and the skip stay
    on the device, tests/test_device_skip.py), with an optimizer that takes ``found_inf``."""
    t = Trainer(quick(model, optim=optim, steps=10, device=device.type))
    assert t.device_skip == (device.type == "cuda")  # every recipe's optimizer takes found_inf
    assert getattr(t.optimizer, "nonfinite", "ignore") == "ignore"  # no second owner
    t.train_step(*t.batch(0))  # creates the optimizer state
    tolist = torch.Tensor.tolist  # bypasses the dispatcher: counted separately
    calls = []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(1) or tolist(self))
    poison_loss(t, {2})
    with _HostReads() as mode:
        mode.counter_values = {1.0, 2.0, 3.0}  # Adam's t during steps 1-3
        for _ in range(3):  # steps 1, 2 (non-finite: skipped), 3
            t.train_step(*t.batch(t.step))
    reads = mode.reads + len(calls)
    t.read_host_state()
    assert t.skipped_steps == 1
    assert reads == (0 if device.type == "cuda" else 3)


def test_schedule_is_a_torch_lambdalr_saved_in_the_checkpoint(tmp_path: Path) -> None:
    t = Trainer(quick("gpt", steps=20, warmup_steps=4, dtype="bfloat16"), tmp_path)
    assert isinstance(t.scheduler, torch.optim.lr_scheduler.LambdaLR)
    assert t.amp_dtype == torch.bfloat16  # CPU autocast: bf16 is used on request anywhere
    t.train(stop_after=10)
    lrs = [g["lr"] for g in t.optimizer.param_groups]
    assert lrs == [t.schedule.lr_at(10)] * len(lrs)
    state = load_checkpoint(tmp_path / "checkpoint.pt")["scheduler"]
    assert state["last_epoch"] == 10 and state["lr_lambdas"][0]["total"] == 20
    resumed = Trainer(TrainConfig(steps=40, stretch_schedule=True), tmp_path, resume=True)
    assert resumed.scheduler.last_epoch == 10 and resumed.schedule.total == 40
    assert resumed.optimizer.param_groups[0]["lr"] == CosineSchedule(1e-2, 40, 4).lr_at(10)
