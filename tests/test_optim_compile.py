"""``torch.compile(opt.step)`` matches eager and keeps the sphere axis (geoopt's degrades to
Euclidean Adam under compile), for every optimizer and sphere kind. Small tensors: CPU Inductor
compiles are slow."""

from __future__ import annotations

import pytest
import torch

import spheretorch as st
from spheretorch.optim import AdamH, RenormAdam, RiemannianAdam, RiemannianSGD, SphereMuon
from spheretorch.sphere import foreach as sphere_foreach


def _layouts():
    """A column sphere, a row sphere, a middle axis, a whole-tensor sphere of radius 2 (all
    float32 and small: stacked where the optimizers stack) and a Euclidean vector."""
    g = torch.Generator().manual_seed(0)
    return [
        st.SphereParameter(torch.randn(6, 5, generator=g), dim=0),
        st.SphereParameter(torch.randn(6, 5, generator=g), dim=1),
        st.SphereParameter(torch.randn(4, 6, 5, generator=g), dim=1),
        st.SphereParameter(torch.randn(6, 5, generator=g), dim=None, radius=2.0),
        torch.nn.Parameter(torch.randn(5, generator=g)),
    ]


COMPILED = {
    "riemannian_adam": lambda ps: RiemannianAdam(ps, lr=0.05),
    "riemannian_adam_exp": lambda ps: RiemannianAdam(ps, lr=0.05, retraction="exp"),
    "riemannian_sgd": lambda ps: RiemannianSGD(ps, lr=0.05, momentum=0.9),
    "renorm_adam": lambda ps: RenormAdam(ps, lr=0.05),
    "adamh": lambda ps: AdamH(ps, lr=0.05),
    "adamh_riemannian": lambda ps: AdamH(ps, lr=0.05, ordering="riemannian"),
    "sphere_muon": lambda ps: SphereMuon(ps, lr=0.05, ns_dtype=None),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(COMPILED))
def test_every_optimizer_compiled_equals_eager_on_every_sphere_kind(name):
    """``torch.compile(opt.step)`` equals the eager step for every optimizer on columns, rows,
    a middle axis and a whole-tensor sphere. (Under torch 2.13's Inductor, RenormAdam,
    AdamH(riemannian) and SphereMuon were off by up to 4e-2 on column and middle-axis spheres:
    in-place ``_foreach`` ops reading their destination, see ``sphere.foreach.apply_``.)"""
    torch._dynamo.reset()
    eager, compiled = _layouts(), _layouts()
    opt_e, opt_c = COMPILED[name](eager), COMPILED[name](compiled)
    step = torch.compile(opt_c.step)
    for t in range(2):
        g = torch.Generator().manual_seed(100 + t)
        for a, b in zip(eager, compiled):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt_e.step()
        step()
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=2e-6)
    for p, before in zip(compiled, _layouts()):
        assert (p - before).abs().max() > 1e-3  # a step, not a no-op
        dims = st.sphere_dim_of(p)
        if dims is not None:  # on its sphere, at its radius
            n = st.sphere.norm(p.detach(), dims)
            torch.testing.assert_close(n, torch.full_like(n, p.sphere_radius), rtol=2e-6, atol=0)


@pytest.mark.parametrize(
    "write",
    [
        lambda xs, vs, red: sphere_foreach.normalize_(xs, red),
        lambda xs, vs, red: sphere_foreach.project_(xs, vs, red),
        lambda xs, vs, red: sphere_foreach.apply_(
            "copy", xs, [x - x.sum(0, keepdim=True) for x in xs]
        ),
    ],
    ids=["normalize_", "project_", "copy back"],
)
def test_in_place_list_writes_compile_as_they_run(write):
    """The list writes of :mod:`spheretorch.sphere.foreach` whose operands read their
    destination along a leading axis: compiled (Inductor) equal to eager."""
    torch._dynamo.reset()

    def run(fn):
        g = torch.Generator().manual_seed(1)
        xs = [torch.randn(6, 5, generator=g), torch.randn(7, 3, generator=g)]
        vs = [torch.randn(6, 5, generator=g), torch.randn(7, 3, generator=g)]
        with torch.no_grad():
            fn(xs, vs, sphere_foreach.RowReducer(xs, 0))
        return xs + vs

    def f(xs, vs, red):
        write(xs, vs, red)

    for a, b in zip(run(f), run(torch.compile(f))):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
