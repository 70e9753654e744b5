"""The pieces of ``compare`` studies under their v0.2 names (kept importable).

Statistics live in :mod:`spheretorch.train.stats`, parsing in :mod:`spheretorch.train.specs`,
the run ledger in :mod:`spheretorch.train.ledger`.
"""

from __future__ import annotations

from .ledger import Ledger, write_csv
from .specs import (
    _coerce,
    grid_fields,
    grid_points,
    model_fields,
    parse_budgets,
    parse_grid,
    point_name,
)
from .stats import (
    CONFIDENCE,
    bootstrap_speedup,
    budget_to_reach,
    speedup,
    steps_to_target,
    t_quantile,
)
from .stats import mean_ci as _mean_ci

__all__ = [
    "CONFIDENCE",
    "Ledger",
    "bootstrap_speedup",
    "budget_to_reach",
    "grid_fields",
    "grid_points",
    "mean_ci",
    "model_fields",
    "parse_budgets",
    "parse_grid",
    "point_name",
    "speedup",
    "steps_to_target",
    "t_quantile",
    "write_csv",
]
_ = _coerce


def mean_ci(values, confidence=CONFIDENCE):  # type: ignore[no-untyped-def]
    """v0.2's form of :func:`spheretorch.train.stats.mean_ci`: a dict ``{"mean", "lo", "hi",
    "n", "n_missing"}``."""
    return _mean_ci(values, confidence).to_dict()
