"""GPT, NGPT and GeoNormGPT: shapes, causality, the sphere invariants, init, config errors."""

from __future__ import annotations

import io
import math

import pytest
import torch

from spheretorch import sphere
from spheretorch.models import (
    GPT,
    MODELS,
    NGPT,
    GeoNormConfig,
    GeoNormGPT,
    TransformerConfig,
    build_model,
    config_from_dict,
    make_config,
)
from spheretorch.models.geonorm import geonorm_step

torch.set_num_threads(1)  # tiny models; avoid oversubscription under pytest-xdist

CFG = dict(vocab_size=17, seq_len=16, n_layer=3, n_head=2, d_model=32)


def make(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, make_config(name, **{**CFG, **kw}))


def tokens(b: int = 3, t: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(
        0, CFG["vocab_size"], (b, t), generator=torch.Generator().manual_seed(seed)
    )


@pytest.mark.parametrize("name", list(MODELS))
def test_shapes_and_loss(name: str) -> None:
    model = make(name)
    idx = tokens()
    logits, loss = model(idx)
    assert logits.shape == (3, 16, CFG["vocab_size"])
    assert loss is None
    logits2, loss = model(idx, idx)
    assert loss is not None and loss.shape == () and math.isfinite(loss.item())
    assert torch.equal(logits, logits2)
    # near-uniform predictions at initialisation
    assert abs(loss.item() - math.log(CFG["vocab_size"])) < 1.0
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("name", list(MODELS))
def test_causal(name: str) -> None:
    model = make(name)
    idx = tokens()
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % CFG["vocab_size"]
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-5)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("name", list(MODELS))
def test_hidden_states_count_and_shorter_inputs(name: str) -> None:
    model = make(name)
    hs = model.hidden_states(tokens(2, 5))
    assert hs.shape == (2 * CFG["n_layer"] + 1, 2, 5, CFG["d_model"])
    out = model.generate(tokens(1, 3), 20, temperature=1.0, top_k=5)
    assert out.shape == (1, 23)
    assert out.max() < CFG["vocab_size"]


@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("ngpt", {"residual_rule": "nlerp"}),
        ("ngpt", {"residual_rule": "slerp"}),
        ("geonorm", {"geo_radius": "fixed"}),
    ],
)
def test_hidden_states_unit_norm(name: str, kw: dict) -> None:
    model = make(name, **kw)
    hs = model.hidden_states(tokens())
    norms = hs.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_geonorm_states_keep_their_embedding_norm() -> None:
    model = make("geonorm")
    idx = tokens()
    norms = model.hidden_states(idx).norm(dim=-1)
    rows = model.tok_emb.weight[idx].norm(dim=-1).detach()
    assert torch.allclose(norms, rows.expand_as(norms), rtol=1e-5)


def test_ngpt_sphere_parameters_along_d_model() -> None:
    model = make("ngpt")
    d = CFG["d_model"]
    expected = {
        "tok_emb.weight": 1,
        "lm_head.weight": 1,
        "attn.qkv.weight": 1,
        "mlp.up.weight": 1,
        "attn.proj.weight": 0,
        "mlp.down.weight": 0,
    }
    seen = set()
    for name, p in model.named_parameters():
        dim = getattr(p, "sphere_dim", None)
        if p.dim() == 1:
            assert dim is None, name  # scaling vectors are Euclidean
            continue
        suffix = next(k for k in expected if name.endswith(k))
        seen.add(suffix)
        assert dim == expected[suffix], name
        assert p.shape[dim] == d, name  # normalized along d_model
        n = p.norm(dim=dim)
        assert torch.allclose(n, torch.ones_like(n), atol=1e-6), name
    assert seen == set(expected)
    assert not any("norm" in n or "bias" in n for n, _ in model.named_parameters())
    assert model.lm_head.weight is not model.tok_emb.weight


