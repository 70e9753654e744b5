"""SphereMuon, AdamH and spheretorch.optim.sphere_steps against references and known answers.

References (ports written here from the published formulas, float64):
* Keller Jordan's Muon (github.com/KellerJordan/Muon, muon.py): ``zeropower_via_newtonschulz5``
  and ``muon_update``;
* NVIDIA Emerging-Optimizers' ObliqueAdam (riemannian_optimizers/normalized_optimizer.py):
  Adam moments, then the tangent projection, decoupled decay, step, renormalization. Its bias
  correction divides sqrt(v) by (1 - beta2^t) instead of sqrt(1 - beta2^t); the port takes a
  flag to do either, and ours equals the corrected one.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs

import spheretorch as st
from spheretorch import SphereParameter
from spheretorch import sphere as S
from spheretorch.optim import AdamH, SphereMuon
from spheretorch.optim.sphere_steps import (
    adam_direction,
    adam_directions,
    hyperball_step_,
    newton_schulz,
    orthogonalize,
    sphere_step,
    sphere_step_,
)

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- references


def keller_zeropower(g, steps, eps=1e-7):
    """Keller Jordan's zeropower_via_newtonschulz5, in g's dtype (here float64)."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    x = g.clone()
    if g.size(-2) > g.size(-1):
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = x @ x.mT
        B = b * A + c * A @ A
        x = a * x + B @ x
    if g.size(-2) > g.size(-1):
        x = x.mT
    return x


def keller_muon_step(p, grad, buf, lr, beta=0.95, wd=0.0, ns_steps=5, nesterov=True, eps=1e-7):
    """Keller Jordan's muon_update + Muon.step for one matrix (grad is not modified)."""
    buf.lerp_(grad, 1 - beta)
    update = grad.lerp(buf, beta) if nesterov else buf
    update = keller_zeropower(update, ns_steps, eps)
    update = update * max(1, grad.size(-2) / grad.size(-1)) ** 0.5
    p.mul_(1 - lr * wd)
    p.add_(update.reshape(p.shape), alpha=-lr)


def oblique_adam_step(p, grad, state, lr, betas, wd, dim, eps, fixed_bias_correction):
    """Emerging-Optimizers' ObliqueAdam step on one 2-D parameter (dim: the normalized axis)."""
    state["step"] = state.get("step", 0) + 1
    m = state.setdefault("exp_avg", torch.zeros_like(p))
    v = state.setdefault("exp_avg_sq", torch.zeros_like(p))
    t = state["step"]
    m.mul_(betas[0]).add_(grad, alpha=1 - betas[0])
    v.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
    bc1, bc2 = 1 - betas[0] ** t, 1 - betas[1] ** t
    if fixed_bias_correction:
        bc2 = math.sqrt(bc2)
    norm_grad = (m / bc1) / (v.sqrt() / bc2 + eps)
    inner = (p * norm_grad).sum(dim=dim, keepdim=True)
    riem = norm_grad - p * inner
    p.mul_(1 - lr * wd)
    p.add_(riem, alpha=-lr)
    p.copy_(torch.nn.functional.normalize(p, p=2.0, dim=dim, eps=eps))


# ----------------------------------------------------------------------------- Euclidean Muon


def euclidean_mats(dtype=torch.float32, seed=0):
    g = gen(seed)
    shapes = [(8, 5), (5, 8), (6, 6), (3, 7)]
    return [torch.nn.Parameter(torch.randn(s, dtype=dtype, generator=g)) for s in shapes]


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"nesterov": False, "momentum": 0.9},
        {"weight_decay": 0.1, "adjust_lr_fn": "match_rms_adamw"},
    ],
)
@pytest.mark.parametrize("foreach", [False, True])
def test_euclidean_matrices_are_torch_muon_bitwise(kw, foreach):
    ours, ref = euclidean_mats(), euclidean_mats()
    opt = SphereMuon(ours, lr=0.02, foreach=foreach, **kw)
    ref_kw = {"weight_decay": 0.0, **kw}
    opt_ref = torch.optim.Muon(ref, lr=0.02, **ref_kw)
    for t in range(4):
        g = gen(100 + t)
        for a, b in zip(ours, ref):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt.step()
        opt_ref.step()
        for a, b in zip(ours, ref):
            assert torch.equal(a, b), (t, kw)


