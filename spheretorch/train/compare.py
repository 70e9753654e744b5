"""``compare``: models (and optimizer recipes) under the same budget, each at its own swept LR.

For every model (and every grid point): an LR sweep (each candidate trained for
``sweep_fraction * steps`` steps with the recipe compressed to that length, seed ``seed``; the
same candidates and budget for every model). When the best candidate is the smallest or the
largest, the sweep is extended one candidate beyond that edge (same geometric spacing) until
the best is interior or the next candidate would leave ``sweep_bounds``; every extension and
the choice are reported. Then full runs at the chosen LR for each seed ``seed .. seed + seeds -
1`` and each budget (a fraction of ``steps``, every budget with its own full schedule, placed
at the steps it actually ran). A seed fixes the initialization and the batches, the same for
every model; every run scores the same fixed validation windows. Afterwards the time per step
is measured with the models *interleaved* (round-robin, median over rounds, after warm-up
steps), so that load from other processes hits all of them alike.

Configuration: :class:`~spheretorch.train.compare.CompareConfig`; parsing:
:mod:`spheretorch.train.specs`; statistics: :mod:`spheretorch.train.stats`; typed results:
:mod:`spheretorch.train.results`; the run ledger: :mod:`spheretorch.train.ledger`; tables and
plots: :mod:`spheretorch.train.report`.

Outputs in ``out``: ``results.json`` (per model, or per grid point then per model: see
:class:`~spheretorch.train.results.ModelResult`), ``results.md`` (the tables, also printed),
``runs.jsonl`` / ``runs.csv`` (one row per run), ``loss_curves*.png``, ``loss_vs_budget*.png``
and ``grid.png`` when asked for, ``run_info.json`` and one run directory per run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import specs as sp
from .errors import TrainingDiverged, UserError
from .ledger import Ledger, write_csv
from .presets import DEFAULT_PRESET, Preset, get_preset
from .report import grid_table, markdown_table, plot_curves, plot_grid, sort_key, write_plots
from .results import ModelResult, RunResult, SweepResult, summarize
from .specs import DEFAULT_MODELS, DEFAULT_SWEEP_BOUNDS, ModelSpec, parse_models
from .text import count
from .trainer import CHECKPOINT, TrainConfig, Trainer

__all__ = [
    "DEFAULT_SWEEP_BOUNDS",
    "CompareConfig",
    "CompareInterrupted",
    "ModelSpec",
    "compare",
    "markdown_table",
    "parse_models",
    "plot_curves",
    "run_compare",
]

logger = logging.getLogger(__name__)
STATE = "compare.json"  # what was asked for: a resumed compare must ask for the same
LEDGER = "runs.jsonl"
_MAX_EXTENSIONS = 12  # per side: a safety net, the bounds end the extension first


class CompareInterrupted(RuntimeError):
    """SIGINT/SIGTERM stopped a run (its checkpoint is saved); ``--resume`` continues."""

    def __init__(self, signal_name: str, where: str) -> None:
        super().__init__(f"interrupted by {signal_name} during {where}")
        self.signal_name = signal_name


@dataclass
class CompareConfig:
    """What to compare. Text fields take the command line's forms (``"gpt,ngpt"``,
    ``"0.25,0.5,1"``, ``"seq_len=64,128"``); :meth:`resolve` parses and validates them and
    fills ``None`` fields from the preset (``UserError`` on bad values).

    Attributes:
        models: ``[LABEL=]MODEL[:KEY=V...]``, comma-separated
            (:func:`~spheretorch.train.specs.parse_models`; ``KEY=optim`` names a model's
            recipe); the first plain ``gpt`` (else the first
            ``gpt``, else the first model) is the baseline whose loss defines the targets.
        optims: optimizer recipes (names of ``spheretorch.train.config.OPTIMIZERS``) as an
            axis: every model with every recipe, each pair with its own LR sweep.
        seeds: full runs per model and budget (seeds ``seed .. seed + seeds - 1``).
        budgets: fractions of ``steps`` (e.g. ``"0.25,0.5,1"``); 1 is always included.
        grid: ``FIELD=V,V,...`` over a model config field or ``batch_size``; each point gets
            its own LR sweep per model. ``seq_len`` keeps the tokens per step fixed (batch
            size = preset batch x preset seq_len / seq_len).
        options: model options for every model whose config has the field (``dropout``, ...).
        sweep: ``False``: the preset's LR per model, no sweep.
        sweep_bounds: ``(lo, hi)``: an edge extension never goes beyond.
        param_dtype: storage dtype of the weights (``float32``: fp32 master weights under
            bf16 autocast; ``bfloat16``: the weights themselves in bf16).
        resume: continue the compare in ``out``: finished runs are read back from
            ``runs.jsonl``, a partial run continues from its checkpoint; the settings must
            equal the interrupted compare's.
    """

    models: str | list[str] | list[ModelSpec] = DEFAULT_MODELS
    preset: str | None = None
    out: str | Path = "runs/compare"
    data: str | None = None
    seed: int = 0
    seeds: int = 1
    device: str = "auto"
    optims: str | list[str] | None = None
    budgets: str | list[float] | None = None
    grid: str | tuple[str, list[Any]] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None
    batch_size: int | None = None
    eval_interval: int | None = None
    eval_batches: int | None = None
    sweep: bool = True
    sweep_lrs: str | list[float] | None = None
    sweep_fraction: float | None = None
    sweep_bounds: str | tuple[float, float] | None = None
    param_dtype: str | None = None
    resume: bool = False

    def resolve(self) -> CompareConfig:
        """A copy with every field parsed, typed and validated: ``models`` a list of
        :class:`~spheretorch.train.specs.ModelSpec` (crossed with ``optims``),
        ``budgets``/``sweep_lrs`` lists, ``grid`` a ``(field, values)`` pair or ``None``,
        numbers from the preset."""
        c = dataclasses.replace(self, options=dict(self.options))
        c.preset = c.preset or DEFAULT_PRESET
        p = get_preset(c.preset)
        if not (isinstance(c.seeds, int) and not isinstance(c.seeds, bool) and c.seeds >= 1):
            raise UserError(f"--seeds must be a positive integer, got {c.seeds!r}")
        models = c.models
        if not (isinstance(models, list) and all(isinstance(m, ModelSpec) for m in models)):
            models = parse_models(models)  # type: ignore[arg-type]
        c.optims = sp.parse_optims(c.optims)  # type: ignore[arg-type]
        c.models = sp.cross_optims(list(models), c.optims)  # type: ignore[arg-type]
        c.budgets = sp.parse_budgets(c.budgets)  # type: ignore[arg-type]
        if not isinstance(c.grid, tuple):
            c.grid = sp.parse_grid(c.grid)
        known = sp.model_fields()
        for key in c.options:
            if key not in known:
                raise UserError(
                    f"--set {key}: not a model config field; choose from {', '.join(known)}"
                )
        c.steps = c.steps or p.steps
        c.batch_size = c.batch_size or p.batch_size
        c.eval_interval = c.eval_interval or p.eval_interval
        c.eval_batches = c.eval_batches or p.eval_batches
        lrs = sp.parse_lrs(c.sweep_lrs) or list(p.sweep_lrs)  # type: ignore[arg-type]
        c.sweep_lrs = lrs if c.sweep else []
        c.sweep_fraction = p.sweep_fraction if c.sweep_fraction is None else c.sweep_fraction
        if not (0 < c.sweep_fraction <= 1):
            raise UserError(f"--sweep-fraction must be in (0, 1], got {c.sweep_fraction}")
        bounds = c.sweep_bounds
        if not isinstance(bounds, tuple):
            bounds = sp.parse_lr_bounds(bounds)
        c.sweep_bounds = bounds or DEFAULT_SWEEP_BOUNDS
        aliases = {"bf16": "bfloat16", "fp32": "float32", None: "float32"}
        c.param_dtype = aliases.get(c.param_dtype, c.param_dtype)
        if c.param_dtype not in ("float32", "bfloat16"):
            raise UserError(f"--param-dtype: unknown {c.param_dtype!r}; choose fp32 or bf16")
        c.out = Path(c.out)
        return c

    def state(self) -> dict[str, Any]:
        """What a resumed compare must ask for again (``compare.json``); of a resolved
        config."""
        models = [
            [s.label, s.model, s.options] + ([s.optim] if s.optim else [])
            for s in self.models  # type: ignore[union-attr]
        ]
        grid = self.grid
        return {
            "models": models,
            "preset": self.preset,
            "data": str(Path(self.data).resolve()) if self.data else None,
            "seed": self.seed,
            "seeds": self.seeds,
            "budgets": self.budgets,
            "grid": [grid[0], grid[1]] if isinstance(grid, tuple) else None,
            "options": self.options,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "eval_interval": self.eval_interval,
            "eval_batches": self.eval_batches,
            "sweep_lrs": self.sweep_lrs,
            "sweep_fraction": self.sweep_fraction,
            "device": self.device,
            "optims": self.optims,
            "sweep_bounds": list(self.sweep_bounds),  # type: ignore[arg-type]
            "param_dtype": self.param_dtype,
        }


# fields added after v0.2: a compare.json without them asked for their defaults
_STATE_DEFAULTS: dict[str, Any] = {
    "optims": [],
    "sweep_bounds": list(DEFAULT_SWEEP_BOUNDS),
    "param_dtype": "float32",
}


# -- one run -------------------------------------------------------------------------------------
def _model_options(spec: ModelSpec, common: dict[str, Any], point: dict[str, Any]) -> dict:
    """The options one run passes: the common ones (``--set``) and the grid point's, each
    only where the model's config has the field, then the model's own."""
    own = sp.model_fields(spec.model)
    merged = {**common, **{k: v for k, v in point.items() if k != "batch_size"}}
    return {**{k: v for k, v in merged.items() if k in own}, **spec.options}


def _train_config(
    cfg: CompareConfig, spec: ModelSpec, point: dict[str, Any], **kw: Any
) -> TrainConfig:
    """One run's configuration: the compare's settings, the grid point's, the model's."""
    fields = {
        "batch_size": point.get("batch_size", cfg.batch_size),
        "eval_batches": cfg.eval_batches,
    }
    return TrainConfig(
        model=spec.model,
        preset=cfg.preset,
        data=cfg.data,
        device=cfg.device,
        optim=spec.optim,
        param_dtype=cfg.param_dtype,
        model_options=_model_options(spec, cfg.options, point),
        **{**fields, **kw},
    )


def _preflight(cfg: CompareConfig, points: list[dict[str, Any]]) -> None:
    """Every error a run could raise on its settings (data, model options, batch against the
    data), raised before anything is written: one trainer reads the data, the rest of the
    configurations are only resolved."""
    specs: list[ModelSpec] = cfg.models  # type: ignore[assignment]
    first = Trainer(_train_config(cfg, specs[0], points[0], steps=1), None, save_checkpoints=False)
    for spec in specs:
        for point in points:
            c = _train_config(cfg, spec, point, steps=1).resolve()
            seq_len = c.model_config(first.tokenizer.vocab_size).seq_len
            first.data.check_fits(seq_len, c.batch_size)


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
    info: dict[str, Any] = {
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
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=self.total, desc=self.desc, file=sys.stderr, dynamic_ncols=True, leave=True
            )
        return self.bar

    def grow(self, n: int) -> None:
        self.total += n
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

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
    """Median ms per training step over ``rounds`` round-robin passes of ``steps`` steps,
    after two warm-up steps per model (compilation, allocator, caches: steady state only)."""
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


class _Runner:
    """Trains the runs of one ``compare`` call, recording each in the ledger as it finishes
    (a recorded run is read back instead of trained again)."""

    def __init__(
        self, cfg: CompareConfig, ledger: Ledger, progress: bool, handle_signals: bool
    ) -> None:
        self.cfg, self.ledger = cfg, ledger
        self.out = Path(cfg.out)
        self.progress, self.handle_signals = progress, handle_signals

    def run(
        self,
        key: str,
        spec: ModelSpec,
        point: dict[str, Any],
        run_dir: Path,
        bar: Any,
        *,
        phase: str,
        budget: float,
        grid: str | None,
        lr: float,
        seed: int,
        steps: int,
        eval_interval: int | None,
        keep_checkpoint: bool,
    ) -> RunResult:
        """Train one run (or continue it from its checkpoint), record and return it."""
        done = self.ledger.get(key)
        if done is not None:
            if bar is not None:
                bar.update(done["steps"])
            return RunResult.from_row(done)
        cfg = _train_config(
            self.cfg, spec, point, seed=seed, lr=lr, steps=steps, eval_interval=eval_interval
        )
        # a partial run of an interrupted compare continues; otherwise every run starts fresh
        resume = self.cfg.resume and (run_dir / CHECKPOINT).is_file()
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
        c, m = trainer.config, trainer.model_config
        final = summary["final_val_loss"]
        diverged = bool(summary["diverged"] or diverged_msg or final is None)
        run = RunResult(
            key=key,
            phase=phase,
            model=spec.label,
            family=spec.model,
            options=spec.options,
            optim=c.optim,
            seed=seed,
            lr=lr,
            budget=budget,
            steps=trainer.step,
            batch_size=c.batch_size,
            seq_len=m.seq_len,
            n_layer=m.n_layer,
            d_model=m.d_model,
            tokens_per_step=c.batch_size * m.seq_len,
            final_val_loss=None if diverged else final,
            final_train_loss=summary["final_train_loss"],
            diverged=diverged,
            ms_per_step=summary["ms_per_step"],
            wall_s=round(time.perf_counter() - t0, 3),
            n_params=summary["n_params"],
            dir=str(run_dir.relative_to(self.out)),
            warmup_steps=c.warmup_steps,
            param_dtype=c.param_dtype,
            grid=grid,
            grid_point=dict(point),
            history=[[h["step"], h["val_loss"], h["train_loss"]] for h in trainer.history],
        )
        if not keep_checkpoint:
            (run_dir / CHECKPOINT).unlink(missing_ok=True)
        self.ledger.record(run.to_row())
        return run


# -- the study -----------------------------------------------------------------------------------
def compare(
    config: CompareConfig | str | list[str] | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    handle_signals: bool = False,
    **fields: Any,
) -> dict[str, Any]:
    """Run the comparison and write its outputs; returns ``results.json``'s content (per
    model, or per grid point then per model).

    ``config`` is a :class:`~spheretorch.train.compare.CompareConfig`, or the models' text with
    the other fields as keywords (``compare("gpt,ngpt", preset="smoke", out=...)``).
    ``progress``: tqdm bars; ``log``: where the lines of the report go (default: the logger);
    ``handle_signals``: SIGINT/SIGTERM during a run checkpoint it and raise
    ``CompareInterrupted`` (the command line does this).
    """
    if isinstance(config, CompareConfig):
        cfg = dataclasses.replace(config, **fields) if fields else config
    else:
        if config is not None:
            fields["models"] = config
        cfg = CompareConfig(**fields)
    results = run_compare(cfg, progress=progress, log=log, handle_signals=handle_signals)
    return _to_json(results)


def _to_json(results: dict[str, dict[str, ModelResult]]) -> dict[str, Any]:
    if list(results) == [""]:
        return {k: r.to_dict() for k, r in results[""].items()}
    return {pt: {k: r.to_dict() for k, r in res.items()} for pt, res in results.items()}


def run_compare(
    config: CompareConfig,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    handle_signals: bool = False,
) -> dict[str, dict[str, ModelResult]]:
    """:func:`spheretorch.train.compare` on a
    :class:`~spheretorch.train.compare.CompareConfig`, returning the typed results keyed by
    grid point (``""`` without a grid), then by model label."""
    say = log if log is not None else logger.info
    cfg = config.resolve()
    p = get_preset(cfg.preset)  # type: ignore[arg-type]
    grid = cfg.grid if isinstance(cfg.grid, tuple) else None
    base_seq = int(cfg.options.get("seq_len", p.seq_len))
    points = sp.grid_points(grid, base_seq, cfg.batch_size)  # type: ignore[arg-type]
    out = Path(cfg.out)
    state = cfg.state()
    _check_state(out, state, cfg.resume)
    run_steps = sp.budget_steps(cfg.budgets, cfg.steps)  # type: ignore[arg-type]
    _preflight(cfg, points)
    out.mkdir(parents=True, exist_ok=True)
    ledger_path = out / LEDGER
    if not cfg.resume:
        ledger_path.unlink(missing_ok=True)
    ledger = Ledger(ledger_path)
    (out / STATE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    for b, n in run_steps.items():
        if not math.isclose(n / cfg.steps, b, rel_tol=1e-9):  # type: ignore[operator]
            say(
                f"warning: --budgets {b:g} runs {n} of {cfg.steps} steps, a fraction of "
                f"{n / cfg.steps:.4g}; it is reported and plotted there"  # type: ignore[operator]
            )

    t_start = time.perf_counter()
    info: dict[str, Any] = {"preset": p.to_dict(), "compare": state, "machine": machine_info()}
    # glibc allocator tuning (stable CPU step times) is the caller's environment; recorded
    info["malloc_env"] = {
        k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    }
    runner = _Runner(cfg, ledger, progress, handle_signals)
    field_name = grid[0] if grid else None
    if field_name == "seq_len":
        say(
            f"grid seq_len: tokens per step held at {cfg.batch_size * base_seq} "  # type: ignore[operator]
            f"(batch size {', '.join(str(pt['batch_size']) for pt in points)})"
        )
    results: dict[str, dict[str, ModelResult]] = {}
    text = ""
    for point in points:
        name = sp.point_name(point, field_name)
        point_run = _Point(runner, p, point, name, run_steps, say)
        results[name] = point_run.run()
        # written after every grid point: an unfinished study still has its finished points
        text = _write_outputs(out, results, field_name, cfg.preset, ledger, info, t_start)  # type: ignore[arg-type]
    say(text)
    say(f"compare wall time: {info['wall_s']:.1f} s; outputs in {out}")
    return results


class _Point:
    """One grid point: LR sweeps (extended at an edge), full runs, interleaved timing."""

    def __init__(
        self,
        runner: _Runner,
        preset: Preset,
        point: dict[str, Any],
        name: str,
        run_steps: dict[float, int],
        say: Callable[[str], None],
    ) -> None:
        self.runner, self.cfg, self.preset = runner, runner.cfg, preset
        self.point, self.name, self.run_steps, self.say = point, name, run_steps, say
        self.specs: list[ModelSpec] = self.cfg.models  # type: ignore[assignment]
        self.prefix = f"[{name}] " if name else ""
        self.pdir = runner.out / name if name else runner.out

    def run(self) -> dict[str, ModelResult]:
        sweeps = self._sweeps()
        chosen = {s.label: sweeps[s.label].chosen for s in self.specs}
        runs = self._full_runs(chosen)
        timing = self._timing(chosen)
        seeds = list(range(self.cfg.seed, self.cfg.seed + self.cfg.seeds))
        return summarize(self.specs, runs, seeds, self.run_steps, sweeps, timing)

    # -- LR sweep ----------------------------------------------------------------------------
    def _sweeps(self) -> dict[str, SweepResult]:
        cfg = self.cfg
        lrs: list[float] = cfg.sweep_lrs  # type: ignore[assignment]
        sweep_steps = max(1, round(cfg.sweep_fraction * cfg.steps))  # type: ignore[operator]
        total = len(self.specs) * len(lrs) * sweep_steps
        bar = _bar(self.runner.progress and bool(lrs), total, f"{self.prefix}LR sweep")
        out: dict[str, SweepResult] = {}
        try:
            for spec in self.specs:
                if not lrs:
                    lr = self.preset.lr.get(spec.model, next(iter(self.preset.lr.values())))
                    out[spec.label] = SweepResult({}, lr, note="no sweep: the preset's LR")
                    continue
                out[spec.label] = self._sweep(spec, lrs, sweep_steps, bar)
        finally:
            if bar is not None:
                bar.close()
        return out

    def _sweep_run(self, spec: ModelSpec, lr: float, steps: int, bar: Any) -> float | None:
        run = self.runner.run(
            f"{self.name}/{spec.label}/sweep/lr{lr:g}", spec, self.point,
            self.pdir / "sweep" / f"{spec.label}-lr{lr:g}", bar, phase="sweep",
            budget=self.cfg.sweep_fraction, grid=self.name or None, lr=lr, seed=self.cfg.seed,
            steps=steps, eval_interval=steps, keep_checkpoint=False,
        )  # fmt: skip
        v = run.final_val_loss
        self.say(
            f"{self.prefix}sweep {spec.label:8s} lr={lr:<8g} val_loss="
            + (f"{v:.4f}" if v is not None else "diverged")
            + f" ({count(steps, 'step')})"
        )
        return v

    def _sweep(self, spec: ModelSpec, lrs: list[float], steps: int, bar: Any) -> SweepResult:
        """Sweep ``lrs``; while the best is the smallest or largest candidate, add one more
        beyond it at the spacing of the two candidates at that end, within the bounds."""
        lo_bound, hi_bound = self.cfg.sweep_bounds  # type: ignore[misc]
        losses = {lr: self._sweep_run(spec, lr, steps, bar) for lr in lrs}
        extensions: list[float] = []
        edge, note = None, ""
        for _ in range(2 * _MAX_EXTENSIONS):
            finite = {lr: v for lr, v in losses.items() if v is not None}
            if not finite:
                break
            cands = sorted(losses)
            best = min(finite, key=finite.__getitem__)
            if len(cands) < 2:
                note = "one candidate: no edge check"
                break
            if best == cands[0]:
                side, nxt = "low", best * best / cands[1]
            elif best == cands[-1]:
                side, nxt = "high", best * best / cands[-2]
            else:
                break
            nxt = float(f"{nxt:.4g}")  # a readable name for the run (and its key)
            if not (lo_bound <= nxt <= hi_bound):
                edge = side
                note = (
                    f"at the {side} edge, bound reached (next candidate {nxt:g} outside "
                    f"--sweep-bounds {lo_bound:g},{hi_bound:g})"
                )
                break
            self.say(
                f"{self.prefix}sweep {spec.label:8s} best lr {best:g} is the {side}est "
                f"candidate: extending the sweep to {nxt:g}"
            )
            if bar is not None:
                bar.grow(steps)
            extensions.append(nxt)
            losses[nxt] = self._sweep_run(spec, nxt, steps, bar)
        finite = {lr: v for lr, v in losses.items() if v is not None}
        if finite:
            chosen = min(finite, key=finite.__getitem__)
            if not note:
                note = "interior" + (f" after {len(extensions)} extension(s)" if extensions else "")
        else:
            chosen = self.preset.lr.get(spec.model, next(iter(self.preset.lr.values())))
            note = "every candidate diverged: the preset's LR"
        self.say(f"{self.prefix}sweep {spec.label:8s} chose lr {chosen:g} ({note})")
        return SweepResult(losses, chosen, extensions, edge, note)

    # -- full runs and timing ----------------------------------------------------------------
    def _full_runs(self, chosen: dict[str, float]) -> dict[tuple[str, int, float], RunResult]:
        cfg = self.cfg
        seeds = range(cfg.seed, cfg.seed + cfg.seeds)
        n_full = len(self.specs) * cfg.seeds * sum(self.run_steps.values())
        runs: dict[tuple[str, int, float], RunResult] = {}
        bar = _bar(self.runner.progress, n_full, f"{self.prefix}full runs")
        try:
            for s in seeds:  # seeds outermost: an interrupted study has whole seeds first
                for b in sorted(self.run_steps, reverse=True):
                    for spec in self.specs:
                        suffix = ("" if s == cfg.seed else f"-seed{s}") + (
                            "" if b == 1 else f"-b{b:g}"
                        )
                        run = self.runner.run(
                            f"{self.name}/{spec.label}/seed{s}/b{b:g}", spec, self.point,
                            self.pdir / f"{spec.label}{suffix}", bar, phase="full", budget=b,
                            grid=self.name or None, lr=chosen[spec.label], seed=s,
                            steps=self.run_steps[b], eval_interval=cfg.eval_interval,
                            keep_checkpoint=True,
                        )  # fmt: skip
                        runs[(spec.label, s, b)] = run
                        v = run.final_val_loss
                        self.say(
                            f"{self.prefix}full  {spec.label:8s} lr={chosen[spec.label]:<8g} "
                            f"seed={s} budget={b:g} val_loss="
                            + (f"{v:.4f}" if v is not None else "diverged")
                            + f" ({run.steps} steps, {run.ms_per_step or math.nan:.1f} ms/step "
                            "in its own run)"
                        )
        finally:
            if bar is not None:
                bar.close()
        return runs

    def _timing(self, chosen: dict[str, float]) -> dict[str, float]:
        """Interleaved step timing on fresh models (step time does not depend on the
        weights)."""
        p = self.preset
        if not p.timing_rounds:
            return {}
        trainers = {}
        for spec in self.specs:
            c = _train_config(
                self.cfg, spec, self.point, seed=self.cfg.seed, lr=chosen[spec.label],
                eval_batches=1,
            )  # fmt: skip
            trainers[spec.label] = Trainer(c, None, save_checkpoints=False)
        bar = _bar(self.runner.progress, p.timing_rounds * len(self.specs), f"{self.prefix}timing")
        try:
            timing = _time_interleaved(trainers, p.timing_rounds, p.timing_steps, bar)
        finally:
            if bar is not None:
                bar.close()
        self.say(
            f"{self.prefix}timing (interleaved, median of {count(p.timing_rounds, 'round')} x "
            f"{count(p.timing_steps, 'step')} after warm-up): "
            + ", ".join(f"{k} {v:.1f} ms/step" for k, v in timing.items())
        )
        return timing


def _write_outputs(
    out: Path,
    results: dict[str, dict[str, ModelResult]],
    field_name: str | None,
    preset: str,
    ledger: Ledger,
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
    (out / "results.json").write_text(
        json.dumps(_to_json(results), indent=2) + "\n", encoding="utf-8"
    )
    (out / "run_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    rows = sorted(ledger.rows.values(), key=lambda r: r["key"])
    write_csv([{k: v for k, v in r.items() if k != "history"} for r in rows], out / "runs.csv")
    tables = [markdown_table(res, preset, point=name or None) for name, res in results.items()]
    for name, res in results.items():
        write_plots(out, res, preset, name)
    if field_name is not None:
        tables.insert(0, grid_table(results, field_name))
        plot_grid(results, field_name, out / "grid.png")
    text = "\n\n".join(tables)
    (out / "results.md").write_text(text + "\n", encoding="utf-8")
    return text


def _check_state(out: Path, state: dict[str, Any], resume: bool) -> None:
    saved_path = out / STATE
    if not resume:
        return
    if not saved_path.is_file():
        raise UserError(f"nothing to resume: {saved_path} does not exist")
    saved = json.loads(saved_path.read_text(encoding="utf-8"))
    for key, value in state.items():
        theirs = saved.get(key, _STATE_DEFAULTS.get(key))
        if json.loads(json.dumps(value)) != theirs:
            flag = "--" + key.replace("_", "-")
            raise UserError(
                f"--resume: {flag} differs from the interrupted compare's "
                f"({theirs!r} there, {value!r} now); pass the same settings"
            )
