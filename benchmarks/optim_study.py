"""A small CPU study of the optimizers on one model: AdamW, Muon, RenormAdam, RiemannianAdam,
AdamH and SphereMuon (the ``train --optim`` recipes), each over a short LR grid and seeds.

Every run is an in-memory :class:`spheretorch.train.trainer.Trainer` run of the same model,
data, preset and step budget; only ``optim``, ``lr`` and ``seed`` change. Reported per
optimizer and LR: the final validation loss (mean and spread over seeds) and the best LR.
Writes ``OUT/results.json`` (every run's summary) and ``OUT/results.md`` (the table).

``lr`` is the trainer's ``--lr``: Adam's LR; for ``muon``/``sphere_muon`` Muon's LR and the
sphere step angle are ``MUON_LR_SCALE`` (5) times it and the AdamW parts keep it; for ``adamh``
it is the update norm relative to the weight norm (per row on nGPT's sphere matrices).

Usage::

    python benchmarks/optim_study.py --out benchmarks/results/optim_study   # ~10 CPU min
    python benchmarks/optim_study.py --quick --out /tmp/optim-study          # seconds
    python benchmarks/optim_study.py --device cuda --preset gpu-medium --data data/owt-gpt2 \
        --steps 2000 --out DIR                                               # the GPU study
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from spheretorch.train import TrainConfig
from spheretorch.train.trainer import Trainer

#: the LR grid of each recipe (the trainer's --lr)
GRIDS: dict[str, tuple[float, ...]] = {
    "adamw": (3e-3, 1e-2, 3e-2),
    "renorm": (3e-3, 1e-2, 3e-2),
    "riemannian": (1e-2, 3e-2, 1e-1),
    "muon": (3e-3, 1e-2, 3e-2),
    "sphere_muon": (3e-3, 1e-2, 3e-2),
    "adamh": (3e-3, 1e-2, 3e-2),
}


def run(
    model: str,
    optim: str,
    lr: float,
    seed: int,
    steps: int,
    eval_batches: int,
    preset: str = "smoke",
    device: str = "cpu",
    data: str | None = None,
) -> dict:
    cfg = TrainConfig(
        model=model,
        preset=preset,
        data=data,
        device=device,
        optim=optim,
        lr=lr,
        seed=seed,
        steps=steps,
        eval_batches=eval_batches,
        eval_interval=steps,
    )
    summary = Trainer(cfg, None, progress=False, save_checkpoints=False).train()
    return {"optim": optim, "lr": lr, "seed": seed, **summary}


def table(runs: list[dict]) -> str:
    lines = [
        "| optimizer | lr | final val loss (mean over seeds) | spread | ms/step |",
        "|---|---|---|---|---|",
    ]
    best: dict[str, tuple[float, float]] = {}
    for optim, grid in GRIDS.items():
        for lr in grid:
            rs = [r for r in runs if r["optim"] == optim and r["lr"] == lr]
            if not rs:
                continue
            losses = [r["final_val_loss"] for r in rs]
            mean = statistics.fmean(losses)
            spread = max(losses) - min(losses)
            ms = statistics.fmean(r["ms_per_step"] for r in rs)
            lines.append(f"| {optim} | {lr:g} | {mean:.4f} | {spread:.4f} | {ms:.1f} |")
            if optim not in best or mean < best[optim][1]:
                best[optim] = (lr, mean)
    lines += ["", "| optimizer | best lr | final val loss | best lr at the grid's edge |"]
    lines.append("|---|---|---|---|")
    for optim, (lr, loss) in sorted(best.items(), key=lambda kv: kv[1][1]):
        edge = "yes" if lr in (min(GRIDS[optim]), max(GRIDS[optim])) else "no"
        lines.append(f"| {optim} | {lr:g} | {loss:.4f} | {edge} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for results.json/results.md")
    parser.add_argument("--model", default="ngpt", choices=("gpt", "ngpt", "geonorm"))
    parser.add_argument("--preset", default="smoke", help="train preset (e.g. gpu-medium)")
    parser.add_argument("--data", default=None, help="corpus (default: the preset's)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 optimizers, 1 LR, 4 steps")
    parser.add_argument(
        "--render-only", action="store_true", help="rewrite results.md from OUT/results.json"
    )
    args = parser.parse_args(argv)
    command = "python benchmarks/optim_study.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    torch.set_num_threads(args.threads)
    grids = GRIDS
    steps, seeds, evals = args.steps, args.seeds, args.eval_batches
    if args.quick:
        grids = {"renorm": GRIDS["renorm"][:1], "sphere_muon": GRIDS["sphere_muon"][:1]}
        steps, seeds, evals = 4, 1, 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    t0 = time.perf_counter()
    if args.render_only:
        runs = json.loads((out / "results.json").read_text())
        grids = {}
        command = (out / "results.md").read_text().split("`")[1]
    for optim, grid in grids.items():
        for lr in grid:
            for seed in range(seeds):
                r = run(
                    args.model, optim, lr, seed, steps, evals, args.preset, args.device, args.data
                )
                runs.append(r)
                print(
                    f"{optim:12s} lr={lr:<6g} seed={seed} val={r['final_val_loss']:.4f}", flush=True
                )
    header = (
        f"# optimizer study: {args.model}, preset {args.preset}, {steps} steps, {seeds} seed(s), "
        f"{evals} eval batches, torch {torch.__version__}, {args.threads} CPU thread(s)\n\n"
        f"Command: `{command}` ({time.perf_counter() - t0:.0f} s). Final validation loss "
        f"after the run's cosine schedule; spread = max - min over seeds. ms/step is as "
        f"measured on a shared 2-core machine (other jobs running): not a speed comparison "
        f"(benchmarks/optim_step.py --only-family muon is).\n\n"
    )
    if not args.render_only:
        (out / "results.json").write_text(json.dumps(runs, indent=1) + "\n")
    (out / "results.md").write_text(header + table(runs) + "\n")
    print(header + table(runs))


if __name__ == "__main__":
    main()
