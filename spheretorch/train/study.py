"""Statistics and bookkeeping for ``compare`` studies: seeds, budgets, grids, tidy results.

* Intervals over seeds: mean +- t_{0.975, n-1} s / sqrt(n) (Student t, two-sided 95%).
* Iso-loss speedup: runs of several budgets b (fractions of the preset's steps, each with its
  own full schedule) give a loss curve L_M(b) per model. With target L* = GPT's mean loss at
  b = 1, model M needs the budget b_M where log L_M crosses log L*, interpolated linearly in
  (log b, log L); speedup = 1 / b_M. Its interval: a paired bootstrap over seeds (the same
  resampled seeds for both models, since a seed fixes the batches for every model).
* Steps to target within one run: the step at which the validation curve crosses the target,
  interpolated linearly in (log step, log loss) between the two evaluations around it.
* Tidy results: one JSON object per finished run in ``runs.jsonl`` (appended as runs finish,
  which also makes an interrupted study resumable) and the same rows as ``runs.csv``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError

__all__ = [
    "Ledger",
    "bootstrap_speedup",
    "budget_to_reach",
    "grid_points",
    "mean_ci",
    "parse_budgets",
    "parse_grid",
    "speedup",
    "steps_to_target",
    "t_quantile",
    "write_csv",
]

CONFIDENCE = 0.95


# -- Student t ---------------------------------------------------------------------------------
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


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """``t`` with ``P(|T| < t) = confidence`` for integer ``df >= 1`` (the two-sided critical
    value: ``scipy.stats.t.ppf((1 + confidence) / 2, df)``), by bisection on the exact CDF."""
    if not (isinstance(df, int) and df >= 1):
        raise ValueError(f"df must be a positive integer, got {df!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    lo, hi = 0.0, 1.0
    while _t_central(hi, df) < confidence:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_central(mid, df) < confidence:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


def mean_ci(values: Iterable[float | None], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean of the finite values with a Student-t interval over them.

    Returns ``{"mean", "lo", "hi", "n", "n_missing"}``; ``lo``/``hi`` are ``None`` with fewer
    than two finite values, ``mean`` is ``None`` with none (non-finite values, e.g. diverged
    runs, are counted in ``n_missing``)."""
    vals = list(values)
    x = np.array([v for v in vals if v is not None and math.isfinite(v)], dtype=np.float64)
    out: dict[str, Any] = {"mean": None, "lo": None, "hi": None, "n": int(x.size)}
    out["n_missing"] = len(vals) - x.size
    if x.size == 0:
        return out
    m = float(x.mean())
    out["mean"] = m
    if x.size >= 2:
        half = t_quantile(x.size - 1, confidence) * float(x.std(ddof=1)) / math.sqrt(x.size)
        out["lo"], out["hi"] = m - half, m + half
    return out


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

    ``budgets`` increasing, ``losses`` the (mean) loss at each; log-log interpolation between
    the last measured budget above the target and the next one (on a noisy, non-monotone
    curve this is the conservative crossing). Returns ``(budget, how)``, ``how`` one of
    ``"interpolated"``, ``"exact"`` (a measured point equals the target and all later ones
    are at or below it), ``"extrapolated"`` (the target lies beyond the measured range: the
    nearest end segment's log-log line is extended, only where the loss falls along it),
    ``"at most"`` (below target from the smallest budget on, no falling segment to extend:
    the budget returned is an upper bound) or ``"never"`` (``None``).
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
            return _loglog_cross(b, v, *pts[1], target), "extrapolated"
        return b, "at most"
    i = above[-1]
    if i + 1 < len(pts):
        b1, v1 = pts[i + 1]
        if v1 == target:
            return b1, "exact"
        return _loglog_cross(*pts[i], b1, v1, target), "interpolated"
    # above the target at the largest budget: extend the last segment if the loss still falls
    if extrapolate and len(pts) > 1 and pts[-1][1] < pts[-2][1]:
        return _loglog_cross(*pts[-2], *pts[-1], target), "extrapolated"
    return None, "never"


def steps_to_target(history: Sequence[dict[str, Any]], target: float) -> float | None:
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
    target count as speedup 0 (they pull the lower bound down rather than being dropped).
    Returns ``{"speedup", "how", "lo", "hi", "n_seeds", "n_boot"}`` (``lo``/``hi`` ``None``
    with one seed)."""
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


# -- specs ---------------------------------------------------------------------------------------
def parse_budgets(spec: str | Sequence[float] | None) -> list[float]:
    """``"0.25,0.5,1"`` -> ``[0.25, 0.5, 1.0]``: sorted, unique, each in (0, 1]; the full
    budget 1 is added when absent (it defines the target loss)."""
    if spec is None or spec == "":
        return [1.0]
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: set[float] = set()
    for item in items:
        try:
            b = float(item)
        except (TypeError, ValueError):
            raise UserError(
                f"--budgets takes fractions of the preset's steps such as 0.25,0.5,1; got {item!r}"
            ) from None
        if not (math.isfinite(b) and 0 < b <= 1):
            raise UserError(f"--budgets: each fraction must be in (0, 1], got {item!r}")
        out.add(b)
    out.add(1.0)
    return sorted(out)


def _coerce(field: str, raw: str, kind: tuple[type, bool], flag: str = "--grid") -> Any:
    """``raw`` as the field's type ``kind = (type, accepts None)``; ``none`` for ``None``."""
    typ, nullable = kind
    text = raw.strip()
    try:
        if nullable and text.lower() in ("none", "null"):
            return None
        if typ is bool:
            if text.lower() in ("1", "true", "yes"):
                return True
            if text.lower() in ("0", "false", "no"):
                return False
            raise ValueError
        return typ(text)
    except ValueError:
        raise UserError(f"{flag} {field}: {raw!r} is not a valid {typ.__name__} value") from None


def model_fields(model: str | None = None) -> dict[str, tuple[type, bool]]:
    """``{field: (type, accepts None)}`` of a model's config (every model's with ``None``);
    ``vocab_size`` defaults to the data's, and a larger one may be set (padding)."""
    from .. import models as m

    names = [model] if model is not None else list(m.MODELS)
    out: dict[str, tuple[type, bool]] = {}
    for name in names:
        cls = getattr(m.MODELS[name], "config_class", m.TransformerConfig)
        for f in dataclasses.fields(cls):
            if f.name in out:
                continue
            t = str(f.type)
            typ: type = str
            for prefix, kind in (("int", int), ("float", float), ("bool", bool)):
                if t.startswith(prefix):
                    typ = kind
            out[f.name] = (typ, "None" in t)
    return out


def grid_fields() -> dict[str, tuple[type, bool]]:
    """Fields a grid may vary: any model's config fields and ``batch_size``."""
    return {"batch_size": (int, False), **model_fields()}


def parse_grid(spec: str | None) -> tuple[str, list[Any]] | None:
    """``"seq_len=64,128,256"`` -> ``("seq_len", [64, 128, 256])`` (values typed by field)."""
    if spec is None or spec == "":
        return None
    field, sep, values = spec.partition("=")
    field = field.strip()
    kinds = grid_fields()
    if not sep or not values.strip():
        raise UserError(f"--grid takes FIELD=V,V,... such as seq_len=64,128; got {spec!r}")
    if field not in kinds:
        raise UserError(f"--grid: unknown field {field!r}; choose from {', '.join(kinds)}")
    raw = [v.strip() for v in values.split(",") if v.strip()]
    parsed = list(dict.fromkeys(_coerce(field, v, kinds[field]) for v in raw))
    if not parsed:
        raise UserError(f"--grid {field} needs at least one value")
    if kinds[field][0] is int and any(v is None or v <= 0 for v in parsed):
        raise UserError(f"--grid {field}: values must be positive integers")
    return field, parsed


def grid_points(
    grid: tuple[str, list[Any]] | None, base_seq_len: int, base_batch_size: int
) -> list[dict[str, Any]]:
    """One dict of overrides per grid point. Varying ``seq_len`` keeps the tokens per step
    ``base_batch_size * base_seq_len`` fixed by setting ``batch_size`` to
    ``tokens // seq_len`` (which must divide exactly)."""
    if grid is None:
        return [{}]
    field, values = grid
    points = []
    for v in values:
        point: dict[str, Any] = {field: v}
        if field == "seq_len":
            tokens = base_batch_size * base_seq_len
            if tokens % v:
                raise UserError(
                    f"--grid seq_len={v}: tokens per step ({base_batch_size} x {base_seq_len} "
                    f"= {tokens}) must be a multiple of each context length"
                )
            point["batch_size"] = tokens // v
        points.append(point)
    return points


def point_name(point: dict[str, Any], field: str | None) -> str:
    """Directory name of a grid point, e.g. ``seq_len=256``."""
    return "" if field is None else f"{field}={point[field]}"


# -- tidy rows and resumable bookkeeping ---------------------------------------------------------
class Ledger:
    """Append-only ``runs.jsonl``: one row per finished run, keyed by ``row["key"]``.

    A study records each run as it finishes; on resume every recorded key is skipped, so an
    interrupted study continues where it stopped. A torn last line (a kill mid-write) is
    ignored and rewritten away."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            good = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and "key" in row:
                    self.rows[row["key"]] = row
                    good.append(line + "\n")
            self.path.write_text("".join(good), encoding="utf-8")

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def get(self, key: str) -> dict[str, Any] | None:
        return self.rows.get(key)

    def record(self, row: dict[str, Any]) -> None:
        self.rows[row["key"]] = row
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    def select(self, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.rows.values() if all(r.get(k) == v for k, v in match.items())]


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """The rows as CSV (columns: the union of keys in first-seen order; nested values as
    JSON)."""
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow(
                {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()}
            )
