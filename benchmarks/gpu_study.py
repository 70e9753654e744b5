"""The one-call GPU study: GPT, nGPT and GeoNorm on a real corpus in a few minutes.

    python benchmarks/gpu_study.py                       # CUDA: the study, within --time-budget
    python benchmarks/gpu_study.py --device cpu --quick  # the smoke (CI): toy sizes, ~1 minute

1. A byte-level corpus from what is on the machine (no network): the Python sources of the
   installed packages (``site-packages/**/*.py`` of this interpreter, shuffled by file with a
   fixed seed so that the validation tail is a mix of packages, capped at ``--max-mb``), made
   with ``spheretorch prepare``'s :func:`~spheretorch.train.prepare.prepare`. ``--corpus``
   names another directory of sources, or a prepared corpus to use as it is.
2. A probe times a few steps of each model at the preset's size and sets the number of steps
   so that the whole study fits ``--time-budget`` seconds (the ``gpu-quick`` preset: 8 layers,
   d 512, context 1024, batch 16, about 25M parameters in the blocks).
3. ``spheretorch compare``: LR sweeps per model (extended at an edge), ``--seeds`` full runs
   at budgets 0.25, 0.5 and 1 of the steps, interleaved timing. Reported: final loss, steps,
   tokens and wall-clock to the target (GPT's final loss) with Kaplan-Meier intervals over
   seeds, iso-loss speedups across budgets with bootstrap intervals, loss curves.

4. The optimizer study (``--studies optims``: a call of its own, within its own time budget;
   ``--studies models,optims`` shares one budget between the two): nGPT at the preset's width
   with ``OPTIM_LAYERS`` layers trained by each of AdamW, Muon, RenormAdam, RiemannianAdam,
   AdamH and SphereMuon (``compare --optims``: each recipe its own LR sweep over one grid wide
   enough for Adam-type and Muon-type LRs, extended at an edge), the same seeds, budgets and
   statistics; the target is the first recipe's (AdamW's) final loss. The CPU study of the
   same question: ``benchmarks/study.sh optims``.

Outputs in ``--out`` (default ``runs/gpu_study``): ``corpus/``, ``compare/`` (the models'
compare), ``optims/`` (the optimizers' compare), ``gpu_study.md`` (settings, probes, tables)
and ``gpu_study.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

MODELS = "gpt,ngpt,geonorm"
BUDGETS = "0.25,0.5,1"
#: at most two extensions on either side of gpu-quick's {1e-3, 2e-3, 4e-3}: the time plan
#: counts on it
GPU_SWEEP_BOUNDS = (2.5e-4, 1.6e-2)
#: the optimizer study: one model, the six recipes (AdamW first: its loss is the target)
OPTIM_MODEL = "ngpt"
OPTIMS = "adamw,muon,renorm,riemannian,adamh,sphere_muon"
#: one LR grid for every recipe (Adam-type LRs sit near 1e-3, Muon-type and hyperball ones
#: near 2e-2: x4 apart, each recipe's best is inside or one extension away), and bounds
#: allowing two extensions per side
OPTIM_SWEEP_LRS = "1e-3,4e-3,1.6e-2"
OPTIM_SWEEP_BOUNDS = (6.25e-5, 0.256)
#: the optimizer study's depth: six recipes in one call's time budget (gpu-quick has 8 layers)
OPTIM_LAYERS = 4
STUDIES = ("models", "optims")
#: each study's compare outputs, under --out
OUT_DIRS = {"models": "compare", "optims": "optims"}


def source_files(roots: list[Path], max_bytes: int, seed: int = 0) -> list[Path]:
    """``*.py`` files under ``roots`` (sorted, then shuffled with ``seed``), the first ones up
    to ``max_bytes`` in all."""
    found: list[Path] = []
    for root in roots:
        for d, dirs, files in os.walk(root):
            dirs.sort()
            found += [Path(d) / f for f in sorted(files) if f.endswith(".py")]
    random.Random(seed).shuffle(found)
    picked, total = [], 0
    for f in found:
        try:
            size = f.stat().st_size
        except OSError:
            continue
        if size == 0 or total + size > max_bytes:
            continue
        picked.append(f)
        total += size
    return picked


def make_corpus(args: argparse.Namespace, out: Path) -> tuple[Path, dict[str, Any]]:
    """The prepared corpus to train on: ``--corpus`` as it is when it is one, else a
    byte-level one made from Python sources."""
    from spheretorch.train.errors import UserError
    from spheretorch.train.prepare import prepare

    given = Path(args.corpus) if args.corpus else None
    if given is not None and (given / "meta.json").is_file():
        return given, json.loads((given / "meta.json").read_text())
    roots = [given] if given is not None else [Path(sysconfig.get_paths()["purelib"])]
    files = source_files(roots, int(args.max_mb * 2**20))
    if not files:
        raise UserError(f"no .py files under {', '.join(map(str, roots))}")
    corpus = out / "corpus"
    meta = prepare(files, corpus, "byte", val_fraction=0.05, progress=False, force=True)
    meta["source_roots"] = [str(r) for r in roots]
    return corpus, meta


def probe(
    preset: str, corpus: Path, device: str, runs: dict[str, dict], steps: int = 5
) -> dict[str, float]:
    """ms per training step of each run at the preset's size (after warm-up steps).
    ``runs``: label -> TrainConfig fields."""
    import torch

    from spheretorch.train import TrainConfig, Trainer

    out = {}
    for model, fields in runs.items():
        t = Trainer(TrainConfig(preset=preset, data=str(corpus), device=device, **fields))
        for i in range(3):
            t.train_step(*t.batch(i))
        if t.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(steps):
            t.train_step(*t.batch(3 + i))
        if t.device.type == "cuda":
            torch.cuda.synchronize()
        out[model] = 1000 * (time.perf_counter() - t0) / steps
        del t
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def plan_steps(
    ms: dict[str, float], seconds: float, seeds: int, eval_interval: int, lo: int, hi: int
) -> int:
    """Full-run steps S such that every model's runs fit ``seconds``: per model at most
    (3 sweep LRs + 2 extensions) x 0.2 S + seeds x (0.25 + 0.5 + 1) S steps, plus 15% for
    evaluations and start-up; a multiple of ``eval_interval`` in [lo, hi]."""
    per_step = sum(ms.values()) / 1000 * (5 * 0.2 + seeds * 1.75) * 1.15
    s = int(seconds / per_step) // eval_interval * eval_interval
    return max(lo, min(hi, s))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None, help="cuda (default where present) or cpu")
    ap.add_argument("--quick", action="store_true", help="toy sizes: the smoke (~1 min on CPU)")
    ap.add_argument("--out", default="runs/gpu_study", help="output directory")
    ap.add_argument("--corpus", help="a directory of sources, or a prepared corpus")
    ap.add_argument("--max-mb", type=float, default=None, help="corpus cap (default 200; 1 quick)")
    ap.add_argument("--time-budget", type=float, default=420.0, help="seconds for everything")
    ap.add_argument("--seeds", type=int, default=None, help="seeds (default 2; 2 quick)")
    ap.add_argument("--steps", type=int, default=None, help="full-run steps (default: planned)")
    ap.add_argument("--param-dtype", default="fp32", help="fp32 (default) or bf16 weights")
    ap.add_argument(
        "--studies",
        default="models",
        help="which studies, sharing the time budget: models (GPT, nGPT, GeoNorm; the "
        "default), optims (nGPT with six optimizers), or models,optims",
    )
    args = ap.parse_args(argv)
    studies = [x.strip() for x in args.studies.split(",") if x.strip()]
    if not studies or any(x not in STUDIES for x in studies):
        ap.error(
            f"--studies: a comma-separated subset of {','.join(STUDIES)}, got {args.studies!r}"
        )
    start = time.perf_counter()

    import torch

    from spheretorch.cli import _setup_logging
    from spheretorch.train.errors import UserError
    from spheretorch.train.presets import get_preset

    _setup_logging()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_study: error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    args.max_mb = args.max_mb or (1.0 if args.quick else 200.0)
    seeds = args.seeds or 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        corpus, meta = make_corpus(args, out)
    except UserError as e:
        print(f"gpu_study: error: {e}", file=sys.stderr)
        return 2
    t_corpus = time.perf_counter() - start
    print(
        f"corpus: {meta['tokens']['train']:,} train / {meta['tokens']['val']:,} val bytes "
        f"from {meta.get('files', '?')} files ({t_corpus:.1f} s)",
        flush=True,
    )
    preset = "smoke" if args.quick else "gpu-quick"
    p = get_preset(preset)
    threads = torch.get_num_threads()
    if device == "cpu" and p.threads:  # as the command line does: tiny models, one thread
        torch.set_num_threads(p.threads)
    try:
        return _studies(args, studies, device, preset, corpus, meta, seeds, out, start, t_corpus)
    finally:
        torch.set_num_threads(threads)


def _study(
    kind: str,
    args: argparse.Namespace,
    device: str,
    preset: str,
    corpus: Path,
    seeds: int,
    out: Path,
    seconds: float,
) -> dict[str, Any]:
    """One study (``kind``: ``"models"`` or ``"optims"``) within ``seconds``: probe, plan,
    compare. Returns its settings, probe, results and Markdown table."""
    from spheretorch.train.compare import CompareConfig, compare
    from spheretorch.train.presets import get_preset

    p = get_preset(preset)
    # the optimizer study's depth (the smoke: 1 of its preset's 2 layers, the same path)
    depth = {"n_layer": 1 if args.quick else OPTIM_LAYERS} if kind == "optims" else {}
    if kind == "models":
        runs = {m: {"model": m} for m in MODELS.split(",")}
    else:
        runs = {
            f"{OPTIM_MODEL}+{o}": {"model": OPTIM_MODEL, "optim": o, "model_options": depth}
            for o in OPTIMS.split(",")
        }
    t0 = time.perf_counter()
    ms = probe(preset, corpus, device, runs, steps=2 if args.quick else 5)
    print(
        f"{kind}: probe (ms/step): " + ", ".join(f"{k} {v:.1f}" for k, v in ms.items()), flush=True
    )
    if args.steps:
        steps = args.steps
    elif args.quick:
        steps = 16
    else:
        left = seconds - (time.perf_counter() - t0) - 15  # 15 s: tables, plots
        steps = plan_steps(ms, left, seeds, p.eval_interval, 4 * p.eval_interval, 4000)
    eval_interval = max(1, min(p.eval_interval, steps // 4))
    print(
        f"{kind}: full runs of {steps} steps (eval every {eval_interval}), {seeds} seeds",
        flush=True,
    )
    # quick: two candidates and tight bounds (an extension still happens, cheaply)
    if kind == "models":
        setting = dict(
            models=MODELS,
            sweep_lrs="1e-2,3e-2" if args.quick else None,
            sweep_bounds=(3e-3, 0.1) if args.quick else GPU_SWEEP_BOUNDS,
        )
    else:
        setting = dict(
            models=OPTIM_MODEL,
            optims=OPTIMS,
            options=dict(depth),
            sweep_lrs="1e-2,3e-2" if args.quick else OPTIM_SWEEP_LRS,
            sweep_bounds=(3e-3, 0.1) if args.quick else OPTIM_SWEEP_BOUNDS,
        )
    config = CompareConfig(
        preset=preset,
        out=out / OUT_DIRS[kind],
        data=str(corpus),
        device=device,
        seeds=seeds,
        budgets="0.5,1" if args.quick else BUDGETS,
        steps=steps,
        eval_interval=eval_interval,
        eval_batches=2 if args.quick else None,
        param_dtype=args.param_dtype,
        **setting,  # type: ignore[arg-type]
    )
    results = compare(config, progress=False, log=lambda line: print(line, flush=True))
    table = (Path(config.out) / "results.md").read_text(encoding="utf-8")
    return {
        "steps": steps,
        "options": depth,
        "probe_ms_per_step": ms,
        "wall_s": time.perf_counter() - t0,
        "results": results,
        "table": table,
    }


TITLES = {
    "models": "GPT, nGPT and GeoNorm",
    "optims": f"{OPTIM_MODEL} with {len(OPTIMS.split(','))} optimizers ({OPTIMS})",
}


def _studies(
    args: argparse.Namespace,
    studies: list[str],
    device: str,
    preset: str,
    corpus: Path,
    meta: dict[str, Any],
    seeds: int,
    out: Path,
    start: float,
    t_corpus: float,
) -> int:
    """The studies one after the other, each given an equal share of the time left; one
    report and one JSON for all."""
    from spheretorch.train.compare import machine_info

    done: dict[str, dict[str, Any]] = {}
    for i, kind in enumerate(studies):
        left = args.time_budget - (time.perf_counter() - start) - 15  # 15 s: the report
        done[kind] = _study(
            kind, args, device, preset, corpus, seeds, out, left / (len(studies) - i)
        )
    wall = time.perf_counter() - start
    info = {
        "device": device,
        "machine": machine_info(),
        "preset": preset,
        "quick": args.quick,
        "studies": studies,
        "seeds": seeds,
        "budgets": BUDGETS,
        "corpus": {k: meta.get(k) for k in ("tokens", "files", "source_roots", "vocab_size")},
        "corpus_s": t_corpus,
        "wall_s": wall,
    }
    for kind, d in done.items():
        info[kind] = {k: d[k] for k in ("steps", "options", "probe_ms_per_step", "wall_s")}
    data: dict[str, Any] = {"info": info}
    if "models" in done:
        data["results"] = done["models"]["results"]
    if "optims" in done:
        data["optim_results"] = done["optims"]["results"]
    (out / "gpu_study.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    machine = info["machine"].get("gpu") or info["machine"]["cpu"]
    lines = [
        f"# GPU study ({'quick smoke, ' if args.quick else ''}{device}: {machine})",
        "",
        f"Corpus: byte-level, {meta['tokens']['train']:,} training bytes of Python sources. "
        f"Preset `{preset}`, budgets {BUDGETS}, {seeds} seeds; wall time {wall:.0f} s.",
    ]
    for kind, d in done.items():
        probe_text = ", ".join(f"{k} {v:.1f}" for k, v in d["probe_ms_per_step"].items())
        lines += [
            "",
            f"## {TITLES[kind]}",
            "",
            f"{d['steps']} steps at budget 1"
            + "".join(f", {k}={v}" for k, v in d["options"].items())
            + f"; probe ms/step {probe_text}; "
            f"{d['wall_s']:.0f} s. Outputs: `{OUT_DIRS[kind]}/`.",
            "",
            d["table"].strip(),
        ]
    (out / "gpu_study.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"gpu_study: {wall:.0f} s; outputs in {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