def test_ngpt_scale_trick_values() -> None:
    model = make("ngpt")
    block = model.blocks[0]
    d = CFG["d_model"]
    assert torch.allclose(block.alpha_a(), torch.full((d,), 0.05))
    assert torch.allclose(block.alpha_a.param, torch.full((d,), 1 / math.sqrt(d)))
    assert torch.allclose(block.attn.s_qk(), torch.ones(d))
    assert torch.allclose(model.s_z(), torch.ones(CFG["vocab_size"]))
    assert block.mlp.v_gain == pytest.approx(math.sqrt(d))


def test_ngpt_attention_matches_reference_formula() -> None:
    """q, k unit per head after RoPE, scaled by s_qk; softmax scale sqrt(d_k)."""
    model = make("ngpt", n_layer=1)
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.s_qk.param.mul_(torch.linspace(0.5, 1.5, CFG["d_model"]))
    x = sphere.random(2, 7, CFG["d_model"])
    b, t, h, dh = 2, 7, attn.n_head, attn.head_dim
    qkv = attn.qkv(x).view(b, t, 3, h, dh)
    q, k, v = (attn.rotary(qkv[:, :, i]) if i < 2 else qkv[:, :, i] for i in range(3))
    s = attn.s_qk().view(h, dh)
    q, k = s * sphere.normalize(q), s * sphere.normalize(k)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * math.sqrt(dh)
    scores = scores.masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
    y = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(b, t, -1)
    assert torch.allclose(attn(x), attn.proj(y), atol=1e-5)


def test_gpt_init_stds() -> None:
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=64, seq_len=16, n_layer=4, n_head=4, d_model=256)
    model = GPT(cfg)
    out_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            assert torch.all(p == 1), name
        elif name.endswith(("attn.proj.weight", "mlp.down.weight")):
            assert p.std().item() == pytest.approx(out_std, rel=0.05), name
        else:
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
    assert not any("bias" in n for n, _ in model.named_parameters())
    tied = GPT(make_config("gpt", **{**CFG, "tie_embeddings": True}))
    assert tied.lm_head.weight is tied.tok_emb.weight


def test_gpt_post_norm_has_unit_rms_states() -> None:
    model = make("gpt", norm_position="post")
    hs = model.hidden_states(tokens())[1:]
    rms = hs.pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-2)


def test_geonorm_step_on_sphere_and_smooth() -> None:
    torch.manual_seed(0)
    d = 32
    h = sphere.random(5, d)
    g = torch.randn(5, d) * 3
    for angle in ("linear", "atan"):
        out = geonorm_step(h, g, 0.7, radius=math.sqrt(d), angle=angle)
        assert torch.allclose(out.norm(dim=-1), torch.ones(5), atol=1e-6)
        # the step moves within span{h, g}: out is orthogonal to anything orthogonal to both
        w = torch.randn(5, d)
        basis = torch.linalg.qr(torch.stack([h, g], -1)).Q
        w = w - (basis @ (basis.transpose(-1, -2) @ w[..., None]))[..., 0]
        assert torch.allclose((out * w).sum(-1), torch.zeros(5), atol=1e-5)
    # a purely radial update does not move the state, with finite gradients
    gr = (2.0 * h).requires_grad_()
    hr = h.clone().requires_grad_()
    out = geonorm_step(hr, gr, 1.0, radius=math.sqrt(d), angle="atan")
    assert torch.allclose(out, h, atol=1e-6)
    out.sum().backward()
    assert torch.isfinite(gr.grad).all() and torch.isfinite(hr.grad).all()


def test_geonorm_atan_unit_step_is_post_norm_of_tangent_update() -> None:
    """s = 1, no decay, angle atan: the geodesic step lands on Norm(r h + v)."""
    torch.manual_seed(0)
    d = 16
    r = math.sqrt(d)
    h, g = sphere.random(4, d), torch.randn(4, d)
    v = g - (h * g).sum(-1, keepdim=True) * h
    expected = sphere.normalize(r * h + v)
    assert torch.allclose(geonorm_step(h, g, 1.0, radius=r, angle="atan"), expected, atol=1e-6)
    # linear angle = exp map of the tangent vector v on the radius-r sphere
    step = geonorm_step(h, g, 1.0, radius=r, angle="linear")
    assert torch.allclose(step, sphere.expmap(h, v / r), atol=1e-6)


