"""The statistics of ``compare`` studies: intervals over seeds, censored times, iso-loss speedups.

Every interval is two-sided 95% (``CONFIDENCE``) and every quantity that can only be
positive (steps, seconds, speedups) gets an interval that stays positive:

* **Means** (final validation loss, a curve's points): mean +- t_{0.975, n-1} s / sqrt(n)
  (:func:`mean_ci`). Losses sit far from 0, so the symmetric interval is safe there.
* **Positive quantities without censoring** (e.g. ms per step over rounds): the geometric mean
  with a Student-t interval on the logarithms, exp(mean(log x) +- t s_log / sqrt(n))
  (:func:`log_mean_ci`).
* **Times to a target** (steps, tokens, seconds): a seed that never reaches the target within
  its N steps is *censored* at N (it would have needed more than N), not dropped. The
  Kaplan-Meier estimate of the survival function S(t) = P(time > t) gives the median time
  (the first event time with S <= 1/2; the midpoint to the next event time where S is exactly
  1/2, so that without censoring it is the sample median) and its interval from the pointwise
  log-log ("exponential Greenwood") band of S, as ``scipy.stats.ecdf(...).sf.confidence_interval(
  method="log-log")``: the lower limit is the first time whose band's lower edge is <= 1/2,
  the upper limit the first time whose upper edge is <= 1/2 (``None``, i.e. unbounded, when
  no observed time gets there: "more than N") (:func:`km_median`).
* **Per-seed speedup in steps**: the ratio r_i = (model's steps) / (baseline's steps) on seed
  i (a censored model gives r_i > N / baseline's steps, censored there); speedup = 1 / the
  Kaplan-Meier median of r, its interval the reciprocal of r's (a lower limit 0 when r's upper
  limit is unbounded) (:func:`censored_speedup`).
* **Iso-loss speedup across budgets** (:func:`speedup`, :func:`bootstrap_speedup`): target L* =
  the baseline's mean loss at budget 1; the model needs the budget b where its mean
  loss-vs-budget curve crosses L* (log-log interpolation between measured budgets); speedup =
  1 / b. Its interval: a paired percentile bootstrap over seeds; a resample whose curve never
  reaches the target contributes speedup 0 (censored below), so a limit is never negative.
  Extrapolating beyond the measured budgets is allowed at most ``MAX_EXTRAPOLATION``-fold
  (and marked ``"extrapolated"``); further out the result is a bound (``"at most"``) or
  ``"never"``, never a number read off an extended line.
* **Steps to target within one run** (:func:`steps_to_target`): the step at which the
  validation curve crosses the target, interpolated in (log step, log loss).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "CONFIDENCE",
    "MAX_EXTRAPOLATION",
    "Interval",
    "bootstrap_speedup",
    "budget_to_reach",
    "censored_speedup",
    "km_curve",
    "km_median",
    "log_mean_ci",
    "mean_ci",
    "normal_quantile",
    "speedup",
    "steps_to_target",
    "t_quantile",
]

CONFIDENCE = 0.95
#: how far (as a factor on the budget) an iso-loss crossing may be extrapolated
MAX_EXTRAPOLATION = 2.0


@dataclass(frozen=True)
class Interval:
    """An estimate with its 95% interval over ``n`` usable values (``n_missing`` unusable:
    diverged runs). ``lo``/``hi`` are ``None`` when there is no interval (fewer than two
    values); for censored times ``hi`` is also ``None`` when the upper limit is unbounded
    (``bounded_above`` tells the two apart); ``n_censored`` seeds never reached the target."""

    estimate: float | None
    lo: float | None = None
    hi: float | None = None
    n: int = 0
    n_missing: int = 0
    n_censored: int = 0
    bounded_above: bool = True
    method: str = "t"

    @property
    def ci(self) -> list[float | None]:
        return [self.lo, self.hi]

    def to_dict(self) -> dict[str, Any]:
        """Plain values (``mean`` names the estimate, as results.json always has)."""
        d: dict[str, Any] = {"mean": self.estimate, "lo": self.lo, "hi": self.hi, "n": self.n}
        d["n_missing"] = self.n_missing
        if self.method != "t":
            d.update(n_censored=self.n_censored, bounded_above=self.bounded_above)
            d["method"] = self.method
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Interval:
        d = d or {}
        return cls(
            d.get("mean"),
            d.get("lo"),
            d.get("hi"),
            int(d.get("n", 0)),
            int(d.get("n_missing", 0)),
            int(d.get("n_censored", 0)),
            bool(d.get("bounded_above", True)),
            str(d.get("method", "t")),
        )


# -- quantiles ---------------------------------------------------------------------------------
def _t_central(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer ``df`` (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd: (2/pi)(theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        term, total = 1.0, 0.0
        if df > 1:
            total = 1.0
            for k in range(1, (df - 3) // 2 + 1):
                term *= c2 * (2 * k) / (2 * k + 1)
                total += term
            total *= s * math.cos(theta)
        return 2 / math.pi * (theta + total)
    term, total = 1.0, 1.0  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
    for k in range(1, (df - 2) // 2 + 1):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return s * total


def _bisect(central: Any, confidence: float) -> float:
    lo, hi = 0.0, 1.0
    while central(hi) < confidence:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if central(mid) < confidence:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """``t`` with ``P(|T| < t) = confidence`` for integer ``df >= 1`` (the two-sided critical
    value: ``scipy.stats.t.ppf((1 + confidence) / 2, df)``), by bisection on the exact CDF."""
    if not (isinstance(df, int) and df >= 1):
        raise ValueError(f"df must be a positive integer, got {df!r}")
    _check_confidence(confidence)
    return _bisect(lambda t: _t_central(t, df), confidence)


def normal_quantile(confidence: float = CONFIDENCE) -> float:
    """``z`` with ``P(|Z| < z) = confidence`` (``scipy.special.ndtri((1 + confidence) / 2)``)."""
    _check_confidence(confidence)
    return _bisect(lambda z: math.erf(z / math.sqrt(2)), confidence)


# -- means ---------------------------------------------------------------------------------------
def _finite(values: Iterable[float | None]) -> tuple[np.ndarray, int]:
    vals = list(values)
    x = np.array([v for v in vals if v is not None and math.isfinite(v)], dtype=np.float64)
    return x, len(vals) - x.size


def mean_ci(values: Iterable[float | None], confidence: float = CONFIDENCE) -> Interval:
    """Mean of the finite values with a Student-t interval over them (``None`` and non-finite
    values, e.g. diverged runs, are counted in ``n_missing``)."""
    x, missing = _finite(values)
    if x.size == 0:
        return Interval(None, n=0, n_missing=missing)
    m = float(x.mean())
    if x.size < 2:
        return Interval(m, n=1, n_missing=missing)
    half = t_quantile(x.size - 1, confidence) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return Interval(m, m - half, m + half, int(x.size), missing)


def log_mean_ci(values: Iterable[float | None], confidence: float = CONFIDENCE) -> Interval:
    """Geometric mean of positive values with a Student-t interval on their logarithms: both
    limits are positive (``exp`` of the limits of :func:`mean_ci` of ``log x``)."""
    x, missing = _finite(values)
    if (x <= 0).any():
        raise ValueError("log_mean_ci needs positive values")
    r = mean_ci(np.log(x).tolist(), confidence)
    exp = lambda v: None if v is None else math.exp(v)  # noqa: E731
    return Interval(exp(r.estimate), exp(r.lo), exp(r.hi), r.n, missing, method="log-t")


# -- censored times ------------------------------------------------------------------------------
def km_curve(
    times: Sequence[float], reached: Sequence[bool], confidence: float = CONFIDENCE
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Kaplan-Meier survival S(t) at the distinct event times with its pointwise log-log
    band: ``(t, S, lo, hi)`` (``reached[i]`` False: time ``i`` is censored there). Where S is
    0 the band is [0, 0]; where the variance is undefined the band is the whole [0, 1]."""
    t = np.asarray(times, dtype=np.float64)
    e = np.asarray(reached, dtype=bool)
    if t.shape != e.shape:
        raise ValueError(f"times and reached differ in length: {t.size} and {e.size}")
    ev = np.unique(t[e])
    n = np.array([(t >= u).sum() for u in ev], dtype=np.float64)
    d = np.array([((t == u) & e).sum() for u in ev], dtype=np.float64)
    sf = np.cumprod((n - d) / n)
    z = normal_quantile(confidence)
    lo, hi = np.zeros_like(sf), np.ones_like(sf)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.cumsum(d / (n * (n - d)))  # Greenwood's sum (inf once n == d)
        se = np.sqrt(g) / np.abs(np.log(sf))
        lnl = np.log(-np.log(sf))
        ok = np.isfinite(se) & (sf > 0) & (sf < 1)
        lo[ok] = np.exp(-np.exp(lnl[ok] + z * se[ok]))
        hi[ok] = np.exp(-np.exp(lnl[ok] - z * se[ok]))
    hi[sf == 0] = 0.0
    return ev, sf, lo, hi


