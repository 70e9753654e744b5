"""``torch.compile(opt.step)`` matches eager and keeps the sphere axis (geoopt's degrades to
Euclidean Adam under compile). One small test: CPU inductor compiles are slow."""

from __future__ import annotations

import pytest
import torch

import spheretorch as st
from spheretorch.optim import RenormAdam, RiemannianAdam


def _params():
    g = torch.Generator().manual_seed(0)
    return [
        st.SphereParameter(torch.randn(6, 5, generator=g), dim=0),
        torch.nn.Parameter(torch.randn(5, generator=g)),
    ]


@pytest.mark.slow
def test_compiled_step_matches_eager_and_stays_on_sphere():
    torch._dynamo.reset()
    for make in (
        lambda ps: RiemannianAdam(ps, lr=0.05),
        lambda ps: RenormAdam(ps, lr=0.05),
    ):
        eager, compiled = _params(), _params()
        opt_e, opt_c = make(eager), make(compiled)
        step = torch.compile(opt_c.step)
        for t in range(3):
            g = torch.Generator().manual_seed(100 + t)
            for a, b in zip(eager, compiled):
                a.grad = torch.randn(a.shape, generator=g)
                b.grad = a.grad.clone()
            opt_e.step()
            step()
            for a, b in zip(eager, compiled):
                torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-5)
            norms = torch.linalg.vector_norm(compiled[0].detach(), dim=0)
            torch.testing.assert_close(norms, torch.ones(5), rtol=0, atol=1e-6)
        # the step moved the sphere parameter by about lr per column: not a no-op
        assert (compiled[0] - _params()[0]).abs().max() > 1e-2