@pytest.mark.parametrize("decay", ["none", "inverse", "inverse_sqrt", "linear"])
def test_geonorm_decays(decay: str) -> None:
    cfg = GeoNormConfig(**{**CFG, "n_layer": 4, "update_decay": decay, "geo_radius": "fixed"})
    factors = [cfg.decay(layer) for layer in range(4)]
    expected = {
        "none": [1, 1, 1, 1],
        "inverse": [1, 1 / 2, 1 / 3, 1 / 4],
        "inverse_sqrt": [1, 1 / math.sqrt(2), 1 / math.sqrt(3), 1 / 2],
        "linear": [1, 3 / 4, 1 / 2, 1 / 4],
    }[decay]
    assert factors == pytest.approx(expected)
    model = GeoNormGPT(cfg)
    assert [b.decay for b in model.blocks] == pytest.approx(expected)
    hs = model.hidden_states(tokens())
    assert torch.allclose(hs.norm(dim=-1), torch.ones(hs.shape[:-1]), atol=1e-5)


@pytest.mark.parametrize(
    ("name", "kw", "match"),
    [
        ("gpt", {"d_model": 33}, "divisible"),
        ("gpt", {"d_model": 6, "n_head": 2}, "even"),
        ("gpt", {"n_layer": 0}, "n_layer"),
        ("gpt", {"vocab_size": 2.5}, "vocab_size"),
        ("gpt", {"norm_position": "middle"}, "norm_position"),
        ("ngpt", {"residual_rule": "lerp"}, "residual_rule"),
        ("geonorm", {"update_decay": "cosine"}, "update_decay"),
        ("gpt", {"dropout": 1.0}, "dropout"),
        ("ngpt", {"alpha_init": float("nan")}, "alpha_init must be finite"),
        ("ngpt", {"alpha_scale": float("inf")}, "alpha_scale must be finite"),
        ("geonorm", {"geo_clamp": -1.0}, "geo_clamp"),
        ("geonorm", {"geo_bias": 1}, "geo_bias"),
        ("gpt", {"residual_rule": "nlerp"}, "model 'gpt' has no option 'residual_rule'"),
        ("ngpt", {"update_decay": "linear"}, "model 'ngpt' has no option 'update_decay'"),
        ("geonorm", {"norm_position": "post"}, "model 'geonorm' has no option 'norm_position'"),
    ],
)
def test_config_errors(name: str, kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        make_config(name, **{**CFG, **kw})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", list(MODELS))
def test_config_round_trip_and_defaults(name: str) -> None:
    cfg = make_config(name, **CFG)
    assert type(cfg) is MODELS[name].config_class
    assert cfg.d_mlp == 4 * CFG["d_model"]
    assert type(cfg).from_dict(cfg.to_dict()) == cfg
    assert make_config(name, **cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        type(cfg).from_dict({**cfg.to_dict(), "bogus": 1})
    # a plain TransformerConfig gives the model its own defaults
    assert MODELS[name](TransformerConfig(**CFG)).config == cfg
    with pytest.raises(ValueError, match="unknown model"):
        make_config("bert", **CFG)


def test_config_defaults_and_none_text() -> None:
    assert make_config("ngpt", **CFG).alpha_scale == pytest.approx(1 / math.sqrt(CFG["d_model"]))
    geo = make_config("geonorm", **CFG, geo_clamp="none", geo_step_scale="none")
    assert geo.geo_clamp is None
    assert geo.geo_step_scale == pytest.approx(1 / math.sqrt(CFG["d_model"]))
    with pytest.raises(TypeError, match="needs a NGPTConfig"):
        NGPT(make_config("gpt", **CFG))


def test_bad_inputs() -> None:
    model = make("gpt")
    with pytest.raises(ValueError, match="exceeds"):
        model(tokens(1, 17))
    with pytest.raises(ValueError, match="int64"):
        model(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="unknown model"):
        build_model("bert", TransformerConfig(**CFG))
    with pytest.raises(TypeError):
        NGPT({"vocab_size": 3})


@pytest.mark.parametrize("name", list(MODELS))
def test_state_dict_round_trip_keeps_sphere_params(name: str) -> None:
    model = make(name)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other = make(name)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    other.load_state_dict(torch.load(buf, weights_only=True))
    idx = tokens()
    assert torch.equal(model(idx)[0], other(idx)[0])
    dims = [getattr(p, "sphere_dim", None) for p in other.parameters()]
    assert dims == [getattr(p, "sphere_dim", None) for p in model.parameters()]


def test_param_groups_decay_only_euclidean_matrices() -> None:
    for name in MODELS:
        model = make(name)
        groups = model.param_groups(0.1)
        decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
        for p in model.parameters():
            on_sphere = getattr(p, "sphere_dim", None) is not None
            assert (id(p) in decayed) == (p.dim() >= 2 and not on_sphere)
        assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_fused_unit_matches_normalize_and_gradcheck() -> None:
    from spheretorch.sphere import unit

    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(unit, (x,))
    y = torch.randn(4, 9)
    assert torch.allclose(unit(y), sphere.normalize(y), atol=1e-7)
    assert torch.equal(unit(torch.zeros(2, 3)), torch.zeros(2, 3))
    b = torch.randn(4, 9, dtype=torch.bfloat16)
    assert unit(b).dtype == torch.bfloat16
    assert torch.equal(unit(b), sphere.normalize(b, on_zero="keep"))


@pytest.mark.parametrize("name", list(MODELS))
def test_meta_build_then_to_empty_and_reset_parameters(name: str) -> None:
    """Build on the meta device (no memory), materialise, initialise: same model as eager."""
    cfg = make_config(name, **CFG)
    with torch.device("meta"):
        meta = MODELS[name](cfg)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    torch.manual_seed(5)
    meta.reset_parameters()
    torch.manual_seed(5)
    eager = MODELS[name](cfg)  # what the docs promise: a plain eager build, same seed
    assert meta.state_dict().keys() == eager.state_dict().keys()
    for key, value in eager.state_dict().items():
        assert torch.equal(meta.state_dict()[key], value), key
    for (n, p), q in zip(meta.named_parameters(), eager.parameters(), strict=True):
        assert type(p) is type(q) and getattr(p, "sphere_dim", None) == getattr(
            q, "sphere_dim", None
        ), n
    for m, e in zip(meta.modules(), eager.modules(), strict=True):
        for key, buf in e.named_buffers(recurse=False):  # RoPE tables (not in the state dict)
            assert torch.equal(getattr(m, key), buf), key
    idx = tokens()
    assert torch.equal(meta(idx, idx)[1], eager(idx, idx)[1])


def test_rope_tables_exact_in_the_model_dtype() -> None:
    model = make("gpt")
    rot = model.blocks[0].attn.rotary
    ref = (torch.arange(CFG["seq_len"], dtype=torch.float64)[:, None]) * (
        10000.0 ** -(torch.arange(0, rot.head_dim, 2, dtype=torch.float64) / rot.head_dim)
    )
    model.double()
    assert rot.cos.dtype == torch.float64
    torch.testing.assert_close(rot.cos, ref.cos(), rtol=0, atol=1e-15)
    torch.testing.assert_close(rot.sin, ref.sin(), rtol=0, atol=1e-15)
    model.to(torch.bfloat16)  # half types: tables and rotation stay in float32
    assert rot.cos.dtype == torch.float32
    x = torch.randn(2, 5, 2, rot.head_dim, dtype=torch.bfloat16)
    expected = rot(x.float()).to(torch.bfloat16)
    assert torch.equal(rot(x), expected)
    # the loss of a half model is computed in float32
    logits, loss = model(tokens(), tokens())
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("bad", [CFG["vocab_size"], 1000, -1])
@pytest.mark.parametrize("training", [True, False])
def test_out_of_vocab_token_ids_are_a_one_line_error(name: str, bad: int, training: bool) -> None:
    model = make(name).train(training)
    idx = tokens()
    idx[1, 3] = bad
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 17\)") as info:
        model(idx)
    assert "\n" not in str(info.value) and str(bad) in str(info.value)
    with pytest.raises(ValueError, match="token ids"):
        model.hidden_states(idx)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": 0}, "top_k must be a positive int or None, got 0"),
        ({"top_k": -3}, "top_k must be a positive int"),
        ({"top_k": 2.5}, "top_k must be a positive int"),
        ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
        ({"temperature": -1.0}, "temperature must be a finite number >= 0"),
        ({"max_new_tokens": -1}, "max_new_tokens must be >= 0"),
    ],
)
def test_generate_bad_arguments(kwargs: dict, match: str) -> None:
    model = make("ngpt")
    args = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=match) as info:
        model.generate(tokens(1, 2), **args)
    assert "\n" not in str(info.value)


