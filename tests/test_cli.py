"""The command line end to end on the smoke preset, and its user errors (exit code 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spheretorch.cli import main
from spheretorch.train import load_checkpoint

torch.set_num_threads(1)  # tiny models; avoid oversubscription under pytest-xdist

ROOT = Path(__file__).resolve().parents[1]


def run_module(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "spheretorch", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_train_resume_and_sample(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    args = ["train", "--model", "ngpt", "--preset", "smoke", "--out", str(out), "--no-progress"]
    assert main([*args, "--steps", "20"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [20]
    assert (out / "checkpoint.pt").is_file()
    # an existing run is not overwritten without --resume/--force
    assert main([*args, "--steps", "20"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main([*args, "--steps", "40", "--resume"]) == 2  # would stretch the schedule
    assert "pass --stretch-schedule" in capsys.readouterr().err
    assert main([*args, "--steps", "40", "--resume", "--stretch-schedule"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [20, 40]
    capsys.readouterr()
    ckpt = str(out / "checkpoint.pt")
    assert main(["sample", "--checkpoint", ckpt, "--prompt", "ROMEO:", "--tokens", "30"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 30 + 1


def test_compare_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    proc = run_module(
        "compare", "--preset", "smoke", "--out", str(out), "--no-progress", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"gpt", "ngpt", "geonorm"}
    for r in results.values():
        assert {"final_val_loss", "steps_to_target", "ms_per_step", "lr"} <= set(r)
        # a swept LR: the candidates, or the ones an edge of the sweep added
        assert f"{r['lr']:g}" in r["sweep"] and r["ms_per_step"] > 0
        assert {float(x) for x in r["sweep"]} == {3e-3, 1e-2, *r["sweep_extensions"]}
    assert results["gpt"]["steps_to_target"] is not None  # the baseline reaches its own loss
    assert (out / "loss_curves.png").stat().st_size > 1000
    table = (out / "results.md").read_text()
    assert "| gpt |" in table and "| ngpt |" in table and table.strip() in proc.stdout
    assert (out / "gpt" / "metrics.jsonl").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--model", "bert", "--out", "x"], "invalid choice: 'bert'"),
        (["train", "--model", "gpt", "--preset", "huge", "--out", "x"], "unknown preset 'huge'"),
        (["train", "--model", "gpt", "--data", "missing.txt", "--out", "x"], "not found"),
        (["train", "--model", "gpt", "--steps", "0", "--out", "x"], "positive integer"),
        (["train", "--model", "gpt", "--out", "x", "--resume"], "nothing to resume"),
        (["train", "--model", "gpt", "--out", "x", "--set", "n_head=5"], "bad model options"),
        (["compare", "--models", "gpt,bert", "--out", "x"], "unknown model 'bert'"),
        (["sample", "--checkpoint", "nope.pt"], "checkpoint not found"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
)
def test_user_errors_exit_2_with_one_line(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(SystemExit) as exc:
            raise SystemExit(main(args))
    finally:
        os.chdir(cwd)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_non_utf8_data_via_module(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff" * 100)
    args = ["train", "--model", "gpt", "--data", str(bad), "--out", "r", "--preset", "smoke"]
    proc = run_module(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"spheretorch: error: {bad} is not UTF-8 text (invalid byte 0xff at offset 0); "
        "convert it to UTF-8 or train with --tokenizer byte"
    ]


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return subprocess.run(
        [*cmd, "-m", "spheretorch", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_torchrun_ddp_and_fsdp_match_one_process(tmp_path: Path) -> None:
    """2 CPU ranks (gloo), each on half of every batch, give the one-process metrics; the
    metrics are written once (rank 0); an FSDP2 (sharded) checkpoint resumes."""
    from spheretorch.train import TrainConfig, Trainer

    cfg = {"model": "ngpt", "preset": "smoke", "eval_interval": 5}
    Trainer(TrainConfig(**cfg, steps=10), tmp_path / "one").train()
    resume = TrainConfig(model="ngpt", steps=20, stretch_schedule=True)
    Trainer(resume, tmp_path / "one", resume=True).train()
    expected = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").open()]

    def check(run: Path, n_rows: int) -> None:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
        assert [r["step"] for r in rows] == [5, 10, 15, 20][:n_rows]  # once, not per rank
        for r, e in zip(rows, expected):
            for key in ("train_loss", "val_loss"):
                assert abs(r[key] - e[key]) <= 1e-5, (run.name, r, e)
        assert json.loads((run / "summary.json").read_text())["world_size"] == 2

    args = ["train", "--model", "ngpt", "--preset", "smoke", "--eval-interval", "5"]
    args += ["--no-progress", "--steps", "10"]
    ddp = torchrun(*args, "--out", "ddp", "--distributed", "ddp", cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    check(tmp_path / "ddp", 2)
    assert ddp.stdout.count("val loss") == 1 and ddp.stderr.count("2 ranks (ddp)") == 1
    assert load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")["step"] == 10

    fsdp = torchrun(*args, "--out", "fsdp", "--distributed", "fsdp", cwd=tmp_path)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    check(tmp_path / "fsdp", 2)
    shards = tmp_path / "fsdp" / "checkpoint.dcp"
    assert (shards / ".metadata").is_file() and len(list(shards.glob("*.distcp"))) == 2
    assert not (tmp_path / "fsdp" / "checkpoint.pt").exists()
    resumed = torchrun(
        *args[:-1],
        "20",
        "--out",
        "fsdp",
        "--distributed",
        "fsdp",
        "--resume",
        "--stretch-schedule",
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step 10" in resumed.stderr
    check(tmp_path / "fsdp", 4)
    # the sharded checkpoint also serves sampling on one process, sphere rows still unit
    from spheretorch.train import load_model

    model, _, ckpt = load_model(tmp_path / "fsdp" / "checkpoint.dcp")
    assert ckpt["step"] == 20
    for p in model.parameters():
        if getattr(p, "sphere_dim", None) is not None:
            n = p.norm(dim=p.sphere_dim)
            assert torch.allclose(n, torch.ones_like(n), atol=1e-5)
