"""Tables and plots of ``compare`` results (with 95% intervals over seeds).

Every function takes a point's results typed (:class:`~spheretorch.train.results.ModelResult`)
or as read from a results.json of any version (v0.2's files show their own statistics, said
so under the table)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .results import ModelResult, coerce_all
from .text import count

__all__ = [
    "grid_table",
    "log_ticks",
    "markdown_table",
    "plot_budgets",
    "plot_curves",
    "plot_grid",
    "write_plots",
]


def sort_key(point: str) -> tuple[int, Any]:
    value = point.split("=", 1)[1]
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


# -- tables --------------------------------------------------------------------------------------
def _fmt(v: Any, spec: str, suffix: str = "") -> str:
    return "-" if v is None else format(v, spec) + suffix


def _ci(mean: Any, ci: Any, spec: str, suffix: str = "") -> str:
    if mean is None:
        return "-"
    if not ci or ci[0] is None:
        return format(mean, spec) + suffix
    return f"{format(mean, spec)}{suffix} [{format(ci[0], spec)}, {format(ci[1], spec)}]"


def _steps_cell(r: ModelResult, is_base: bool) -> str:
    """Steps to target: the Kaplan-Meier median with its interval (an unbounded upper limit
    as ``>N``), the censored seeds counted; v0.2's files as they were (mean, t interval)."""
    n_seeds = len(r.steps_to_target_per_seed) or len(r.seeds)
    if r.statistics == "v0.2":
        steps = r.steps_to_target
        txt = "not reached" if steps is None else _ci(steps, r.steps_to_target_ci, ".0f")
        txt += f" / {r.steps}"
        missing = sum(v is None for v in r.steps_to_target_per_seed)
        if missing and steps is not None:
            txt += f" (not reached in {missing} of {count(n_seeds, 'seed')})"
        if r.steps_to_target_at_first_eval and not is_base:
            txt += (
                f" (at the first evaluation in {count(r.steps_to_target_at_first_eval, 'seed')}: "
                "speedup a lower bound)"
            )
        return txt
    est, (lo, hi) = r.steps_to_target, r.steps_to_target_ci
    if est is None:
        txt = f"not reached (median > {r.steps})"
    elif lo is None and hi is None:
        txt = f"{est:.0f}"
    else:
        upper = f">{r.steps}" if hi is None else format(hi, ".0f")
        txt = f"{est:.0f} [{_fmt(lo, '.0f')}, {upper}]"
    txt += f" / {r.steps}"
    if r.steps_to_target_censored:
        txt += f" ({r.steps_to_target_censored} of {count(n_seeds, 'seed')} censored at {r.steps})"
    if r.steps_to_target_at_first_eval and not is_base:
        txt += (
            f" (at the first evaluation in {count(r.steps_to_target_at_first_eval, 'seed')}: "
            "an upper bound)"
        )
    return txt


def _lr_cell(r: ModelResult) -> str:
    txt = f"{r.lr:g}"
    if r.lr_edge:
        how = "bound reached" if "bound reached" in r.lr_note else "sweep not extended"
        txt += f" (at the {r.lr_edge} edge, {how})"
    elif r.sweep_extensions:
        txt += " (sweep extended: " + ", ".join(f"{x:g}" for x in r.sweep_extensions) + ")"
    elif r.sweep and r.statistics == "v0.2":
        lrs = sorted(float(k) for k in r.sweep)
        if len(lrs) > 1 and r.lr in (lrs[0], lrs[-1]):
            txt += " (edge of the sweep)"
    return txt


def _budget_cell(bs: dict[str, Any]) -> str:
    txt = _ci(bs.get("speedup"), [bs.get("lo"), bs.get("hi")], ".2f", "x")
    how = bs.get("how")
    if how == "extrapolated":
        txt += " (extrapolated, not measured)"
    elif how == "at most":
        txt = ">= " + txt + " (below target at every budget)"
    elif how == "never":
        txt = "not reached at any budget"
    return txt


