"""The bad-input catalogue (docs/errors.md): every case gives one line and exit status 2 from
the command line, without a traceback, and writes nothing; the library raises clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spheretorch import geodesic, sphere
from spheretorch.cli import main
from spheretorch.parameter import SphereParameter
from spheretorch.train import TrainConfig, Trainer, save_atomic

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["train", "--model", "gpt", "--preset", "smoke", "--no-progress", "--out", "run"]


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding every bad input the catalogue needs."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("to be or not to be")
    (tmp_path / "small.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 10)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    good = tmp_path / "good.pt"
    save_atomic({"weights": torch.ones(3)}, good)
    (tmp_path / "trunc.pt").write_bytes(good.read_bytes()[:40])
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled class
    return tmp_path


# (command line, the exact message after "spheretorch: error: ")
CASES: list[tuple[list[str], str]] = [
    (
        ["train", "--model", "bert", "--out", "run"],
        "argument --model: invalid choice: 'bert' (choose from 'gpt', 'ngpt', 'geonorm')",
    ),
    (
        [*TRAIN[:4], "huge", *TRAIN[5:]],
        "unknown preset 'huge'; choose from smoke, cpu-small, cpu-bpe, gpu-quick, gpu-medium",
    ),
    ([*TRAIN, "--data", "missing.txt"], "data file not found: missing.txt"),
    ([*TRAIN, "--data", "adir"], "adir is not a prepared corpus: meta.json is missing"),
    ([*TRAIN, "--data", "empty.txt"], "empty.txt is empty"),
    (
        [*TRAIN, "--data", "short.txt"],
        "short.txt is too short: its train split has 17 tokens, fewer than the context "
        "length 32 + 2",
    ),
    (
        [*TRAIN, "--data", "latin1.txt"],
        "latin1.txt is not UTF-8 text (invalid byte 0xe9 at offset 3); convert it to UTF-8 "
        "or train with --tokenizer byte",
    ),
    ([*TRAIN, "--steps", "0"], "argument --steps: expected a positive integer, got 0"),
    ([*TRAIN, "--steps", "-3"], "argument --steps: expected a positive integer, got -3"),
    ([*TRAIN, "--steps", "ten"], "argument --steps: expected a positive integer, got 'ten'"),
    ([*TRAIN, "--lr", "0"], "argument --lr: expected a positive number, got 0"),
    ([*TRAIN, "--lr", "nan"], "argument --lr: expected a positive number, got nan"),
    (
        [*TRAIN, "--max-bad-steps", "0"],
        "argument --max-bad-steps: expected a positive integer, got 0",
    ),
    (
        [*TRAIN, "--data", "small.txt", "--batch-size", "1000"],
        "batch size 1000 is larger than the data: small.txt has 364 training windows of length 32",
    ),
    (
        [*TRAIN, "--set", "n_head=5"],
        "bad model options: d_model=64 must be divisible by n_head=5",
    ),
    ([*TRAIN, "--set", "d_model"], "argument --set: expected KEY=VALUE, got 'd_model'"),
    (
        [*TRAIN, "--tokenizer", "words"],
        "argument --tokenizer: invalid choice: 'words' (choose from 'char', 'byte')",
    ),
    (
        [*TRAIN, "--resume", "--force"],
        "--resume and --force contradict each other: pass one of them",
    ),
    ([*TRAIN, "--resume"], "nothing to resume: run/checkpoint.pt does not exist"),
    (
        [*TRAIN[:-1], "afile"],
        "--out afile exists and is not a directory",
    ),
    (
        [*TRAIN, "--distributed", "ddp"],
        "--distributed ddp needs a process started by torchrun (WORLD_SIZE is not set); "
        "e.g. torchrun --nproc-per-node 2 -m spheretorch train",
    ),
    (
        ["compare", "--preset", "smoke", "--models", "gpt,bert", "--out", "run"],
        "unknown model 'bert'; choose from gpt, ngpt, geonorm",
    ),
    (
        ["compare", "--preset", "smoke", "--models", ",", "--out", "run"],
        "--models needs at least one model",
    ),
    ([*TRAIN, "--device", "tpu"], "unknown device 'tpu'; use auto, cpu, cuda or mps"),
    (["sample", "--checkpoint", "nope.pt"], "checkpoint not found: nope.pt"),
    (
        ["sample", "--checkpoint", "good.pt"],
        "good.pt is not a spheretorch training checkpoint",
    ),
    (
        ["sample", "--checkpoint", "text.pt"],
        "cannot read checkpoint text.pt: not a complete PyTorch file (truncated, or another "
        "kind of file)",
    ),
    (
        ["sample", "--checkpoint", "module.pt"],
        "module.pt is not a spheretorch training checkpoint",
    ),
    (["frobnicate"], "argument command: invalid choice: 'frobnicate' (choose from 'train', "),
    # issue 13: what used to be a traceback, a silent acceptance, or a stray directory
    ([*TRAIN[:-1], ""], "--out must not be empty (use . for the current directory)"),
    ([*TRAIN[:-1], "afile/sub"], "--out afile/sub: afile is not a directory"),
    (
        ["compare", "--preset", "smoke", "--out", "afile"],
        "--out afile exists and is not a directory",
    ),
    ([*TRAIN, "--device", "meta"], "unknown device 'meta'; use auto, cpu, cuda or mps"),
    (
        [*TRAIN, "--seed", "99999999999999999999999"],
        "argument --seed: expected an integer in [-2**63, 2**64 - 1], got 99999999999999999999999",
    ),
    (
        [*TRAIN, "--weight-decay", "nan"],
        "argument --weight-decay: expected a finite number >= 0, got nan",
    ),
    (
        [*TRAIN, "--weight-decay", "inf"],
        "argument --weight-decay: expected a finite number >= 0, got inf",
    ),
    ([*TRAIN, "--warmup-steps", "-1"], "argument --warmup-steps: expected an integer >= 0, got -1"),
    (
        [*TRAIN, "--set", "alpha_init=nan"],
        "argument --set: alpha_init=nan: expected a finite number",
    ),
    (
        [*TRAIN, "--set", "alpha_scale=inf"],
        "argument --set: alpha_scale=inf: expected a finite number",
    ),
    (
        ["sample", "--checkpoint", "good.pt", "--temperature", "nan"],
        "argument --temperature: expected a finite number >= 0, got nan",
    ),
    (
        ["sample", "--checkpoint", "good.pt", "--temperature", "-1"],
        "argument --temperature: expected a finite number >= 0, got -1",
    ),
    (
        ["compare", "--preset", "smoke", "--models", "gpt", "--data", "empty.txt", "--out", "run"],
        "empty.txt is empty",
    ),
    (
        ["sample", "--checkpoint", "adir"],
        "no checkpoint in adir: expected checkpoint.pt or checkpoint.dcp",
    ),
]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as e:  # argparse's errors
        code = e.code  # type: ignore[assignment]
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), CASES, ids=[" ".join(a[-2:]) for a, _ in CASES])
def test_cli_bad_input_one_line_exit_2(
    args: list[str], message: str, files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_cli(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("spheretorch") and ": error: " in lines[0]
    assert message in lines[0]
    assert not (files / "run").exists()  # nothing written


def test_truncated_checkpoint_names_the_file(files: Path, capsys) -> None:
    code, err = run_cli(["sample", "--checkpoint", "trunc.pt"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("spheretorch: error: cannot read checkpoint trunc.pt: ")


def test_existing_run_is_never_overwritten(files: Path, capsys) -> None:
    assert main([*TRAIN, "--steps", "10"]) == 0
    before = {p.name: p.read_bytes() for p in (files / "run").iterdir()}
    for extra in ([], ["--steps", "20"], ["--resume", "--force"], ["--data", "empty.txt"]):
        code, err = run_cli([*TRAIN, *extra], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1
    code, err = run_cli([*TRAIN, "--steps", "10"], capsys)
    assert err.strip() == (
        "spheretorch: error: run already holds a run; pass --resume to continue it or --force"
    )
    after = {p.name: p.read_bytes() for p in (files / "run").iterdir()}
    assert after == before
    # a resume whose checkpoint is damaged says so and leaves the directory alone
    (files / "run" / "checkpoint.pt").write_bytes(before["checkpoint.pt"][:100])
    code, err = run_cli([*TRAIN, "--resume"], capsys)
    assert code == 2 and err.startswith("spheretorch: error: cannot read checkpoint run/")
    assert (files / "run" / "metrics.jsonl").read_bytes() == before["metrics.jsonl"]


def test_non_utf8_through_the_module_entry_point(files: Path) -> None:
    """The real process: exit status 2 and exactly one line on stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "spheretorch", *TRAIN, "--data", "latin1.txt"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "spheretorch: error: latin1.txt is not UTF-8 text (invalid byte 0xe9 at offset 3); "
        "convert it to UTF-8 or train with --tokenizer byte"
    ]


