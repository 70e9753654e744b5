"""NGPT equals NVIDIA's reference nGPT (github.com/NVIDIA/ngpt, model.py + train.py) in float64.

The reference's equations are re-implemented below in a few lines (our own port, parameters named
as in its model.py), with two repairs: its RoPE (which returns only the partner term, not a
rotation; see docs/transformers.md) is a correct interleaved rotation, mapped to our rotate-half
layout by permuting q/k rows within each head; and its ``justnorm`` upcast to float32 is a
float64 norm here (in float64 the upcast would be a downcast).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from spheretorch.models import NGPT, make_config
from spheretorch.optim import RenormAdam

torch.set_num_threads(1)

CFG = dict(vocab_size=11, seq_len=8, n_layer=2, n_head=2, d_model=16)
D, H = CFG["d_model"], CFG["n_head"]
HD, BASE = D // H, 1.0 / math.sqrt(CFG["d_model"])  # head size, the reference's base_scale


def justnorm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return x / x.norm(p=2, dim=dim, keepdim=True)


def rope_interleaved(x: torch.Tensor) -> torch.Tensor:
    """Pairs (2i, 2i+1) rotated by position * 10000^(-2i/hd): the reference's layout, repaired."""
    t = x.shape[1]
    freq = torch.exp(torch.arange(0, HD, 2, dtype=x.dtype) * (-math.log(10000.0) / HD))
    ang = torch.arange(t, dtype=x.dtype)[:, None] * freq  # (T, hd/2)
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), -1).flatten(-2)


def reference_loss(p: dict[str, torch.Tensor], idx: torch.Tensor, tgt: torch.Tensor):
    """model.py's GPT.forward with use_nGPT=1 (attention written out instead of flash_attn)."""
    b, t = idx.shape
    h = p["wte"][idx]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for i in range(CFG["n_layer"]):
        w = {k.split(".", 2)[2]: v for k, v in p.items() if k.startswith(f"h.{i}.")}
        q = (h @ w["query"].T).view(b, t, H, HD)
        k = (h @ w["key"].T).view(b, t, H, HD)
        v = (h @ w["value"].T).view(b, t, H, HD)
        q, k = rope_interleaved(q), rope_interleaved(k)
        sqk = (w["sqk"] * (1.0 / BASE)).view(H, HD)
        q, k = sqk * justnorm(q), sqk * justnorm(k)
        att = torch.einsum("bthd,bshd->bhts", q, k) * math.sqrt(HD)  # softmax_scale = sqrt(d_k)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        y = torch.einsum("bhts,bshd->bthd", att, v).reshape(b, t, D)
        h_att = y @ w["att_c_proj"].T
        lr = torch.abs(w["attn_alpha"] * (0.05 / BASE))
        a_norm, b_norm = justnorm(h), justnorm(h_att)
        h = justnorm(a_norm + lr * (b_norm - a_norm))
        uv = (h @ w["c_fc"].T) * (w["suv"] * (1.0 * D**0.5))
        u, gate = uv.chunk(2, dim=-1)
        h_mlp = (u * F.silu(gate)) @ w["mlp_c_proj"].T
        lr = torch.abs(w["mlp_alpha"] * (0.05 / BASE))
        a_norm, b_norm = justnorm(h), justnorm(h_mlp)
        h = justnorm(a_norm + lr * (b_norm - a_norm))
    logits = (h @ p["lm_head"].T) * (p["sz"] * (1.0 / BASE))
    return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), tgt.view(-1))


# Our rotate-half coordinate j of a head is the reference's interleaved coordinate PERM[j].
PERM = torch.cat([torch.arange(0, HD, 2), torch.arange(1, HD, 2)])
ROWS = torch.cat([h * HD + PERM for h in range(H)])