def markdown_table(
    results: Mapping[str, ModelResult | Mapping[str, Any]],
    preset: str = "",
    point: str | None = None,
) -> str:
    """The per-model table of one (grid) point; ``results`` typed or as read from any
    version's results.json."""
    res = coerce_all(results)
    names = list(res)
    first = res[names[0]]
    base = first.baseline
    base_ms = res[base].ms_per_step if base in res else None
    target = first.target_val_loss
    n_seeds = len(first.seeds)
    budgets = first.budgets
    old = first.statistics == "v0.2"
    where = f"Preset `{preset}`" + (f", {point}" if point else "")
    lines = [
        f"{where}; {count(n_seeds, 'seed')}; target = {base}'s final val loss"
        + (f" ({target:.4f})" if target is not None else "")
        + (
            "; [95% intervals over seeds: Student-t for losses"
            + (", Kaplan-Meier for steps to target]" if not old else "]")
            if n_seeds > 1
            else ""
        ),
        "",
    ]
    head = "| model | lr | final val loss | steps to target | speedup (steps) |"
    rule = "|---|---|---|---|---|"
    if len(budgets) > 1:
        head += " iso-loss speedup (budgets) |"
        rule += "---|"
    head += f" ms/step | time/step vs {base} |"
    rule += "---|---|"
    lines += [head, rule]
    for name in names:
        r = res[name]
        rel = r.ms_per_step / base_ms if (base_ms and r.ms_per_step) else None
        loss = _ci(r.final_val_loss, r.final_val_loss_ci, ".4f")
        if r.speedup is None and not old and name != base:
            speed = "-" if r.steps_to_target is None else _ci(r.speedup, r.speedup_ci, ".2f", "x")
        else:
            speed = _ci(r.speedup, r.speedup_ci, ".2f", "x")
        line = f"| {name} | {_lr_cell(r)} | {loss} | {_steps_cell(r, name == base)} | {speed} |"
        if len(budgets) > 1:
            line += f" {_budget_cell(r.budget_speedup or {})} |"
        line += f" {_fmt(r.ms_per_step, '.1f')} | {_fmt(rel, '.2f', 'x')} |"
        lines.append(line)
    if not old:
        lines += ["", *_to_target_table(res)]
    lines += ["", _notes(first, len(budgets) > 1)]
    edges = [n for n in names if res[n].lr_edge]
    if edges:
        lines += [
            "",
            "LR at the edge of the sweep (the optimum may lie beyond): "
            + "; ".join(f"{n}: {res[n].lr_note}" for n in edges)
            + ".",
        ]
    return "\n".join(lines)


def _to_target_table(res: dict[str, ModelResult]) -> list[str]:
    """Tokens and wall-clock seconds to the target (steps x tokens per step, steps x the
    steady ms/step): Kaplan-Meier medians with their intervals."""

    def cell(est: float | None, ci: list[float | None], r: ModelResult, spec: str, k: float) -> str:
        if est is None:
            return f"not reached (> {format(r.steps * k, spec)})" if k else "-"
        lo, hi = ci
        if lo is None and hi is None:
            return format(est, spec)
        upper = f">{format(r.steps * k, spec)}" if hi is None else format(hi, spec)
        return f"{format(est, spec)} [{_fmt(lo, spec)}, {upper}]"

    lines = ["| model | tokens to target | wall-clock to target (s) |", "|---|---|---|"]
    for name, r in res.items():
        tps = (r.batch_size or 0) * (r.seq_len or 0)
        sec = (r.ms_per_step or 0) / 1000
        tok = cell(r.tokens_to_target, r.tokens_to_target_ci, r, ",.0f", tps)
        wall = cell(r.wall_s_to_target, r.wall_s_to_target_ci, r, ".3g", sec)
        lines.append(f"| {name} | {tok} | {wall} |")
    return lines