def km_median(
    times: Sequence[float | None],
    reached: Sequence[bool],
    confidence: float = CONFIDENCE,
) -> Interval:
    """The Kaplan-Meier median of times, some censored, with its interval (see the module
    docstring). ``None`` times (diverged runs) are left out and counted in ``n_missing``. The
    estimate is ``None`` when fewer than half the seeds reached the target (the median lies
    beyond every censoring time); when exactly half did and S stays at 1/2 up to the last
    censoring, it is the last event time (the lowest value the median can take); ``hi`` is
    ``None`` with ``bounded_above=False`` when the upper limit is beyond the data. One value
    gives no interval."""
    pairs = [(float(t), bool(r)) for t, r in zip(times, reached, strict=True) if t is not None]
    missing = len(list(times)) - len(pairs)
    n = len(pairs)
    n_cens = sum(not r for _, r in pairs)
    base = {"n": n, "n_missing": missing, "n_censored": n_cens, "method": "kaplan-meier"}
    if not pairs or n_cens == n:
        return Interval(None, bounded_above=False, **base)
    t, s, lo, hi = km_curve([p[0] for p in pairs], [p[1] for p in pairs], confidence)
    half = 0.5
    below = np.nonzero(s <= half + 1e-12)[0]
    est = float(t[below[0]]) if below.size else None
    if below.size and abs(s[below[0]] - half) <= 1e-12 and below[0] + 1 < t.size:
        # S is exactly 1/2 until the next event: the midpoint (the sample median without
        # censoring, e.g. the mean of two seeds), as R's survfit does
        est = 0.5 * (est + float(t[below[0] + 1]))  # type: ignore[operator]
    if n < 2:
        return Interval(est, None, None, bounded_above=est is not None, **base)
    lo_i = np.nonzero(lo <= half)[0]
    hi_i = np.nonzero(hi <= half)[0]
    lower = float(t[lo_i[0]]) if lo_i.size else None
    upper = float(t[hi_i[0]]) if hi_i.size else None
    return Interval(est, lower, upper, bounded_above=upper is not None, **base)


