"""The study statistics (spheretorch.train.study) against numpy/scipy oracles."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from spheretorch.train import study
from spheretorch.train.errors import UserError

stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 6, 9, 10, 29, 30, 101])
@pytest.mark.parametrize("confidence", [0.5, 0.9, 0.95, 0.99])
def test_t_quantile_matches_scipy(df: int, confidence: float) -> None:
    expected = stats.t.ppf((1 + confidence) / 2, df)
    assert study.t_quantile(df, confidence) == pytest.approx(expected, rel=1e-9)


def test_t_quantile_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="df"):
        study.t_quantile(0)
    with pytest.raises(ValueError, match="confidence"):
        study.t_quantile(3, 1.0)


def test_mean_ci_matches_scipy_interval() -> None:
    x = [1.91, 1.87, 1.95, 1.90]
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    r = study.mean_ci(x)
    assert r["mean"] == pytest.approx(np.mean(x), rel=1e-14)
    assert (r["lo"], r["hi"]) == pytest.approx((lo, hi), rel=1e-10)
    assert r["n"] == 4 and r["n_missing"] == 0


def test_mean_ci_drops_diverged_and_needs_two_for_an_interval() -> None:
    r = study.mean_ci([2.0, None, math.nan])
    assert r == {"mean": 2.0, "lo": None, "hi": None, "n": 1, "n_missing": 2}
    assert study.mean_ci([])["mean"] is None


def test_budget_to_reach_is_exact_on_a_power_law() -> None:
    # L(b) = 3 b^-0.2: log-log interpolation is exact between any two points
    budgets = [0.25, 0.5, 1.0]
    losses = [3 * b**-0.2 for b in budgets]
    target = 3 * 0.7**-0.2
    b, how = study.budget_to_reach(budgets, losses, target)
    assert how == "interpolated" and b == pytest.approx(0.7, rel=1e-12)
    # beyond the range: the end segment is extended (still exact on a power law)
    b, how = study.budget_to_reach(budgets, losses, 3 * 2.0**-0.2)
    assert how == "extrapolated" and b == pytest.approx(2.0, rel=1e-12)
    b, how = study.budget_to_reach(budgets, losses, 3 * 0.15**-0.2)
    assert how == "extrapolated" and b == pytest.approx(0.15, rel=1e-12)
    # further than 2-fold out: a bound, not a number read off the extended line
    assert study.budget_to_reach(budgets, losses, 3 * 0.1**-0.2) == (0.25, "at most")
    assert study.budget_to_reach(budgets, losses, losses[1]) == (0.5, "exact")


def test_budget_to_reach_takes_the_last_crossing_of_a_noisy_curve() -> None:
    # dips below the target at 0.25, back above at 0.5, below for good at 1
    b, how = study.budget_to_reach([0.25, 0.5, 1.0], [1.9, 2.1, 1.8], 2.0)
    lb = math.log(0.5) + (math.log(2.0) - math.log(2.1)) * math.log(2) / math.log(1.8 / 2.1)
    assert how == "interpolated" and b == pytest.approx(math.exp(lb), rel=1e-12)
    # below everywhere on a rising curve: the smallest budget is an upper bound
    assert study.budget_to_reach([0.5, 1.0], [1.7, 1.8], 1.8) == (0.5, "at most")


def test_budget_to_reach_never_when_curve_rises_or_stops() -> None:
    assert study.budget_to_reach([0.5, 1], [2.0, 2.1], 1.5) == (None, "never")
    assert study.budget_to_reach([0.5, 1], [2.0, None], 1.5) == (None, "never")
    assert study.budget_to_reach([0.5, 1], [2.0, 1.9], 1.5, extrapolate=False) == (None, "never")


def test_steps_to_target_interpolates_between_evaluations() -> None:
    hist = [{"step": s, "val_loss": 4 * s**-0.1} for s in (40, 80, 120, 160)]
    target = 4 * 100**-0.1
    assert study.steps_to_target(hist, target) == pytest.approx(100, rel=1e-12)
    assert study.steps_to_target(hist, 10.0) == 40  # already below at the first evaluation
    assert study.steps_to_target(hist, 1.0) is None
    assert study.steps_to_target([{"step": 5, "val_loss": None}], 1.0) is None


def test_speedup_of_a_shifted_power_law() -> None:
    # model M at budget b equals base at budget 1.6 b: a 1.6x speedup
    budgets = [0.25, 0.5, 1.0]
    base = np.array([[2 * b**-0.3 for b in budgets]] * 3)
    model = np.array([[2 * (1.6 * b) ** -0.3 for b in budgets]] * 3)
    s, how = study.speedup(budgets, base, model)
    assert how == "interpolated" and s == pytest.approx(1.6, rel=1e-12)
    r = study.bootstrap_speedup(budgets, base, model, n_boot=50)
    assert r["lo"] == pytest.approx(1.6) and r["hi"] == pytest.approx(1.6)  # no spread


def test_bootstrap_matches_exact_resampling_distribution() -> None:
    rng = np.random.default_rng(1)
    budgets = [0.25, 0.5, 1.0]
    base = 2.0 * np.array(budgets)[None, :] ** -0.3 + 0.02 * rng.standard_normal((3, 3))
    model = 1.9 * np.array(budgets)[None, :] ** -0.3 + 0.02 * rng.standard_normal((3, 3))
    # all 27 equally likely paired resamples of 3 seeds
    exact = []
    for idx in itertools.product(range(3), repeat=3):
        s, _ = study.speedup(budgets, base[list(idx)], model[list(idx)])
        exact.append(0.0 if s is None else s)
    r = study.bootstrap_speedup(budgets, base, model, n_boot=4000, seed=3)
    lo, hi = np.quantile(exact, [0.025, 0.975])
    assert min(exact) <= r["lo"] <= r["speedup"] <= r["hi"] <= max(exact)
    assert r["lo"] == pytest.approx(lo, rel=0.05) and r["hi"] == pytest.approx(hi, rel=0.05)
    assert r["n_seeds"] == 3 and r["n_boot"] == 4000


def test_bootstrap_single_seed_has_no_interval_and_checks_shapes() -> None:
    r = study.bootstrap_speedup([1.0], np.array([[2.0]]), np.array([[1.9]]))
    assert r["lo"] is None and r["n_boot"] == 0
    with pytest.raises(ValueError, match="n_seeds"):
        study.bootstrap_speedup([0.5, 1.0], np.ones((2, 2)), np.ones((3, 2)))


def test_parse_budgets() -> None:
    assert study.parse_budgets("0.5,0.25") == [0.25, 0.5, 1.0]
    assert study.parse_budgets(None) == [1.0]
    for bad in ("0", "1.5", "x", "nan"):
        with pytest.raises(UserError, match="--budgets"):
            study.parse_budgets(bad)


def test_parse_grid_and_points_keep_tokens_per_step() -> None:
    assert study.parse_grid("n_layer=2,4,4") == ("n_layer", [2, 4])
    assert study.parse_grid("update_decay=none,inverse") == ("update_decay", ["none", "inverse"])
    grid = study.parse_grid("seq_len=64,128,256")
    points = study.grid_points(grid, base_seq_len=128, base_batch_size=16)
    assert [p["batch_size"] * p["seq_len"] for p in points] == [2048] * 3
    assert points[0] == {"seq_len": 64, "batch_size": 32}
    for bad in ("seq_len", "colour=1", "n_layer=a", "n_layer=0", "n_layer="):
        with pytest.raises(UserError, match="--grid"):
            study.parse_grid(bad)
    with pytest.raises(UserError, match="multiple"):
        study.grid_points(("seq_len", [100]), 128, 3)


def test_ledger_resumes_and_drops_a_torn_line(tmp_path) -> None:
    path = tmp_path / "runs.jsonl"
    led = study.Ledger(path)
    led.record({"key": "a", "loss": 1.0})
    led.record({"key": "b", "loss": 2.0})
    with open(path, "a") as f:
        f.write('{"key": "c", "lo')  # killed mid-write
    again = study.Ledger(path)
    assert "a" in again and "b" in again and "c" not in again
    assert [json.loads(x)["key"] for x in path.read_text().splitlines()] == ["a", "b"]
    assert again.select(loss=2.0) == [{"key": "b", "loss": 2.0}]


def test_write_csv_round_trips(tmp_path) -> None:
    import csv

    rows = [{"key": "a", "x": 1.5, "h": [1, 2]}, {"key": "b", "y": None}]
    study.write_csv(rows, tmp_path / "r.csv")
    with open(tmp_path / "r.csv", encoding="utf-8") as f:
        back = list(csv.DictReader(f))
    assert back[0] == {"key": "a", "x": "1.5", "h": "[1, 2]", "y": ""}
    assert back[1]["y"] == ""