def _notes(first: ModelResult, budgets: bool) -> str:
    if first.statistics == "v0.2":
        steps = (
            "Steps to target (v0.2 statistics): within the full run, interpolated (log-log) "
            "between evaluations; mean and Student-t interval over the seeds that reached the "
            "target (seeds that never did are left out, which biases the mean down and lets "
            "the interval go negative); speedup (steps) = the baseline's steps / the model's, "
            "per seed, same interval. "
        )
    else:
        steps = (
            "Steps to target: within the full run, interpolated (log-log) between "
            "evaluations; Kaplan-Meier median over seeds, a seed that never reached the "
            "target censored at the run's steps, with the interval from the log-log band "
            "(an upper limit beyond the runs shown as >N); speedup (steps): 1 / the median of "
            "the per-seed ratio model / baseline steps, censored likewise (interval "
            "reciprocal, lower limit 0 when unbounded). "
        )
    if budgets:
        steps += (
            "Iso-loss speedup: the budget (the fraction of the steps actually run, each run "
            "with its own schedule) at which the model's mean loss reaches the target, "
            "log-log interpolated (extrapolated at most 2-fold, and marked); interval: paired "
            "percentile bootstrap over seeds (a resample that never reaches it counts 0). "
        )
    if first.ms_per_step_source == "interleaved":
        steps += (
            "ms/step: the interleaved timing printed above (median of round-robin rounds on "
            "fresh models, after warm-up steps); each run's own average, which includes "
            "whatever load hit that run alone, is `ms_per_step_full_run` in results.json."
        )
    else:
        steps += "ms/step: mean of the full runs' own averages."
    return steps


def grid_table(
    results: Mapping[str, Mapping[str, ModelResult | Mapping[str, Any]]], field_name: str
) -> str:
    """One row per grid point: final loss and speedups of every model (extrapolated
    iso-loss speedups marked ``*``)."""
    typed = {pt: coerce_all(res) for pt, res in results.items()}
    points = list(typed)
    labels = list(typed[points[0]])
    first = typed[points[0]][labels[0]]
    budgets = len(first.budgets) > 1
    head = f"| {field_name} | " + " | ".join(f"{m} final val loss" for m in labels)
    rule = "|---|" + "---|" * len(labels)
    base = first.baseline
    others = [m for m in labels if m != base]
    for m in others:
        head += f" | {m} speedup {'(iso-loss)' if budgets else '(steps)'}"
        rule += "---|"
    lines = [head + " |", rule]
    marked = False
    for pt in points:
        res = typed[pt]
        cells = [pt.split("=", 1)[1]]
        cells += [_ci(res[m].final_val_loss, res[m].final_val_loss_ci, ".3f") for m in labels]
        for m in others:
            if budgets:
                bs = res[m].budget_speedup or {}
                cell = _ci(bs.get("speedup"), [bs.get("lo"), bs.get("hi")], ".2f", "x")
                if bs.get("how") == "extrapolated":
                    cell, marked = cell + " *", True
                elif bs.get("how") == "at most":
                    cell = ">= " + cell
                cells.append(cell)
            else:
                cells.append(_ci(res[m].speedup, res[m].speedup_ci, ".2f", "x"))
        lines.append("| " + " | ".join(cells) + " |")
    old = first.statistics == "v0.2"
    if marked:
        limit = "" if old else " (at most 2-fold)"
        lines += ["", f"\\* extrapolated beyond the measured budgets{limit}, not measured."]
    if old:
        lines += [
            "",
            "(v0.2 statistics: steps-to-target speedups are means with Student-t intervals "
            "over the seeds that reached the target, iso-loss extrapolation was unlimited; "
            "`benchmarks/rederive_study.py` gives the current ones from the same runs.)",
        ]
    return "\n".join(lines)


