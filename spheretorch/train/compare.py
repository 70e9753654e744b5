"""``compare``: GPT vs nGPT vs GeoNorm under the same budget, each at its own swept LR.

For every model (and every grid point): a short LR sweep (each of the preset's ``sweep_lrs``
trained for ``sweep_fraction * steps`` steps with the recipe compressed to that length, seed
``seed``; the same candidates and budget for every model), then full runs at the best LR for
each seed ``seed .. seed + seeds - 1`` and each budget (a fraction of ``steps``, every budget
with its own full schedule). A seed fixes the initialization and the batches, the same for
every model; every run scores the same fixed validation windows. Afterwards the time per step
is measured with the models *interleaved* (round-robin, median over rounds), so that load from
other processes hits all of them alike. Statistics: :mod:`spheretorch.train.study`; tables and
plots: :mod:`spheretorch.train.report`.

Outputs in ``out``: ``results.json`` (per model, or per grid point then per model:
``final_val_loss`` with its 95% interval, ``steps_to_target``, ``speedup``, ``budget_speedup``,
``ms_per_step``, ``lr``, ...), ``results.md`` (the tables, also printed), ``runs.jsonl`` /
``runs.csv`` (one row per run), ``loss_curves*.png`` (mean validation loss against step with
its interval band), ``loss_vs_budget*.png`` and ``grid.png`` when asked for, ``run_info.json``
and one run directory per run.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models import MODELS
from . import study
from .errors import TrainingDiverged, UserError
from .presets import get_preset
from .report import grid_table, markdown_table, plot_curves, plot_grid, sort_key, write_plots
from .text import count
from .trainer import CHECKPOINT, TrainConfig, Trainer

__all__ = [
    "CompareInterrupted",
    "ModelSpec",
    "compare",
    "markdown_table",
    "parse_models",
    "plot_curves",
]

logger = logging.getLogger(__name__)
STATE = "compare.json"  # what was asked for: a resumed compare must ask for the same
LEDGER = "runs.jsonl"


class CompareInterrupted(RuntimeError):
    """SIGINT/SIGTERM stopped a run (its checkpoint is saved); ``--resume`` continues."""

    def __init__(self, signal_name: str, where: str) -> None:
        super().__init__(f"interrupted by {signal_name} during {where}")
        self.signal_name = signal_name


@dataclass(frozen=True)
class ModelSpec:
    """A compared model: ``label`` (its name in tables and directories), the model family
    and model options on top of the preset's (e.g. ``gpt`` with ``norm_position="post"``)."""

    label: str
    model: str
    options: dict[str, Any] = field(default_factory=dict)