def censored_speedup(
    base_steps: Sequence[float | None],
    model_steps: Sequence[float | None],
    censor_at: Sequence[float],
    confidence: float = CONFIDENCE,
) -> Interval:
    """Per-seed speedup base / model with censoring: seed i gives r_i = model_i / base_i, or,
    when the model never reached the target (``model_i`` ``None``), r_i censored at
    ``censor_at[i] / base_i``. Returns 1 / (Kaplan-Meier median of r) with the reciprocal
    interval; ``lo`` is 0 where r's upper limit is unbounded; the estimate ``None`` when the
    median of r is beyond the data. Seeds whose baseline has no time (diverged) are left
    out."""
    ratios: list[float | None] = []
    reached: list[bool] = []
    for b, m, cap in zip(base_steps, model_steps, censor_at, strict=True):
        if b is None or not b > 0:
            ratios.append(None)
            reached.append(False)
        elif m is None:
            ratios.append(cap / b)
            reached.append(False)
        else:
            ratios.append(m / b)
            reached.append(True)
    r = km_median(ratios, reached, confidence)
    inv = lambda v: None if v is None else 1.0 / v  # noqa: E731
    if r.n < 2:
        return Interval(inv(r.estimate), None, None, r.n, r.n_missing, r.n_censored,
                        method="kaplan-meier ratio")  # fmt: skip
    lo = 0.0 if r.hi is None else 1.0 / r.hi
    return Interval(
        inv(r.estimate), lo, inv(r.lo), r.n, r.n_missing, r.n_censored, method="kaplan-meier ratio"
    )


# -- loss against budget / step ----------------------------------------------------------------
def _loglog_cross(x0: float, y0: float, x1: float, y1: float, target: float) -> float:
    """``x`` where the line through (log x0, log y0), (log x1, log y1) has log y = log target."""
    lx0, lx1 = math.log(x0), math.log(x1)
    ly0, ly1, lt = math.log(y0), math.log(y1), math.log(target)
    return math.exp(lx0 + (lt - ly0) * (lx1 - lx0) / (ly1 - ly0))


