"""RenormAdam's fixed points, against oracles (scipy's eigh, a Karcher-mean fixed point).

RenormAdam as nGPT uses it (the Euclidean gradient into Adam's moments, then x / |x|) stops
O(1) away from the answer on these problems, with a constant or a decaying learning rate: Adam
scales each coordinate, so the radial part of its step is not along x and renormalisation
does not cancel it. ``project_grad=True`` (the tangent part of the gradient into the moments)
converges. benchmarks/renorm_bias.py measures the full table (docs/optimizers.md).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

import spheretorch as st
from spheretorch.optim import RenormAdam


def _eigen(n: int = 200):
    b = np.random.default_rng(0).standard_normal((n, n))
    a = (b + b.T) / 2
    _, v = scipy.linalg.eigh(a)
    return torch.from_numpy(a), torch.from_numpy(v[:, -1])


def _maximise_rayleigh(a, project_grad: bool, steps: int = 1500, lr: float = 1e-2):
    g = torch.Generator().manual_seed(1)
    x = st.SphereParameter(torch.randn(a.shape[0], generator=g, dtype=torch.float64), dim=0)
    opt = RenormAdam([x], lr=lr, project_grad=project_grad)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        (-(x @ a @ x)).backward()
        opt.step()
        sched.step()
    return x.detach()


def _angle(x, y):
    return math.acos(min(1.0, abs(float(x @ y))))


def test_project_grad_finds_the_leading_eigenvector():
    a, v = _eigen()
    x = _maximise_rayleigh(a, project_grad=True)
    assert _angle(x, v) < 1e-6
    assert abs(float(x.norm()) - 1) < 1e-12


def test_renorm_adam_as_ngpt_uses_it_stays_biased_even_with_a_decaying_lr():
    """The measured behaviour the docs state: not an O(lr) bias that a decay removes."""
    a, v = _eigen()
    x = _maximise_rayleigh(a, project_grad=False)
    assert _angle(x, v) > 0.3


def _karcher_problem(n=51, k=20):
    g = torch.Generator().manual_seed(0)
    c = torch.nn.functional.normalize(torch.randn(n, generator=g, dtype=torch.float64), dim=0)
    tangent = st.sphere.project(c.expand(k, n), 0.6 * torch.randn(k, n, generator=g).double())
    return st.sphere.expmap(c.expand(k, n), tangent)


@pytest.mark.parametrize("project_grad", [True, False])
def test_karcher_mean_fixed_point(project_grad):
    """Minimising the sum of squared geodesic distances: the answer is where the log maps
    sum to zero. project_grad=True gets there; the nGPT form stops short."""
    pts = _karcher_problem()
    x = st.SphereParameter(pts.mean(0).clone(), dim=0)
    opt = RenormAdam([x], lr=1e-2, project_grad=project_grad)
    steps = 1500
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        st.sphere.dist(x.expand_as(pts), pts).square().sum().backward()
        opt.step()
        sched.step()
    residual = float(st.sphere.logmap(x.detach().expand_as(pts), pts).sum(0).norm())
    if project_grad:
        assert residual < 1e-6
    else:
        assert residual > 1e-2


def test_project_grad_leaves_p_grad_alone_and_equals_adam_on_the_tangent_gradient():
    g = torch.Generator().manual_seed(3)
    x = st.SphereParameter(torch.randn(4, 6, generator=g, dtype=torch.float64), dim=1)
    y = torch.nn.Parameter(x.detach().clone())
    grad = torch.randn(4, 6, generator=g, dtype=torch.float64)
    x.grad = grad.clone()
    y.grad = grad - (grad * y.detach()).sum(1, keepdim=True) * y.detach()
    RenormAdam([x], lr=0.1, project_grad=True).step()
    torch.optim.Adam([y], lr=0.1, foreach=False).step()
    with torch.no_grad():
        y.div_(y.norm(dim=1, keepdim=True))
    assert torch.equal(x.grad, grad)
    torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-14, atol=1e-15)


def test_project_grad_must_be_a_bool():
    with pytest.raises(TypeError, match="project_grad must be True or False"):
        RenormAdam([torch.nn.Parameter(torch.ones(2))], project_grad="yes")
