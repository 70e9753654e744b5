"""Every path on every device present: the CPU always, CUDA where there is one (the
``device`` fixture of tests/conftest.py; ``pytest -m cuda`` is the CUDA lane alone, the lane
``make gpu-check`` runs and reports).

Each test compares the device's float32 (or bf16) result with float64 on the CPU, the one
reference, so that a device-only fault (a kernel, a compiled graph, a stream or a CUDA graph)
cannot pass. Small shapes: on the CPU these add seconds to the suite.
"""

from __future__ import annotations

import copy
import math
import os
import socket
from pathlib import Path

import pytest
import torch

import spheretorch as st
from spheretorch import geodesic, sphere
from spheretorch.models import MODELS, build_model, make_config
from spheretorch.optim import AdamH, RenormAdam, RiemannianAdam, RiemannianSGD, SphereMuon
from spheretorch.train import TrainConfig, Trainer

F64 = torch.float64
TINY = {"n_layer": 1, "n_head": 2, "d_model": 32, "seq_len": 16}


def close(a: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float = 1e-6) -> None:
    torch.testing.assert_close(a.detach().cpu().to(F64), ref.detach().cpu(), rtol=rtol, atol=atol)


# -- geometry ---------------------------------------------------------------------------------


def test_geometry_on_device_equals_float64(device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    x64 = sphere.normalize(torch.randn(64, 33, generator=g, dtype=F64))
    y64 = sphere.normalize(torch.randn(64, 33, generator=g, dtype=F64))
    u64 = sphere.project(x64, 0.3 * torch.randn(64, 33, generator=g, dtype=F64))
    x, y, u = (t.float().to(device) for t in (x64, y64, u64))
    cases = {
        "normalize": lambda x, y, u: sphere.normalize(3 * y + u),
        "expmap": lambda x, y, u: sphere.expmap(x, u),
        "retract": lambda x, y, u: sphere.retract(x, u),
        "logmap": lambda x, y, u: sphere.logmap(x, y),
        "dist": lambda x, y, u: sphere.dist(x, y),
        "transport": lambda x, y, u: sphere.transport(x, y, u),
        "slerp": lambda x, y, u: geodesic.slerp(x, y, 0.3),
        "nlerp": lambda x, y, u: geodesic.nlerp(x, y, 0.3),
    }
    for name, f in cases.items():
        out = f(x, y, u)
        assert out.device.type == device.type, name
        torch.testing.assert_close(
            out.cpu().to(F64), f(x64, y64, u64), rtol=2e-5, atol=2e-6, msg=name
        )
    # unit: the models' normalizer, forward and its hand-written backward
    z64 = torch.randn(8, 16, 32, generator=g, dtype=F64, requires_grad=True)
    z = z64.detach().float().to(device).requires_grad_()
    w = torch.randn(8, 16, 32, generator=g, dtype=F64)
    (sphere.unit(z) * w.float().to(device)).sum().backward()
    (sphere.unit(z64) * w).sum().backward()
    close(z.grad, z64.grad, rtol=1e-5)


# -- optimizers -------------------------------------------------------------------------------

LAYOUT = [((16, 24), -1), ((24, 16), 0), ((4, 16, 8), 1), ((16, 24), -1), ((33,), None)]
IMPLEMENTATIONS = {
    "single": dict(foreach=False),
    "foreach": dict(foreach=True),
    "fused": dict(fused=True),
    "capturable": dict(capturable=True, foreach=True),
}
OPTIMIZERS = {
    "riemannian_adam": (RiemannianAdam, dict(lr=0.05, weight_decay=0.1)),
    "renorm_adam": (RenormAdam, dict(lr=0.05, weight_decay=0.1)),
    "riemannian_sgd": (RiemannianSGD, dict(lr=0.1, momentum=0.9)),
    # Newton-Schulz in the parameters' dtype (float32 here): bf16 would not track float64
    "sphere_muon": (SphereMuon, dict(lr=0.05, ns_dtype=None, measure_angle=True)),
    "adamh": (AdamH, dict(lr=0.05, measure_angle=True)),
    "adamh_angular": (AdamH, dict(lr=0.05, angular=True, angle_per="tensor")),
}
#: the optimizers without a fused path (``fused=True`` is refused)
UNFUSED = (SphereMuon, AdamH)


def make_params(device: torch.device, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(1)
    out = []
    for shape, dim in LAYOUT:
        data = torch.randn(shape, generator=g, dtype=F64).to(device=device, dtype=dtype)
        out.append(
            st.SphereParameter(data, dim=dim) if dim is not None else torch.nn.Parameter(data)
        )
    return out


def run_steps(params, opt, steps: int = 4, bad: int | None = None) -> None:
    for t in range(steps):
        g = torch.Generator().manual_seed(100 + t)
        for p in params:
            grad = torch.randn(p.shape, generator=g, dtype=F64)
            p.grad = (grad * (math.nan if t == bad else 1)).to(device=p.device, dtype=p.dtype)
        opt.step()


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_implementation_on_device_equals_float64(
    name: str, impl: str, device: torch.device
) -> None:
    cls, kw = OPTIMIZERS[name]
    if impl == "capturable" and cls is RiemannianSGD:
        pytest.skip("RiemannianSGD has no capturable flag")
    if impl == "fused" and cls in UNFUSED:
        pytest.skip(f"{cls.__name__} has no fused path")
    ref = make_params(torch.device("cpu"), F64)
    run_steps(ref, cls(ref, **kw, foreach=False), bad=2)
    params = make_params(device, torch.float32)
    opt = cls(params, **kw, **IMPLEMENTATIONS[impl])
    run_steps(params, opt, bad=2)  # step 2 non-finite: skipped (nonfinite="skip")
    assert opt.skipped_steps == 1
    for p, r, (_, dim) in zip(params, ref, LAYOUT):
        close(p, r, rtol=2e-5, atol=2e-6)
        if dim is not None:
            assert (p.detach().double().norm(dim=dim) - 1).abs().max() < 1e-6


#: the capturable optimizers and their options in the CUDA-graph tests
CAPTURED = [
    (RiemannianAdam, {}),
    (RenormAdam, {}),
    (SphereMuon, dict(ns_dtype=None, measure_angle=True)),
    (AdamH, dict(angular=True)),
]


def test_a_captured_cuda_graph_replays_the_optimizer_step(cuda: torch.device) -> None:
    """``capturable=True``: the step captured once in a CUDA graph, replayed with new
    gradients copied into the captured ones, equals the eager steps. (SphereMuon's and
    AdamH's directions are allocated in the capture: their kernels' tables are built then.)"""
    for cls, kw in CAPTURED:
        eager = make_params(cuda, torch.float32)
        run_steps(eager, cls(eager, lr=0.05, capturable=True, foreach=True, **kw), steps=6)
        params = make_params(cuda, torch.float32)
        opt = cls(params, lr=0.05, capturable=True, foreach=True, **kw)
        for p in params:
            p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        run_steps_into = []
        for t in range(6):
            g = torch.Generator().manual_seed(100 + t)
            run_steps_into.append(
                [torch.randn(p.shape, generator=g, dtype=F64).float().to(cuda) for p in params]
            )
        for p, g in zip(grads, run_steps_into[0]):  # warm-up step on a side stream
            p.copy_(g)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            opt.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            opt.step()
        for t in range(1, 6):
            for p, g in zip(grads, run_steps_into[t]):
                p.copy_(g)
            graph.replay()
        torch.cuda.synchronize()
        for p, e in zip(params, eager):
            torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-6)


def test_a_whole_training_step_captured_in_a_cuda_graph(cuda: torch.device) -> None:
    """Forward, backward and step captured together, gradients set to None before the
    capture (torch's whole-network recipe): the gradients are allocated in the graph's pool,
    at addresses the warm-up step never saw, so every kernel table is built in the capture.
    Replays with new inputs equal the eager steps."""

    def build() -> list[torch.nn.Parameter]:
        g = torch.Generator().manual_seed(3)
        return [
            st.SphereParameter(torch.randn(32, 16, generator=g).to(cuda), dim=1),
            st.SphereParameter(torch.randn(8, 32, generator=g).to(cuda), dim=None),
            torch.nn.Parameter(torch.zeros(8, device=cuda)),
        ]

    def loss_of(ps: list[torch.nn.Parameter], x: torch.Tensor) -> torch.Tensor:
        w1, w2, b = ps
        return (torch.tanh(x @ w1.T) @ w2.T + b).square().mean()

    inputs = [
        torch.randn(4, 16, generator=torch.Generator().manual_seed(50 + t)).to(cuda)
        for t in range(6)
    ]
    for cls, kw in CAPTURED:
        eager = build()
        opt = cls(eager, lr=0.05, capturable=True, **kw)
        for x in inputs:
            opt.zero_grad(set_to_none=True)
            loss_of(eager, x).backward()
            opt.step()
        params = build()
        opt = cls(params, lr=0.05, capturable=True, **kw)
        static_x = inputs[0].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # the warm-up is the first step
            loss_of(params, static_x).backward()
            opt.step()
        torch.cuda.current_stream().wait_stream(side)
        opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss_of(params, static_x).backward()
            opt.step()
        for x in inputs[1:]:
            static_x.copy_(x)
            graph.replay()
        torch.cuda.synchronize()
        for p, e in zip(params, eager):
            torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-6, msg=cls.__name__)