def test_euclidean_matrices_equal_keller_jordans_muon_in_float64():
    for eps in (1e-7, 0.0):  # Keller adds eps to the norm, torch clamps: equal at eps=0
        ours, ref = euclidean_mats(F64), euclidean_mats(F64)
        opt = SphereMuon(ours, lr=0.02, weight_decay=0.05, ns_dtype=None, eps=eps)
        bufs = [torch.zeros_like(p) for p in ref]
        for t in range(4):
            g = gen(200 + t)
            for a, b, buf in zip(ours, ref, bufs):
                a.grad = torch.randn(a.shape, dtype=F64, generator=g)
                with torch.no_grad():
                    keller_muon_step(b, a.grad, buf, 0.02, wd=0.05, eps=eps)
            opt.step()
        tol = 1e-14 if eps == 0 else 1e-7  # eps/|G| ~ 1e-8 relative, amplified by NS
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a.detach(), b.detach(), atol=tol, rtol=0)


def test_batched_newton_schulz_equals_one_by_one():
    g = gen(1)
    mats = [torch.randn(6, 4, dtype=F64, generator=g) for _ in range(5)] + [torch.randn(3, 9)]
    one = orthogonalize(mats, dtype=None, batch=False)
    many = orthogonalize(mats, dtype=None, batch=True)
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=0)
    bf_one = orthogonalize(mats, batch=False)
    bf_many = orthogonalize(mats, batch=True)
    for a, b in zip(bf_one, bf_many):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=0)


def test_newton_schulz_flattens_singular_values():
    u, _ = torch.linalg.qr(torch.randn(16, 16, dtype=F64, generator=gen(2)))
    v, _ = torch.linalg.qr(torch.randn(8, 8, dtype=F64, generator=gen(3)))
    s = torch.logspace(-1, 1, 8, dtype=F64)  # condition number 100
    g = u[:, :8] @ torch.diag(s) @ v.T
    out = newton_schulz(g, dtype=None)
    sv = torch.linalg.svdvals(out)
    assert float(sv.min()) > 0.6 and float(sv.max()) < 1.25, sv
    # same singular vectors: the polar factor's directions
    polar = u[:, :8] @ v.T
    assert float((out * polar).sum() / (out.norm() * polar.norm())) > 0.98


# ----------------------------------------------------------------------------- sphere geometry


def _sphere_params(dtype=F64, seed=0):
    g = gen(seed)
    return [
        SphereParameter(torch.randn(5, 7, dtype=dtype, generator=g), dim=1),
        SphereParameter(torch.randn(9, 4, dtype=dtype, generator=g), dim=0),
        SphereParameter(torch.randn(4, 3, 2, 2, dtype=dtype, generator=g), dim=(1, 2, 3)),
        SphereParameter(3 * torch.randn(6, 5, dtype=dtype, generator=g), dim=None),
        SphereParameter(torch.randn(8, dtype=dtype, generator=g), dim=None),
    ]


@pytest.mark.parametrize("cls,kw", [(SphereMuon, {}), (AdamH, {}), (AdamH, {"angular": True})])
def test_spheres_keep_their_radius_and_turn_by_the_learning_rate(cls, kw):
    params = _sphere_params()
    radii = [p.sphere_radius for p in params]
    opt = cls(params, lr=0.03, measure_angle=True, angle_per="sphere", **kw)
    for t in range(3):
        g = gen(10 + t)
        for p in params:
            p.grad = torch.randn(p.shape, dtype=F64, generator=g)
        before = [p.detach().clone() for p in params]
        opt.step()
        for p, b, r in zip(params, before, radii):
            n = S.norm(p.detach(), p.sphere_dim)
            torch.testing.assert_close(n, torch.full_like(n, r), atol=1e-12 * r, rtol=0)
            angle = opt.state[p]["angle"]
            measured = S.angle(b, p.detach(), p.sphere_dim, radius=r).reshape(-1)
            torch.testing.assert_close(angle, measured, atol=1e-12, rtol=0)
            if cls is SphereMuon or kw.get("angular"):
                torch.testing.assert_close(angle, torch.full_like(angle, 0.03), atol=1e-12, rtol=0)
            else:  # hyperball: |u| = lr * r moves a point by at most asin(lr) radians
                assert float(angle.max()) <= math.asin(0.03) + 1e-12


def test_sphere_muon_tensor_angles_have_rms_lr_and_follow_the_polar_factor():
    """angle_per='tensor': the RMS angle over a matrix's row spheres is lr; a wide matrix's
    orthogonalized tangent update (near-unit rows) turns every row by about lr."""
    p = SphereParameter(torch.randn(4, 32, dtype=F64, generator=gen(5)), dim=1)
    opt = SphereMuon([p], lr=0.01, measure_angle=True, ns_dtype=None)
    p.grad = torch.randn(p.shape, dtype=F64, generator=gen(6))
    opt.step()
    a = opt.state[p]["angle"]
    torch.testing.assert_close(a.square().mean().sqrt(), torch.tensor(0.01, dtype=F64))
    assert float(a.min()) > 0.005


