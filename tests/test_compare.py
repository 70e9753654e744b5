"""``compare`` with seeds, budgets, a grid and resume (tiny runs of the smoke preset)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from spheretorch.cli import main
from spheretorch.train import report
from spheretorch.train.compare import CompareInterrupted, compare, parse_models
from spheretorch.train.errors import UserError
from spheretorch.train.trainer import Trainer

TINY = {
    "preset": "smoke",
    "steps": 12,
    "eval_interval": 4,
    "eval_batches": 1,
    "sweep_lrs": [3e-3, 1e-2],
    "sweep_fraction": 0.5,
    "sweep_bounds": (3e-3, 1e-2),  # no extension beyond the candidates (tested on its own)
    "progress": False,
    "log": lambda *a: None,
}
VOLATILE = {"wall_s", "ms_per_step", "ms_per_step_full_run", "dir", "wall_s_to_target"}
VOLATILE |= {"wall_s_to_target_ci"}


def _stable(rows: dict[str, Any]) -> dict[str, Any]:
    return {k: {f: v for f, v in r.items() if f not in VOLATILE} for k, r in rows.items()}


def _ledger(out: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    return _stable({r["key"]: r for r in rows})


def test_parse_models_labels_and_options() -> None:
    specs = parse_models("gpt, post=gpt:norm_position=post,ngpt:alpha_init=0.25,gpt")
    assert [(s.label, s.model, s.options) for s in specs] == [
        ("gpt", "gpt", {}),
        ("post", "gpt", {"norm_position": "post"}),
        ("ngpt:alpha_init=0.25", "ngpt", {"alpha_init": 0.25}),
    ]
    for bad in ("bert", "x=gpt:colour=red", "gpt:steps=3", "a/b=gpt"):
        with pytest.raises(UserError, match=r"--models|unknown model"):
            parse_models(bad)


def test_seeds_and_budgets(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    res = compare("gpt,ngpt", out=out, seeds=2, budgets="0.5", **{**TINY, "sweep_lrs": [1e-2]})
    g, n = res["gpt"], res["ngpt"]
    assert g["seeds"] == [0, 1] and g["budgets"] == [0.5, 1.0] and g["budget_steps"] == [6, 12]
    per_seed = g["final_val_loss_per_seed"]
    assert g["final_val_loss"] == pytest.approx(sum(per_seed) / 2)
    lo, hi = g["final_val_loss_ci"]
    assert lo < g["final_val_loss"] < hi
    assert g["target_val_loss"] == g["final_val_loss"] and n["baseline"] == "gpt"
    assert set(n["budget_speedup"]) >= {"speedup", "lo", "hi", "how", "n_seeds"}
    assert g["budget_speedup"]["speedup"] == pytest.approx(1.0)
    # the same seed gives every model the same batches: the ledger records it per run
    rows = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    full = [r for r in rows if r["phase"] == "full"]
    assert len(full) == 2 * 2 * 2 and len([r for r in rows if r["phase"] == "sweep"]) == 2
    assert {(r["seed"], r["budget"], r["steps"]) for r in full} == {
        (s, b, st) for s in (0, 1) for b, st in ((0.5, 6), (1.0, 12))
    }
    assert (out / "runs.csv").read_text().count("\n") == len(rows) + 1
    assert (out / "loss_vs_budget.png").stat().st_size > 1000
    table = (out / "results.md").read_text()
    assert "iso-loss speedup" in table and "Student-t" in table and "Kaplan-Meier" in table


def test_grid_seq_len_keeps_tokens_per_step(tmp_path: Path) -> None:
    out = tmp_path / "grid"
    res = compare("gpt,ngpt", out=out, grid="seq_len=16,32", **{**TINY, "sweep_lrs": [1e-2]})
    assert list(res) == ["seq_len=16", "seq_len=32"]
    for point, tokens in (("seq_len=16", 16 * 16), ("seq_len=32", 8 * 32)):
        assert res[point]["gpt"]["batch_size"] * res[point]["gpt"]["seq_len"] == tokens
    assert (out / "grid.png").stat().st_size > 1000
    assert (out / "seq_len=16" / "gpt" / "metrics.jsonl").is_file()
    assert "| seq_len |" in (out / "results.md").read_text()


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """Deliver a real SIGINT during the ``call``-th training step of the process."""
    original = Trainer.train_step
    count = {"n": 0}

    def step(self: Trainer, x: Any, y: Any) -> Any:
        count["n"] += 1
        if count["n"] == call:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, x, y)

    monkeypatch.setattr(Trainer, "train_step", step)


def test_resume_after_sigint_mid_sweep_and_mid_run_equals_uninterrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kw = {**TINY, "budgets": "0.5"}  # sweeps: 2 x 2 runs of 6 steps; full: 2 x (12 + 6)
    ref = compare("gpt,ngpt", out=tmp_path / "ref", **kw)
    out = tmp_path / "cut"
    n_rows = []
    for call, resume in ((9, False), (22, True)):  # 9: 2nd sweep run; 22: 1st full run
        with monkeypatch.context() as m:
            _interrupt_at(m, call)
            with pytest.raises(CompareInterrupted, match="SIGINT"):
                compare("gpt,ngpt", out=out, handle_signals=True, resume=resume, **kw)
        n_rows.append(len(_ledger(out)))
        assert any(out.rglob("checkpoint.pt"))  # the interrupted run saved where it stopped
    assert n_rows == [1, 4]  # the first sweep run, then all four sweep runs were finished
    again = compare("gpt,ngpt", out=out, resume=True, handle_signals=True, **kw)
    assert _ledger(out) == _ledger(tmp_path / "ref")
    assert _stable(again) == _stable(ref)


def test_resume_checks_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c"
    args = ["compare", "--preset", "smoke", "--models", "gpt", "--out", str(out), "--no-progress"]
    args += ["--steps", "4", "--eval-batches", "1", "--sweep-lrs", "1e-2"]
    assert main([*args, "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(args) == 0
    assert main([*args, "--resume", "--seeds", "2"]) == 2
    assert "--seeds differs" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0  # everything recorded: nothing is trained again
    assert main([*args, "--sweep-lrs", "x"]) == 2


def test_log_ticks_are_plain_numbers() -> None:
    plt = report._pyplot()
    fig, ax = plt.subplots()
    ax.plot([40, 800], [1, 2])
    ax.set_xscale("log")
    report.log_ticks(ax, [40, 80, 400, 800])
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["40", "50", "100", "200", "500", "800"]
    plt.close(fig)