def test_library_trainer_errors(files: Path) -> None:
    from spheretorch.train import UserError

    with pytest.raises(UserError, match=r"^unknown distributed mode 'mpi'; choose from none"):
        Trainer(TrainConfig(preset="smoke"), distributed="mpi")
    with pytest.raises(UserError, match=r"^--resume needs --out DIR$"):
        Trainer(TrainConfig(preset="smoke"), resume=True)
    with pytest.raises(UserError, match=r"^unknown dtype 'float8'"):
        TrainConfig(preset="smoke", dtype="float8").resolve()


def test_batch_not_divisible_by_world_size(
    files: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checked from torchrun's WORLD_SIZE before any process group is created."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, err = run_cli([*TRAIN, "--distributed", "ddp", "--batch-size", "7"], capsys)
    assert code == 2
    assert err.splitlines() == [
        "spheretorch: error: batch size 7 is not divisible by the world size 2: every rank "
        "needs an equal share"
    ]
    assert not (files / "run").exists()


# -- library: spheretorch.sphere, geodesic, SphereParameter -----------------------------------

LIBRARY: list[tuple[object, type[Exception], str]] = [
    (
        lambda: sphere.normalize(torch.arange(6).reshape(2, 3), dim=-1),
        TypeError,
        "x must have a floating-point dtype (float16, bfloat16, float32, float64), got torch.int64",
    ),
    (lambda: sphere.normalize([1.0, 2.0]), TypeError, "x must be a torch.Tensor, got list"),
    (
        lambda: sphere.normalize(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), dim=-1),
        ValueError,
        "cannot normalize a tensor of shape (2, 2) along dim=1: the slice x[1, :] has zero "
        "norm (pass on_zero='fixed' to map zero slices to a fixed point)",
    ),
    (
        lambda: sphere.normalize(torch.tensor([[1.0, float("nan")]]), dim=-1),
        ValueError,
        "cannot normalize a tensor of shape (1, 2) along dim=1: the slice x[0, :] has "
        "non-finite values (NaN or inf)",
    ),
    (
        lambda: sphere.normalize(torch.ones(2, 3), dim=2),
        ValueError,
        "dim=2 is out of range for a tensor of shape (2, 3) (expected -2 <= dim < 2)",
    ),
    (
        lambda: sphere.normalize(torch.ones(2, 3), dim=1.0),
        TypeError,
        "dim must be an int, got float",
    ),
    (
        lambda: sphere.normalize(torch.ones(2, 3), dim=1, on_zero="bogus"),
        ValueError,
        "on_zero must be 'raise', 'fixed' or 'keep', got 'bogus'",
    ),
    (
        lambda: geodesic.slerp(torch.ones(2, 3), torch.ones(2, 4), 0.5, dim=-1),
        ValueError,
        "a and b must have the same shape, got (2, 3) and (2, 4)",
    ),
    (
        lambda: geodesic.slerp(torch.ones(2, 3), torch.ones(2, 3), torch.ones(5), dim=-1),
        ValueError,
        "t of shape (5,) does not broadcast against points of shape (2, 3)",
    ),
    (
        lambda: geodesic.slerp(torch.ones(2, 3), torch.ones(2, 3), "half", dim=-1),
        TypeError,
        "t must be a float or a tensor, got str",
    ),
    (
        lambda: geodesic.slerp(torch.ones(2, 3).long(), torch.ones(2, 3).long(), 0.5),
        TypeError,
        "a must have a floating-point dtype (float16, bfloat16, float32, float64), got torch.int64",
    ),
    (
        lambda: geodesic.slerp(torch.ones(2, 3), torch.ones(2, 3), 0.5, dim=5),
        ValueError,
        "dim=5 is out of range for a tensor of shape (2, 3) (expected -2 <= dim < 2)",
    ),
    (
        lambda: SphereParameter(torch.ones(2, 3).long(), dim=1),
        TypeError,
        "data must have a floating-point dtype (float16, bfloat16, float32, float64), got "
        "torch.int64",
    ),
    (
        lambda: SphereParameter(torch.zeros(2, 3), dim=1),
        ValueError,
        "cannot normalize a tensor of shape (2, 3) along dim=1: the slice x[0, :] has zero "
        "norm (pass on_zero='fixed' to map zero slices to a fixed point)",
    ),
    (
        lambda: SphereParameter(torch.ones(2, 3), dim=3),
        ValueError,
        "dim=3 is out of range for a tensor of shape (2, 3) (expected -2 <= dim < 2)",
    ),
    (
        lambda: SphereParameter(None, dim=1),
        TypeError,
        "SphereParameter needs data: a floating-point tensor",
    ),
]


@pytest.mark.parametrize(("call", "kind", "message"), LIBRARY)
def test_library_bad_input(call, kind: type[Exception], message: str) -> None:
    with pytest.raises(kind) as exc:
        call()
    assert str(exc.value) == message


def test_sharded_resume_precheck_accepts_the_old_directory(files: Path, capsys) -> None:
    fsdp = [*TRAIN, "--resume", "--distributed", "fsdp"]
    code, err = run_cli(fsdp, capsys)
    assert code == 2 and "nothing to resume: run/checkpoint.dcp does not exist" in err
    # only the .old directory of a save killed between its renames: resumable, so the next
    # complaint is the missing torchrun, not a missing checkpoint
    (files / "run" / "checkpoint.dcp.old").mkdir(parents=True)
    code, err = run_cli(fsdp, capsys)
    assert code == 2 and "nothing to resume" not in err
    assert "--distributed fsdp needs a process started by torchrun" in err