def parse_models(spec: str | list[str]) -> list[ModelSpec]:
    """``"gpt,ngpt,post=gpt:norm_position=post"``: comma-separated ``[LABEL=]MODEL[:KEY=V...]``
    (model options are TransformerConfig fields; the label defaults to the whole item)."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    items = [s for s in items if s]
    if not items:
        raise UserError("--models needs at least one model")
    specs: dict[str, ModelSpec] = {}
    for item in items:
        head, *opts = item.split(":")
        label, sep, model = head.partition("=")
        if not sep:
            label, model = item, head
        if model not in MODELS:
            raise UserError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
        kinds = study.model_fields(model)
        options = {}
        for opt in opts:
            key, eq, raw = opt.partition("=")
            if not eq or key not in kinds:
                raise UserError(
                    f"--models {item!r}: model options are KEY=VALUE with KEY a field of "
                    f"{model}'s config, e.g. gpt:norm_position=post; got {opt!r}"
                )
            options[key] = study._coerce(key, raw, kinds[key], "--models")
        if not label or "/" in label or label.startswith("."):
            raise UserError(f"--models {item!r}: the label must be a plain name")
        specs.setdefault(label, ModelSpec(label, model, options))
    return list(specs.values())


def _model_options(spec: ModelSpec, common: dict[str, Any], point: dict[str, Any]) -> dict:
    """The options one run passes: the common ones (``--set``) and the grid point's, each
    only where the model's config has the field, then the model's own."""
    own = study.model_fields(spec.model)
    merged = {**common, **{k: v for k, v in point.items() if k != "batch_size"}}
    return {**{k: v for k, v in merged.items() if k in own}, **spec.options}


def _train_config(
    base: dict[str, Any], spec: ModelSpec, point: dict[str, Any], **kw: Any
) -> TrainConfig:
    """One run's configuration: the compare's settings, the grid point's, the model's."""
    fields = {
        "batch_size": point.get("batch_size", base["batch_size"]),
        "eval_batches": base["eval_batches"],
        **kw,
    }
    return TrainConfig(
        model=spec.model,
        preset=base["preset"],
        data=base["data"],
        device=base["device"],
        model_options=_model_options(spec, base["options"], point),
        **fields,
    )


def _preflight(base: dict[str, Any], specs: list[ModelSpec], points: list[dict[str, Any]]) -> None:
    """Every error a run could raise on its settings (data, model options, batch against the
    data), raised before anything is written: one trainer reads the data, the rest of the
    configurations are only resolved."""
    first = Trainer(_train_config(base, specs[0], points[0], steps=1), None, save_checkpoints=False)
    for spec in specs:
        for point in points:
            cfg = _train_config(base, spec, point, steps=1).resolve()
            seq_len = cfg.model_config(first.tokenizer.vocab_size).seq_len
            first.data.check_fits(seq_len, cfg.batch_size)


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


class _Bar:
    """A tqdm bar opened at its first use: a run that fails before training (bad data, bad
    options) leaves no half-drawn bar above its one-line error."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.bar = total, desc, None

    def _open(self) -> Any:
        if self.bar is None:
            import sys

            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=self.total, desc=self.desc, file=sys.stderr, dynamic_ncols=True, leave=True
            )
        return self.bar

    def update(self, n: int) -> None:
        self._open().update(n)

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self._open().set_postfix_str(text, refresh=refresh)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _bar(progress: bool, total: int, desc: str) -> _Bar | None:
    return _Bar(total, desc) if progress else None


def _time_interleaved(
    trainers: dict[str, Trainer], rounds: int, steps: int, bar: Any = None
) -> dict[str, float]:
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
            if bar is not None:
                bar.update(1)
    return {name: statistics.median(v) for name, v in samples.items()}


