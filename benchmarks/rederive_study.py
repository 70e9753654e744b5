"""Re-derive a committed study's tables with the current statistics, without training again.

    python benchmarks/rederive_study.py benchmarks/results/study_context [...]

Reads the study's ``results.json`` (per-seed steps to target, sweeps, timings) and
``runs.csv`` (every full run's final loss), recomputes steps to target as Kaplan-Meier medians
with censoring, the per-seed speedup likewise, the iso-loss speedups with the fractions the
budgets actually ran and the extrapolation limit, marks LRs at the edge of their sweep, and
writes ``rederived.json`` and ``rederived.md`` next to them (the originals stay as the old
code wrote them).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from spheretorch.train import stats  # noqa: E402
from spheretorch.train.report import grid_table, markdown_table  # noqa: E402
from spheretorch.train.results import STATISTICS, ModelResult  # noqa: E402


def _losses(rows: list[dict[str, str]], point: str, label: str, seeds: list[int], budgets):
    """(n_seeds, n_budgets) final losses of the full runs (NaN: diverged)."""
    out = np.full((len(seeds), len(budgets)), np.nan)
    for r in rows:
        if r["phase"] != "full" or r["model"] != label or (r.get("grid") or "") != point:
            continue
        i, j = seeds.index(int(r["seed"])), budgets.index(float(r["budget"]))
        out[i, j] = float(r["final_val_loss"]) if r["final_val_loss"] else np.nan
    return out


def rederive_point(old: dict[str, Any], rows: list[dict[str, str]], point: str) -> dict:
    typed = {k: ModelResult.from_dict(v) for k, v in old.items()}
    base = typed[next(iter(typed))].baseline
    b = typed[base]
    n = b.steps
    base_steps = b.steps_to_target_per_seed
    budgets = b.budgets
    fractions = [s / n for s in b.budget_steps] if b.budget_steps else list(budgets)
    base_l = _losses(rows, point, base, b.seeds, budgets)
    for label, r in typed.items():
        per_seed = r.steps_to_target_per_seed
        times = [n if v is None else v for v in per_seed]
        km = stats.km_median(times, [v is not None for v in per_seed])
        spd = stats.censored_speedup(base_steps, per_seed, [float(n)] * len(per_seed))
        r.steps_to_target, r.steps_to_target_ci = km.estimate, km.ci
        r.steps_to_target_censored = km.n_censored
        r.speedup, r.speedup_ci = spd.estimate, spd.ci
        tps = (r.batch_size or 0) * (r.seq_len or 0)
        scale = [(tps, "tokens_to_target"), ((r.ms_per_step or 0) / 1000, "wall_s_to_target")]
        for k, name in scale:
            f = lambda v, k=k: None if v is None else v * k  # noqa: E731
            setattr(r, name, f(km.estimate))
            setattr(r, name + "_ci", [f(km.lo), f(km.hi)])
        r.budget_fractions = fractions
        if len(budgets) > 1 and label != base:
            model_l = _losses(rows, point, label, r.seeds, budgets)
            r.budget_speedup = stats.bootstrap_speedup(fractions, base_l, model_l)
        lrs = sorted(float(x) for x in r.sweep)
        if len(lrs) > 1 and r.lr in (lrs[0], lrs[-1]):
            r.lr_edge = "low" if r.lr == lrs[0] else "high"
            r.lr_note = (
                f"at the {r.lr_edge} edge of the sweep {', '.join(f'{x:g}' for x in lrs)} "
                "(these runs predate the automatic extension)"
            )
        r.statistics = STATISTICS + " (re-derived from the v0.2 runs)"
    return {k: v.to_dict() for k, v in typed.items()}


def rederive(study: Path) -> str:
    old = json.loads((study / "results.json").read_text(encoding="utf-8"))
    with open(study / "runs.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    preset = json.loads((study / "run_info.json").read_text(encoding="utf-8"))["preset"]["name"]
    grid = all("=" in k for k in old)
    if grid:
        new = {pt: rederive_point(res, rows, pt) for pt, res in old.items()}
        field = next(iter(new)).split("=", 1)[0]
        tables = [grid_table(new, field)]
        tables += [markdown_table(res, preset, point=pt) for pt, res in new.items()]
    else:
        new = rederive_point(old, rows, "")
        tables = [markdown_table(new, preset)]
    text = "\n\n".join(tables)
    (study / "rederived.json").write_text(json.dumps(new, indent=2) + "\n", encoding="utf-8")
    (study / "rederived.md").write_text(
        f"Re-derived from `results.json` and `runs.csv` with {STATISTICS} "
        f"(`benchmarks/rederive_study.py`); no run was repeated.\n\n{text}\n",
        encoding="utf-8",
    )
    return text


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["benchmarks/results/study_context"]:
        print(rederive(Path(arg)))
