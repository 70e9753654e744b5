"""Where RenormAdam's fixed points lie, measured on two problems with known answers.

1. Leading eigenvector of a symmetric 200 x 200 matrix by maximising x^T A x on S^199
   (scipy.linalg.eigh is the oracle).
2. Karcher mean of 20 points on S^50 (fixed point: the sum of log maps is zero; the oracle is
   a long Riemannian gradient descent).

For each optimizer (RenormAdam as nGPT uses it, RenormAdam(project_grad=True),
RiemannianAdam, RiemannianSGD) it prints the angle (rad) between the final point and the
answer, at constant learning rates and with a cosine decay to zero.

    python benchmarks/renorm_bias.py            # full (about a minute on one CPU thread)
    python benchmarks/renorm_bias.py --quick    # fewer steps (seconds)
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import scipy.linalg
import torch

import spheretorch as st
from spheretorch.optim import RenormAdam, RiemannianAdam, RiemannianSGD


def eigen_problem(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = np.random.default_rng(seed)
    b = g.standard_normal((n, n))
    a = (b + b.T) / 2
    _, v = scipy.linalg.eigh(a)
    return torch.from_numpy(a), torch.from_numpy(v[:, -1])


def karcher_problem(n: int = 51, k: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    center = torch.nn.functional.normalize(torch.randn(n, generator=g, dtype=torch.float64), dim=0)
    pts = st.sphere.expmap(
        center.expand(k, n),
        st.sphere.project(center.expand(k, n), 0.6 * torch.randn(k, n, generator=g).double()),
    )
    x = center.clone()  # the oracle: Riemannian gradient descent to convergence
    for _ in range(2000):
        step = st.sphere.logmap(x.expand(k, n), pts).mean(0)
        x = st.sphere.expmap(x, step)
    return pts, x


def angle(x: torch.Tensor, y: torch.Tensor, sign_free: bool) -> float:
    c = float(torch.dot(x, y) / (x.norm() * y.norm()))
    if sign_free:
        c = abs(c)
    return math.acos(max(-1.0, min(1.0, c)))


def solve(kind: str, make_opt, steps: int, decay: bool, seed: int = 1) -> float:
    if kind == "eigen":
        a, answer = EIGEN
        n = a.shape[0]
    else:
        pts, answer = KARCHER
        n = pts.shape[1]
    g = torch.Generator().manual_seed(seed)
    x = st.SphereParameter(torch.randn(n, generator=g, dtype=torch.float64), dim=0)
    opt = make_opt([x])
    lr0 = opt.param_groups[0]["lr"]
    for t in range(steps):
        if decay:
            opt.param_groups[0]["lr"] = lr0 * 0.5 * (1 + math.cos(math.pi * t / steps))
        opt.zero_grad()
        if kind == "eigen":
            loss = -(x @ a @ x)
        else:
            loss = st.sphere.dist(x.expand_as(pts), pts).square().sum()
        loss.backward()
        opt.step()
    return angle(x.detach(), answer, sign_free=kind == "eigen")


OPTIMIZERS = {
    "RenormAdam (nGPT)": lambda lr: lambda ps: RenormAdam(ps, lr=lr),
    "RenormAdam(project_grad=True)": lambda lr: lambda ps: RenormAdam(ps, lr=lr, project_grad=True),
    "RiemannianAdam": lambda lr: lambda ps: RiemannianAdam(ps, lr=lr),
    "RiemannianSGD": lambda lr: lambda ps: RiemannianSGD(ps, lr=lr * 0.1, momentum=0.9),
}

EIGEN = eigen_problem()
KARCHER = karcher_problem()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (seconds)")
    ap.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="optimizer names to run (default: all), e.g. 'RenormAdam (nGPT)'",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    steps = 1000 if args.quick else 10_000
    rows = []
    for kind in ("eigen", "karcher"):
        for name, make in OPTIMIZERS.items():
            if args.only and name not in args.only:
                continue
            for lr, decay in ((1e-2, False), (1e-3, False), (1e-2, True)):
                err = solve(kind, make(lr), steps, decay)
                sched = "cosine to 0" if decay else "constant"
                rows.append((kind, name, f"{lr:g}", sched, err))
    print(f"| problem | optimizer | lr | schedule | angle to the answer (rad), {steps} steps |")
    print("| --- | --- | ---: | --- | ---: |")
    for kind, name, lr, sched, err in rows:
        print(f"| {kind} | {name} | {lr} | {sched} | {err:.2e} |")


if __name__ == "__main__":
    main()
