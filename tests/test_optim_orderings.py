"""The ordering=/angular= options of RiemannianAdam and RenormAdam (issue 25): the sphere
parameters take spheretorch.optim.sphere_steps' reference step, Euclidean ones their usual
one. References: Emerging-Optimizers' ObliqueAdam (port in test_sphere_muon, bias correction
fixed), known answers, torch's Adam for Euclidean parameters."""

from __future__ import annotations

import pytest
import torch

from spheretorch import SphereParameter
from spheretorch import sphere as S
from spheretorch.optim import RenormAdam, RiemannianAdam

from .test_sphere_muon import gen, oblique_adam_step

F64 = torch.float64


def _make(cls, **kw):
    return lambda ps: cls(ps, **kw)


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize(
    "cls,kw",
    [
        (RiemannianAdam, {"second_moment": "coordinate"}),
        (RenormAdam, {}),
    ],
)
def test_oblique_ordering_is_emerging_optimizers_obliqueadam_fixed(cls, kw, dim, wd):
    x0 = S.normalize(torch.randn(6, 5, dtype=F64, generator=gen(11)), dim)
    p = SphereParameter(x0.clone(), dim=dim)
    e = torch.nn.Parameter(torch.randn(4, dtype=F64, generator=gen(12)))
    e_ref = torch.nn.Parameter(e.detach().clone())
    betas, lr, eps = (0.9, 0.99), 0.01, 1e-8
    opt = cls(
        [p, e],
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=wd,
        decoupled_weight_decay=True,
        ordering="oblique",
        **kw,
    )
    opt_ref = torch.optim.AdamW([e_ref], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    ref, s_ref = x0.clone(), {}
    for t in range(1, 6):
        g = torch.randn(6, 5, dtype=F64, generator=gen(20 + t))
        p.grad = g.clone()
        e.grad = torch.randn(4, dtype=F64, generator=gen(40 + t))
        e_ref.grad = e.grad.clone()
        oblique_adam_step(ref, g, s_ref, lr, betas, wd, dim, eps, fixed_bias_correction=True)
        opt.step()
        opt_ref.step()
    torch.testing.assert_close(p.detach(), ref, atol=1e-14, rtol=0)
    torch.testing.assert_close(e.detach(), e_ref.detach(), atol=1e-15, rtol=0)


@pytest.mark.parametrize(
    "cls,kw",
    [
        (RiemannianAdam, {}),
        (RiemannianAdam, {"ordering": "oblique"}),
        (RenormAdam, {}),
        (RenormAdam, {"project_grad": True}),
    ],
)
def test_angular_steps_turn_each_sphere_by_lr_and_keep_the_radius(cls, kw):
    ps = [
        SphereParameter(torch.randn(5, 4, dtype=F64, generator=gen(1)), dim=1),
        SphereParameter(3 * torch.randn(4, 3, dtype=F64, generator=gen(2)), dim=None),
        SphereParameter(torch.randn(3, 2, 2, dtype=F64, generator=gen(3)), dim=(1, 2)),
    ]
    radii = [p.sphere_radius for p in ps]
    opt = cls(ps, lr=0.02, angular=True, **kw)
    for t in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, dtype=F64, generator=gen(50 + t))
        opt.step()
        for p, r in zip(ps, radii):
            a = opt.state[p]["angle"]
            torch.testing.assert_close(a, torch.full_like(a, 0.02), atol=1e-12, rtol=0)
            n = S.norm(p.detach(), p.sphere_dim)
            torch.testing.assert_close(n, torch.full_like(n, r), atol=1e-12 * r, rtol=0)


def test_riemannian_angular_reaches_the_known_answer():
    a = torch.randn(6, 4, dtype=F64, generator=gen(40))
    w = SphereParameter(torch.randn(6, 4, dtype=F64, generator=gen(41)), dim=None, radius=2.0)
    opt = RiemannianAdam([w], lr=0.1, angular=True)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.975)
    for _ in range(700):
        opt.zero_grad()
        (-(w * a).sum()).backward()
        opt.step()
        sched.step()
    assert float((w.detach() - 2 * a / a.norm()).norm() / 2) < 1e-5