# -- models -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_models_on_device_equal_float64_and_bf16_tracks_them(
    name: str, device: torch.device
) -> None:
    torch.manual_seed(0)
    model = build_model(name, make_config(name, vocab_size=31, **TINY))
    ref = copy.deepcopy(model).double()  # the same weights, exactly
    model.to(device)
    x = torch.randint(0, 31, (4, 16), generator=torch.Generator().manual_seed(2))
    logits64, loss64 = ref(x, x)
    loss64.backward()
    logits, loss = model(x.to(device), x.to(device))
    loss.backward()
    close(logits, logits64, rtol=1e-4, atol=1e-5)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        scale = q.grad.abs().max().item() or 1.0
        err = (p.grad.detach().cpu().double() - q.grad).abs().max().item()
        assert err <= 1e-4 * scale, (n, err, scale)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        _, loss_bf16 = model(x.to(device), x.to(device))
    assert abs(loss_bf16.item() - loss64.item()) < 0.05 * loss64.item()


# -- training ---------------------------------------------------------------------------------


def tiny(model: str = "ngpt", **kw: object) -> TrainConfig:
    base = dict(preset="smoke", steps=10, eval_interval=5, eval_batches=1, batch_size=4)
    return TrainConfig(model=model, **{**base, "model_options": dict(TINY), **kw})


