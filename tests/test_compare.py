"""``compare`` with seeds, budgets, a grid and resume (tiny runs of the smoke preset)."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from spheretorch.cli import main
from spheretorch.train import report
from spheretorch.train.compare import (
    CompareConfig,
    CompareInterrupted,
    _train_config,
    compare,
    parse_models,
)
from spheretorch.train.errors import UserError
from spheretorch.train.specs import cross_optims
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
    assert main([*args[:-2], "--sweep-lrs", "x", "--force"]) == 2
    assert "--sweep-lrs takes positive numbers" in capsys.readouterr().err


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


# -- the study's honesty: LR edges, budgets as run, censoring, recipes, old files ---------------
def _fake_sweep(lrs: list[float], bounds: tuple[float, float], best: float) -> Any:
    """``_Point._sweep`` on a loss that is a parabola in log lr with its minimum at
    ``best`` (no training)."""
    from spheretorch.train.compare import CompareConfig, _Point, get_preset

    cfg = CompareConfig(preset="smoke", sweep_bounds=bounds).resolve()
    point = _Point.__new__(_Point)
    point.cfg, point.prefix, point.say = cfg, "", lambda *a: None
    point.preset = get_preset("smoke")
    tried: list[float] = []

    def run(spec: Any, lr: float, steps: int, bar: Any) -> float | None:
        tried.append(lr)
        return None if lr > 0.3 else 2 + (math.log(lr) - math.log(best)) ** 2

    point._sweep_run = run  # type: ignore[method-assign]
    spec = parse_models("gpt")[0]
    return point._sweep(spec, lrs, 4, None), tried


def test_sweep_extends_beyond_an_edge_until_interior() -> None:
    res, tried = _fake_sweep([1e-3, 2e-3, 4e-3], (1e-5, 0.5), best=0.02)
    assert tried[:3] == [1e-3, 2e-3, 4e-3]
    assert res.extensions == [8e-3, 0.016, 0.032]  # the same factor 2, one at a time
    assert res.chosen == 0.016 and res.edge is None and "interior" in res.note
    # downwards as well
    res, _ = _fake_sweep([1e-3, 2e-3], (1e-5, 0.5), best=3e-4)
    assert res.extensions == [5e-4, 2.5e-4, 1.25e-4] and res.chosen == 2.5e-4


def test_sweep_at_the_bound_says_so() -> None:
    res, tried = _fake_sweep([1e-3, 2e-3, 4e-3], (1e-5, 1e-2), best=0.5)
    assert res.extensions == [8e-3] and res.chosen == 8e-3
    assert res.edge == "high" and "bound reached" in res.note
    # a diverged candidate above the best is an edge found: interior, no further extension
    res, _ = _fake_sweep([0.1, 0.2], (1e-5, 1.0), best=0.25)
    assert res.extensions == [0.4] and res.chosen == 0.2 and res.edge is None
    # one candidate: nothing to extend from
    res, tried = _fake_sweep([1e-3], (1e-5, 0.5), best=0.1)
    assert tried == [1e-3] and res.extensions == [] and "one candidate" in res.note


def test_edges_budgets_as_run_and_tables(tmp_path: Path) -> None:
    lines: list[str] = []
    kw = {**TINY, "steps": 8, "eval_interval": 4, "log": lines.append}
    res = compare("gpt,ngpt", out=tmp_path / "b", budgets="0.001", **kw)
    g = res["gpt"]
    assert g["budgets"] == [0.001, 1.0] and g["budget_steps"] == [1, 8]
    assert g["budget_fractions"] == [0.125, 1.0]
    assert any("--budgets 0.001 runs 1 of 8 steps, a fraction of 0.125" in x for x in lines)
    for r in res.values():  # the sweep is bounded by its own candidates here
        assert r["lr_edge"] in (None, "low", "high") and r["sweep_extensions"] == []
        assert (r["lr_edge"] is not None) == ("bound reached" in r["lr_note"])
        assert r["statistics"].startswith("v0.3")
    table = (tmp_path / "b" / "results.md").read_text()
    if any(r["lr_edge"] for r in res.values()):
        assert "edge, bound reached" in table
    with pytest.raises(UserError, match="both round to 1 of 8 steps"):
        compare("gpt", out=tmp_path / "c", budgets="0.001,0.1", **kw)


def test_optimizer_recipes_as_an_axis(tmp_path: Path) -> None:
    kw = {**TINY, "sweep_lrs": [1e-2], "steps": 4}
    res = compare("gpt", out=tmp_path / "o", optims="adamw,renorm", **kw)
    assert list(res) == ["gpt+adamw", "gpt+renorm"]
    assert [r["optim"] for r in res.values()] == ["adamw", "renorm"]
    assert {r["baseline"] for r in res.values()} == {"gpt+adamw"}
    # a model may name its own recipe; the axis leaves it alone
    specs = cross_optims(parse_models("gpt,n=ngpt:optim=riemannian"), ["adamw", "renorm"])
    assert [(s.label, s.optim) for s in specs] == [
        ("gpt+adamw", "adamw"), ("gpt+renorm", "renorm"), ("n", "riemannian")
    ]  # fmt: skip
    with pytest.raises(UserError, match="unknown optimizer recipe 'sgdx'"):
        compare("gpt", out=tmp_path / "q", optims="adamw,sgdx", **kw)


def test_censored_steps_in_the_table() -> None:
    from spheretorch.train.results import STATISTICS, ModelResult

    base = ModelResult("gpt", 1e-2, 1.5, 60.0, 10.0, baseline="gpt", steps=60, seeds=[0, 1, 2])
    base.statistics = STATISTICS
    m = ModelResult("ngpt", 1e-2, 1.6, 36.0, 12.0, baseline="gpt", steps=60, seeds=[0, 1, 2])
    m.statistics, m.steps_to_target_ci = STATISTICS, [24.0, None]
    m.steps_to_target_per_seed, m.steps_to_target_censored = [24.0, 36.0, None], 1
    m.speedup, m.speedup_ci = 1.5, [0.0, 2.5]
    table = report.markdown_table({"gpt": base, "ngpt": m}, "smoke")
    row = next(line for line in table.splitlines() if line.startswith("| ngpt |"))
    assert "| 36 [24, >60] / 60 (1 of 3 seeds censored at 60) | 1.50x [0.00, 2.50] |" in row
    assert "Kaplan-Meier" in table


def test_old_results_files_still_render() -> None:
    root = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    ctx = json.loads((root / "study_context" / "results.json").read_text())
    grid = report.grid_table(ctx, "seq_len")
    assert grid.count("\n") >= 5
    for point, res in ctx.items():
        table = report.markdown_table(res, "cpu-small", point=point)
        assert "v0.2 statistics" in table and "(edge of the sweep)" in table
    flat = json.loads((root / "geonorm_variants" / "results.json").read_text())
    assert "| gpt |" in report.markdown_table(flat, "cpu-small")


def test_grid_given_twice_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["compare", "--preset", "smoke", "--out", str(tmp_path / "g")]
    with pytest.raises(SystemExit) as exc:  # argparse's usage error
        main([*args, "--grid", "n_layer=1", "--grid", "n_layer=2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--grid given twice" in err
    assert not (tmp_path / "g").exists()


def test_fair_baselines_param_dtype_warmup_dropout() -> None:
    import torch

    from spheretorch import SphereParameter
    from spheretorch.train.config import TrainConfig

    cfg = CompareConfig(preset="smoke", options={"dropout": 0.2}, param_dtype="bf16").resolve()
    for spec in cfg.models:  # type: ignore[union-attr]
        c = _train_config(cfg, spec, {}, steps=20)
        assert c.model_options["dropout"] == 0.2 and c.param_dtype == "bfloat16"
        r = c.resolve()
        assert r.warmup_steps == (0 if spec.model == "ngpt" else 1)  # 5% of 20: GPT's warmup
    t = Trainer(TrainConfig(model="ngpt", preset="smoke", steps=2, param_dtype="bf16"), None)
    assert {p.dtype for p in t.model.parameters()} == {torch.bfloat16}
    assert any(isinstance(p, SphereParameter) for p in t.model.parameters())
    t.train()
    assert t.model.config.dropout == 0.0  # fp32 is the default
    t32 = Trainer(TrainConfig(model="gpt", preset="smoke", steps=1), None)
    assert {p.dtype for p in t32.model.parameters()} == {torch.float32}
    with pytest.raises(UserError, match="--param-dtype"):
        CompareConfig(param_dtype="fp8").resolve()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--sweep-bounds", "1e-3"], "--sweep-bounds takes two learning rates LO,HI"),
        (["--optims", "adamw,sgdx"], "--optims: unknown optimizer recipe 'sgdx'; choose from"),
        (["--models", "gpt:optim=sgdx"], "unknown optimizer recipe 'sgdx'"),
        (["--steps", "8", "--budgets", "0.001,0.1"], "--budgets 0.001 and 0.1 both round to 1"),
    ],
)
def test_compare_flags_bad_input_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    out = tmp_path / "bad"
    assert main(["compare", "--preset", "smoke", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("spheretorch: error: ") and message in err
    assert not out.exists()  # nothing written