@pytest.mark.parametrize("cls", [RiemannianAdam, RenormAdam])
def test_options_are_checked(cls):
    p = [SphereParameter(torch.randn(3, 4), dim=1)]
    with pytest.raises(ValueError, match="ordering must be one of"):
        cls(p, ordering="sideways")
    with pytest.raises(TypeError, match="angular must be True or False"):
        cls(p, angular=1)
    with pytest.raises(ValueError, match=r"take the reference step .* it has no fused=True"):
        cls(p, angular=True, fused=True)
    with pytest.raises(ValueError, match="it has no amsgrad=True"):
        cls(p, ordering="oblique", amsgrad=True)


@pytest.mark.parametrize("cls", [RiemannianAdam, RenormAdam])
def test_state_dict_round_trip_with_options(cls):
    import copy

    p = SphereParameter(torch.randn(5, 4, dtype=F64, generator=gen(5)), dim=1)
    opt = cls([p], lr=0.05, ordering="oblique", angular=True)
    p.grad = torch.randn(5, 4, dtype=F64, generator=gen(6))
    opt.step()
    q = copy.deepcopy(p)
    opt2 = cls([q], lr=0.05, ordering="oblique", angular=True)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for o, x in ((opt, p), (opt2, q)):
        x.grad = torch.randn(5, 4, dtype=F64, generator=gen(7))
        o.step()
    assert torch.equal(p, q)


@pytest.mark.parametrize(
    "kw", [{}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True}, {"weight_decay": 0.1}]
)
def test_riemannian_sgd_angular_turns_by_lr_and_leaves_euclidean_params_to_torch(kw):
    from spheretorch.optim import RiemannianSGD

    ps = [
        SphereParameter(torch.randn(5, 4, dtype=F64, generator=gen(1)), dim=1),
        SphereParameter(3 * torch.randn(4, 3, dtype=F64, generator=gen(2)), dim=None),
    ]
    e = torch.nn.Parameter(torch.randn(3, dtype=F64, generator=gen(3)))
    e_ref = torch.nn.Parameter(e.detach().clone())
    opt = RiemannianSGD([*ps, e], lr=0.03, angular=True, **kw)
    opt_ref = torch.optim.SGD([e_ref], lr=0.03, **kw)
    for t in range(3):
        for p in (*ps, e):
            p.grad = torch.randn(p.shape, dtype=F64, generator=gen(60 + t))
        e_ref.grad = e.grad.clone()
        opt.step()
        opt_ref.step()
        for p in ps:
            a = opt.state[p]["angle"]
            torch.testing.assert_close(a, torch.full_like(a, 0.03), atol=1e-12, rtol=0)
    torch.testing.assert_close(e.detach(), e_ref.detach(), atol=1e-15, rtol=0)
    torch.testing.assert_close(ps[1].detach().norm(), torch.tensor(ps[1].sphere_radius, dtype=F64))


def test_riemannian_sgd_angular_reaches_leading_eigenvectors():
    from spheretorch.optim import RiemannianSGD

    k, n = 4, 6
    q = torch.linalg.qr(torch.randn(k, n, n, dtype=F64, generator=gen(50)))[0]
    mats = q @ torch.diag_embed(torch.linspace(1.0, 3.0, n, dtype=F64).expand(k, n)) @ q.mT
    w = SphereParameter(torch.randn(k, n, dtype=F64, generator=gen(51)), dim=1)
    opt = RiemannianSGD([w], lr=0.1, momentum=0.9, angular=True)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.975)
    for _ in range(700):
        opt.zero_grad()
        (-torch.einsum("ki,kij,kj->", w, mats, w)).backward()
        opt.step()
        sched.step()
    cos = (w.detach() * q[:, :, -1]).sum(1).abs()
    assert float((1 - cos).abs().max().sqrt()) < 1e-5
