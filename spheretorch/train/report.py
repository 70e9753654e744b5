"""Tables and plots of ``compare`` results (means with 95% intervals over seeds)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

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


def markdown_table(results: dict[str, Any], preset: str = "", point: str | None = None) -> str:
    """The per-model table (means with Student-t 95% intervals over seeds)."""
    names = list(results)
    first = results[names[0]]
    base = first["baseline"]
    base_ms = results[base]["ms_per_step"] if base in results else None
    target = first["target_val_loss"]
    n_seeds = len(first.get("seeds", [0]))
    budgets = first.get("budgets", [1.0])
    where = f"Preset `{preset}`" + (f", {point}" if point else "")
    lines = [
        f"{where}; {n_seeds} seed{'s' * (n_seeds > 1)}; target = {base}'s final val loss"
        + (f" ({target:.4f})" if target is not None else "")
        + ("; [95% Student-t interval over seeds]" if n_seeds > 1 else ""),
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
        r = results[name]
        rel = r["ms_per_step"] / base_ms if (base_ms and r["ms_per_step"]) else None
        steps = r["steps_to_target"]
        steps_txt = (
            "not reached" if steps is None else _ci(steps, r.get("steps_to_target_ci"), ".0f")
        ) + f" / {r['steps']}"
        per_seed = r.get("steps_to_target_per_seed") or []
        missing = sum(v is None for v in per_seed)
        if missing and steps is not None:
            steps_txt += f" (not reached in {missing} of {count(len(per_seed), 'seed')})"
        n_first = r.get("steps_to_target_at_first_eval", 0) if name != base else 0
        if n_first:
            steps_txt += (
                f" (at the first evaluation in {count(n_first, 'seed')}: speedup a lower bound)"
            )
        loss = _ci(r["final_val_loss"], r.get("final_val_loss_ci"), ".4f")
        speed = _ci(r["speedup"], r.get("speedup_ci"), ".2f", "x")
        line = f"| {name} | {r['lr']:g} | {loss} | {steps_txt} | {speed} |"
        if len(budgets) > 1:
            bs = r.get("budget_speedup") or {}
            txt = _ci(bs.get("speedup"), [bs.get("lo"), bs.get("hi")], ".2f", "x")
            if bs.get("how") == "extrapolated":
                txt += " (extrapolated)"
            elif bs.get("how") == "at most":
                txt = ">= " + txt + " (below target at every budget)"
            line += f" {txt} |"
        line += f" {_fmt(r['ms_per_step'], '.1f')} | {_fmt(rel, '.2f', 'x')} |"
        lines.append(line)
    source = first.get("ms_per_step_source", "interleaved")
    lines += [
        "",
        "Steps to target: within the full run, interpolated (log-log) between evaluations; "
        "speedup (steps) = the baseline's steps / the model's, per seed. "
        + (
            "Iso-loss speedup: the budget (fraction of the steps, each run with its own "
            "schedule) at which the model's mean loss reaches the target, log-log interpolated;"
            " interval: paired bootstrap over seeds. "
            if len(budgets) > 1
            else ""
        )
        + (
            "ms/step: the interleaved timing printed above (median of round-robin rounds on "
            "fresh models); each run's own average, which includes whatever load hit that run "
            "alone, is `ms_per_step_full_run` in results.json."
            if source == "interleaved"
            else "ms/step: mean of the full runs' own averages."
        ),
    ]
    return "\n".join(lines)


def grid_table(results: dict[str, dict[str, Any]], field_name: str) -> str:
    """One row per grid point: final loss and speedups of every model."""
    points = list(results)
    labels = list(results[points[0]])
    budgets = len(results[points[0]][labels[0]].get("budgets", [1])) > 1
    head = f"| {field_name} | " + " | ".join(f"{m} final val loss" for m in labels)
    rule = "|---|" + "---|" * len(labels)
    base = results[points[0]][labels[0]]["baseline"]
    others = [m for m in labels if m != base]
    for m in others:
        head += f" | {m} speedup {'(iso-loss)' if budgets else '(steps)'}"
        rule += "---|"
    lines = [head + " |", rule]
    for pt in points:
        res = results[pt]
        cells = [pt.split("=", 1)[1]]
        cells += [
            _ci(res[m]["final_val_loss"], res[m].get("final_val_loss_ci"), ".3f") for m in labels
        ]
        for m in others:
            if budgets:
                bs = res[m].get("budget_speedup") or {}
                cells.append(_ci(bs.get("speedup"), [bs.get("lo"), bs.get("hi")], ".2f", "x"))
            else:
                cells.append(_ci(res[m]["speedup"], res[m].get("speedup_ci"), ".2f", "x"))
        lines.append("| " + " | ".join(cells) + " |")
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


def plot_curves(results: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Validation loss against step (log axis): the mean over seeds with its 95% band (or the
    single run with its training loss dashed)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    all_steps: list[int] = []
    for i, (name, r) in enumerate(results.items()):
        color = f"C{i}"
        curve = r.get("curve")
        n = len(r.get("seeds", [0]))
        if curve and n > 1:
            pts = [
                (s, m, lo, hi)
                for s, m, lo, hi in zip(curve["step"], curve["mean"], curve["lo"], curve["hi"])
                if m is not None
            ]
            if not pts:
                continue
            st, m, lo, hi = zip(*pts)
            ax.plot(
                st, m, color=color, label=f"{name} (lr {r['lr']:g}, mean of {count(n, 'seed')})"
            )
            if all(v is not None for v in lo + hi):
                ax.fill_between(st, lo, hi, color=color, alpha=0.2, lw=0)
            all_steps += list(st)
            continue
        h = [row for row in r["history"] if row.get("val_loss") is not None]
        if not h:
            continue
        steps = [row["step"] for row in h]
        all_steps += steps
        ax.plot(
            steps, [row["val_loss"] for row in h], color=color, label=f"{name} val (lr {r['lr']:g})"
        )
        tr = [(row["step"], row["train_loss"]) for row in h if row.get("train_loss") is not None]
        if tr:
            ax.plot(*zip(*tr), color=color, ls="--", alpha=0.5, lw=1)
    _finish(ax, results, all_steps, "step", "validation loss (nats/token)")
    ax.set_title(f"loss curves {title}".strip())
    _save(fig, path)


def plot_budgets(results: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Final validation loss against budget (log-log) with 95% error bars over seeds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    steps_all: list[int] = []
    for i, (name, r) in enumerate(results.items()):
        pts = [
            (st, c)
            for st, c in zip(r["budget_steps"], r["loss_by_budget"])
            if c["mean"] is not None
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
    xlabel = "training steps (each run its own schedule)"
    _finish(ax, results, steps_all, xlabel, "final validation loss")
    ax.set_title(f"loss vs budget {title}".strip())
    _save(fig, path)


def _finish(ax: Any, results: dict[str, Any], steps: list[int], xlabel: str, ylabel: str) -> None:
    """Target line, log-step axis with readable ticks, labels, grid and legend."""
    target = next(iter(results.values()))["target_val_loss"]
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


def plot_grid(results: dict[str, dict[str, Any]], field_name: str, path: str | Path) -> None:
    """Final loss (left) and speedup over the baseline (right) against the grid field, with
    95% error bars over seeds."""
    plt = _pyplot()
    points = list(results)
    numeric = all(sort_key(pt)[0] == 0 for pt in points)
    xs = [float(pt.split("=", 1)[1]) if numeric else i for i, pt in enumerate(points)]
    labels = list(results[points[0]])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, m in enumerate(labels):
        rs = [results[pt][m] for pt in points]
        mean = [r["final_val_loss"] if r["final_val_loss"] is not None else math.nan for r in rs]
        lo = [(r["final_val_loss_ci"] or [None])[0] for r in rs]
        hi = [(r["final_val_loss_ci"] or [None, None])[1] for r in rs]
        err = [[mu - lw if lw is not None else 0 for mu, lw in zip(mean, lo)],
               [h - mu if h is not None else 0 for mu, h in zip(mean, hi)]]  # fmt: skip
        a1.errorbar(xs, mean, yerr=err, fmt="o-", color=f"C{i}", capsize=3, label=m)
        if m == rs[0]["baseline"]:
            continue
        sp, sl, sh = [], [], []
        for r in rs:
            bs = r.get("budget_speedup")
            if bs:
                s, lw, h = bs["speedup"], bs["lo"], bs["hi"]
            else:
                s, (lw, h) = r["speedup"], (r.get("speedup_ci") or [None, None])
            sp.append(s if s is not None else math.nan)
            sl.append(0 if lw is None or s is None else s - lw)
            sh.append(0 if h is None or s is None else h - s)
        a2.errorbar(xs, sp, yerr=[sl, sh], fmt="o-", color=f"C{i}", capsize=3, label=m)
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
    a2.set_ylabel("speedup over baseline")
    _save(fig, path)


def write_plots(out: Path, results: dict[str, Any], preset: str, point: str) -> None:
    suffix = f"_{point}" if point else ""
    plot_curves(results, out / f"loss_curves{suffix}.png", title=f"preset {preset} {point}".strip())
    first = next(iter(results.values()))
    if len(first.get("budgets", [1])) > 1:
        plot_budgets(results, out / f"loss_vs_budget{suffix}.png", title=point)
