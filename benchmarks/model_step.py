"""Time one training step's forward + backward of GPT, nGPT and GeoNorm, eager and compiled.

The models run interleaved in one process (one step each per round, the order rotating); the
median over the rounds and the ratio to GPT in the same mode are printed. On one CPU thread the
process's CPU clock times the steps (steadier on a shared machine), elsewhere the wall clock
with ``torch.cuda.synchronize()`` around each step. nGPT and GeoNorm use
the fused sphere ops (``spheretorch::unit``, ``::nlerp_residual``, ``::slerp_residual``,
``::rope_unit``, ``::geonorm_step``: Triton kernels on CUDA, the PyTorch references on CPU).
Besides the models' defaults, ``ngpt-slerp`` (``residual_rule="slerp"``) and ``geonorm-atan``
(``geo_angle="atan"``) time the options' fused paths; ``NAME-unfused`` is NAME composed as
before the fused ops.

Usage::

    python benchmarks/model_step.py                              # CPU, 1 thread, small shape
    python benchmarks/model_step.py --device cuda --dtype bf16 --compile \\
        --n-layer 12 --d-model 768 --n-head 12 --seq-len 1024 --batch 32 --vocab 8192

:func:`model_step_times` is the callable form (for ``benchmarks/gpu_check.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from spheretorch.geodesic import geodesic_update
from spheretorch.kernels.geodesic_step import geonorm_step_reference
from spheretorch.models import build_model, make_config
from spheretorch.models import geonorm as geonorm_module
from spheretorch.sphere import upcast

# ----------------------------------------------------------------------------- before issue 22
# The models' sphere operations as they were composed before the fused ops (commit cbc376f),
# copied here so that both run in one process: `unit` as an autograd.Function, nGPT's residual
# step as geodesic_update(unit(h), unit(f), |alpha|), RoPE then unit then the q scale, and
# GeoNorm's step through autograd.


class _UnitBefore(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        xf = upcast(x)
        r = torch.rsqrt((xf * xf).sum(-1, keepdim=True).clamp_min(torch.finfo(xf.dtype).tiny))
        y = xf * r
        ctx.save_for_backward(y, r)
        return y.to(x.dtype, copy=True)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        y, r = ctx.saved_tensors
        gf = g.to(y.dtype)
        return ((gf - y * (gf * y).sum(-1, keepdim=True)) * r).to(g.dtype)


def _query_key_before(self: Any, qk: Tensor) -> tuple[Tensor, Tensor, float]:
    qk = _UnitBefore.apply(self.rotary(qk))
    s = self.s_qk().view(self.n_head, self.head_dim)
    q = qk[:, :, : self.n_head] * (s * s * math.sqrt(self.head_dim)).to(qk.dtype)
    return q, qk[:, :, self.n_head :], 1.0


def _nblock_before(self: Any, h: Tensor, record: list[Tensor] | None = None) -> Tensor:
    for f, alpha in ((self.attn, self.alpha_a), (self.mlp, self.alpha_m)):
        unit = _UnitBefore.apply
        h = geodesic_update(unit(h), unit(f(h)), alpha().abs().to(h.dtype), self.rule)
    return h


def _geoblock_before(self: Any, x: Tensor, record: list[Tensor] | None = None) -> Tensor:
    for norm, f, a, b in (
        (self.norm_a, self.attn, self.s_a, self.b_a),
        (self.norm_m, self.mlp, self.s_m, self.b_m),
    ):
        g = self.drop(f(norm(x)))
        x = geonorm_step_reference(
            x, g, a(), 0.0 if b is None else b, decay=self.decay, clamp=self.clamp,
            angle=self.angle, radius=self.radius,
        )  # fmt: skip
    return x


#: the timed model variants beyond the plain model names: (model, config options)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "ngpt-slerp": ("ngpt", {"residual_rule": "slerp"}),
    "geonorm-atan": ("geonorm", {"geo_angle": "atan"}),
}
#: the default set: every model and option path, fused and as before the fused ops
DEFAULT_MODELS = (
    "gpt", "ngpt", "geonorm", "ngpt-unfused", "geonorm-unfused", "ngpt-slerp",
    "ngpt-slerp-unfused", "geonorm-atan", "geonorm-atan-unfused",
)  # fmt: skip


def unfused(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (nGPT or GeoNorm) switched to the pre-issue-22 composition, in place."""
    for block in model.blocks:
        if isinstance(block, geonorm_module.GeoBlock):
            block.forward = types.MethodType(_geoblock_before, block)
        else:
            block.forward = types.MethodType(_nblock_before, block)
            block.attn.query_key = types.MethodType(_query_key_before, block.attn)
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(model: torch.nn.Module, forward: Callable, idx: torch.Tensor, amp) -> Callable:
    def run() -> None:
        model.zero_grad(set_to_none=True)
        with amp():
            loss = forward(idx, idx)[1]
        loss.backward()

    return run