def test_generate_on_an_empty_prompt_and_empty_forward() -> None:
    model = make("gpt")
    empty = torch.zeros(1, 0, dtype=torch.long)
    with pytest.raises(ValueError, match=r"a prompt of at least one token .* shape \(1, 0\)"):
        model.generate(empty, 3)
    with pytest.raises(ValueError, match="idx holds no tokens"):
        model(empty)
    with pytest.raises(ValueError, match=r"idx must be a .* tensor of int64 token ids, got list"):
        model.generate([[1, 2]], 3)
    # greedy decoding and top_k = 1 agree; top_k larger than the vocabulary is all tokens
    greedy = model.generate(tokens(1, 2), 4, temperature=0)
    assert torch.equal(model.generate(tokens(1, 2), 4, top_k=1), greedy)
    assert model.generate(tokens(1, 2), 4, top_k=1000).shape == (1, 6)


def test_ngpt_loads_off_sphere_rows_renormalized_with_a_warning() -> None:
    """The documented choice (SphereParameter): renormalize with a warning naming the key."""
    model = make("ngpt")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["tok_emb.weight"] *= 5.0
    state["blocks.0.attn.proj.weight"] *= 0.5  # a dim=0 sphere parameter
    other = make("ngpt")
    with pytest.warns(UserWarning, match="off the unit sphere") as record:
        other.load_state_dict(state)
    warned = " ".join(str(w.message) for w in record)
    assert "'tok_emb.weight'" in warned and "'blocks.0.attn.proj.weight'" in warned
    for name, p in other.named_parameters():
        if getattr(p, "sphere_dim", None) is not None:
            n = p.norm(dim=p.sphere_dim)
            assert torch.allclose(n, torch.ones_like(n), atol=1e-6), name
    idx = tokens()
    torch.testing.assert_close(other(idx)[0], model(idx)[0])


