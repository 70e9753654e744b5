"""``compare``: GPT vs nGPT vs GeoNorm under the same budget, each at its own swept LR.

For every model: a short LR sweep (each candidate of the preset's ``sweep_lrs`` trained for
``sweep_fraction * steps`` steps with the full recipe compressed to that length; the same
candidates and budget for every model), then a full run at the best LR. Afterwards the time
per training step is measured again with the models *interleaved* (round-robin, a few steps
each, median over rounds) so that load from other processes hits all of them alike.

Outputs in ``out``: ``results.json`` (per model: ``final_val_loss``, ``steps_to_target``,
``speedup``, ``ms_per_step``, ``lr``, ...), ``results.md`` (the table, also printed),
``loss_curves.png`` (validation loss against step on a log axis), ``run_info.json`` (machine,
preset, wall time) and one run directory per model (``metrics.jsonl``, ``checkpoint.pt``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ..models import MODELS
from .errors import UserError
from .presets import get_preset
from .trainer import TrainConfig, Trainer

logger = logging.getLogger(__name__)

__all__ = ["compare", "markdown_table", "parse_models", "plot_curves", "steps_to_reach"]


def parse_models(spec: str | list[str]) -> list[str]:
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    if not names:
        raise UserError("--models needs at least one model")
    for n in names:
        if n not in MODELS:
            raise UserError(f"unknown model {n!r}; choose from {', '.join(MODELS)}")
    return list(dict.fromkeys(names))


def steps_to_reach(history: list[dict[str, Any]], target: float) -> int | None:
    """First evaluated step whose validation loss is <= ``target`` (None if never)."""
    for row in history:
        v = row.get("val_loss")
        if v is not None and v <= target:
            return int(row["step"])
    return None


def _final(summary: dict[str, Any]) -> float:
    v = summary.get("final_val_loss")
    return math.inf if v is None or summary.get("diverged") else float(v)


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    with contextlib.suppress(OSError):
        info["loadavg_start"] = os.getloadavg()
    return info


def _time_interleaved(trainers: dict[str, Trainer], rounds: int, steps: int) -> dict[str, float]:
    """Median ms per training step over ``rounds`` round-robin passes of ``steps`` steps."""
    samples: dict[str, list[float]] = {name: [] for name in trainers}
    for tr in trainers.values():  # warm-up
        for _ in range(2):
            tr.train_step(*tr.batch(tr.step))
    for r in range(rounds):
        order = list(trainers) if r % 2 == 0 else list(reversed(trainers))
        for name in order:
            tr = trainers[name]
            batches = [tr.batch(tr.step + i) for i in range(steps)]
            if tr.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for x, y in batches:
                tr.train_step(x, y)
            if tr.device.type == "cuda":
                torch.cuda.synchronize()
            samples[name].append(1000 * (time.perf_counter() - t0) / steps)
    return {name: statistics.median(v) for name, v in samples.items()}


def compare(
    models: str | list[str] = "gpt,ngpt,geonorm",
    preset: str = "cpu-small",
    out: str | Path = "runs/compare",
    data: str | None = None,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    sweep: bool = True,
    log: Any = None,
) -> dict[str, Any]:
    """Run the comparison and write its outputs; returns the per-model results. Progress
    lines and the table go to ``log`` (default: this module's logger at INFO)."""
    names = parse_models(models)
    p = get_preset(preset)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = logger.info if log is None else log
    t_start = time.perf_counter()
    # glibc allocator tuning (stable CPU step times) is the caller's environment: see
    # docs/quickstart.md and `make demo`; recorded here with the machine
    malloc = {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    info = {"preset": p.to_dict(), "machine": machine_info(), "malloc_env": malloc}

    def config(model: str, **kw: Any) -> TrainConfig:
        return TrainConfig(model=model, preset=preset, data=data, seed=seed, device=device, **kw)

    sweep_steps = max(1, round(p.sweep_fraction * p.steps))
    lrs = p.sweep_lrs if sweep else ()
    chosen: dict[str, float] = {}
    sweeps: dict[str, dict[str, float | None]] = {}
    for name in names:
        results: dict[float, float] = {}
        for lr in lrs:
            cfg = config(name, lr=lr, steps=sweep_steps, eval_interval=sweep_steps)
            run = Trainer(cfg, out / "sweep" / f"{name}-lr{lr:g}", save_checkpoints=False)
            results[lr] = _final(run.train())
            log(f"sweep {name:8s} lr={lr:<8g} val_loss={results[lr]:.4f} ({sweep_steps} steps)")
        finite = {lr: v for lr, v in results.items() if math.isfinite(v)}
        chosen[name] = min(finite, key=finite.__getitem__) if finite else p.lr[name]
        sweeps[name] = {f"{lr:g}": (v if math.isfinite(v) else None) for lr, v in results.items()}

    summaries: dict[str, dict[str, Any]] = {}
    histories: dict[str, list[dict[str, Any]]] = {}
    trainers: dict[str, Trainer] = {}
    for name in names:
        run = Trainer(config(name, lr=chosen[name]), out / name, progress=progress)
        t0 = time.perf_counter()
        summaries[name] = run.train()
        summaries[name]["wall_s"] = time.perf_counter() - t0
        histories[name] = run.history
        log(
            f"full  {name:8s} lr={chosen[name]:<8g} val_loss={_final(summaries[name]):.4f} "
            f"({summaries[name]['steps']} steps, {summaries[name]['ms_per_step']:.1f} ms/step)"
        )
        trainers[name] = run

    timing = _time_interleaved(trainers, p.timing_rounds, p.timing_steps) if p.timing_rounds else {}
    del trainers

    baseline = "gpt" if "gpt" in names else names[0]
    target = _final(summaries[baseline])
    base_steps = steps_to_reach(histories[baseline], target)
    results_json: dict[str, Any] = {}
    for name in names:
        s = summaries[name]
        reached = steps_to_reach(histories[name], target) if math.isfinite(target) else None
        results_json[name] = {
            "final_val_loss": s["final_val_loss"],
            "steps_to_target": reached,
            "speedup": (base_steps / reached) if (reached and base_steps) else None,
            "ms_per_step": timing.get(name, s["ms_per_step"]),
            "ms_per_step_full_run": s["ms_per_step"],
            "lr": chosen[name],
            "target_val_loss": target if math.isfinite(target) else None,
            "baseline": baseline,
            "steps": s["steps"],
            "n_params": s["n_params"],
            "optim": s["optim"],
            "sweep": sweeps[name],
            "wall_s": s["wall_s"],
            "history": histories[name],
        }
    info["wall_s"] = time.perf_counter() - t_start
    with contextlib.suppress(OSError):
        info["loadavg_end"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(results_json, indent=2) + "\n", encoding="utf-8")
    (out / "run_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    table = markdown_table(results_json, preset)
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    plot_curves(results_json, out / "loss_curves.png", title=f"preset {preset}")
    log(table)
    log(f"compare wall time: {info['wall_s']:.1f} s; outputs in {out}")
    return results_json


def markdown_table(results: dict[str, Any], preset: str = "") -> str:
    names = list(results)
    base = results[names[0]]["baseline"]
    base_ms = results[base]["ms_per_step"] if base in results else None
    target = results[names[0]]["target_val_loss"]
    lines = [
        f"Preset `{preset}`; target = {base}'s final val loss"
        + (f" ({target:.4f})" if target is not None else ""),
        "",
        "| model | lr | final val loss | steps to target | speedup | ms/step | time/step vs "
        f"{base} |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        r = results[name]

        def fmt(v: Any, spec: str) -> str:
            return "-" if v is None else format(v, spec)

        rel = r["ms_per_step"] / base_ms if (base_ms and r["ms_per_step"]) else None
        steps = "not reached" if r["steps_to_target"] is None else str(r["steps_to_target"])
        lines.append(
            f"| {name} | {r['lr']:g} | {fmt(r['final_val_loss'], '.4f')} | {steps} / {r['steps']} "
            f"| {fmt(r['speedup'], '.2f')}{'x' if r['speedup'] else ''} | "
            f"{fmt(r['ms_per_step'], '.1f')} | {fmt(rel, '.2f')}{'x' if rel else ''} |"
        )
    return "\n".join(lines)


def plot_curves(results: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Validation (solid) and training (dashed) loss against step, log-step axis."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, r) in enumerate(results.items()):
        h = [row for row in r["history"] if row.get("val_loss") is not None]
        if not h:
            continue
        color = f"C{i}"
        steps = [row["step"] for row in h]
        ax.plot(
            steps, [row["val_loss"] for row in h], color=color, label=f"{name} val (lr {r['lr']:g})"
        )
        tr = [(row["step"], row["train_loss"]) for row in h if row.get("train_loss") is not None]
        if tr:
            ax.plot(*zip(*tr), color=color, ls="--", alpha=0.5, lw=1)
    target = next(iter(results.values()))["target_val_loss"]
    if target is not None:
        ax.axhline(target, color="gray", lw=0.8, ls=":", label="target")
    ax.set_xscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"loss curves {title}".strip())
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
