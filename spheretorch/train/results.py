"""Typed results of a ``compare`` study: one :class:`RunResult` per training run (a row of
``runs.jsonl``), one :class:`SweepResult` per model's LR sweep, one :class:`ModelResult` per
model and grid point (an entry of ``results.json``), and :func:`summarize` that turns runs
into model results with the statistics of :mod:`spheretorch.train.stats`.

``results.json`` keeps the names it always had (per model: ``final_val_loss``,
``steps_to_target``, ``ms_per_step``, ``lr``, ...); ``ModelResult.from_dict`` reads the files
of earlier versions too (fields they lack take their defaults; ``statistics`` then says
``"v0.2"``: Student-t intervals over the seeds that reached the target, censored seeds
dropped).
"""

from __future__ import annotations

import dataclasses
import math
import statistics as pystats
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import stats
from .specs import ModelSpec

__all__ = ["STATISTICS", "ModelResult", "RunResult", "SweepResult", "summarize"]

#: names the statistics a results file was made with (absent from v0.2's files)
STATISTICS = "v0.3: Kaplan-Meier medians with censoring; positive intervals"


@dataclass
class RunResult:
    """One finished run: a row of ``runs.jsonl`` / ``runs.csv``."""

    key: str
    phase: str  # "sweep" or "full"
    model: str  # the label
    family: str
    options: dict[str, Any]
    optim: str
    seed: int
    lr: float
    budget: float  # the nominal fraction asked for
    steps: int
    batch_size: int
    seq_len: int
    n_layer: int
    d_model: int
    tokens_per_step: int
    final_val_loss: float | None
    final_train_loss: float | None
    diverged: bool
    ms_per_step: float | None
    wall_s: float
    n_params: int
    dir: str
    warmup_steps: int = 0
    param_dtype: str = "float32"
    grid: str | None = None
    grid_point: dict[str, Any] = field(default_factory=dict)
    history: list[list[float | None]] = field(default_factory=list)  # [step, val, train]

    def to_row(self) -> dict[str, Any]:
        """The ledger's row: the fields, with the grid point also flat (``grid_seq_len``)."""
        row = dataclasses.asdict(self)
        row.update({f"grid_{k}": v for k, v in self.grid_point.items()})
        return row

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> RunResult:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in row.items() if k in names}
        if "grid_point" not in row:  # v0.2 rows: the point only as grid_FIELD columns
            kw["grid_point"] = {
                k[5:]: v for k, v in row.items() if k.startswith("grid_") and k != "grid_point"
            }
        return cls(**kw)

    def curve(self) -> list[dict[str, Any]]:
        return [{"step": s, "val_loss": v, "train_loss": t} for s, v, t in self.history]


@dataclass
class SweepResult:
    """One model's LR sweep: every candidate's final validation loss (``None``: diverged),
    the LRs added beyond the edge, the choice, and ``edge`` (``"low"``/``"high"`` when the
    choice is still at that end of the candidates: the bound was reached or every further
    candidate failed; ``None`` when it is interior)."""

    losses: dict[float, float | None]
    chosen: float
    extensions: list[float] = field(default_factory=list)
    edge: str | None = None
    note: str = ""


