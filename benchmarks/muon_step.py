"""Time one optimizer step of SphereMuon and AdamH against torch.optim.Muon and torch's AdamW.

Every candidate gets its own copy of the same matrices and fixed gradients; candidates are
timed interleaved in one process (one step each per round, the order rotating) and the median
over the rounds is reported with ratios against ``torch.optim.Muon`` (Euclidean matrices,
bfloat16 Newton-Schulz one matrix at a time) and ``torch.optim.AdamW(foreach=True)``.

Candidates (the same shapes for all):

* ``torch Muon`` / ``torch AdamW``: the references, Euclidean matrices;
* ``SphereMuon euclid``: our Muon path on the same Euclidean matrices (equal to torch's, step
  for step), same-shape matrices batched (``torch.bmm``);
* ``SphereMuon rows`` / ``SphereMuon rows, one by one``: unit-row sphere matrices, batched or
  not (``batch_ns=False``); ``SphereMuon frobenius``: every matrix on its Frobenius sphere;
* ``AdamH rows`` / ``AdamH frobenius``: hyperball Adam on the same sphere kinds.

Sets (``--set``): ``default`` 8 x (256, 256) + 4 x (1024, 256) (CPU); ``small`` 4 x (64, 64) +
2 x (128, 64) (the ``--quick`` smoke); ``gpt124m`` the hidden matrices of GPT-2 small (12 x
qkv (2304, 768), proj (768, 768), up (3072, 768), down (768, 3072); for ``--device cuda``).

Usage::

    python benchmarks/muon_step.py --quick                 # seconds, CPU
    python benchmarks/muon_step.py --device cuda --set default gpt124m
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

import spheretorch as st
from spheretorch.optim import AdamH, SphereMuon

Shapes = list[tuple[int, int]]


def sets() -> dict[str, Shapes]:
    gpt: Shapes = []
    for _ in range(12):
        gpt += [(2304, 768), (768, 768), (3072, 768), (768, 3072)]
    return {
        "default": [(256, 256)] * 8 + [(1024, 256)] * 4,
        "small": [(64, 64)] * 4 + [(128, 64)] * 2,
        "gpt124m": gpt,
    }


def make(shapes: Shapes, kind: str, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out: list[torch.Tensor] = []
    for s in shapes:
        x = torch.randn(s, generator=g).to(device)
        if kind == "rows":
            out.append(st.SphereParameter(x, dim=1))
        elif kind == "frobenius":
            out.append(st.SphereParameter(x, dim=None))
        else:
            out.append(torch.nn.Parameter(x))
    gg = torch.Generator().manual_seed(1)
    for p in out:
        p.grad = torch.randn(p.shape, generator=gg).to(device)
    return out


def candidates(shapes: Shapes, device: torch.device) -> dict[str, Callable[[], None]]:
    specs: dict[str, tuple[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]] = {
        "torch Muon": ("euclid", lambda ps: torch.optim.Muon(ps, lr=0.02, weight_decay=0.0)),
        "torch AdamW": ("euclid", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)),
        "SphereMuon euclid": ("euclid", lambda ps: SphereMuon(ps, lr=0.02)),
        "SphereMuon rows": ("rows", lambda ps: SphereMuon(ps, lr=0.02)),
        "SphereMuon rows, one by one": ("rows", lambda ps: SphereMuon(ps, lr=0.02, batch_ns=False)),
        "SphereMuon frobenius": ("frobenius", lambda ps: SphereMuon(ps, lr=0.02)),
        "AdamH rows": ("rows", lambda ps: AdamH(ps, lr=0.01)),
        "AdamH frobenius": ("frobenius", lambda ps: AdamH(ps, lr=0.01)),
    }
    out = {}
    for name, (kind, build) in specs.items():
        opt = build(make(shapes, kind, device))
        out[name] = opt.step
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_set(shapes: Shapes, device: torch.device, rounds: int) -> dict[str, float]:
    steps = candidates(shapes, device)
    names = list(steps)
    for step in steps.values():  # warm-up (allocations, first-call costs)
        step()
    sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            sync(device)
            t0 = time.perf_counter()
            steps[n]()
            sync(device)
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) * 1e3 for n, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--set", nargs="+", default=None, choices=sorted(sets()))
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (median)")
    parser.add_argument("--quick", action="store_true", help="the small set, 3 rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    names = args.set or (["small"] if args.quick else ["default"])
    rounds = args.rounds or (3 if args.quick else 10)
    where = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
    print(f"# muon_step: torch {torch.__version__}, {device} ({where or 'unknown CPU'}), ", end="")
    print(f"{torch.get_num_threads()} threads, median of {rounds} rounds")
    for name in names:
        shapes = sets()[name]
        ms = time_set(shapes, device, rounds)
        print(f"\n## set {name}: {len(shapes)} matrices, {sum(a * b for a, b in shapes):,} values")
        print(f"{'candidate':30s} {'ms/step':>9s} {'vs torch Muon':>14s} {'vs torch AdamW':>15s}")
        for n, t in ms.items():
            print(f"{n:30s} {t:9.3f} {t / ms['torch Muon']:13.2f}x {t / ms['torch AdamW']:14.2f}x")


if __name__ == "__main__":
    main()
