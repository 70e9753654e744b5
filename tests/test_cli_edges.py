"""Issue 13: install and first contact, run directories that nothing can lose (guard, lock,
--force), resume conflicts, one-line errors with a distinct status for the unexpected, and a
memory estimate before anything large is allocated (docs/errors.md lists each outcome)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import tomllib
import torch

from spheretorch.cli import EXIT_INTERNAL, build_parser, main
from spheretorch.train import TrainConfig, Trainer, UserError, load_checkpoint, memory
from spheretorch.train.prepare import prepare
from spheretorch.train.rundir import LOCK, REPLACED, RunDir

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["train", "--model", "gpt", "--preset", "smoke", "--no-progress"]


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code  # type: ignore[assignment]
    return code, capsys.readouterr().err


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


# -- install and first contact ----------------------------------------------------------------


def test_cli_needs_are_core_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    assert "tqdm" in core and "matplotlib" in core
    readme = (ROOT / "README.md").read_text()
    cpu = "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    assert readme.index(cpu) < readme.index("make test")  # the user's install comes first
    assert "about 11 min on 2 cores" in readme


def test_help_shows_every_option_with_its_default(capsys) -> None:
    parser = build_parser()
    subs = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name, sub in subs.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings} has no help"
        text = sub.format_help()
        for action in sub._actions:
            if action.default not in (None, False, [], "==SUPPRESS=="):
                assert f"default: {action.default}" in " ".join(text.split()), action.dest
    train = " ".join(subs["train"].format_help().split())
    assert "(default: cpu-small)" in train and "cpu-small (800 steps)" in train
    resume = subs["train"]._option_string_actions["--resume"].help
    assert (
        "--steps, --device, --compile, --compile-check, --max-bad-steps, --no-memory-check"
        in resume
    )
    assert "--stretch-schedule" in resume
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("spheretorch 0.")
    code, err = run([], capsys)
    assert code == 2 and "usage: spheretorch" in err and len(err.strip().splitlines()) == 1


def test_gpu_preset_on_cpu_warns_and_memory_is_checked_first(monkeypatch, capsys) -> None:
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**30)
    code, err = run([*TRAIN[:4], "gpu-medium", "--no-progress", "--out", "big"], capsys)
    assert code == 2 and "preset gpu-medium trains on a prepared corpus, not the built-in" in err
    prepare(["tinyshakespeare"], "corpus", "char", progress=False)
    gpu = [*TRAIN[:4], "gpu-medium", "--no-progress", "--out", "big", "--data", "corpus"]
    code, err = run(gpu, capsys)
    assert code == 2
    assert "preset gpu-medium is sized for a GPU; on cpu it will be very slow" in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("spheretorch: error: this run needs about ")
    assert "of cpu memory, but 1.0 GiB is available" in line and "--no-memory-check" in line
    assert not Path("big").exists()


def test_memory_estimate_refuses_huge_batches_and_can_be_overridden(monkeypatch, capsys) -> None:
    cfg = TrainConfig(preset="smoke").resolve()
    small = memory.estimate(Trainer(cfg).model_config, cfg.batch_size, cfg.eval_batches, False)
    assert 0 < small.total < 2**30
    monkeypatch.setattr(memory, "available_bytes", lambda device: 8 * 2**30)
    code, err = run([*TRAIN, "--out", "r", "--batch-size", "100000"], capsys)
    assert code == 2 and "activations" in err and "8.0 GiB is available" in err
    # --eval-batches beyond the split's windows is capped, and so is its estimate (0.1 GiB
    # for the 13,938 batches of tinyshakespeare's validation split, not 16 GiB)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**20)
    code, err = run([*TRAIN, "--out", "r", "--eval-batches", "2000000"], capsys)
    assert code == 2 and "evaluation batches 0.1 GiB" in err
    assert not Path("r").exists()
    # the override: the check is skipped (a tiny run that fits anyway)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1)
    assert run([*TRAIN, "--out", "r", "--steps", "2"], capsys)[0] == 2
    assert run([*TRAIN, "--out", "r", "--steps", "2", "--no-memory-check"], capsys)[0] == 0


def test_sample_accepts_a_run_directory(capsys) -> None:
    assert run([*TRAIN, "--out", "r", "--steps", "2"], capsys)[0] == 0
    capsys.readouterr()
    assert main(["sample", "--checkpoint", "r", "--tokens", "5", "--temperature", "0"]) == 0
    assert len(capsys.readouterr().out) >= 5


# -- data loss --------------------------------------------------------------------------------


def test_compare_never_writes_into_a_train_run(capsys) -> None:
    assert (
        run([*TRAIN[:2], "ngpt", *TRAIN[3:], "--out", "runs/ngpt", "--steps", "2"], capsys)[0] == 0
    )
    before = snapshot(Path("runs"))
    cmp = ["compare", "--preset", "smoke", "--models", "ngpt", "--no-sweep", "--no-progress"]
    for out, force in (("runs", []), ("runs", ["--force"]), ("runs/ngpt", ["--force"])):
        code, err = run([*cmp, "--out", out, *force], capsys)
        assert code == 2 and ("train run" in err), err
    assert snapshot(Path("runs")) == before
    # and train never writes into a compare's directory
    Path("cmp").mkdir()
    Path("cmp/results.json").write_text("{}")
    code, err = run([*TRAIN, "--out", "cmp", "--force"], capsys)
    assert code == 2 and "cmp holds a compare run" in err


def test_compare_guards_its_directory(capsys) -> None:
    cmp = ["compare", "--preset", "smoke", "--models", "gpt", "--no-sweep", "--no-progress"]
    Path("c").mkdir()
    Path("c/results.json").write_text('{"old": true}')
    code, err = run([*cmp, "--out", "c"], capsys)
    assert code == 2 and "c already holds a run; pass --force" in err
    assert run([*cmp, "--out", "c", "--force"], capsys)[0] == 0
    results = json.loads(Path("c/results.json").read_text())
    assert "old" not in results and set(results) == {"gpt"}
    assert not Path("c", REPLACED).exists()


def test_force_keeps_the_old_run_until_the_new_one_checkpoints(monkeypatch, capsys) -> None:
    assert run([*TRAIN, "--out", "r", "--steps", "10"], capsys)[0] == 0
    before = snapshot(Path("r"))

    def crash(self, x, y):
        if self.step == 3:
            raise RuntimeError("simulated crash")
        return real(self, x, y)

    real = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", crash)
    code, err = run([*TRAIN, "--out", "r", "--force", "--steps", "20"], capsys)
    assert code == EXIT_INTERNAL
    assert "internal error: RuntimeError: simulated crash" in err
    assert "previous run in r is kept" in err
    after = snapshot(Path("r"))
    assert {k: v for k, v in after.items() if k != LOCK} == {
        k: v for k, v in before.items() if k != LOCK
    }
    monkeypatch.setattr(Trainer, "train_step", real)
    assert run([*TRAIN, "--out", "r", "--force", "--steps", "20"], capsys)[0] == 0
    assert load_checkpoint(Path("r/checkpoint.pt"))["step"] == 20
    assert not Path("r", REPLACED).exists()
    assert [json.loads(x)["step"] for x in Path("r/metrics.jsonl").read_text().splitlines()] == [20]


def test_a_killed_forced_run_is_undone_by_the_next_command(capsys) -> None:
    assert run([*TRAIN, "--out", "r", "--steps", "10"], capsys)[0] == 0
    before = snapshot(Path("r"))
    # what a --force run killed (SIGKILL) before its first checkpoint leaves behind
    aside = Path("r", REPLACED)
    aside.mkdir()
    for name in ("checkpoint.pt", "metrics.jsonl", "summary.json"):
        Path("r", name).rename(aside / name)
    Path("r/metrics.jsonl").write_text("")
    code, err = run([*TRAIN, "--out", "r"], capsys)  # the next command restores, then guards
    assert code == 2 and "r already holds a run" in err
    assert snapshot(Path("r")) == before


def test_one_run_per_directory_at_a_time(capsys) -> None:
    with RunDir("r").claim("train"):
        code, err = run([*TRAIN, "--out", "r", "--steps", "2"], capsys)
        assert code == 2
        assert f"r is in use by another run (train, pid {os.getpid()} on " in err
        assert "wait for it to finish or choose another --out" in err
    assert run([*TRAIN, "--out", "r", "--steps", "2"], capsys)[0] == 0  # released


def test_a_run_without_a_checkpoint_has_one_consistent_answer(monkeypatch, capsys) -> None:
    evaluate = Trainer.evaluate
    monkeypatch.setattr(Trainer, "evaluate", lambda self: math.nan)  # diverges at step 10
    code, _ = run([*TRAIN, "--out", "r", "--steps", "10"], capsys)
    assert code == 1 and not Path("r/checkpoint.pt").exists()
    code, err = run([*TRAIN, "--out", "r", "--resume"], capsys)
    assert code == 2 and "nothing to resume" in err
    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    code, err = run([*TRAIN, "--out", "r", "--steps", "10"], capsys)
    assert code == 0, err
    assert "holds the files of a run that wrote no checkpoint; starting over" in err


# -- resume: conflicts, data path --------------------------------------------------------------


def test_resume_refuses_conflicting_flags_and_stores_data_absolute(tmp_path, capsys) -> None:
    Path("d").mkdir()
    Path("d/text.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    base = [*TRAIN, "--out", "r", "--data", "d/text.txt"]
    assert run([*base, "--steps", "10"], capsys)[0] == 0
    saved = load_checkpoint(Path("r/checkpoint.pt"))["train_config"]
    assert saved["data"] == str((tmp_path / "d/text.txt").resolve())
    resume = [*TRAIN[:2], "gpt", "--no-progress", "--out", "r", "--resume"]
    for flag, value, theirs in (
        ("--lr", "0.5", "0.01"),
        ("--preset", "cpu-small", "smoke"),
        ("--batch-size", "4", "8"),
        ("--optim", "renorm", "adamw"),
        ("--data", "other.txt", "text.txt"),
        ("--seed", "3", "0"),
        ("--set", "d_model=32", "(unset)"),
    ):
        code, err = run([*resume, flag, value], capsys)
        assert code == 2, (flag, err)
        assert f"spheretorch: error: {flag} " in err and "conflicts with the checkpoint's" in err
        assert theirs in err and "--no-memory-check" in err
    # the same values, and the allowed overrides, are accepted; from another directory too
    os.chdir("d")
    again = [*TRAIN[:2], "gpt", "--no-progress", "--out", "../r", "--resume", "--steps", "20"]
    again.append("--stretch-schedule")
    assert run([*again, "--lr", "0.01", "--device", "cpu", "--max-bad-steps", "3"], capsys)[0] == 0
    assert load_checkpoint(Path("../r/checkpoint.pt"))["step"] == 20


def test_non_finite_hyperparameters_are_refused_up_front() -> None:
    for kw in (
        {"weight_decay": math.nan},
        {"weight_decay": math.inf},
        {"grad_clip": math.inf},
        {"min_lr_ratio": math.nan},
        {"betas": (0.9, math.nan)},
        {"model_options": {"alpha_init": math.nan}},
        {"seed": 2**64},
    ):
        with pytest.raises(UserError):
            TrainConfig(preset="smoke", **kw).resolve()


# -- unexpected failures ----------------------------------------------------------------------


def test_unexpected_errors_are_one_line_with_their_own_status(monkeypatch, capsys) -> None:
    def boom(self, stop_after=None):
        raise KeyError("surprise")

    monkeypatch.setattr(Trainer, "train", boom)
    code, err = run([*TRAIN, "--out", "r"], capsys)
    assert code == EXIT_INTERNAL == 70
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "spheretorch: internal error: KeyError: 'surprise' (exit status 70; rerun with --debug "
        "for the traceback)"
    )
    code, err = run([*TRAIN, "--out", "r", "--debug"], capsys)
    assert code == 70 and "Traceback (most recent call last)" in err


def test_unwritable_out_is_a_user_error(monkeypatch, capsys) -> None:
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    code, err = run([*TRAIN, "--out", "locked/run"], capsys)
    assert code == 2 and "--out locked/run: no permission to write in ." in err