# -- plots ---------------------------------------------------------------------------------------
def log_ticks(ax: Any, values: list[float], axis: str = "x") -> None:
    """Readable plain-number ticks on a log axis (matplotlib labels only powers of ten): the
    1-2-5 sequence inside the data's range plus its ends, or the data's own values when
    that gives fewer than three ticks; minor tick labels off."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    lo, hi = min(values), max(values)
    ticks = {
        m * 10.0**k
        for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
        for m in (1, 2, 5)
        if lo <= m * 10.0**k <= hi
    }
    if len(ticks) < 3:
        uniq = sorted(set(values))
        ticks = set(uniq[:: max(1, len(uniq) // 6)])
    ticks |= {lo, hi}
    # drop ticks crowding a neighbour (closer than 15% on the log scale)
    kept: list[float] = []
    for t in sorted(ticks):
        if not kept or t / kept[-1] > 1.15 or t == hi:
            if kept and t == hi and t / kept[-1] <= 1.15 and len(kept) > 1:
                kept.pop()
            kept.append(t)
    a = ax.xaxis if axis == "x" else ax.yaxis
    a.set_major_locator(FixedLocator(kept))
    a.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    a.set_minor_formatter(NullFormatter())


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_curves(
    results: Mapping[str, ModelResult | Mapping[str, Any]], path: str | Path, title: str = ""
) -> None:
    """Validation loss against step (log axis): the mean over seeds with its 95% band (or the
    single run with its training loss dashed)."""
    plt = _pyplot()
    res = coerce_all(results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    all_steps: list[int] = []
    for i, (name, r) in enumerate(res.items()):
        color = f"C{i}"
        curve = r.curve
        n = len(r.seeds)
        if curve and n > 1:
            pts = [
                (s, m, lo, hi)
                for s, m, lo, hi in zip(curve["step"], curve["mean"], curve["lo"], curve["hi"])
                if m is not None
            ]
            if not pts:
                continue
            st, m, lo, hi = zip(*pts)
            ax.plot(st, m, color=color, label=f"{name} (lr {r.lr:g}, mean of {count(n, 'seed')})")
            if all(v is not None for v in lo + hi):
                ax.fill_between(st, lo, hi, color=color, alpha=0.2, lw=0)
            all_steps += list(st)
            continue
        h = [row for row in r.history if row.get("val_loss") is not None]
        if not h:
            continue
        steps = [row["step"] for row in h]
        all_steps += steps
        ax.plot(
            steps, [row["val_loss"] for row in h], color=color, label=f"{name} val (lr {r.lr:g})"
        )
        tr = [(row["step"], row["train_loss"]) for row in h if row.get("train_loss") is not None]
        if tr:
            ax.plot(*zip(*tr), color=color, ls="--", alpha=0.5, lw=1)
    _finish(ax, res, all_steps, "step", "validation loss (nats/token)")
    ax.set_title(f"loss curves {title}".strip())
    _save(fig, path)


def plot_budgets(
    results: Mapping[str, ModelResult | Mapping[str, Any]], path: str | Path, title: str = ""
) -> None:
    """Final validation loss against the steps each budget actually ran (log-log) with 95%
    error bars over seeds."""
    plt = _pyplot()
    res = coerce_all(results)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    steps_all: list[int] = []
    for i, (name, r) in enumerate(res.items()):
        pts = [
            (st, c) for st, c in zip(r.budget_steps, r.loss_by_budget) if c.get("mean") is not None
        ]
        if not pts:
            continue
        st = [s for s, _ in pts]
        steps_all += st
        m = [c["mean"] for _, c in pts]
        err = [
            [0.0 if c["lo"] is None else c["mean"] - c["lo"] for _, c in pts],
            [0.0 if c["hi"] is None else c["hi"] - c["mean"] for _, c in pts],
        ]
        ax.errorbar(st, m, yerr=err, fmt="o-", color=f"C{i}", capsize=3, label=name)
    xlabel = "training steps run (each budget its own schedule)"
    _finish(ax, res, steps_all, xlabel, "final validation loss")
    ax.set_title(f"loss vs budget {title}".strip())
    _save(fig, path)


def _finish(
    ax: Any, results: dict[str, ModelResult], steps: list[int], xlabel: str, ylabel: str
) -> None:
    """Target line, log-step axis with readable ticks, labels, grid and legend."""
    target = next(iter(results.values())).target_val_loss
    if target is not None:
        ax.axhline(target, color="gray", lw=0.8, ls=":", label="target")
    ax.set_xscale("log")
    if steps:
        log_ticks(ax, steps)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def _save(fig: Any, path: str | Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def plot_grid(
    results: Mapping[str, Mapping[str, ModelResult | Mapping[str, Any]]],
    field_name: str,
    path: str | Path,
) -> None:
    """Final loss (left) and speedup over the baseline (right) against the grid field, with
    95% error bars over seeds. An extrapolated iso-loss speedup is drawn hollow (and named in
    the legend), never as a measured point."""
    plt = _pyplot()
    typed = {pt: coerce_all(res) for pt, res in results.items()}
    points = list(typed)
    numeric = all(sort_key(pt)[0] == 0 for pt in points)
    xs = [float(pt.split("=", 1)[1]) if numeric else i for i, pt in enumerate(points)]
    labels = list(typed[points[0]])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    extrapolated = False
    for i, m in enumerate(labels):
        rs = [typed[pt][m] for pt in points]
        mean = [r.final_val_loss if r.final_val_loss is not None else math.nan for r in rs]
        lo = [r.final_val_loss_ci[0] for r in rs]
        hi = [r.final_val_loss_ci[1] for r in rs]
        err = [[mu - lw if lw is not None else 0 for mu, lw in zip(mean, lo)],
               [h - mu if h is not None else 0 for mu, h in zip(mean, hi)]]  # fmt: skip
        a1.errorbar(xs, mean, yerr=err, fmt="o-", color=f"C{i}", capsize=3, label=m)
        if m == rs[0].baseline:
            continue
        sp, sl, sh, hollow = [], [], [], []
        for r in rs:
            bs = r.budget_speedup
            if bs:
                s, lw, h = bs.get("speedup"), bs.get("lo"), bs.get("hi")
            else:
                s, (lw, h) = r.speedup, r.speedup_ci
            sp.append(s if s is not None else math.nan)
            sl.append(0 if lw is None or s is None else s - lw)
            sh.append(0 if h is None or s is None else h - s)
            hollow.append(bool(bs) and bs.get("how") == "extrapolated")
        color = f"C{i}"
        measured = [v if not e else math.nan for v, e in zip(sp, hollow)]
        a2.errorbar(xs, measured, yerr=[sl, sh], fmt="o-", color=color, capsize=3, label=m)
        if any(hollow):
            extrapolated = True
            a2.plot(
                [x for x, e in zip(xs, hollow) if e],
                [v for v, e in zip(sp, hollow) if e],
                "o",
                mfc="none",
                color=color,
                label=f"{m} (extrapolated, not measured)",
            )
    a2.axhline(1.0, color="gray", lw=0.8, ls=":")
    for a in (a1, a2):
        if numeric and min(xs) > 0:
            a.set_xscale("log", base=2)
        a.set_xticks(xs)
        a.set_xticklabels([pt.split("=", 1)[1] for pt in points])
        a.minorticks_off()
        a.set_xlabel(field_name)
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    a1.set_ylabel("final validation loss")
    a2.set_ylabel("speedup over baseline" + (" (hollow: extrapolated)" if extrapolated else ""))
    _save(fig, path)


def write_plots(
    out: Path, results: Mapping[str, ModelResult | Mapping[str, Any]], preset: str, point: str
) -> None:
    suffix = f"_{point}" if point else ""
    plot_curves(results, out / f"loss_curves{suffix}.png", title=f"preset {preset} {point}".strip())
    first = next(iter(coerce_all(results).values()))
    if len(first.budgets) > 1:
        plot_budgets(results, out / f"loss_vs_budget{suffix}.png", title=point)
