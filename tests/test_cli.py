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
    assert main([*args, "--steps", "40", "--resume"]) == 0
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
        assert r["lr"] in (3e-3, 1e-2) and r["ms_per_step"] > 0
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
