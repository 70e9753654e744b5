"""Time one training step's forward + backward of GPT, nGPT and GeoNorm, eager and compiled.

The models run interleaved in one process (one step each per round, the order rotating); the
median over the rounds and the ratio to GPT in the same mode are printed. nGPT and GeoNorm use
the fused sphere ops (``spheretorch::unit``, ``::nlerp_residual``, ``::rope_unit``,
``::geonorm_step``: Triton kernels on CUDA, the PyTorch references on CPU).

Usage::

    python benchmarks/model_step.py                              # CPU, 1 thread, small shape
    python benchmarks/model_step.py --device cuda --dtype bf16 --compile \\
        --n-layer 12 --d-model 768 --n-head 12 --seq-len 1024 --batch 32 --vocab 8192

:func:`model_step_times` is the callable form (for ``benchmarks/gpu_check.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch

from spheretorch.models import build_model, make_config


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
    models: tuple[str, ...] = ("gpt", "ngpt", "geonorm"),
    compile: bool = False,
    dtype: str = "float32",
    rounds: int = 20,
    warmup: int = 3,
    batch: int = 8,
    **shape: int,
) -> dict[str, float]:
    """Median seconds per forward + backward step for each model, interleaved.

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
        model = build_model(name, make_config(name, **cfg)).to(dev)
        forward = torch.compile(model) if compile else model
        runs[name] = _step(model, forward, idx, amp)
    for name in models:
        for _ in range(warmup):
            runs[name]()
    _sync(dev)
    times: dict[str, list[float]] = {n: [] for n in models}
    names = list(models)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            _sync(dev)
            t0 = time.perf_counter()
            runs[name]()
            _sync(dev)
            times[name].append(time.perf_counter() - t0)
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
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = {
        "n_layer": args.n_layer,
        "n_head": args.n_head,
        "d_model": args.d_model,
        "seq_len": args.seq_len,
        "vocab_size": args.vocab,
    }
    t = model_step_times(
        args.device, compile=args.compile, dtype=args.dtype, rounds=args.rounds,
        batch=args.batch, **shape,
    )  # fmt: skip
    mode = "compiled" if args.compile else "eager"
    print(
        f"fwd+bwd per step, {mode}, {args.dtype}, {args.device}, batch {args.batch}, {shape}, "
        f"{args.threads} thread(s), {args.rounds} interleaved rounds, torch {torch.__version__}"
    )
    for name, sec in t.items():
        print(f"  {name:<8} median {1e3 * sec:8.2f} ms   / gpt {sec / t['gpt']:5.2f}")


if __name__ == "__main__":
    main()
