"""Time one GeoNorm step (forward + backward): v0.1's hand-written step, the step as of
ca33b00 (before issue 10's speed fix), the readable reference with autograd (the step before
issue 22) and the fused op ``spheretorch::geonorm_step`` (its CPU implementation here).

* ``v0.1 (38b2f69)``: v0.1's ``geonorm_step``, copied below as the reference (unit states,
  fixed radius sqrt(d), ``atan`` angle, no clamp or bias: less work by design);
* ``ca33b00``: the reference over that commit's ``sphere.expmap`` (copied below: ``|u|^2``,
  its series and an autograd ``normalize`` recomputed);
* ``reference``: :func:`spheretorch.kernels.geodesic_step.geonorm_step_reference`, autograd;
* ``op``: :func:`spheretorch.models.geonorm.geonorm_step` (the custom op, hand-written
  backward).

The last three run with the model's defaults (own radius, ``linear`` angle, clamp pi/4, bias).
The candidates run interleaved in one process (one step each per round, the order rotating), on
one thread by default, timed by the process's CPU clock on one thread (steadier than the wall
clock on a shared machine) and by the wall clock otherwise; the median and best are printed.

Usage::

    python benchmarks/geonorm_step.py                     # 16 x 128 x 128, 150 rounds
    python benchmarks/geonorm_step.py --rounds 300 --threads 2
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from unittest import mock

import torch
from torch import Tensor

from spheretorch import sphere
from spheretorch.kernels.geodesic_step import geonorm_step_reference
from spheretorch.models.geonorm import geonorm_step
from spheretorch.sphere import atanc_sq, sinc, unit

# ----------------------------------------------------------------------------- v0.1 reference


def geonorm_step_v01(h: Tensor, g: Tensor, k: Tensor | float, radius: float, angle: str) -> Tensor:
    """v0.1's step, verbatim but for the imports (commit 38b2f69)."""
    hf, gf = h.float(), g.float()
    v = gf - (hf * gf).sum(-1, keepdim=True) * hf
    z = torch.linalg.vector_norm(v, dim=-1, keepdim=True) / radius
    if angle == "atan":
        theta = k * torch.atan(z)
        per_z = k * atanc_sq(z * z)
    else:
        theta = k * z
        per_z = k * torch.ones_like(z)
    out = torch.cos(theta) * hf + (sinc(theta) * per_z / radius) * v
    return unit(out).to(h.dtype)


def expmap_ca33b00(x: Tensor, u: Tensor, *, norm_u: Tensor | None = None) -> Tensor:
    """``sphere.expmap(x, u)`` (last axis) as of ca33b00: ``norm_u`` is ignored, ``|u|^2``, its
    series and an autograd ``normalize`` are recomputed."""
    cos_n, sinc_n = sphere.cos_sinc_sq(sphere.inner(u, u))
    return sphere.normalize(cos_n * x + sinc_n * u, -1, on_zero="keep")


def geonorm_step_ca33b00(*args: object, **kwargs: object) -> Tensor:
    """The step as of ca33b00: the reference over ca33b00's ``expmap`` (the only difference
    between the two)."""
    with mock.patch.object(sphere, "expmap", expmap_ca33b00):
        return geonorm_step_reference(*args, **kwargs)


# ----------------------------------------------------------------------------- timing


def make_case(
    step: Callable[..., Tensor], v01: bool, shape: tuple[int, ...], seed: int
) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    if v01:
        x = x / x.norm(dim=-1, keepdim=True)
    g = 0.3 * torch.randn(shape, generator=gen)
    grad = torch.randn(shape, generator=gen)
    x.requires_grad_(True)
    g.requires_grad_(True)
    a = torch.ones(1, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    leaves = (x, g, a, b)
    radius = math.sqrt(shape[-1])

    def run() -> None:
        for t in leaves:
            t.grad = None
        if v01:
            y = step(x, g, a * 1.0, radius, "atan")
        else:
            y = step(x, g, a * 1.0, b, decay=1.0, clamp=math.pi / 4, angle="linear")
        y.backward(grad)

    return run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs="+", default=[16, 128, 128])
    ap.add_argument("--rounds", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = tuple(args.shape)

    cases = {
        "v0.1 (38b2f69)": make_case(geonorm_step_v01, True, shape, 0),
        "ca33b00": make_case(geonorm_step_ca33b00, False, shape, 0),
        "reference": make_case(geonorm_step_reference, False, shape, 0),
        "op": make_case(geonorm_step, False, shape, 0),
    }
    names = list(cases)
    for name in names:  # warm up
        for _ in range(5):
            cases[name]()
    clock = time.process_time if args.threads == 1 else time.perf_counter
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = clock()
            cases[name]()
            times[name].append(clock() - t0)

    print(
        f"GeoNorm step fwd+bwd, shape {shape}, float32, {args.threads} thread(s), "
        f"{args.rounds} interleaved rounds, {'CPU' if args.threads == 1 else 'wall'} clock, "
        f"torch {torch.__version__}"
    )
    med0, best0 = statistics.median(times[names[0]]), min(times[names[0]])
    for name in names:
        med, best = statistics.median(times[name]), min(times[name])
        print(
            f"  {name:<15} median {1e3 * med:6.2f} ms  best {1e3 * best:6.2f} ms"
            f"  / v0.1: median {med / med0:4.2f}  best {best / best0:4.2f}"
        )


if __name__ == "__main__":
    main()