@pytest.mark.parametrize("model", ["gpt", "ngpt"])
def test_train_and_resume_on_device(model: str, device: torch.device, tmp_path: Path) -> None:
    full = Trainer(tiny(model, device=device.type))
    summary = full.train()
    assert summary["device"].startswith(device.type) and summary["final_val_loss"] < 10
    assert summary["steady"] and summary["warmup_steps_untimed"] == 2
    Trainer(tiny(model, device=device.type), tmp_path).train(stop_after=5)
    resumed = Trainer(tiny(model, device=device.type), tmp_path, resume=True)
    again = resumed.train()
    assert again["steps"] == 10
    tol = 0.0 if device.type == "cpu" else 1e-5  # CPU bit for bit; GPU within round-off
    assert again["final_val_loss"] == pytest.approx(summary["final_val_loss"], rel=tol)
    for a, b in zip(resumed.model.parameters(), full.model.parameters()):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * 1e-2)


def test_compiled_bf16_training_on_the_gpu_passes_the_compile_check(cuda: torch.device) -> None:
    for model in MODELS:
        t = Trainer(tiny(model, device="cuda", compile=True, dtype="bf16"))
        summary = t.train()
        assert summary["compile_check"]["ok"], summary["compile_check"]
        assert summary["compile_s"] > 0 and summary["final_val_loss"] < 10


def test_compare_on_the_gpu(cuda: torch.device, tmp_path: Path) -> None:
    from spheretorch.cli import main

    args = ["compare", "--models", "gpt,ngpt", "--preset", "smoke", "--steps", "6"]
    args += ["--no-sweep", "--device", "cuda", "--no-progress", "--out", str(tmp_path / "c")]
    args += [f"--set={k}={v}" for k, v in TINY.items()]
    assert main(args) == 0
    assert (tmp_path / "c" / "results.json").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_one_gpu_ddp_and_fsdp_equal_one_process(
    mode: str, cuda: torch.device, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NCCL with one rank: the wrapped run equals the plain one within round-off."""
    plain = Trainer(tiny("ngpt", device="cuda", steps=6, eval_interval=6)).train()
    env = {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for k, v in {**env, "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(k, v)
    t = Trainer(tiny("ngpt", device="cuda", steps=6, eval_interval=6), tmp_path, distributed=mode)
    try:
        assert t.parallel.ctx.backend == "nccl"
        summary = t.train()
    finally:
        t.close()
    assert summary["final_val_loss"] == pytest.approx(plain["final_val_loss"], rel=1e-4)
    assert os.environ["WORLD_SIZE"] == "1"
