"""The GPU paths on CPU: ``--compile`` (inductor) and ``--dtype bf16`` (autocast).

Inductor compiles are slow on a shared CPU, so each model is compiled once (one model per
optimizer recipe: GPT + AdamW, nGPT + RenormAdam, GeoNorm + RiemannianAdam) at a tiny size.
"""

from __future__ import annotations

import pytest
import torch

from spheretorch import SphereParameter
from spheretorch.analysis import trajectory
from spheretorch.train import TrainConfig, Trainer

TINY = {"n_layer": 1, "n_head": 2, "d_model": 32, "seq_len": 16}
RECIPES = [("gpt", "adamw"), ("ngpt", "renorm"), ("geonorm", "riemannian")]


def trainer(model: str, optim: str, steps: int, **kw: object) -> Trainer:
    config = TrainConfig(
        model=model,
        preset="smoke",
        optim=optim,
        steps=steps,
        eval_interval=steps,
        eval_batches=1,
        batch_size=4,
        model_options=dict(TINY),
        **kw,
    )
    return Trainer(config)


@pytest.mark.slow
@pytest.mark.parametrize(("model", "optim"), RECIPES)
def test_compiled_equals_eager_and_trains(model: str, optim: str) -> None:
    compiled = trainer(model, optim, 3, compile=True)
    eager = trainer(model, optim, 3)
    assert compiled.forward_model is not compiled.model  # really compiled, also on CPU
    x, y = compiled.batch(0)
    loss = {}
    for t in (compiled, eager):
        loss[t] = t.forward_model(x, y)[1]
        loss[t].backward()
    assert torch.allclose(loss[compiled], loss[eager], rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(compiled.model.named_parameters(), eager.model.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name
    for t in (compiled, eager):  # the steps below start from no gradients, as in train()
        t.optimizer.zero_grad(set_to_none=True)
    assert compiled.compile_check is None  # the trainer's own check runs at its first step
    # Compiled training (the same graph, now with the optimizer) follows eager training.
    steps = {t: [float(t.train_step(*t.batch(s))) for s in range(3)] for t in (compiled, eager)}
    assert compiled.compile_check["ok"], compiled.compile_check
    assert steps[compiled] == pytest.approx(steps[eager], rel=1e-3)
    assert steps[compiled][-1] < steps[compiled][0]
    if model == "ngpt":  # evaluation (no_grad, eval mode) is a second graph: compile it once
        assert compiled.evaluate() == pytest.approx(eager.evaluate(), rel=1e-4)


@pytest.mark.parametrize("model", ["gpt", "ngpt", "geonorm"])
def test_bf16_autocast_trains_and_keeps_the_sphere(model: str) -> None:
    optim = dict(RECIPES)[model]
    bf16 = trainer(model, optim, 30, dtype="bf16")
    fp32 = trainer(model, optim, 30, dtype="float32")
    assert bf16.amp_dtype == torch.bfloat16 and fp32.amp_dtype is None
    start = bf16.evaluate()
    loss, ref = bf16.train()["final_val_loss"], fp32.train()["final_val_loss"]
    assert loss < start - 0.25  # it learns
    assert loss != ref and abs(loss - ref) < 0.05  # autocast really ran, and tracks float32
    for name, p in bf16.model.named_parameters():
        assert p.dtype == torch.float32, name  # master weights stay float32
        if isinstance(p, SphereParameter):
            norms = p.detach().norm(dim=p.sphere_dim)
            assert (norms - 1).abs().max() < 4e-3, name
    if model != "gpt":
        x, _ = bf16.batch(0)
        with torch.no_grad(), bf16.autocast():
            radius = trajectory(bf16.model, x).float().norm(dim=-1)
        # nGPT's states are unit vectors; GeoNorm's keep the norm of their embedding row.
        ref = torch.ones_like(radius) if model == "ngpt" else radius[:1]
        assert (radius / ref - 1).abs().max() < 4e-3