def to_ours(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference tensors (weights or gradients) in our parameter names and layout."""
    out = {"tok_emb.weight": p["wte"], "lm_head.weight": p["lm_head"], "s_z.param": p["sz"]}
    d_mlp = 4 * D
    for i in range(CFG["n_layer"]):
        w = {k.split(".", 2)[2]: v for k, v in p.items() if k.startswith(f"h.{i}.")}
        o = f"blocks.{i}."
        out[o + "attn.qkv.weight"] = torch.cat((w["query"][ROWS], w["key"][ROWS], w["value"]))
        out[o + "attn.proj.weight"] = w["att_c_proj"]
        out[o + "attn.s_qk.param"] = w["sqk"][ROWS]
        out[o + "mlp.up.weight"] = w["c_fc"]
        out[o + "mlp.down.weight"] = w["mlp_c_proj"]
        out[o + "mlp.s_u.param"], out[o + "mlp.s_v.param"] = w["suv"][:d_mlp], w["suv"][d_mlp:]
        out[o + "alpha_a.param"], out[o + "alpha_m.param"] = w["attn_alpha"], w["mlp_alpha"]
    return out


def reference_params(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random reference parameters: matrices on the sphere, scaling vectors off their init."""

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    def vec(n: int, stored: float) -> torch.Tensor:  # stored value * (1 + noise)
        return stored * (1 + 0.3 * torch.rand(n, generator=gen, dtype=torch.float64))

    v = CFG["vocab_size"]
    p = {"wte": justnorm(rand(v, D)), "lm_head": justnorm(rand(v, D)), "sz": vec(v, BASE)}
    for i in range(CFG["n_layer"]):
        o = f"h.{i}."
        for name in ("query", "key", "value"):
            p[o + name] = justnorm(rand(D, D), 1)
        p[o + "att_c_proj"] = justnorm(rand(D, D), 0)
        p[o + "c_fc"] = justnorm(rand(8 * D, D), 1)
        p[o + "mlp_c_proj"] = justnorm(rand(D, 4 * D), 0)
        p[o + "attn_alpha"], p[o + "mlp_alpha"] = vec(D, BASE), vec(D, BASE)
        p[o + "sqk"], p[o + "suv"] = vec(D, BASE), vec(8 * D, 1.0)
    return {k: t.requires_grad_() for k, t in p.items()}


def normalize_matrices(p: dict[str, torch.Tensor]) -> None:
    """train.py's normalize_matrices: rows along the model dimension, after every step."""
    with torch.no_grad():
        for name, t in p.items():
            if t.dim() == 2:
                t.copy_(justnorm(t, 0 if name.endswith(("att_c_proj", "mlp_c_proj")) else 1))


@pytest.fixture
def pair():
    gen = torch.Generator().manual_seed(0)
    ref = reference_params(gen)
    model = NGPT(make_config("ngpt", **CFG)).double()
    mine = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in to_ours(ref).items():
            mine[name].copy_(value)
    assert set(mine) == set(to_ours(ref))
    idx = torch.randint(0, CFG["vocab_size"], (2, CFG["seq_len"]), generator=gen)
    tgt = torch.randint(0, CFG["vocab_size"], (2, CFG["seq_len"]), generator=gen)
    return ref, model, idx, tgt


def test_logits_and_every_gradient_equal_the_reference(pair) -> None:
    ref, model, idx, tgt = pair
    ref_logits, ref_loss = reference_loss(ref, idx, tgt)
    ref_loss.backward()
    logits, loss = model(idx, tgt)
    loss.backward()
    assert loss.dtype == torch.float64  # the loss in the model's dtype
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-13)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-13)
    ref_grads = to_ours({k: t.grad for k, t in ref.items()})
    for name, p in model.named_parameters():
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=0, atol=1e-12 * max(scale, 1))
    # the raw embedding lookup keeps the radial part of tok_emb's gradient (v0.1 dropped it)
    rows = model.tok_emb.weight
    assert (rows.grad * rows).sum(-1).abs().max() > 1e-6


def test_three_renorm_adam_steps_equal_adamw_plus_normalize_matrices(pair) -> None:
    ref, model, idx, tgt = pair
    hyper = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    ref_opt = torch.optim.AdamW(list(ref.values()), **hyper)
    opt = RenormAdam(model.parameters(), **hyper)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    for _ in range(3):
        ref_opt.zero_grad()
        reference_loss(ref, idx, tgt)[1].backward()
        ref_opt.step()
        normalize_matrices(ref)
        opt.zero_grad()
        model(idx, tgt)[1].backward()
        opt.step()
    expected = to_ours({k: t.detach() for k, t in ref.items()})
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=0, atol=1e-9)
        assert (p.detach() - start[name]).abs().max() > 1e-3, name  # the steps moved it
