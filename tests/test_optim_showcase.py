"""Problems with known answers: the leading eigenvector of symmetric matrices.

Maximising the Rayleigh quotient :math:`R(x) = x^T A x / x^T x` on the unit sphere gives the
eigenvector of the largest eigenvalue. Five independent problems are solved at once, one per
row of a ``(5, n)`` sphere parameter (``dim=1``) or one per column of an ``(n, 5)`` one
(``dim=0``), and checked against :func:`scipy.linalg.eigh`.

The quotient (not :math:`x^T A x`) is used on purpose: its gradient is tangent at unit
:math:`x`. With :math:`x^T A x` the gradient keeps a radial part :math:`2\\lambda x` at the
optimum, which the Riemannian optimizers project away but which Adam's per-coordinate
normalisation in :class:`RenormAdam` turns into a tangential bias (its fixed point is then not
the eigenvector).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

import spheretorch as st
from spheretorch.optim import RenormAdam, RiemannianAdam, RiemannianSGD

F64 = torch.float64
B, N = 5, 12


def symmetric_problems(seed: int = 0) -> torch.Tensor:
    """``B`` random symmetric ``N x N`` matrices, spectrum in [-0.7, 0.7] plus a top 1.0."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(B, N, N, generator=g, dtype=F64))[0]
    lam = torch.rand(B, N, generator=g, dtype=F64) * 1.4 - 0.7
    lam[:, 0] = 1.0
    return q @ torch.diag_embed(lam) @ q.transpose(-1, -2)


SOLVERS = {
    "RiemannianSGD": (lambda p: RiemannianSGD([p], lr=0.5, maximize=True), None, 150),
    "RiemannianSGD-nesterov-exp": (
        lambda p: RiemannianSGD(
            [p], lr=0.2, momentum=0.5, nesterov=True, retraction="exp", maximize=True
        ),
        None,
        150,
    ),
    "RiemannianAdam": (lambda p: RiemannianAdam([p], lr=0.05, maximize=True), 0.99, 600),
    "RiemannianAdam-coordinate-exp": (
        lambda p: RiemannianAdam(
            [p], lr=0.1, second_moment="coordinate", retraction="exp", maximize=True
        ),
        0.98,
        400,
    ),
    "RenormAdam": (lambda p: RenormAdam([p], lr=0.1, maximize=True), 0.98, 400),
}


@pytest.mark.parametrize("dim", [1, 0], ids=["rows", "columns"])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_leading_eigenvector(name, dim):
    make, gamma, steps = SOLVERS[name]
    a = symmetric_problems()
    x0 = torch.randn(B, N, generator=torch.Generator().manual_seed(1), dtype=F64)
    p = st.SphereParameter(x0 if dim == 1 else x0.T.contiguous(), dim=dim)
    opt = make(p)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma) if gamma else None
    for _ in range(steps):
        opt.zero_grad()
        x = p if dim == 1 else p.T
        rayleigh = torch.einsum("bi,bij,bj->b", x, a, x) / (x * x).sum(-1)
        rayleigh.sum().backward()
        opt.step()
        if sched is not None:
            sched.step()
    x = (p if dim == 1 else p.T).detach()
    for b in range(B):
        w, v = scipy.linalg.eigh(a[b].numpy())
        xb = x[b].numpy()
        assert abs(np.linalg.norm(xb) - 1) < 1e-12
        assert 1 - abs(float(v[:, -1] @ xb)) < 1e-7, f"problem {b}"
        assert abs(float(xb @ a[b].numpy() @ xb) - w[-1]) < 1e-7