def test_frobenius_sphere_orthogonalizes_the_matrix_not_its_rows():
    """dim=None: the update direction is the (projected) polar factor of the whole matrix."""
    w = SphereParameter(torch.randn(6, 4, dtype=F64, generator=gen(7)), dim=None)
    r = w.sphere_radius
    g = torch.randn(6, 4, dtype=F64, generator=gen(8))
    x = w.detach().clone()
    opt = SphereMuon([w], lr=0.02, momentum=0.0, nesterov=False, ns_dtype=None)
    w.grad = g
    opt.step()
    gt = S.project(x, g, None, radius=r)
    o = S.project(x, newton_schulz(gt, dtype=None), None, radius=r)
    want = S.expmap(x, -0.02 * r * o / o.norm(), None, radius=r)
    torch.testing.assert_close(w.detach(), want, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- orderings


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_oblique_ordering_equals_emerging_optimizers_with_fixed_bias_correction(dim, wd):
    x0 = S.normalize(torch.randn(6, 5, dtype=F64, generator=gen(11)), dim)
    ours, ref, buggy = x0.clone(), x0.clone(), x0.clone()
    param = SphereParameter(x0.clone(), dim=dim)  # the one-call form, sphere_step_
    m, v = torch.zeros_like(x0), torch.zeros_like(x0)
    s_ref, s_bug = {}, {}
    betas, lr, eps = (0.9, 0.99), 0.01, 1e-8
    for t in range(1, 6):
        g = torch.randn(6, 5, dtype=F64, generator=gen(20 + t))
        oblique_adam_step(ref, g, s_ref, lr, betas, wd, dim, eps, fixed_bias_correction=True)
        oblique_adam_step(buggy, g, s_bug, lr, betas, wd, dim, eps, fixed_bias_correction=False)
        m.lerp_(g, 1 - betas[0])
        v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
        d = adam_direction(m, v, t, betas, eps)
        z, dz = (ours, d) if dim == 1 else (ours.T, d.T)
        new, _ = sphere_step(z, dz, lr, project=True, rule="adam", weight_decay=wd)
        ours = new if dim == 1 else new.T
        sphere_step_(param, d, lr, project=True, rule="adam", weight_decay=wd)
    torch.testing.assert_close(ours, ref, atol=1e-14, rtol=0)
    torch.testing.assert_close(param.detach(), ref, atol=1e-14, rtol=0)
    assert float((ours - buggy).abs().max()) > 1e-4  # the bug is not a rounding matter


def test_hyperball_rule_is_the_adamh_recipe():
    """|u| = lr * |W| along the Adam direction (not projected), then back to radius |W|."""
    w = SphereParameter(2 * torch.randn(5, 4, dtype=F64, generator=gen(30)), dim=None)
    r, x = w.sphere_radius, w.detach().clone()
    opt = AdamH([w], lr=0.05, betas=(0.9, 0.95), eps=1e-8)
    g = torch.randn(5, 4, dtype=F64, generator=gen(31))
    w.grad = g
    opt.step()
    d = (0.1 * g / 0.1) / ((0.05 * g * g).sqrt() / math.sqrt(0.05) + 1e-8)
    u = 0.05 * r * d / d.norm()
    want = r * (x - u) / (x - u).norm()
    torch.testing.assert_close(w.detach(), want, atol=1e-13, rtol=0)


# ----------------------------------------------------------------------------- known answers


def _train(opt, loss_fn, steps=700, gamma=0.975):
    """``steps`` steps with the LR decaying geometrically (to ~1e-8 of its start)."""
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        sched.step()


def _max_trace(make):
    a = torch.randn(6, 4, dtype=F64, generator=gen(40))
    w = SphereParameter(torch.randn(6, 4, dtype=F64, generator=gen(41)), dim=None, radius=2.0)
    _train(make(w), lambda: -(w * a).sum())
    assert abs(float(w.detach().norm()) - 2.0) < 1e-12  # the radius is kept
    return w.detach(), a


@pytest.mark.parametrize(
    "make",
    [
        lambda p: SphereMuon([p], lr=0.1, ns_dtype=None),
        lambda p: AdamH([p], lr=0.1, ordering="riemannian"),
        lambda p: AdamH([p], lr=0.1, ordering="riemannian", angular=True),
    ],
)
def test_max_trace_on_the_frobenius_sphere_reaches_r_a_over_norm_a(make):
    w, a = _max_trace(make)
    err = float((w - 2.0 * a / a.norm()).norm() / 2.0)
    assert err < 1e-5, err


@pytest.mark.parametrize("ordering", ["renorm", "oblique"])
def test_preconditioned_orderings_converge_to_the_sign_of_a(ordering):
    """The documented bias of per-coordinate Adam before the projection: a constant gradient
    -A gives the direction -sign(A), whose tangent part vanishes at r sign(A) / |sign(A)|."""
    w, a = _max_trace(lambda p: AdamH([p], lr=0.1, ordering=ordering))
    biased = 2.0 * a.sign() / a.sign().norm()
    # oblique reaches it; renorm's steps along a nearly radial D turn by lr * sin(angle) only,
    # so with the same decaying LR it is still on its way (but far from the true answer)
    assert float((w - biased).norm() / 2.0) < (1e-5 if ordering == "oblique" else 0.05)
    assert float((w - 2.0 * a / a.norm()).norm() / 2.0) > 0.1


@pytest.mark.parametrize(
    "make",
    [
        lambda p: SphereMuon([p], lr=0.1, ns_dtype=None),
        lambda p: SphereMuon([p], lr=0.1, ns_dtype=None, angle_per="sphere"),
        lambda p: AdamH([p], lr=0.1, ordering="riemannian"),
        lambda p: AdamH([p], lr=0.1, ordering="riemannian", angular=True),
    ],
)
def test_rows_reach_their_leading_eigenvectors(make):
    """Row i maximizes w_i^T S_i w_i: the leading eigenvector of S_i (up to sign)."""
    k, n = 4, 6
    q = torch.linalg.qr(torch.randn(k, n, n, dtype=F64, generator=gen(50)))[0]
    ev = torch.linspace(1.0, 3.0, n, dtype=F64)  # gap 0.4 between the top two
    mats = q @ torch.diag_embed(ev.expand(k, n)) @ q.mT
    lead = q[:, :, -1]
    w = SphereParameter(torch.randn(k, n, dtype=F64, generator=gen(51)), dim=1)
    _train(make(w), lambda: -torch.einsum("ki,kij,kj->", w, mats, w))
    cos = (w.detach() * lead).sum(1).abs()
    err = (1 - cos).abs().max().sqrt()  # ~ the angle to the answer
    assert float(err) < 1e-5, err


# ----------------------------------------------------------------------------- routing and API


def test_routing_groups_and_state():
    g = gen(60)
    sph = SphereParameter(torch.randn(4, 5, generator=g), dim=1)
    mat = torch.nn.Parameter(torch.randn(4, 5, generator=g))
    emb = torch.nn.Parameter(torch.randn(10, 5, generator=g))
    vec = torch.nn.Parameter(torch.randn(5, generator=g))
    conv = torch.nn.Parameter(torch.randn(3, 2, 2, 2, generator=g))
    opt = SphereMuon(
        [{"params": [sph, mat, vec, conv]}, {"params": [emb], "use_muon": False, "adamw_lr": 0.1}],
        lr=0.02,
    )
    for p in (sph, mat, emb, vec, conv):
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    assert set(opt.state[sph]) == {"momentum_buffer"}
    assert set(opt.state[mat]) == {"momentum_buffer"}
    for p in (emb, vec, conv):  # AdamW's state, as torch.optim.AdamW keeps it
        assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
    # the AdamW parameters equal torch's AdamW with the group's options
    ref = torch.nn.Parameter(emb.detach().clone())
    with pytest.raises(ValueError, match=r"use_muon=True needs real tensors of >= 2 axes"):
        SphereMuon([{"params": [vec], "use_muon": True}]).step(lambda: vec.sum().backward())
    del ref


def test_adamw_parameters_equal_torch_adamw():
    g = gen(70)
    ours = [torch.nn.Parameter(torch.randn(5, generator=g)), torch.nn.Parameter(torch.randn(3))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = AdamH(ours, lr=0.01, betas=(0.9, 0.95), weight_decay=0.1)
    opt_ref = torch.optim.AdamW(ref, lr=0.01, betas=(0.9, 0.95), weight_decay=0.1)
    opt2 = SphereMuon(
        [torch.nn.Parameter(p.detach().clone()) for p in ours],
        adamw_lr=0.01,
        adamw_betas=(0.9, 0.95),
        adamw_weight_decay=0.1,
    )
    for t in range(3):
        for a, b, c in zip(ours, ref, opt2.param_groups[0]["params"]):
            a.grad = torch.randn(a.shape, generator=gen(80 + t))
            b.grad, c.grad = a.grad.clone(), a.grad.clone()
        opt.step()
        opt_ref.step()
        opt2.step()
    for a, b, c in zip(ours, ref, opt2.param_groups[0]["params"]):
        assert torch.equal(a, b) and torch.equal(c, b)


def test_nonfinite_policy_and_flags():
    p = SphereParameter(torch.randn(3, 4), dim=1)
    before = p.detach().clone()
    opt = AdamH([p])
    p.grad = torch.full((3, 4), math.nan)
    opt.step()
    assert torch.equal(p.detach(), before) and opt.skipped_steps == 1
    with pytest.raises(FloatingPointError, match=r"param_groups\[0\]\['params'\]\[0\]"):
        AdamH([p], nonfinite="raise").step()
    with pytest.raises(RuntimeError, match="`fused` is not supported by SphereMuon"):
        SphereMuon([p], fused=True)
    with pytest.raises(RuntimeError, match="`differentiable` is not supported by AdamH"):
        AdamH([p], differentiable=True)
    with pytest.raises(ValueError, match="angle_per must be 'tensor' or 'sphere'"):
        SphereMuon([p], angle_per="row")


def test_loaded_whole_tensor_radius_is_kept_by_the_optimizers():
    """A whole-tensor sphere takes its radius from a loaded state dict; the next step keeps it."""
    m = torch.nn.Module()
    m.w = SphereParameter(torch.randn(4, 4), dim=None)
    m.load_state_dict({"w": 5.0 * S.normalize(torch.randn(4, 4), None)})
    opt = SphereMuon(m.parameters(), lr=0.1)
    m.w.grad = torch.randn(4, 4)
    opt.step()
    assert abs(float(m.w.detach().norm()) - 5.0) < 1e-5
    assert st.sphere_dim_of(m.w) == (0, 1)


def test_renorm_ordering_is_torch_muon_then_renormalization():
    x = torch.randn(6, 5, generator=gen(90))
    ours = SphereParameter(x, dim=1)
    ref = torch.nn.Parameter(ours.detach().clone())
    opt = SphereMuon([ours], lr=0.02, ordering="renorm", weight_decay=0.1)
    opt_ref = torch.optim.Muon([ref], lr=0.02, weight_decay=0.1)
    for t in range(3):
        ours.grad = torch.randn(6, 5, generator=gen(91 + t))
        ref.grad = ours.grad.clone()
        opt.step()
        opt_ref.step()
        with torch.no_grad():
            ref.copy_(S.normalize(ref, 1))
        assert torch.equal(ours.detach(), ref.detach())


# ----------------------------------------------------------------------------- train recipes


@pytest.mark.parametrize("recipe", ["muon", "sphere_muon", "adamh"])
@pytest.mark.parametrize("model_name", ["gpt", "ngpt"])
def test_train_recipes_build_step_and_resume_bitwise(recipe, model_name):
    from spheretorch.models import build_model, make_config
    from spheretorch.train.config import MUON_LR_SCALE, build_optimizer

    cfg = make_config(model_name, vocab_size=17, seq_len=8, n_layer=1, n_head=2, d_model=16)
    torch.manual_seed(0)
    model = build_model(model_name, cfg)
    opt = build_optimizer(model, recipe, 4e-3, 0.1, (0.9, 0.95))
    assert isinstance(opt, AdamH if recipe == "adamh" else SphereMuon)
    if recipe != "adamh":
        lrs = {g["lr"] for g in opt.param_groups}
        assert 4e-3 * MUON_LR_SCALE in lrs
        embeddings = [g for g in opt.param_groups if g.get("use_muon") is False]
        on_adamw = {id(p) for g in embeddings for p in g["params"]}
        assert (id(model.tok_emb.weight) in on_adamw) == (model_name == "gpt")
    idx = torch.randint(0, 17, (2, 8), generator=gen(0))

    def step(m, o):
        torch.manual_seed(1)  # the same dropout masks for both models
        o.zero_grad()
        m(idx, idx)[1].backward()
        o.step()

    step(model, opt)
    twin = build_model(model_name, cfg)
    twin.load_state_dict(model.state_dict())
    opt2 = build_optimizer(twin, recipe, 4e-3, 0.1, (0.9, 0.95))
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # (a state dict holds references)
    step(model, opt)
    step(twin, opt2)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [SphereMuon, AdamH])
def test_half_precision_spheres_keep_float32_math(cls):
    """bfloat16 sphere parameters: norms and angles computed in float32, state in float32
    for AdamH's moments, the result stored back in bfloat16 on the sphere."""
    p = SphereParameter(torch.randn(8, 16).bfloat16(), dim=1)
    q = SphereParameter(torch.randn(4, 4).bfloat16(), dim=None)
    opt = cls([p, q], lr=0.05, measure_angle=True)
    for t in range(2):
        for x in (p, q):
            x.grad = torch.randn(x.shape, generator=gen(t)).bfloat16()
        opt.step()
    assert p.dtype == torch.bfloat16 and opt.state[p]["angle"].dtype == torch.float32
    n = S.norm(p.detach(), 1)
    torch.testing.assert_close(n, torch.ones_like(n), atol=1e-2, rtol=0)
    if cls is AdamH:
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        # across load_state_dict too (torch casts floating state to the parameter's dtype)
        again = cls([p, q], lr=0.05, measure_angle=True)
        again.load_state_dict(opt.state_dict())
        for key in ("exp_avg", "exp_avg_sq"):
            assert again.state[p][key].dtype == torch.float32
            assert torch.equal(again.state[p][key], opt.state[p][key])
        again.step()


def test_optim_step_benchmark_times_the_muon_family(capsys):
    """benchmarks/optim_step.py's Muon family (--quick smoke: every candidate steps)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "optim_step.py"
    spec = importlib.util.spec_from_file_location("optim_step", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = str(torch.get_num_threads())  # main() sets it: keep this process's
    mod.main(["--quick", "--set", "matrices", "--only-family", "muon", "--threads", threads])
    out = capsys.readouterr().out
    assert "| SphereMuon(frobenius) |" in out and "| AdamH(rows) |" in out
    assert "vs torch Muon" in out and "| optimizer |" not in out  # the Muon table only
    if hasattr(torch.optim, "Muon"):
        assert "| torch Muon | " in out


# ----------------------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None)
@given(
    hs.sampled_from([(5, 4), (3, 2, 2), (6,), (2, 3, 4)]),
    hs.sampled_from(["int", "tuple", "none"]),
    hs.sampled_from([1.0, 0.5, 7.0]),
    hs.sampled_from(["adam", "hyperball", "angular"]),
    hs.floats(1e-6, 1.0),
    hs.integers(0, 2**31 - 1),
)
def test_sphere_step_keeps_the_radius_and_its_angle(shape, kind, r, rule, lr, seed):
    dims = {"int": -1, "tuple": tuple(range(1, len(shape))) or 0, "none": None}[kind]
    g = gen(seed)
    p = SphereParameter(torch.randn(shape, dtype=F64, generator=g), dim=dims, radius=r)
    d = torch.randn(shape, dtype=F64, generator=g)
    before = p.detach().clone()
    angle = sphere_step_(p, d, lr, rule=rule, project=rule != "adam", measure=True)
    n = S.norm(p.detach(), p.sphere_dim)
    torch.testing.assert_close(n, torch.full_like(n, r), atol=1e-12 * r, rtol=0)
    measured = S.angle(before, p.detach(), p.sphere_dim, radius=r).reshape(-1)
    torch.testing.assert_close(angle, measured, atol=1e-12, rtol=0)
    if rule == "angular":
        torch.testing.assert_close(angle, torch.full_like(angle, lr), atol=1e-12, rtol=0)
    elif rule == "hyperball":  # tangent u of norm lr * r: exactly atan(lr)
        torch.testing.assert_close(angle, torch.full_like(angle, math.atan(lr)), atol=1e-12, rtol=0)


@settings(max_examples=40, deadline=None)
@given(
    hs.sampled_from([(5, 4), (1, 9), (3, 1)]),
    hs.booleans(),
    hs.booleans(),
    hs.sampled_from([1.0, 0.5, 7.0]),
    hs.floats(1e-6, 2.0),
    hs.sampled_from([1.0, 1e-30, 1e30]),
    hs.integers(0, 2**31 - 1),
)
def test_in_place_hyperball_step_equals_sphere_step(shape, whole, project, r, lr, scale, seed):
    """AdamH's CPU path (the direction overwritten, no buffer of the parameter's size)
    against the reference rule, in float64: rows or one whole-tensor row, projected or not,
    directions of any scale (the step is scale-free), a zero direction row (no move)."""
    g = gen(seed)
    z = S.normalize(torch.randn(shape, dtype=F64, generator=g), -1, radius=r)
    if whole:
        z = z.reshape(1, -1) * (r / z.norm())
    d = torch.randn(z.shape, dtype=F64, generator=g) * scale
    if z.shape[0] > 1:
        d[1] = 0.0
    want, _ = sphere_step(z, d, lr, radius=r, project=project, rule="hyperball")
    got = z.clone()
    hyperball_step_(got, d.clone(), lr, radius=r, project=project)
    torch.testing.assert_close(got, want, atol=1e-13 * r, rtol=0)
    if z.shape[0] > 1:  # a zero direction: no move (and no NaN, whatever lr * r)
        torch.testing.assert_close(got[1], z[1], atol=1e-15 * r, rtol=0)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("dim", [None, 1])
def test_a_zero_gradient_leaves_adamh_spheres_in_place(dim, foreach):
    """A layer (or a row: an unused token's embedding) whose gradient is zero has a zero
    Adam direction: its sphere stays, with no NaN, even where lr * r / tiny overflows
    (a whole-matrix sphere of radius 20, lr 0.5)."""
    w = SphereParameter(torch.randn(6, 5, dtype=F64, generator=gen(90)), dim=dim, radius=20.0)
    before = w.detach().clone()
    opt = AdamH([w], lr=0.5, foreach=foreach)
    for _ in range(2):
        w.grad = torch.zeros_like(w)
        opt.step()
    torch.testing.assert_close(w.detach(), before, atol=1e-13, rtol=0)


def test_adam_directions_up_to_scale_are_positive_multiples():
    """``up_to_scale``: each direction times ``1 - beta1^t`` (one buffer each, written in place
    for a large CPU tensor), for tensors at different steps."""
    # (the large one: divided into its own buffer on the CPU; the small ones: one _foreach op)
    shapes = [(4, 5), (4, 5), (200, 200)]
    ms = [torch.randn(*s, dtype=F64, generator=gen(i)) for i, s in enumerate(shapes)]
    vs = [torch.rand(*s, dtype=F64, generator=gen(10 + i)) for i, s in enumerate(shapes)]
    steps, betas = [1.0, 2.0, 7.0], (0.9, 0.95)
    exact = adam_directions(ms, vs, steps, betas, 1e-8)
    scaled = adam_directions(ms, vs, steps, betas, 1e-8, up_to_scale=True)
    for e, s_, t, m in zip(exact, scaled, steps, ms):
        torch.testing.assert_close(s_, e * (1 - betas[0] ** t), rtol=1e-14, atol=0)
        assert s_.data_ptr() != m.data_ptr()  # the moments are left alone


def test_adamh_takes_the_in_place_step_where_it_applies(monkeypatch):
    """foreach AdamH on float32/float64 row and whole-tensor spheres takes the in-place step
    (and equals the reference loop, foreach=False); column spheres, measured angles and the
    angular rule take sphere_step."""
    from spheretorch.optim import sphere_steps

    calls: list[tuple] = []
    real = sphere_steps.hyperball_step_
    monkeypatch.setattr(
        "spheretorch.optim._hybrid.hyperball_step_",
        lambda z, *a, **k: calls.append(tuple(z.shape)) or real(z, *a, **k),
    )

    def params():
        g = gen(70)
        return [
            SphereParameter(torch.randn(6, 5, dtype=F64, generator=g), dim=1),
            SphereParameter(torch.randn(6, 5, dtype=F64, generator=g), dim=None, radius=2.0),
            SphereParameter(torch.randn(6, 5, dtype=F64, generator=g), dim=0),
        ]

    out = {}
    for foreach in (True, False):
        ps = params()
        opt = AdamH(ps, lr=0.05, foreach=foreach, ordering="oblique")
        for t in range(3):
            for i, p in enumerate(ps):
                p.grad = torch.randn(p.shape, dtype=F64, generator=gen(80 + 3 * t + i))
            opt.step()
        out[foreach] = ps
    assert calls == [(6, 5), (1, 30)] * 3  # not the column sphere, not foreach=False
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)
    calls.clear()
    for kw in (dict(measure_angle=True), dict(angular=True)):
        ps = params()
        opt = AdamH(ps, lr=0.05, **kw)
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
    assert calls == []


def test_two_dimensional_newton_schulz_is_torch_muons():
    from torch.optim._muon import _zeropower_via_newtonschulz

    for shape in [(7, 3), (3, 7), (5, 5)]:
        x = torch.randn(shape, generator=gen(sum(shape)))
        want = _zeropower_via_newtonschulz(x, (3.4445, -4.7750, 2.0315), 5, 1e-7)
        assert torch.equal(newton_schulz(x), want)


@pytest.mark.parametrize(
    "shape,dim,to_rows",
    [
        ((5, 7), 1, lambda t: t),
        ((9, 4), 0, lambda t: t.T),  # column spheres: the transposed matrix's rows
        ((4, 3, 2, 2), (1, 2, 3), lambda t: t.reshape(4, -1)),  # one sphere per filter
    ],
)
@pytest.mark.parametrize("angle_per", ["sphere", "tensor"])
def test_row_spheres_orthogonalize_the_matrix_of_spheres(shape, dim, to_rows, angle_per):
    """The definition in SphereMuon's docstring, step by step: O = P(NS(P G)) on the matrix
    whose rows are the spheres, then each row turns along -o_i by lr (or lr |o_i| / rms)."""
    w = SphereParameter(torch.randn(shape, dtype=F64, generator=gen(12)), dim=dim)
    g = torch.randn(shape, dtype=F64, generator=gen(13))
    z = to_rows(w.detach().clone())
    opt = SphereMuon([w], lr=0.05, momentum=0.0, nesterov=False, ns_dtype=None, angle_per=angle_per)
    w.grad = g
    opt.step()
    o = S.project(z, newton_schulz(S.project(z, to_rows(g), 1), dtype=None), 1)
    n = o.norm(dim=1, keepdim=True)
    theta = 0.05 * (torch.ones_like(n) if angle_per == "sphere" else n / n.square().mean().sqrt())
    want = torch.cos(theta) * z - torch.sin(theta) * o / n
    torch.testing.assert_close(to_rows(w.detach()), want, atol=1e-12, rtol=0)


@settings(max_examples=40, deadline=None)
@given(
    hs.lists(hs.integers(1, 4), min_size=1, max_size=4),
    hs.integers(0, 3),
    hs.integers(0, 3),
)
def test_rows_are_the_spheres_and_invert(shape, first, last):
    from spheretorch.optim.sphere_steps import from_rows, rows

    first, last = sorted((first % len(shape), last % len(shape)))
    dims = tuple(range(first, last + 1))
    t = torch.randn(shape, dtype=F64, generator=gen(len(shape)))
    layout = S.sphere_layout(t.shape, dims)
    z = rows(t, layout)
    assert z.shape == (layout.count, layout.size)
    assert torch.equal(from_rows(z, layout, t.shape), t)
    torch.testing.assert_close(
        z.norm(dim=1).sort().values, S.norm(t, dims, keepdim=False).reshape(-1).sort().values
    )


@pytest.mark.parametrize("angle_per", ["tensor", "sphere"])
def test_batched_sphere_steps_equal_one_by_one(angle_per):
    """Same-shape sphere parameters stepped together (stacked rows; whole-tensor spheres of
    different radii as unit rows) equal the one-by-one steps."""

    def make():
        g = gen(77)
        out = [SphereParameter(torch.randn(5, 7, dtype=F64, generator=g), dim=1) for _ in range(3)]
        out += [
            SphereParameter(s * torch.randn(4, 6, dtype=F64, generator=g), dim=None) for s in (1, 3)
        ]
        return out

    a, b = make(), make()
    kw = dict(lr=0.05, ns_dtype=None, angle_per=angle_per, measure_angle=True)
    opt_a, opt_b = SphereMuon(a, batch_ns=True, **kw), SphereMuon(b, batch_ns=False, **kw)
    for t in range(3):
        for x, y in zip(a, b):
            x.grad = torch.randn(x.shape, dtype=F64, generator=gen(300 + t))
            y.grad = x.grad.clone()
        opt_a.step()
        opt_b.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach(), y.detach(), atol=1e-12, rtol=0)
        torch.testing.assert_close(
            opt_a.state[x]["angle"], opt_b.state[y]["angle"], atol=1e-12, rtol=0
        )


@pytest.mark.parametrize("inplace", [False, True])
def test_stacked_tangent_projections_equal_one_by_one(inplace):
    """The tangent projections of the Muon family (momentum, Riemannian moments): unit row
    spheres through ``_foreach`` ops, same-size whole-tensor spheres (radii 1.5, 3, 6) as one
    stack, the rest one by one: equal to projecting each parameter alone, which is
    ``sphere.project``."""
    from spheretorch.optim._hybrid import HybridOptimizer

    g = gen(7)
    ps = [SphereParameter(torch.randn(3, 4, dtype=torch.float64, generator=g), dim=1)]
    ps += [SphereParameter(torch.randn(3, 4, dtype=torch.float64, generator=g), dim=0)]
    for scale in (1.5, 3.0, 6.0):
        x = torch.randn(3, 4, dtype=torch.float64, generator=g)
        ps.append(SphereParameter(scale * x / x.norm(), dim=None))
    ts = [torch.randn(p.shape, dtype=torch.float64, generator=g) for p in ps]
    got = [t.clone() for t in ts]
    got = HybridOptimizer._tangent(ps, got, inplace=inplace)
    for p, t, out in zip(ps, ts, got):
        r = float(getattr(p, "sphere_radius", 1.0))
        ref = S.project(p.detach(), t, st.sphere_dim_of(p), radius=r)
        torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13)
        whole = p.detach().reshape(-1) / r
        if st.sphere_dim_of(p) == (0, 1):  # tangent to the Frobenius sphere
            assert abs(float(whole @ out.reshape(-1))) < 1e-12