# The config a v0.1 checkpoint holds (every model's fields in one dict), d_model = 32.
S32 = 1.0 / math.sqrt(32)
V01 = {
    **CFG,
    **{"d_mlp": 128, "dropout": 0.0, "rope_base": 10000.0, "norm_position": "pre"},
    **{"init_std": 0.02, "norm_eps": 1e-06, "tie_embeddings": False, "residual_rule": "nlerp"},
    **{"alpha_init": 0.05, "alpha_scale": S32, "sqk_init": 1.0, "sqk_scale": S32},
    **{"suv_init": 1.0, "suv_scale": 1.0, "sz_init": 1.0, "sz_scale": S32},
    **{"update_decay": "inverse_sqrt", "geo_angle": "atan", "geo_step_init": 1.0},
    "geo_step_scale": S32,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_config_from_dict_reads_v01_checkpoints(name: str) -> None:
    cfg = config_from_dict(name, V01)
    assert type(cfg) is MODELS[name].config_class
    assert config_from_dict(name, cfg.to_dict()) == cfg
    if name == "geonorm":  # v0.1's equations, the options named in docs/transformers.md
        old = dict(geo_angle="atan", update_decay="inverse_sqrt", geo_clamp=None)
        old |= dict(geo_bias=False, geo_radius="fixed", geo_step_scale=None)
        assert cfg == make_config("geonorm", **CFG, **old)
        keys = set(build_model(name, cfg).state_dict())
        assert "blocks.0.s_a.param" in keys and not any(k.endswith("b_a") for k in keys)
    with pytest.raises(ValueError, match="has no option 'bogus'"):
        config_from_dict(name, {**cfg.to_dict(), "bogus": 1})