def model_step_times(
    device: str = "cpu",
    models: tuple[str, ...] = DEFAULT_MODELS,
    compile: bool = False,
    dtype: str = "float32",
    rounds: int = 20,
    warmup: int = 3,
    batch: int = 8,
    **shape: int,
) -> dict[str, float]:
    """Median seconds per forward + backward step for each model, interleaved.

    ``models``: ``gpt``, ``ngpt``, ``geonorm``, the option variants of :data:`VARIANTS`
    (``ngpt-slerp``, ``geonorm-atan``), and any of those but ``gpt`` with ``-unfused``: the
    same model composed as before the fused ops (:func:`unfused`).

    ``shape``: TransformerConfig fields (``vocab_size``, ``seq_len``, ``n_layer``, ``n_head``,
    ``d_model``). ``dtype="bf16"`` runs under bfloat16 autocast (float32 weights).
    """
    dev = torch.device(device)
    cfg = {"vocab_size": 256, "seq_len": 64, "n_layer": 2, "n_head": 4, "d_model": 128, **shape}

    def amp() -> contextlib.AbstractContextManager:
        if dtype == "bf16":
            return torch.autocast(dev.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg["vocab_size"], (batch, cfg["seq_len"]), generator=gen).to(dev)
    runs = {}
    for name in models:
        torch.manual_seed(0)
        base = name.removesuffix("-unfused")
        kind, options = VARIANTS.get(base, (base, {}))
        model = build_model(kind, make_config(kind, **cfg, **options)).to(dev)
        if name != base:
            unfused(model)
        forward = torch.compile(model) if compile else model
        runs[name] = _step(model, forward, idx, amp)
    for name in models:
        for _ in range(warmup):
            runs[name]()
    _sync(dev)
    # one CPU thread: the process's CPU clock (steady on a shared machine); else wall clock
    one_thread = dev.type == "cpu" and torch.get_num_threads() == 1
    clock = time.process_time if one_thread else time.perf_counter
    times: dict[str, list[float]] = {n: [] for n in models}
    names = list(models)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            _sync(dev)
            t0 = clock()
            runs[name]()
            _sync(dev)
            times[name].append(clock() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bf16"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help="comma-separated: gpt, ngpt, geonorm, ngpt-slerp, geonorm-atan, NAME-unfused",
    )
    args = ap.parse_args(argv)
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    known = {"gpt", "ngpt", "geonorm", *VARIANTS}
    for m in models:
        if m.removesuffix("-unfused") not in known or m == "gpt-unfused":
            ap.error(f"--models: unknown model {m!r}; expected names from {sorted(known)}")
    torch.set_num_threads(args.threads)
    shape = {
        "n_layer": args.n_layer,
        "n_head": args.n_head,
        "d_model": args.d_model,
        "seq_len": args.seq_len,
        "vocab_size": args.vocab,
    }
    t = model_step_times(
        args.device, models, compile=args.compile, dtype=args.dtype, rounds=args.rounds,
        batch=args.batch, **shape,
    )  # fmt: skip
    mode = "compiled" if args.compile else "eager"
    print(
        f"fwd+bwd per step, {mode}, {args.dtype}, {args.device}, batch {args.batch}, {shape}, "
        f"{args.threads} thread(s), {args.rounds} interleaved rounds, torch {torch.__version__}"
    )
    base = t.get("gpt")
    for name, sec in t.items():
        rel = f"   / gpt {sec / base:5.2f}" if base else ""
        print(f"  {name:<20} median {1e3 * sec:8.2f} ms{rel}")


if __name__ == "__main__":
    main()
