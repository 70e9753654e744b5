"""The censored and positive statistics (spheretorch.train.stats) against scipy/numpy oracles."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest

from spheretorch.train import stats
from spheretorch.train.errors import UserError
from spheretorch.train.specs import budget_steps

scipy_stats = pytest.importorskip("scipy.stats")
special = pytest.importorskip("scipy.special")


def _scipy_km(times, reached):
    """(t, S, lo, hi) from scipy.stats.ecdf on right-censored data, log-log band."""
    t, e = np.asarray(times, float), np.asarray(reached, bool)
    data = scipy_stats.CensoredData(uncensored=t[e], right=t[~e])
    sf = scipy_stats.ecdf(data).sf
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # undefined at S = 0: a feature
        ci = sf.confidence_interval(0.95, method="log-log")
    return sf.quantiles, sf.probabilities, ci.low.probabilities, ci.high.probabilities


def _median_from(t, s, lo, hi):
    """The median and its limits by the rule of the module docstring, from any band."""
    first = lambda mask: float(t[np.nonzero(mask)[0][0]]) if mask.any() else None  # noqa: E731
    est = first(s <= 0.5)
    j = np.nonzero(s <= 0.5)[0]
    if j.size and np.isclose(s[j[0]], 0.5) and j[0] + 1 < t.size:  # flat at 1/2: midpoint
        est = (t[j[0]] + t[j[0] + 1]) / 2
    return (
        est,
        first(np.nan_to_num(lo, nan=0.0) <= 0.5),
        first(np.where(s == 0, 0.0, np.nan_to_num(hi, nan=1.0)) <= 0.5),
    )


CASES = [
    ([24.0, 36.0, 60.0], [True, True, False]),  # one censored seed (the example)
    ([10.0, 12.0, 15.0, 40.0, 40.0], [True] * 5),  # none censored, a tie
    (
        [5.0, 7.0, 9.0, 11.0, 13.0, 15.0, 20.0, 20.0],
        [True, False, True, True, False, True, False, False],
    ),
    ([3.0, 8.0, 8.0, 9.0], [True, True, False, True]),  # tie of an event and a censoring
]


@pytest.mark.parametrize("times,reached", CASES)
def test_km_curve_matches_scipy_ecdf(times, reached) -> None:
    t, s, lo, hi = stats.km_curve(times, reached)
    qt, qs, qlo, qhi = _scipy_km(times, reached)
    ev = np.isin(qt, t)  # scipy lists censoring times too (where S does not change)
    np.testing.assert_allclose(t, qt[ev], rtol=0, atol=0)
    np.testing.assert_allclose(s, qs[ev], rtol=1e-14)
    ok = np.isfinite(qlo[ev]) & (qs[ev] > 0)
    np.testing.assert_allclose(lo[ok], qlo[ev][ok], rtol=1e-12)
    np.testing.assert_allclose(hi[ok], qhi[ev][ok], rtol=1e-12)


@pytest.mark.parametrize("times,reached", CASES)
def test_km_median_and_limits_from_scipys_band(times, reached) -> None:
    qt, qs, qlo, qhi = _scipy_km(times, reached)
    est, lo, hi = _median_from(qt, qs, qlo, qhi)
    r = stats.km_median(times, reached)
    assert (r.estimate, r.lo, r.hi) == (est, lo, hi)
    assert r.n == len(times) and r.n_censored == sum(not x for x in reached)
    assert r.lo is None or r.lo <= r.estimate
    assert r.hi is None or r.hi >= r.estimate
    assert r.bounded_above == (r.hi is not None)


def test_km_median_censored_seed_gives_a_positive_open_interval() -> None:
    # the case: 24 and 36 steps, the third seed never within 60 steps
    r = stats.km_median([24.0, 36.0, 60.0], [True, True, False])
    assert r.estimate == 36.0 and r.lo == 24.0 and r.hi is None and not r.bounded_above
    assert r.n_censored == 1


@pytest.mark.parametrize(
    "x", [[31.0, 12.0, 20.0, 45.0, 27.0], [31.0, 12.0, 20.0, 45.0], [3.0, 5.0]]
)
def test_km_median_none_censored_is_the_sample_median(x) -> None:
    r = stats.km_median(x, [True] * len(x))
    assert r.estimate == pytest.approx(float(np.median(x)), rel=1e-15) and r.n_censored == 0
    assert 0 < r.lo <= r.estimate <= r.hi


def test_km_median_all_censored_and_one_seed() -> None:
    r = stats.km_median([60.0, 60.0, 60.0], [False] * 3)
    assert r.estimate is None and r.lo is None and r.hi is None and r.n_censored == 3
    one = stats.km_median([17.0], [True])
    assert one.estimate == 17.0 and one.lo is None and one.hi is None and one.n == 1
    cens = stats.km_median([60.0], [False])
    assert cens.estimate is None and cens.n_censored == 1
    # a diverged run has no time: left out and counted
    miss = stats.km_median([None, 20.0, 30.0], [False, True, True])
    assert miss.n == 2 and miss.n_missing == 1 and miss.estimate == 25.0  # S = 1/2 on [20, 30)


def test_censored_speedup_is_the_reciprocal_median_of_ratios() -> None:
    base = [100.0, 120.0, 90.0, 110.0, 100.0]
    model = [50.0, 40.0, 45.0, 55.0, 25.0]  # ratios 0.5, 1/3, 0.5, 0.5, 0.25
    r = stats.censored_speedup(base, model, [200.0] * 5)
    assert r.estimate == pytest.approx(2.0) and r.n_censored == 0
    assert 0 < r.lo <= r.estimate <= r.hi
    # the slower seeds never reach the target: censored, not dropped, so the speedup falls
    cens = stats.censored_speedup(base, [50.0, None, None, 55.0, 25.0], [200.0] * 5)
    assert cens.n_censored == 2 and cens.estimate == pytest.approx(2.0)
    assert cens.lo == 0.0  # the ratio's upper limit is unbounded
    none = stats.censored_speedup(base[:3], [None, None, 10.0], [200.0] * 3)
    assert none.estimate is None  # median ratio beyond the censoring times
    assert stats.censored_speedup([100.0], [50.0], [200.0]).estimate == pytest.approx(2.0)


@pytest.mark.parametrize("x", [[1.2, 3.4, 2.2], [0.01, 100.0], [5.0, 5.5, 6.0, 40.0]])
def test_log_mean_ci_is_the_t_interval_of_the_logs(x) -> None:
    logs = np.log(x)
    lo, hi = scipy_stats.t.interval(0.95, len(x) - 1, loc=logs.mean(), scale=scipy_stats.sem(logs))
    r = stats.log_mean_ci(x)
    assert r.estimate == pytest.approx(scipy_stats.gmean(x), rel=1e-12)
    assert (r.lo, r.hi) == pytest.approx((math.exp(lo), math.exp(hi)), rel=1e-10)
    assert r.lo > 0  # where the plain t interval of [0.01, 100] goes far below 0
    assert stats.mean_ci([0.01, 100.0]).lo < 0


def test_normal_quantile_matches_scipy() -> None:
    for c in (0.5, 0.9, 0.95, 0.99):
        assert stats.normal_quantile(c) == pytest.approx(special.ndtri(0.5 + c / 2), rel=1e-10)


def test_extrapolation_is_limited_and_marked() -> None:
    budgets = [0.25, 0.5, 1.0]
    losses = [3 * b**-0.2 for b in budgets]
    # 1.5-fold beyond the largest budget: extrapolated (and said so)
    b, how = stats.budget_to_reach(budgets, losses, 3 * 1.5**-0.2)
    assert how == "extrapolated" and b == pytest.approx(1.5)
    # 100-fold beyond: no number
    assert stats.budget_to_reach(budgets, losses, 3 * 100**-0.2) == (None, "never")
    # 100-fold below the smallest budget: only a bound (the smallest budget)
    assert stats.budget_to_reach(budgets, losses, 3 * 0.0025**-0.2) == (0.25, "at most")
    s, how = stats.speedup(budgets, np.array([losses]), np.array([[v * 0.5 for v in losses]]))
    assert how == "at most" and s == pytest.approx(4.0)  # a lower bound, 1 / 0.25


def test_bootstrap_limits_stay_positive_with_censored_resamples() -> None:
    budgets = [0.25, 0.5, 1.0]
    base = np.array([[2.0, 1.8, 1.6]] * 3)
    model = np.array([[2.0, 1.7, 1.5], [2.1, 1.95, 1.9], [2.0, 1.75, 1.55]])  # seed 1 never
    r = stats.bootstrap_speedup(budgets, base, model, n_boot=300)
    assert r["lo"] >= 0 and r["hi"] >= r["lo"]
    exact = []
    for idx in itertools.product(range(3), repeat=3):
        s, _ = stats.speedup(budgets, base[list(idx)], model[list(idx)])
        exact.append(0.0 if s is None else s)
    assert min(exact) <= r["lo"] <= r["hi"] <= max(exact)


def test_budget_steps_refuses_budgets_that_round_together() -> None:
    assert budget_steps([0.001, 1.0], 8) == {0.001: 1, 1.0: 8}
    with pytest.raises(UserError, match="both round to 1 of 8 steps"):
        budget_steps([0.001, 0.1, 1.0], 8)
