"""Time one optimizer step: spheretorch's optimizers against torch's Adam/SGD/Muon and geoopt.

Every candidate gets its own copy of the same parameters and fixed gradients; the candidates
are timed interleaved in one process (one step each per round, the order rotating between
rounds) and the median over the rounds is reported, with ratios against torch's foreach and
fused peer (``Adam`` for the Adam family, ``SGD`` for the SGD family) and against geoopt's
``RiemannianAdam``, and the achieved bandwidth: the bytes a step must move (read parameter,
gradient and state, write parameter and state: 28 bytes per float32 value for Adam, 20 for
SGD with momentum) over its time, also as a share of the measured copy bandwidth
(``dst.copy_(src)`` of 256 MiB on CUDA, 64 MiB on CPU).

The Muon family (:class:`~spheretorch.optim.SphereMuon`, :class:`~spheretorch.optim.AdamH`)
runs on the sets made of matrices only (``small``, ``matrices``, ``gpt124m-matrices``), in a
table of its own with ratios against ``torch.optim.Muon`` (where the installed torch has it:
Euclidean matrices, bfloat16 Newton-Schulz one matrix at a time) and torch's ``AdamW``
(foreach and fused) on the same shapes: ``SphereMuon(euclid)`` is our Muon path on the same
Euclidean matrices (equal to torch's step for step, same-shape matrices batched), ``(rows)``
unit-row sphere matrices (``batch_ns=False``: one matrix at a time), ``(frobenius)`` every
matrix on its Frobenius sphere (``SphereParameter(w, dim=None)``); ``AdamH`` on both sphere
kinds.

Parameter sets (``--set``):

* ``default``: 8 x (512, 512) + 4 x (2048, 512) sphere matrices (unit rows) + 20 Euclidean
  vectors of 512 -- the set of the targets in docs/benchmarks.md;
* ``small``: 64 sphere matrices of shape (4, 8): per-parameter overhead;
* ``single``: one float64 sphere vector of 200 values: a research problem's fixed cost per
  step (compare with ``--threads 1``);
* ``gpt124m``: the parameter shapes of GPT-2 small (124M): token and position embeddings,
  12 blocks of attention/MLP matrices (sphere along d_model = 768, as in nGPT) and their
  Euclidean gains/biases. Meant for ``--device cuda``;
* ``matrices``: 8 x (256, 256) + 4 x (1024, 256) sphere matrices (unit rows), where Muon
  applies (the ``default`` set's matrices at a quarter of the width: Newton-Schulz is
  compute-bound, seconds per step on a small CPU at full size); the Muon family only, unless
  ``--only-family`` names others;
* ``gpt124m-matrices``: the 48 hidden matrices of GPT-2 small (qkv (2304, 768), projection
  (768, 768), MLP up (3072, 768) and down (768, 3072) per block): Muon's share of the model,
  the Muon family only (as ``matrices``). Meant for ``--device cuda``.

``--quick`` shrinks every shape by 16 along each axis (at least 2) and times 3 rounds after
one warm-up: seconds on CPU, a smoke test of every candidate (its figures mean nothing).
``--md-out FILE`` writes the Markdown report there as well as printing it.

The script re-executes itself with glibc's ``MALLOC_MMAP_THRESHOLD_=33554432`` and
``MALLOC_TRIM_THRESHOLD_=1073741824`` (stable allocation costs on CPU) unless they are set.

Usage::

    python benchmarks/optim_step.py                      # CPU, default + small sets
    python benchmarks/optim_step.py --device cpu --quick --md-out /tmp/optim.md
    python benchmarks/optim_step.py --device cuda --set default small gpt124m
    python benchmarks/optim_step.py --set matrices small --only-family muon   # Muon family
    python benchmarks/optim_step.py --device cuda --set gpt124m-matrices --only-family muon
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}

if __name__ == "__main__" and any(os.environ.get(k) != v for k, v in _MALLOC_ENV.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **_MALLOC_ENV})

import torch  # noqa: E402

import spheretorch as st  # noqa: E402
from spheretorch.optim import (  # noqa: E402
    AdamH,
    RenormAdam,
    RiemannianAdam,
    RiemannianSGD,
    SphereMuon,
)

# ----------------------------------------------------------------------------- parameter sets


def default_set() -> list[tuple[tuple[int, ...], int | None]]:
    return [((512, 512), 1)] * 8 + [((2048, 512), 1)] * 4 + [((512,), None)] * 20


def small_set() -> list[tuple[tuple[int, ...], int | None]]:
    return [((4, 8), 1)] * 64


def single_set() -> list[tuple[tuple[int, ...], int | None]]:
    return [((200,), 0)]


def gpt124m_set() -> list[tuple[tuple[int, ...], int | None]]:
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    out: list[tuple[tuple[int, ...], int | None]] = [((vocab, d), 1), ((ctx, d), 1)]
    for _ in range(layers):
        out += [
            ((3 * d, d), 1),  # qkv: rows are input-side d_model vectors
            ((d, d), 0),  # attention output projection: columns along d_model
            ((4 * d, d), 1),  # MLP up
            ((d, 4 * d), 0),  # MLP down
        ]
        out += [((d,), None)] * 4 + [((3 * d,), None), ((4 * d,), None)]  # gains / biases
    out += [((d,), None)] * 2
    return out


def matrices_set() -> list[tuple[tuple[int, ...], int | None]]:
    return [((256, 256), 1)] * 8 + [((1024, 256), 1)] * 4


def gpt124m_matrices_set() -> list[tuple[tuple[int, ...], int | None]]:
    d = 768
    block = [((3 * d, d), 1), ((d, d), 0), ((4 * d, d), 1), ((d, 4 * d), 0)]
    return block * 12


SETS = {
    "default": default_set,
    "small": small_set,
    "single": single_set,
    "gpt124m": gpt124m_set,
    "matrices": matrices_set,
    "gpt124m-matrices": gpt124m_matrices_set,
}
#: the candidate families a set runs unless ``--only-family`` says otherwise (all unless named):
#: the sets of matrices exist for the Muon family's table
SET_FAMILIES = {"matrices": ("muon",), "gpt124m-matrices": ("muon",)}
#: dtype of each set's parameters (float32 unless named)
SET_DTYPES = {"single": torch.float64}


def quick(layout):
    """Every shape shrunk by 16 per axis (at least 2): the --quick smoke sizes."""
    return [(tuple(max(2, s // 16) for s in shape), dim) for shape, dim in layout]


def make_params(layout, device, *, seed: int = 0, kind: str = "set", dtype=torch.float32):
    """Parameters with fixed gradients. ``kind``: ``"set"`` (the set's sphere axes),
    ``"geoopt"`` (sphere axis moved last, geoopt's ``ManifoldParameter``), ``"euclid"`` (every
    parameter Euclidean) or ``"frobenius"`` (every sphere parameter on one sphere:
    ``dim=None``)."""
    geoopt_layout = kind == "geoopt"
    g = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for shape, dim in layout:
        if geoopt_layout and dim is not None and dim != len(shape) - 1:
            shape = (*shape[:dim], *shape[dim + 1 :], shape[dim])
            dim = len(shape) - 1
        data = torch.randn(shape, generator=g, dtype=dtype).to(device)
        if dim is None or kind == "euclid":
            p = torch.nn.Parameter(data)
        elif kind == "frobenius":
            p = st.SphereParameter(data, dim=None)
        elif geoopt_layout:
            import geoopt

            p = geoopt.ManifoldParameter(
                torch.nn.functional.normalize(data, dim=-1), manifold=geoopt.Sphere()
            )
        else:
            p = st.SphereParameter(data, dim=dim)
        p.grad = torch.randn(shape, generator=g, dtype=dtype).to(device) * 1e-2
        params.append(p)
    return params


# ----------------------------------------------------------------------------- candidates


class Candidate(NamedTuple):
    """One timed optimizer: its name, how it is built, the parameters it gets (``kind`` of
    :func:`make_params`) and its family (``"adam"``, ``"sgd"`` or ``"muon"``: which torch
    peers its ratios are against, and ``"muon"`` runs on sets of matrices only)."""

    name: str
    build: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    kind: str = "set"
    family: str = "adam"


def _adam_sgd_candidates() -> list[Candidate]:
    specs = [
        ("torch Adam", lambda ps: torch.optim.Adam(ps, lr=1e-3)),
        ("torch Adam(foreach)", lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True)),
        ("torch Adam(fused)", lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True)),
        ("RiemannianAdam", lambda ps: RiemannianAdam(ps, lr=1e-3)),
        (
            "RiemannianAdam(nonfinite='ignore')",
            lambda ps: RiemannianAdam(ps, lr=1e-3, nonfinite="ignore"),
        ),
        ("RiemannianAdam(fused)", lambda ps: RiemannianAdam(ps, lr=1e-3, fused=True)),
        ("RenormAdam", lambda ps: RenormAdam(ps, lr=1e-3)),
        ("RenormAdam(project_grad)", lambda ps: RenormAdam(ps, lr=1e-3, project_grad=True)),
        ("RenormAdam(fused)", lambda ps: RenormAdam(ps, lr=1e-3, fused=True)),
        # without the non-finite test (torch's Adam has none): the same work as torch's
        (
            "RiemannianAdam(fused, nonfinite='ignore')",
            lambda ps: RiemannianAdam(ps, lr=1e-3, fused=True, nonfinite="ignore"),
        ),
        (
            "RenormAdam(fused, nonfinite='ignore')",
            lambda ps: RenormAdam(ps, lr=1e-3, fused=True, nonfinite="ignore"),
        ),
        ("torch SGD(momentum)", lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9)),
        (
            "torch SGD(momentum, foreach)",
            lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, foreach=True),
        ),
        (
            "torch SGD(momentum, fused)",
            lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, fused=True),
        ),
        ("RiemannianSGD(momentum)", lambda ps: RiemannianSGD(ps, lr=1e-2, momentum=0.9)),
        (
            "RiemannianSGD(momentum, fused)",
            lambda ps: RiemannianSGD(ps, lr=1e-2, momentum=0.9, fused=True),
        ),
    ]
    return [Candidate(n, f, family="sgd" if "SGD" in n else "adam") for n, f in specs]


def _muon_candidates() -> list[Candidate]:
    """The Muon family: torch's Muon and AdamW as peers, SphereMuon and AdamH (lr 0.02 and
    0.01 as their docs' examples; torch's Muon without its default weight decay of 0.1, as
    ours)."""
    out = []
    if hasattr(torch.optim, "Muon"):  # torch >= 2.9
        out.append(
            Candidate(
                "torch Muon",
                lambda ps: torch.optim.Muon(ps, lr=0.02, weight_decay=0.0),
                "euclid",
                "muon",
            )
        )
    out += [
        Candidate(
            "torch AdamW(foreach)",
            lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
            "euclid",
            "muon",
        ),
        Candidate(
            "torch AdamW(fused)",
            lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
            "euclid",
            "muon",
        ),
        Candidate("SphereMuon(euclid)", lambda ps: SphereMuon(ps, lr=0.02), "euclid", "muon"),
        Candidate("SphereMuon(rows)", lambda ps: SphereMuon(ps, lr=0.02), "set", "muon"),
        Candidate(
            "SphereMuon(rows, batch_ns=False)",
            lambda ps: SphereMuon(ps, lr=0.02, batch_ns=False),
            "set",
            "muon",
        ),
        Candidate("SphereMuon(frobenius)", lambda ps: SphereMuon(ps, lr=0.02), "frobenius", "muon"),
        Candidate("AdamH(rows)", lambda ps: AdamH(ps, lr=0.01), "set", "muon"),
        Candidate("AdamH(frobenius)", lambda ps: AdamH(ps, lr=0.01), "frobenius", "muon"),
    ]
    return out


def candidates(have_geoopt: bool) -> list[Candidate]:
    """Every candidate (geoopt's where it is installed)."""
    out = _adam_sgd_candidates()
    if have_geoopt:
        import geoopt

        out.append(
            Candidate(
                "geoopt RiemannianAdam",
                lambda ps: geoopt.optim.RiemannianAdam(ps, lr=1e-3),
                "geoopt",
            )
        )
    return out + _muon_candidates()


def applies(c: Candidate, layout) -> bool:
    """The Muon family needs a set of matrices only (torch's Muon takes 2-D tensors only)."""
    return c.family != "muon" or all(len(shape) == 2 for shape, _ in layout)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_set(
    name: str,
    device: torch.device,
    reps: int,
    warmup: int,
    only=None,
    clock=time.perf_counter,
    smoke: bool = False,
    families=None,
):
    layout = SETS[name]()
    if smoke:
        layout = quick(layout)
    dtype = SET_DTYPES.get(name, torch.float32)
    try:
        import geoopt  # noqa: F401

        have_geoopt = True
    except ImportError:
        have_geoopt = False
    entries = []
    for c in candidates(have_geoopt):
        keep = families or SET_FAMILIES.get(name)
        if (only and c.name not in only) or (keep and c.family not in keep):
            continue
        if not applies(c, layout):
            continue
        params = make_params(layout, device, kind=c.kind, dtype=dtype)
        entries.append([c.name, c.build(params), []])
    values = sum(p.numel() for p in entries[0][1].param_groups[0]["params"]) if entries else 0
    for _ in range(warmup):
        for _, opt, _ in entries:
            opt.step()
    sync(device)
    for r in range(reps):
        k = r % len(entries)
        for _, opt, times in entries[k:] + entries[:k]:
            sync(device)
            t0 = clock()
            opt.step()
            sync(device)
            times.append(clock() - t0)
    out = {cname: statistics.median(times) for cname, _, times in entries}
    return out, values, torch.empty((), dtype=dtype).element_size()


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of ``dst.copy_(src)`` (read + write), best of 5."""
    n = (256 if device.type == "cuda" else 64) << 18  # float32 values: 256 / 64 MiB
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best


def peers(cname: str) -> tuple[str, str]:
    """torch's (foreach, fused) peer of a candidate."""
    if "SGD" in cname:
        return "torch SGD(momentum, foreach)", "torch SGD(momentum, fused)"
    return "torch Adam(foreach)", "torch Adam(fused)"


#: the Muon family's peers, in its table's column order
MUON_PEERS = ("torch Muon", "torch AdamW(foreach)", "torch AdamW(fused)")


def bytes_per_value(cname: str, elem: int) -> int:
    """Values a step must read and write per parameter value, times ``elem`` bytes
    (Adam: p, g, m, v read, p, m, v written; SGD with momentum: p, g, b read, p, b written)."""
    return (5 if "SGD" in cname else 7) * elem


TARGETS = {
    # (set, candidate, reference, bound, kind): ratio candidate/reference <= bound ("max") or
    # reference/candidate >= bound ("min")
    "RenormAdam <= 1.2x torch Adam(foreach)": (
        "default",
        "RenormAdam",
        "torch Adam(foreach)",
        1.2,
        "max",
    ),
    "fused RiemannianAdam <= 1.3x torch Adam(fused)": (
        "default",
        "RiemannianAdam(fused)",
        "torch Adam(fused)",
        1.3,
        "max",
    ),
    "fused RenormAdam <= 1.15x torch Adam(fused)": (
        "default",
        "RenormAdam(fused)",
        "torch Adam(fused)",
        1.15,
        "max",
    ),
    "fused RenormAdam, nonfinite='ignore' (torch's work) <= 1.15x torch Adam(fused)": (
        "default",
        "RenormAdam(fused, nonfinite='ignore')",
        "torch Adam(fused)",
        1.15,
        "max",
    ),
    "RiemannianAdam <= 1.4x torch Adam(foreach)": (
        "default",
        "RiemannianAdam",
        "torch Adam(foreach)",
        1.4,
        "max",
    ),
    "geoopt RiemannianAdam >= 2x slower than ours": (
        "default",
        "RiemannianAdam",
        "geoopt RiemannianAdam",
        2.0,
        "min",
    ),
    "small: RiemannianAdam <= 1.5x torch Adam(foreach)": (
        "small",
        "RiemannianAdam",
        "torch Adam(foreach)",
        1.5,
        "max",
    ),
    "small: RenormAdam <= 1.5x torch Adam(foreach)": (
        "small",
        "RenormAdam",
        "torch Adam(foreach)",
        1.5,
        "max",
    ),
    "single: RiemannianAdam <= 1.3x torch Adam": (
        "single",
        "RiemannianAdam",
        "torch Adam",
        1.3,
        "max",
    ),
    "single: RenormAdam <= 1.3x torch Adam": ("single", "RenormAdam", "torch Adam", 1.3, "max"),
    "single: RiemannianSGD <= 1.3x torch SGD": (
        "single",
        "RiemannianSGD(momentum)",
        "torch SGD(momentum)",
        1.3,
        "max",
    ),
    "gpt124m: fused RiemannianAdam <= 1.3x torch Adam(fused)": (
        "gpt124m",
        "RiemannianAdam(fused)",
        "torch Adam(fused)",
        1.3,
        "max",
    ),
    "gpt124m: fused RenormAdam <= 1.15x torch Adam(fused)": (
        "gpt124m",
        "RenormAdam(fused)",
        "torch Adam(fused)",
        1.15,
        "max",
    ),
    "gpt124m: fused RiemannianSGD <= 1.3x torch SGD(fused)": (
        "gpt124m",
        "RiemannianSGD(momentum, fused)",
        "torch SGD(momentum, fused)",
        1.3,
        "max",
    ),
    "gpt124m: RiemannianAdam (foreach) <= 1.5x torch Adam(foreach)": (
        "gpt124m",
        "RiemannianAdam",
        "torch Adam(foreach)",
        1.5,
        "max",
    ),
    "gpt124m: non-finite skip adds <= 10% (fused RiemannianAdam)": (
        "gpt124m",
        "RiemannianAdam(fused)",
        "RiemannianAdam(fused, nonfinite='ignore')",
        1.1,
        "max",
    ),
}


def report(results, args, bandwidth: float) -> str:
    out: list[str] = [f"# optim_step: {' '.join(sys.argv)}\n"]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    dev = args.device
    if args.device.startswith("cuda") and torch.cuda.is_available():
        dev += f" ({torch.cuda.get_device_name()})"
    out.append(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {dev}, CPU {cpu}, "
        f"{args.reps} rounds (median), {args.clock} clock, copy bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s, load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}"
        + (" -- --quick: toy sizes, the figures mean nothing" if args.quick else "")
        + "\n"
    )
    families = {c.name: c.family for c in _adam_sgd_candidates() + _muon_candidates()}
    for set_name, (res, values, elem) in results.items():
        geo = res.get("geoopt RiemannianAdam")
        out.append(f"## set `{set_name}` ({values:,} values)\n")
        main = {k: t for k, t in res.items() if families.get(k, "adam") != "muon"}
        if main:
            out.append(
                "| optimizer | step (ms) | vs torch foreach | vs torch fused | geoopt / this "
                "| GB/s | % of copy |"
            )
            out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for cname, t in main.items():
            foreach_peer, fused_peer = (res.get(k) for k in peers(cname))
            r1 = f"{t / foreach_peer:.2f}x" if foreach_peer else "-"
            r2 = f"{t / fused_peer:.2f}x" if fused_peer else "-"
            r3 = f"{geo / t:.2f}x" if geo else "-"
            bw = values * bytes_per_value(cname, elem) / t
            out.append(
                f"| {cname} | {t * 1e3:.3f} | {r1} | {r2} | {r3} | {bw / 1e9:.1f} "
                f"| {100 * bw / bandwidth:.0f}% |"
            )
        muon = {k: t for k, t in res.items() if families.get(k) == "muon"}
        if muon:
            if main:
                out.append("")
            out.append(
                "| Muon family | step (ms) | vs torch Muon | vs torch AdamW(foreach) "
                "| vs torch AdamW(fused) |"
            )
            out.append("| --- | ---: | ---: | ---: | ---: |")
            for cname, t in muon.items():
                ratios = []
                for peer in MUON_PEERS:
                    ref = res.get(peer)
                    ratios.append(f"{t / ref:.2f}x" if ref else "-")
                out.append(f"| {cname} | {t * 1e3:.3f} | {' | '.join(ratios)} |")
        out.append("")
    lines = []
    for label, (set_name, cand, ref, bound, kind) in TARGETS.items():
        res = results.get(set_name, ({}, 0, 0))[0]
        if cand not in res or ref not in res:
            continue
        ratio = res[cand] / res[ref] if kind == "max" else res[ref] / res[cand]
        ok = ratio <= bound if kind == "max" else ratio >= bound
        lines.append(f"| {label} | {ratio:.2f}x | {'met' if ok else 'MISSED'} |")
    if lines:
        out.append("## targets\n\n| target | measured | |\n| --- | ---: | --- |")
        out.extend(lines)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="default: cpu")
    ap.add_argument(
        "--set",
        nargs="+",
        default=["default", "small"],
        choices=sorted(SETS),
        help="parameter sets to time (default: default small)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument(
        "--quick", action="store_true", help="toy sizes, 3 rounds: a smoke test (seconds)"
    )
    ap.add_argument("--md-out", default=None, help="also write the Markdown report to this file")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default 40; 15 gpt)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    ap.add_argument("--only", nargs="*", default=None, help="candidate names to keep")
    ap.add_argument(
        "--only-family",
        nargs="+",
        default=None,
        choices=("adam", "sgd", "muon"),
        help="candidate families to keep (muon: torch Muon/AdamW, SphereMuon, AdamH; on the "
        "sets of matrices only)",
    )
    ap.add_argument(
        "--clock",
        choices=("wall", "thread"),
        default="wall",
        help="wall: elapsed time (default); thread: CPU time of the calling thread, which "
        "leaves out time the step spent preempted on a loaded machine (CPU, --threads 1 only)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.clock == "thread" and (args.threads != 1 or args.device != "cpu"):
        raise SystemExit("--clock thread: needs --device cpu --threads 1")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    results = {}
    reps = args.reps
    if args.quick:
        reps, args.warmup = reps or 3, 1
    for set_name in args.set:
        n = reps if reps is not None else (15 if set_name.startswith("gpt124m") else 40)
        args.reps = n
        results[set_name] = bench_set(
            set_name,
            device,
            n,
            args.warmup,
            args.only,
            clock,
            smoke=args.quick,
            families=args.only_family,
        )
    text = report(results, args, copy_bandwidth(device))
    print(text, end="")
    if args.md_out:
        with open(args.md_out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
