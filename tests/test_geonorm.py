"""GeoNorm: the third-party reading's equations (own port), smoothness at v = 0 and the clamp,
v0.1's choices as named options."""

from __future__ import annotations

import math

import pytest
import torch

from spheretorch import sphere
from spheretorch.models import GeoNormGPT, make_config
from spheretorch.models.geonorm import geonorm_step

torch.set_num_threads(1)

CFG = dict(vocab_size=13, seq_len=8, n_layer=3, n_head=2, d_model=16)
CLAMP = math.pi / 4
# v0.1's GeoNorm, selected by options (docs/transformers.md lists them)
OLD = dict(
    geo_angle="atan",
    update_decay="inverse_sqrt",
    geo_clamp=None,
    geo_bias=False,
    geo_radius="fixed",
    geo_step_scale=None,
)


def reading(x, g, a, b, decay, clamp=CLAMP):
    """kfold's GeoNorm.forward (normalization.py), without its eps terms."""
    xn = x.norm(dim=-1, keepdim=True)
    v = g - ((x * g).sum(-1, keepdim=True) / xn**2) * x
    vn = v.norm(dim=-1, keepdim=True)
    theta = torch.clamp(vn / xn, max=clamp) * a + b
    theta = torch.clamp(theta * decay, max=clamp)
    return x * torch.cos(theta) + (v / vn) * xn * torch.sin(theta)


def state_and_update(z: float, radial: float = 0.7, n: int = 3, d: int = 5, seed: int = 0):
    """States ``x`` of random norms and updates ``g`` with ``|v| / |x| = z`` exactly."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) * 0.3
    w = sphere.project(sphere.unit(x), torch.randn(n, d, generator=gen, dtype=torch.float64))
    v = sphere.unit(w) * z * x.norm(dim=-1, keepdim=True)
    return x, v + radial * x


@pytest.mark.parametrize(
    ("a", "b", "decay"), [(1.0, 0.0, 1.0), (0.8, 0.1, 1 / 2), (1.3, -0.2, 1 / 3), (2.0, 0.9, 1.0)]
)
def test_step_equals_the_third_party_reading(a: float, b: float, decay: float) -> None:
    for z in (0.05, 0.5, 0.9, 3.0):  # below and beyond the clamp
        x, g = state_and_update(z)
        ab = torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)
        out = geonorm_step(x, g, *ab, decay=decay, clamp=CLAMP)
        torch.testing.assert_close(out, reading(x, g, a, b, decay), rtol=0, atol=1e-14)
        torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-14, atol=0)


@pytest.mark.parametrize(
    ("z", "b"),
    [
        (0.0, 0.0),  # theta0 = 0: the removable singularity
        (1e-4, 0.3),  # tiny theta0 with a bias
        (CLAMP - 1e-3, 0.0),  # just inside the inner clamp
        (CLAMP + 1e-3, 0.0),  # just beyond it
        (0.5, 0.6),  # the outer clamp active: theta = a theta0 + b > pi/4
    ],
)
@pytest.mark.parametrize("angle", ["linear", "atan"])
def test_gradcheck(z: float, b: float, angle: str) -> None:
    x, g = state_and_update(z)
    a = torch.tensor([1.1], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([b], dtype=torch.float64, requires_grad=True)
    x.requires_grad_()
    g.requires_grad_()

    def step(x, g, a, bias):
        return geonorm_step(x, g, a, bias, decay=0.5, clamp=CLAMP, angle=angle)

    # derivatives grow like b / |v| near v = 0: finite differences need a small step there
    eps = 1e-9 if 0 < z < 1e-2 else 1e-7
    assert torch.autograd.gradcheck(step, (x, g, a, bias), eps=eps)
    fixed = lambda x, g, a, bias: geonorm_step(x, g, a, bias, radius=2.0, angle=angle)  # noqa: E731
    assert torch.autograd.gradcheck(fixed, (x, g, a, bias), eps=eps)


def test_radial_update_with_bias_does_not_move_and_has_finite_gradients() -> None:
    """At v = 0 the direction is undefined: the state stays, gradients stay finite."""
    x, g = state_and_update(0.0, radial=0.5)  # a power of two: radial in bfloat16 too
    x.requires_grad_()
    g.requires_grad_()
    bias = torch.tensor([0.4], dtype=torch.float64, requires_grad=True)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        xs, gs = x.to(dtype), g.to(dtype)
        out = geonorm_step(xs, gs, torch.tensor([1.0]), bias.to(dtype), decay=0.5, clamp=CLAMP)
        assert out.dtype == dtype
        torch.testing.assert_close(out, xs)
        grads = torch.autograd.grad(out.float().sum(), (x, g, bias))
        assert all(torch.isfinite(t).all() for t in grads)


def test_default_model_is_the_reading() -> None:
    """Default GeoNormGPT: harmonic decay, clamp, bias, own radius, plain scalars."""
    torch.manual_seed(0)
    model = GeoNormGPT(make_config("geonorm", **CFG)).double()
    with torch.no_grad():
        for block in model.blocks:  # move the scalars off their init
            block.s_a.param.fill_(0.9)
            block.b_m.fill_(0.05)
    idx = torch.randint(0, CFG["vocab_size"], (2, 8))
    states = model.hidden_states(idx)
    torch.testing.assert_close(states[0], model.tok_emb.weight[idx])  # no normalization
    for layer, block in enumerate(model.blocks):
        decay = 1 / (layer + 1)
        x = states[2 * layer]
        g = block.attn(block.norm_a(x))
        torch.testing.assert_close(states[2 * layer + 1], reading(x, g, 0.9, 0.0, decay))
        x = states[2 * layer + 1]
        g = block.mlp(block.norm_m(x))
        torch.testing.assert_close(states[2 * layer + 2], reading(x, g, 1.0, 0.05, decay))
    assert block.s_a.scale == 1.0  # a plain scalar, no scale trick


def test_old_defaults_are_named_options() -> None:
    cfg = make_config("geonorm", **CFG, **OLD)
    model = GeoNormGPT(cfg)
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.endswith(("b_a", "b_m")) for n in names)  # no bias
    block = model.blocks[2]
    assert block.decay == pytest.approx(1 / math.sqrt(3))
    assert block.s_a.scale == pytest.approx(1 / math.sqrt(CFG["d_model"]))  # scale trick
    states = model.hidden_states(torch.randint(0, CFG["vocab_size"], (2, 8)))
    torch.testing.assert_close(states.norm(dim=-1), torch.ones(states.shape[:-1]))
    # v0.1's step: atan angle at radius sqrt(d) = Post-Norm of the tangent update
    h, g = sphere.random(4, 16), torch.randn(4, 16)
    v = sphere.project(h, g)
    expected = sphere.normalize(4.0 * h + v)
    torch.testing.assert_close(geonorm_step(h, g, 1.0, radius=4.0, angle="atan"), expected)