class _Study:
    """The runs of one ``compare`` call, recorded in the ledger as they finish."""

    def __init__(self, out: Path, ledger: study.Ledger, base: dict[str, Any], **kw: Any) -> None:
        self.out, self.ledger, self.base = out, ledger, base
        self.progress: bool = kw["progress"]
        self.handle_signals: bool = kw["handle_signals"]
        self.resume: bool = kw["resume"]

    def run(
        self,
        key: str,
        spec: ModelSpec,
        point: dict[str, Any],
        run_dir: Path,
        bar: Any,
        *,
        lr: float,
        seed: int,
        steps: int,
        eval_interval: int | None,
        row: dict[str, Any],
        keep_checkpoint: bool,
    ) -> dict[str, Any]:
        """Train one run (or continue it from its checkpoint), record and return its row."""
        done = self.ledger.get(key)
        if done is not None:
            if bar is not None:
                bar.update(done["steps"])
            return done
        cfg = _train_config(
            self.base, spec, point, seed=seed, lr=lr, steps=steps, eval_interval=eval_interval
        )
        # a partial run of an interrupted compare continues; otherwise every run starts fresh
        resume = self.resume and (run_dir / CHECKPOINT).is_file()
        trainer = Trainer(
            cfg, run_dir, resume=resume, handle_signals=self.handle_signals, progress=False
        )
        if bar is not None:
            bar.set_postfix_str(f"{spec.label} lr {lr:g} seed {seed}", refresh=True)
            bar.update(trainer.step)
        t0 = time.perf_counter()
        chunk = max(1, steps // 50)  # progress granularity (identical results to one call)
        diverged_msg = None
        try:
            while trainer.step < steps and not trainer.diverged:
                before = trainer.step
                summary = trainer.train(stop_after=min(steps, trainer.step + chunk))
                if bar is not None:
                    bar.update(trainer.step - before)
                if summary["interrupted"]:
                    raise CompareInterrupted(
                        summary["interrupted"], f"{key} at step {trainer.step}"
                    )
        except TrainingDiverged as e:
            diverged_msg = str(e)
        summary = trainer.summary()
        c = trainer.config
        final = summary["final_val_loss"]
        diverged = bool(summary["diverged"] or diverged_msg or final is None)
        row = {
            "key": key,
            **row,
            "model": spec.label,
            "family": spec.model,
            "options": spec.options,
            "seed": seed,
            "lr": lr,
            "steps": trainer.step,
            "batch_size": c.batch_size,
            "seq_len": trainer.model_config.seq_len,
            "n_layer": trainer.model_config.n_layer,
            "d_model": trainer.model_config.d_model,
            "tokens_per_step": c.batch_size * trainer.model_config.seq_len,
            "final_val_loss": None if diverged else final,
            "final_train_loss": summary["final_train_loss"],
            "diverged": diverged,
            "ms_per_step": summary["ms_per_step"],
            "wall_s": round(time.perf_counter() - t0, 3),
            "n_params": summary["n_params"],
            "optim": c.optim,
            "dir": str(run_dir.relative_to(self.out)),
            "history": [[h["step"], h["val_loss"], h["train_loss"]] for h in trainer.history],
        }
        if not keep_checkpoint:
            (run_dir / CHECKPOINT).unlink(missing_ok=True)
        self.ledger.record(row)
        return row


def compare(
    models: str | list[str] = "gpt,ngpt,geonorm",
    preset: str = "cpu-small",
    out: str | Path = "runs/compare",
    data: str | None = None,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    sweep: bool = True,
    log: Callable[[str], None] | None = None,
    *,
    seeds: int = 1,
    budgets: str | list[float] | None = None,
    grid: str | None = None,
    options: dict[str, Any] | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    eval_interval: int | None = None,
    eval_batches: int | None = None,
    sweep_lrs: str | list[float] | None = None,
    sweep_fraction: float | None = None,
    resume: bool = False,
    handle_signals: bool = False,
) -> dict[str, Any]:
    """Run the comparison and write its outputs; returns ``results.json``'s content.

    Args:
        models: ``[LABEL=]MODEL[:KEY=V...]``, comma-separated (``parse_models``); the first
            ``gpt`` (else the first model) is the baseline whose loss defines the targets.
        seeds: full runs per model and budget (seeds ``seed .. seed + seeds - 1``).
        budgets: fractions of ``steps`` (e.g. ``"0.25,0.5,1"``); 1 is always included.
        grid: ``FIELD=V,V,...`` over a model config field, ``batch_size`` or ``steps``; each
            point gets its own LR sweep per model. ``seq_len`` keeps the tokens per step fixed
            (batch size = preset batch x preset seq_len / seq_len).
        options: model options for every model (TransformerConfig fields: ``d_model``, ...).
        steps, batch_size, eval_interval, eval_batches, sweep_lrs, sweep_fraction: override
            the preset's.
        resume: continue the compare in ``out``: finished runs are read back from
            ``runs.jsonl``, a partial run continues from its checkpoint; the settings must
            equal the interrupted compare's.
        handle_signals: SIGINT/SIGTERM during a run checkpoint it and raise
            ``CompareInterrupted`` (the command line does this).
    """
    say = log if log is not None else logger.info
    specs = parse_models(models)
    p = get_preset(preset)
    if not (isinstance(seeds, int) and seeds >= 1):
        raise UserError(f"--seeds must be a positive integer, got {seeds!r}")
    budget_list = study.parse_budgets(budgets)
    grid_spec = study.parse_grid(grid)
    options = dict(options or {})
    known = study.model_fields()
    for key in options:
        if key not in known:
            raise UserError(
                f"--set {key}: not a model config field; choose from {', '.join(known)}"
            )
    base_seq = int(options.get("seq_len", p.seq_len))
    base_batch = batch_size or p.batch_size
    points = study.grid_points(grid_spec, base_seq, base_batch)
    total_steps = steps or p.steps
    lrs = _parse_lrs(sweep_lrs) or list(p.sweep_lrs) if sweep else []
    frac = p.sweep_fraction if sweep_fraction is None else sweep_fraction
    if not 0 < frac <= 1:
        raise UserError(f"--sweep-fraction must be in (0, 1], got {frac}")
    out = Path(out)
    spec_state = {
        "models": [[s.label, s.model, s.options] for s in specs],
        "preset": preset,
        "data": str(Path(data).resolve()) if data else None,
        "seed": seed,
        "seeds": seeds,
        "budgets": budget_list,
        "grid": [grid_spec[0], grid_spec[1]] if grid_spec else None,
        "options": options,
        "steps": total_steps,
        "batch_size": base_batch,
        "eval_interval": eval_interval or p.eval_interval,
        "eval_batches": eval_batches or p.eval_batches,
        "sweep_lrs": lrs,
        "sweep_fraction": frac,
        "device": device,
    }
    _check_state(out, spec_state, resume)
    base = {
        "preset": preset,
        "data": data,
        "device": device,
        "options": options,
        "batch_size": base_batch,
        "eval_batches": spec_state["eval_batches"],
    }
    _preflight(base, specs, points)
    out.mkdir(parents=True, exist_ok=True)
    ledger_path = out / LEDGER
    if not resume:
        ledger_path.unlink(missing_ok=True)
    ledger = study.Ledger(ledger_path)
    (out / STATE).write_text(json.dumps(spec_state, indent=2) + "\n", encoding="utf-8")

    t_start = time.perf_counter()
    info: dict[str, Any] = {"preset": p.to_dict(), "compare": spec_state}
    info["machine"] = machine_info()
    # glibc allocator tuning (stable CPU step times) is the caller's environment; recorded
    info["malloc_env"] = {
        k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    }
    runner = _Study(
        out, ledger, base, progress=progress, handle_signals=handle_signals, resume=resume
    )
    field_name = grid_spec[0] if grid_spec else None
    if field_name == "seq_len":
        say(
            f"grid seq_len: tokens per step held at {base_batch * base_seq} "
            f"(batch size {', '.join(str(pt['batch_size']) for pt in points)})"
        )
    results: dict[str, Any] = {}
    for point in points:
        name = study.point_name(point, field_name)
        pdir = out / name if name else out
        pres = _compare_point(
            runner, specs, point, name, pdir, lrs, frac, total_steps, budget_list,
            spec_state, seed, seeds, p, progress, say,
        )  # fmt: skip
        results[name] = pres
        # written after every grid point: an unfinished study still has its finished points
        text = _write_outputs(out, results, field_name, preset, ledger, info, t_start)
    say(text)
    say(f"compare wall time: {info['wall_s']:.1f} s; outputs in {out}")
    return results[""] if field_name is None else results


def _write_outputs(
    out: Path,
    results: dict[str, Any],
    field_name: str | None,
    preset: str,
    ledger: study.Ledger,
    info: dict[str, Any],
    t_start: float,
) -> str:
    """results.json, run_info.json, runs.csv, results.md and the plots; returns the tables.
    Grid points are shown in increasing order of the field's value (they run in the order
    given, e.g. the most expensive first)."""
    info["wall_s"] = time.perf_counter() - t_start
    with contextlib.suppress(OSError):
        info["loadavg_end"] = os.getloadavg()
    if field_name is not None:
        results = dict(sorted(results.items(), key=lambda kv: sort_key(kv[0])))
    final = results[""] if field_name is None else results
    (out / "results.json").write_text(json.dumps(final, indent=2) + "\n", encoding="utf-8")
    (out / "run_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    rows = sorted(ledger.rows.values(), key=lambda r: r["key"])
    study.write_csv(
        [{k: v for k, v in r.items() if k != "history"} for r in rows], out / "runs.csv"
    )
    tables = [markdown_table(res, preset, point=name or None) for name, res in results.items()]
    for name, res in results.items():
        write_plots(out, res, preset, name)
    if field_name is not None:
        tables.insert(0, grid_table(results, field_name))
        plot_grid(results, field_name, out / "grid.png")
    text = "\n\n".join(tables)
    (out / "results.md").write_text(text + "\n", encoding="utf-8")
    return text


def _parse_lrs(spec: str | list[float] | None) -> list[float]:
    items = spec.split(",") if isinstance(spec, str) else list(spec or [])
    lrs = []
    for item in items:
        try:
            lr = float(item)
        except (TypeError, ValueError):
            lr = math.nan
        if not (math.isfinite(lr) and lr > 0):
            raise UserError(f"--sweep-lrs takes positive numbers such as 1e-3,3e-3; got {item!r}")
        lrs.append(lr)
    return list(dict.fromkeys(lrs))


def _check_state(out: Path, state: dict[str, Any], resume: bool) -> None:
    saved_path = out / STATE
    if not resume:
        return
    if not saved_path.is_file():
        raise UserError(f"nothing to resume: {saved_path} does not exist")
    saved = json.loads(saved_path.read_text(encoding="utf-8"))
    for key, value in state.items():
        if json.loads(json.dumps(value)) != saved.get(key):
            flag = "--" + key.replace("_", "-")
            raise UserError(
                f"--resume: {flag} differs from the interrupted compare's "
                f"({saved.get(key)!r} there, {value!r} now); pass the same settings"
            )


def _compare_point(
    runner: _Study,
    specs: list[ModelSpec],
    point: dict[str, Any],
    name: str,
    pdir: Path,
    lrs: list[float],
    frac: float,
    total_steps: int,
    budgets: list[float],
    state: dict[str, Any],
    seed: int,
    seeds: int,
    p: Any,
    progress: bool,
    say: Callable[[str], None],
) -> dict[str, Any]:
    prefix = f"[{name}] " if name else ""
    grid_row = {"grid": name or None, **{f"grid_{k}": v for k, v in point.items()}}
    sweep_steps = max(1, round(frac * total_steps))
    chosen: dict[str, float] = {}
    sweeps: dict[str, dict[str, float | None]] = {}
    bar = _bar(progress and bool(lrs), len(specs) * len(lrs) * sweep_steps, f"{prefix}LR sweep")
    try:
        for spec in specs:
            losses: dict[float, float | None] = {}
            for lr in lrs:
                row = runner.run(
                    f"{name}/{spec.label}/sweep/lr{lr:g}", spec, point,
                    pdir / "sweep" / f"{spec.label}-lr{lr:g}", bar, lr=lr, seed=seed,
                    steps=sweep_steps, eval_interval=sweep_steps,
                    row={**grid_row, "phase": "sweep", "budget": frac}, keep_checkpoint=False,
                )  # fmt: skip
                losses[lr] = row["final_val_loss"]
                v = losses[lr]
                say(
                    f"{prefix}sweep {spec.label:8s} lr={lr:<8g} val_loss="
                    + (f"{v:.4f}" if v is not None else "diverged")
                    + f" ({count(sweep_steps, 'step')})"
                )
            finite = {lr: v for lr, v in losses.items() if v is not None}
            default_lr = p.lr.get(spec.model, next(iter(p.lr.values())))
            chosen[spec.label] = min(finite, key=finite.__getitem__) if finite else default_lr
            sweeps[spec.label] = {f"{lr:g}": v for lr, v in losses.items()}
    finally:
        if bar is not None:
            bar.close()

    seed_list = list(range(seed, seed + seeds))
    run_steps = {b: max(1, round(b * total_steps)) for b in budgets}
    n_full = len(specs) * len(seed_list) * sum(run_steps.values())
    rows: dict[tuple[str, int, float], dict[str, Any]] = {}
    bar = _bar(progress, n_full, f"{prefix}full runs")
    try:
        for s in seed_list:  # seeds outermost: an interrupted study has whole seeds first
            for b in sorted(budgets, reverse=True):
                for spec in specs:
                    suffix = ("" if s == seed else f"-seed{s}") + ("" if b == 1 else f"-b{b:g}")
                    row = runner.run(
                        f"{name}/{spec.label}/seed{s}/b{b:g}", spec, point,
                        pdir / f"{spec.label}{suffix}", bar, lr=chosen[spec.label], seed=s,
                        steps=run_steps[b], eval_interval=state["eval_interval"],
                        row={**grid_row, "phase": "full", "budget": b}, keep_checkpoint=True,
                    )  # fmt: skip
                    rows[(spec.label, s, b)] = row
                    v = row["final_val_loss"]
                    say(
                        f"{prefix}full  {spec.label:8s} lr={chosen[spec.label]:<8g} seed={s} "
                        f"budget={b:g} val_loss="
                        + (f"{v:.4f}" if v is not None else "diverged")
                        + f" ({count(row['steps'], 'step')}, "
                        f"{row['ms_per_step'] or math.nan:.1f} ms/step in its own run)"
                    )
    finally:
        if bar is not None:
            bar.close()

    timing = _timing_phase(runner, specs, point, chosen, seed, p, progress, prefix, say)
    return _summarize(specs, rows, seed_list, budgets, chosen, sweeps, timing, run_steps)


def _timing_phase(
    runner: _Study,
    specs: list[ModelSpec],
    point: dict[str, Any],
    chosen: dict[str, float],
    seed: int,
    p: Any,
    progress: bool,
    prefix: str,
    say: Callable[[str], None],
) -> dict[str, float]:
    """Interleaved step timing on fresh models (step time does not depend on the weights)."""
    if not p.timing_rounds:
        return {}
    base = runner.base
    trainers = {}
    for spec in specs:
        cfg = _train_config(base, spec, point, seed=seed, lr=chosen[spec.label], eval_batches=1)
        trainers[spec.label] = Trainer(cfg, None, save_checkpoints=False)
    bar = _bar(progress, p.timing_rounds * len(specs), f"{prefix}timing")
    try:
        timing = _time_interleaved(trainers, p.timing_rounds, p.timing_steps, bar)
    finally:
        if bar is not None:
            bar.close()
    say(
        f"{prefix}timing (interleaved, median of {count(p.timing_rounds, 'round')} x "
        f"{count(p.timing_steps, 'step')}): "
        + ", ".join(f"{k} {v:.1f} ms/step" for k, v in timing.items())
    )
    return timing


def _summarize(
    specs: list[ModelSpec],
    rows: dict[tuple[str, int, float], dict[str, Any]],
    seed_list: list[int],
    budgets: list[float],
    chosen: dict[str, float],
    sweeps: dict[str, dict[str, float | None]],
    timing: dict[str, float],
    run_steps: dict[float, int],
) -> dict[str, Any]:
    labels = [s.label for s in specs]
    baseline = next((s.label for s in specs if s.model == "gpt" and not s.options), None)
    baseline = baseline or next((s.label for s in specs if s.model == "gpt"), labels[0])

    def losses(label: str) -> np.ndarray:
        return np.array(
            [
                [
                    math.nan if (v := rows[(label, s, b)]["final_val_loss"]) is None else v
                    for b in budgets
                ]
                for s in seed_list
            ]
        )

    def history(label: str, s: int) -> list[dict[str, Any]]:
        h = rows[(label, s, 1.0)]["history"]
        return [{"step": st, "val_loss": v, "train_loss": t} for st, v, t in h]

    base_losses = losses(baseline)
    base_final = study.mean_ci(base_losses[:, -1])
    results: dict[str, Any] = {}
    for spec in specs:
        label = spec.label
        L = losses(label)
        final = study.mean_ci(L[:, -1])
        # steps to target within the full run: per seed, target = that seed's baseline loss
        per_seed_steps, per_seed_speed, at_first = [], [], 0
        for i, s in enumerate(seed_list):
            target = base_losses[i, -1]
            h = history(label, s)
            reached = study.steps_to_target(h, target)
            # below target already at the first evaluation: the step is an upper bound
            at_first += bool(h and reached is not None and reached == h[0]["step"])
            base_reached = study.steps_to_target(history(baseline, s), target)
            per_seed_steps.append(reached)
            per_seed_speed.append(base_reached / reached if reached and base_reached else None)
        stt = study.mean_ci(per_seed_steps)
        spd = study.mean_ci(per_seed_speed)
        full_rows = [rows[(label, s, 1.0)] for s in seed_list]
        own_ms = [r["ms_per_step"] for r in full_rows if r["ms_per_step"]]
        r: dict[str, Any] = {
            "model": spec.model,
            "options": spec.options,
            "lr": chosen[label],
            "sweep": sweeps.get(label, {}),
            "seeds": seed_list,
            "final_val_loss": final["mean"],
            "final_val_loss_ci": [final["lo"], final["hi"]],
            "final_val_loss_per_seed": [_finite(v) for v in L[:, -1]],
            "diverged_runs": int(sum(r["diverged"] for r in full_rows)),
            "target_val_loss": base_final["mean"],
            "baseline": baseline,
            "steps_to_target": stt["mean"],
            "steps_to_target_ci": [stt["lo"], stt["hi"]],
            "steps_to_target_per_seed": per_seed_steps,
            "steps_to_target_at_first_eval": at_first,
            "speedup": spd["mean"],
            "speedup_ci": [spd["lo"], spd["hi"]],
            "budgets": budgets,
            "budget_steps": [run_steps[b] for b in budgets],
            "loss_by_budget": [study.mean_ci(L[:, k]) for k in range(len(budgets))],
            "ms_per_step": timing.get(label, statistics.mean(own_ms) if own_ms else None),
            "ms_per_step_source": "interleaved" if label in timing else "own runs",
            "ms_per_step_full_run": statistics.mean(own_ms) if own_ms else None,
            "steps": run_steps[1.0],
            "n_params": full_rows[0]["n_params"],
            "optim": full_rows[0]["optim"],
            "batch_size": full_rows[0]["batch_size"],
            "seq_len": full_rows[0]["seq_len"],
            "wall_s": sum(rw["wall_s"] for (lab, _, _), rw in rows.items() if lab == label),
            "history": history(label, seed_list[0]),
            "curve": _curve([history(label, s) for s in seed_list]),
        }
        if len(budgets) > 1 and label == baseline:  # 1 by definition (a noisy curve may dip)
            r["budget_speedup"] = {"speedup": 1.0, "how": "baseline", "lo": 1.0, "hi": 1.0}
        elif len(budgets) > 1:
            r["budget_speedup"] = study.bootstrap_speedup(budgets, base_losses, L)
        results[label] = r
    return results


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _curve(histories: list[list[dict[str, Any]]]) -> dict[str, list[Any]]:
    """Mean validation loss per evaluated step over seeds, with its 95% interval."""
    by_step: dict[int, list[float | None]] = {}
    for h in histories:
        for row in h:
            by_step.setdefault(row["step"], []).append(row["val_loss"])
    steps = sorted(by_step)
    cis = [study.mean_ci(by_step[s]) for s in steps]
    return {
        "step": steps,
        "mean": [c["mean"] for c in cis],
        "lo": [c["lo"] for c in cis],
        "hi": [c["hi"] for c in cis],
    }