@dataclass
class ModelResult:
    """One model's results (at one grid point): the entry of ``results.json``."""

    model: str
    lr: float
    final_val_loss: float | None
    steps_to_target: float | None
    ms_per_step: float | None
    options: dict[str, Any] = field(default_factory=dict)
    optim: str | None = None
    baseline: str = ""
    target_val_loss: float | None = None
    sweep: dict[str, float | None] = field(default_factory=dict)
    sweep_extensions: list[float] = field(default_factory=list)
    lr_edge: str | None = None
    lr_note: str = ""
    seeds: list[int] = field(default_factory=lambda: [0])
    final_val_loss_ci: list[float | None] = field(default_factory=lambda: [None, None])
    final_val_loss_per_seed: list[float | None] = field(default_factory=list)
    diverged_runs: int = 0
    steps_to_target_ci: list[float | None] = field(default_factory=lambda: [None, None])
    steps_to_target_per_seed: list[float | None] = field(default_factory=list)
    steps_to_target_censored: int = 0
    steps_to_target_at_first_eval: int = 0
    tokens_to_target: float | None = None
    tokens_to_target_ci: list[float | None] = field(default_factory=lambda: [None, None])
    wall_s_to_target: float | None = None
    wall_s_to_target_ci: list[float | None] = field(default_factory=lambda: [None, None])
    speedup: float | None = None
    speedup_ci: list[float | None] = field(default_factory=lambda: [None, None])
    budgets: list[float] = field(default_factory=lambda: [1.0])
    budget_fractions: list[float] | None = None
    budget_steps: list[int] = field(default_factory=list)
    loss_by_budget: list[dict[str, Any]] = field(default_factory=list)
    budget_speedup: dict[str, Any] | None = None
    ms_per_step_source: str = "interleaved"
    ms_per_step_full_run: float | None = None
    steps: int = 0
    n_params: int | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    warmup_steps: int | None = None
    param_dtype: str = "float32"
    wall_s: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    curve: dict[str, list[Any]] | None = None
    statistics: str = "v0.2"

    @property
    def fractions(self) -> list[float]:
        """The budgets as run, steps / full steps (v0.2's files hold the nominal ones)."""
        if self.budget_fractions is not None:
            return self.budget_fractions
        return list(self.budgets)

    @property
    def censored_upper(self) -> bool:
        """The steps-to-target interval has no upper limit within the runs."""
        return (
            self.statistics != "v0.2"
            and self.steps_to_target_ci[1] is None
            and (self.steps_to_target_ci[0] is not None)
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelResult:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("final_val_loss", "steps_to_target", "ms_per_step"):
            kw.setdefault(k, None)
        kw.setdefault("model", "")
        kw.setdefault("lr", math.nan)
        return cls(**kw)

    @classmethod
    def coerce(cls, r: ModelResult | Mapping[str, Any]) -> ModelResult:
        return r if isinstance(r, ModelResult) else cls.from_dict(r)


def coerce_all(results: Mapping[str, ModelResult | Mapping[str, Any]]) -> dict[str, ModelResult]:
    """A point's results (typed, or as read from any version's results.json) typed."""
    return {k: ModelResult.coerce(v) for k, v in results.items()}


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _curve(histories: list[list[dict[str, Any]]]) -> dict[str, list[Any]]:
    """Mean validation loss per evaluated step over seeds, with its 95% interval."""
    by_step: dict[int, list[float | None]] = {}
    for h in histories:
        for row in h:
            by_step.setdefault(row["step"], []).append(row["val_loss"])
    steps = sorted(by_step)
    cis = [stats.mean_ci(by_step[s]) for s in steps]
    return {
        "step": steps,
        "mean": [c.estimate for c in cis],
        "lo": [c.lo for c in cis],
        "hi": [c.hi for c in cis],
    }


def _scaled(iv: stats.Interval, k: float | None) -> tuple[float | None, list[float | None]]:
    """An interval of steps as one of tokens or seconds (``k`` per step)."""
    if k is None:
        return None, [None, None]
    est, lo, hi = (None if v is None else v * k for v in (iv.estimate, iv.lo, iv.hi))
    return est, [lo, hi]


def pick_baseline(specs: Sequence[ModelSpec]) -> str:
    """The first plain GPT (own recipe, no options), else the first GPT, else the first."""
    for s in specs:
        if s.is_default_gpt:
            return s.label
    return next((s.label for s in specs if s.model == "gpt"), specs[0].label)


def summarize(
    specs: Sequence[ModelSpec],
    runs: Mapping[tuple[str, int, float], RunResult],
    seeds: Sequence[int],
    budget_steps: Mapping[float, int],
    sweeps: Mapping[str, SweepResult],
    timing: Mapping[str, float],
) -> dict[str, ModelResult]:
    """Every model's :class:`ModelResult` from its full runs ``runs[(label, seed, budget)]``.

    The target of seed i is the baseline's final validation loss on seed i (paired: a seed fixes
    the batches for every model). Steps to target per seed within the full run; a seed that
    never reaches it is censored at the run's steps
    (:func:`~spheretorch.train.stats.km_median`). Tokens and wall-clock to target scale the
    steps by the tokens per step and the steady ms/step.
    """
    budgets = sorted(budget_steps)
    full_steps = budget_steps[1.0]
    fractions = [budget_steps[b] / full_steps for b in budgets]
    baseline = pick_baseline(specs)

    def losses(label: str) -> np.ndarray:
        return np.array(
            [
                [
                    math.nan if (v := runs[(label, s, b)].final_val_loss) is None else v
                    for b in budgets
                ]
                for s in seeds
            ]
        )

    def history(label: str, s: int) -> list[dict[str, Any]]:
        return runs[(label, s, 1.0)].curve()

    base_losses = losses(baseline)
    base_final = stats.mean_ci(base_losses[:, -1])
    base_steps = [
        stats.steps_to_target(history(baseline, s), _finite(base_losses[i, -1]))
        for i, s in enumerate(seeds)
    ]
    results: dict[str, ModelResult] = {}
    for spec in specs:
        label = spec.label
        L = losses(label)
        final = stats.mean_ci(L[:, -1])
        full = [runs[(label, s, 1.0)] for s in seeds]
        per_seed: list[float | None] = []
        reached: list[bool] = []
        at_first = 0
        for i, s in enumerate(seeds):
            target = _finite(base_losses[i, -1])
            h = history(label, s)
            st = stats.steps_to_target(h, target)
            at_first += bool(h and st is not None and st == h[0]["step"])
            per_seed.append(st)
            reached.append(st is not None)
        times: list[float | None] = []
        for i, st in enumerate(per_seed):
            if not math.isfinite(base_losses[i, -1]) or (st is None and full[i].diverged):
                times.append(None)  # no target, or a diverged run: no time at all
            else:  # a seed that never reached the target is censored at the run's steps
                times.append(float(full[i].steps) if st is None else st)
        stt = stats.km_median(times, reached)
        spd = stats.censored_speedup(base_steps, per_seed, [float(r.steps) for r in full])
        own_ms = [r.ms_per_step for r in full if r.ms_per_step]
        ms = timing.get(label, pystats.mean(own_ms) if own_ms else None)
        tps = full[0].tokens_per_step

        tok, tok_ci = _scaled(stt, tps)
        wall, wall_ci = _scaled(stt, None if ms is None else ms / 1000)
        sweep = sweeps.get(label)
        r = ModelResult(
            model=spec.model,
            options=spec.options,
            optim=full[0].optim,
            lr=full[0].lr,
            sweep={f"{lr:g}": v for lr, v in sorted(sweep.losses.items())} if sweep else {},
            sweep_extensions=list(sweep.extensions) if sweep else [],
            lr_edge=sweep.edge if sweep else None,
            lr_note=sweep.note if sweep else "no sweep: the preset's LR",
            seeds=list(seeds),
            final_val_loss=final.estimate,
            final_val_loss_ci=final.ci,
            final_val_loss_per_seed=[_finite(v) for v in L[:, -1]],
            diverged_runs=int(sum(r.diverged for r in full)),
            target_val_loss=base_final.estimate,
            baseline=baseline,
            steps_to_target=stt.estimate,
            steps_to_target_ci=stt.ci,
            steps_to_target_per_seed=per_seed,
            steps_to_target_censored=stt.n_censored,
            steps_to_target_at_first_eval=at_first,
            tokens_to_target=tok,
            tokens_to_target_ci=tok_ci,
            wall_s_to_target=wall,
            wall_s_to_target_ci=wall_ci,
            speedup=spd.estimate,
            speedup_ci=spd.ci,
            budgets=list(budgets),
            budget_fractions=fractions,
            budget_steps=[budget_steps[b] for b in budgets],
            loss_by_budget=[stats.mean_ci(L[:, k]).to_dict() for k in range(len(budgets))],
            ms_per_step=ms,
            ms_per_step_source="interleaved" if label in timing else "own runs",
            ms_per_step_full_run=pystats.mean(own_ms) if own_ms else None,
            steps=full_steps,
            n_params=full[0].n_params,
            batch_size=full[0].batch_size,
            seq_len=full[0].seq_len,
            warmup_steps=full[0].warmup_steps,
            param_dtype=full[0].param_dtype,
            wall_s=sum(rw.wall_s for (lab, _, _), rw in runs.items() if lab == label),
            history=history(label, seeds[0]),
            curve=_curve([history(label, s) for s in seeds]),
            statistics=STATISTICS,
        )
        if len(budgets) > 1 and label == baseline:  # 1 by definition (a noisy curve may dip)
            r.budget_speedup = {"speedup": 1.0, "how": "baseline", "lo": 1.0, "hi": 1.0}
        elif len(budgets) > 1:
            r.budget_speedup = stats.bootstrap_speedup(fractions, base_losses, L)
        results[label] = r
    return results