def budget_to_reach(
    budgets: Sequence[float],
    losses: Sequence[float | None],
    target: float,
    extrapolate: bool = True,
) -> tuple[float | None, str]:
    """The budget from which a loss-vs-budget curve stays at or below ``target``.

    ``budgets`` increasing (the fractions of the steps actually run), ``losses`` the (mean)
    loss at each; log-log interpolation between the last measured budget above the target
    and the next one (on a noisy, non-monotone curve this is the conservative crossing).
    Returns ``(budget, how)``, ``how`` one of ``"interpolated"``, ``"exact"`` (a measured
    point equals the target and all later ones are at or below it), ``"extrapolated"`` (the
    target lies beyond the measured range, at most ``MAX_EXTRAPOLATION``-fold: the nearest
    end segment's log-log line is extended, only where the loss falls along it), ``"at
    most"`` (below target from the smallest budget on, and no crossing within the
    extrapolation limit: the smallest budget is an upper bound) or ``"never"`` (``None``).
    """
    pts = [
        (float(b), float(v))
        for b, v in zip(budgets, losses, strict=True)
        if v is not None and math.isfinite(v) and v > 0
    ]
    if not pts or not (math.isfinite(target) and target > 0):
        return None, "never"
    above = [i for i, (_, v) in enumerate(pts) if v > target]
    if not above:  # at or below the target everywhere
        b, v = pts[0]
        if v == target:
            return b, "exact"
        if extrapolate and len(pts) > 1 and pts[1][1] < v:
            x = _loglog_cross(b, v, *pts[1], target)
            if x >= b / MAX_EXTRAPOLATION * (1 - 1e-9):
                return x, "extrapolated"
        return b, "at most"
    i = above[-1]
    if i + 1 < len(pts):
        b1, v1 = pts[i + 1]
        if v1 == target:
            return b1, "exact"
        return _loglog_cross(*pts[i], b1, v1, target), "interpolated"
    # above the target at the largest budget: extend the last segment if the loss still falls
    if extrapolate and len(pts) > 1 and pts[-1][1] < pts[-2][1]:
        x = _loglog_cross(*pts[-2], *pts[-1], target)
        if x <= pts[-1][0] * MAX_EXTRAPOLATION * (1 + 1e-9):
            return x, "extrapolated"
    return None, "never"


def steps_to_target(history: Sequence[dict[str, Any]], target: float | None) -> float | None:
    """The step at which the validation loss first reaches ``target``, interpolated in
    (log step, log loss) between the evaluation before and the first one at or below it; the
    first evaluation's step when that one is already below (``None`` if never reached)."""
    if target is None or not math.isfinite(target):
        return None
    prev: tuple[float, float] | None = None
    for row in history:
        v = row.get("val_loss")
        if v is None or not math.isfinite(v):
            continue
        step = float(row["step"])
        if v <= target:
            if prev is None or v == target or step <= 0 or prev[0] <= 0:
                return step
            return _loglog_cross(prev[0], prev[1], step, v, target)
        prev = (step, float(v))
    return None


def speedup(
    budgets: Sequence[float],
    base: np.ndarray,
    model: np.ndarray,
    reference: float = 1.0,
    extrapolate: bool = True,
) -> tuple[float | None, str]:
    """Iso-loss speedup of ``model`` over ``base`` from seed-by-budget loss arrays
    ``(n_seeds, n_budgets)`` (NaN for a diverged run): the target is ``base``'s mean loss at
    the ``reference`` budget; speedup = reference / (budget at which ``model``'s mean curve
    reaches it). Returns ``(speedup, how)`` with ``how`` as in :func:`budget_to_reach`."""
    budgets = [float(b) for b in budgets]
    j = budgets.index(float(reference))
    col = base[:, j]
    if not np.isfinite(col).any():
        return None, "never"
    target = float(np.nanmean(col))
    with np.errstate(all="ignore"):
        curve = [
            float(np.nanmean(model[:, k])) if np.isfinite(model[:, k]).any() else None
            for k in range(len(budgets))
        ]
    b, how = budget_to_reach(budgets, curve, target, extrapolate)
    return ((reference / b) if b else None), how


def bootstrap_speedup(
    budgets: Sequence[float],
    base: np.ndarray,
    model: np.ndarray,
    reference: float = 1.0,
    n_boot: int = 2000,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> dict[str, Any]:
    """:func:`speedup` with a percentile bootstrap interval over seeds.

    Rows of ``base`` and ``model`` are paired (row i of both used seed i: same batches), so
    every resample draws seed indices once for both. Resamples whose curve never reaches the
    target count as speedup 0 (censored below: they pull the lower limit down rather than
    being dropped, and no limit is negative). Returns ``{"speedup", "how", "lo", "hi",
    "n_seeds", "n_boot"}`` (``lo``/``hi`` ``None`` with one seed)."""
    base, model = np.asarray(base, dtype=np.float64), np.asarray(model, dtype=np.float64)
    if base.shape != model.shape or base.ndim != 2 or base.shape[1] != len(budgets):
        raise ValueError(
            f"base and model must both be (n_seeds, {len(budgets)}), got {base.shape} and "
            f"{model.shape}"
        )
    point, how = speedup(budgets, base, model, reference)
    n = base.shape[0]
    out: dict[str, Any] = {"speedup": point, "how": how, "lo": None, "hi": None, "n_seeds": n}
    out["n_boot"] = n_boot if n >= 2 else 0
    if n < 2:
        return out
    rng = np.random.default_rng(seed)
    draws = np.empty(n_boot)
    for i in range(n_boot):
        idx = rng.integers(0, n, n)
        s, _ = speedup(budgets, base[idx], model[idx], reference)
        draws[i] = 0.0 if s is None else s
    alpha = (1 - confidence) / 2
    out["lo"], out["hi"] = (float(q) for q in np.quantile(draws, [alpha, 1 - alpha]))
    return out
