"""spheretorch.analysis: trajectories and the optimizer-view instruments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spheretorch import analysis as A
from spheretorch.models import GPT, NGPT, GeoNormConfig, GeoNormGPT, NGPTConfig, TransformerConfig

CFG = TransformerConfig(vocab_size=40, seq_len=12, n_layer=3, n_head=2, d_model=16)
MODELS = [GPT, NGPT, GeoNormGPT]


@pytest.fixture(params=MODELS, ids=lambda c: c.__name__)
def model(request):
    torch.manual_seed(0)
    return request.param(CFG)


def _idx(b: int = 2, t: int = 12) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (b, t), generator=torch.Generator().manual_seed(1))


def test_trajectory_shape_and_endpoint(model) -> None:
    idx = _idx()
    model.train()
    states = A.trajectory(model, idx)
    assert states.shape == (2 * CFG.n_layer + 1, 2, 12, CFG.d_model)
    assert model.training  # mode restored
    model.eval()
    logits, _ = model(idx)
    torch.testing.assert_close(model.head(states[-1]), logits)
    torch.testing.assert_close(states[0], model.embed(idx))


@pytest.mark.parametrize(
    "model", [NGPT(CFG), GeoNormGPT(GeoNormConfig(**CFG.to_dict(), geo_radius="fixed"))]
)
def test_sphere_models_states_are_unit(model) -> None:
    states = A.trajectory(model, _idx())
    torch.testing.assert_close(states.norm(dim=-1), torch.ones(states.shape[:-1]))


def test_step_angles_match_arccos_on_known_states() -> None:
    # Three states on a great circle at angles 0, 0.3, 1.0: steps 0.3 and 0.7.
    e0, e1 = torch.eye(4)[0], torch.eye(4)[1]
    angles = [0.0, 0.3, 1.0]
    s = torch.stack([math.cos(a) * e0 + math.sin(a) * e1 for a in angles])[:, None, None, :]
    torch.testing.assert_close(A.step_angles(s).flatten(), torch.tensor([0.3, 0.7]))
    chord = A.relative_update_sizes(s).flatten()
    torch.testing.assert_close(chord, 2 * torch.sin(torch.tensor([0.3, 0.7]) / 2))


def test_target_cosines_match_manual(model) -> None:
    idx = _idx()
    states = A.trajectory(model, idx)
    cos = A.target_cosines(model, states, idx)
    assert cos.shape == states.shape[:3]
    w = model.lm_head.weight.detach()
    s, b, t = 4, 1, 5
    h = states[s, b, t]
    e = w[idx[b, t]]
    expected = torch.dot(h, e) / (h.norm() * e.norm())
    torch.testing.assert_close(cos[s, b, t], expected)
    with pytest.raises(ValueError, match="targets must have shape"):
        A.target_cosines(model, states, idx[:, :3])


def test_eigen_learning_rates() -> None:
    rows = A.eigen_learning_rates(NGPT(CFG))
    assert len(rows) == CFG.n_layer
    for r in rows:
        assert r["alpha_A"].shape == (CFG.d_model,)
        assert r["alpha_A_mean"] == pytest.approx(NGPTConfig.alpha_init, rel=1e-5)
        assert r["alpha_M_std"] == pytest.approx(0.0, abs=1e-7)
    geo = A.eigen_learning_rates(GeoNormGPT(CFG))
    assert [r["layer"] for r in geo] == list(range(CFG.n_layer))
    with pytest.raises(TypeError, match="relative_update_sizes"):
        A.eigen_learning_rates(GPT(CFG))


def test_condition_numbers_match_numpy(model) -> None:
    rows = A.condition_numbers(model)
    assert len(rows) == CFG.n_layer
    block = model.blocks[1]
    q = block.attn.qkv.weight.detach().double().numpy()[: CFG.d_model]
    down = block.mlp.down.weight.detach().double().numpy()
    assert rows[1]["q"] == pytest.approx(np.linalg.cond(q), rel=1e-8)
    assert rows[1]["down"] == pytest.approx(np.linalg.cond(down), rel=1e-8)
    assert set(rows[0]) == {"layer", "q", "k", "v", "o", "u", "gate", "down"}


def test_embedding_geometry() -> None:
    geo = A.embedding_geometry(NGPT(CFG), max_rows=25, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(geo["input"]["norms"], torch.ones(CFG.vocab_size))
    assert geo["output"]["cosines"].shape == (25 * 24 // 2,)
    assert geo["output"]["cosines"].abs().max() <= 1 + 1e-6


def test_plots_return_figures() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    models = {"GPT": GPT(CFG), "nGPT": NGPT(CFG)}
    idx = _idx()
    states = {k: A.trajectory(m, idx) for k, m in models.items()}
    figs = [
        A.plot_trajectory(states, idx, models),
        A.plot_trajectory(states),
        A.plot_eigen_learning_rates(A.eigen_learning_rates(models["nGPT"])),
        A.plot_condition_numbers({k: A.condition_numbers(m) for k, m in models.items()}),
        A.plot_embedding_geometry({k: A.embedding_geometry(m) for k, m in models.items()}),
    ]
    assert all(isinstance(f, Figure) for f in figs)


def test_rejects_non_models() -> None:
    with pytest.raises(TypeError, match="hidden_states"):
        A.trajectory(torch.nn.Linear(2, 2), _idx())
    with pytest.raises(TypeError, match="blocks"):
        A.condition_numbers(torch.nn.Linear(2, 2))
