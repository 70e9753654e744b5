r"""Instruments for studying a transformer as an optimizer on the sphere.

A stack of ``L`` layers applies ``2L`` residual updates to each token's hidden state. nGPT and
GeoNorm make each update a step on the unit sphere; these functions measure those steps:

* :func:`trajectory` -- the iterates: the state before the first block and after every update.
* :func:`step_angles` -- the geodesic length of each step, :math:`d(\hat h_s, \hat h_{s+1})`.
* :func:`target_cosines` -- :math:`\cos(\hat h_s, \hat e_{y})` with :math:`e_y` the output
  embedding of the correct next token: does each step move the state towards the target?
* :func:`eigen_learning_rates` -- nGPT's per-coordinate step sizes :math:`\alpha_A, \alpha_M`
  after the scale trick (GeoNorm: its per-update step scale times the layer decay).
* :func:`condition_numbers` -- :math:`\sigma_{max}/\sigma_{min}` of each attention and MLP
  matrix, the paper's measure of how well-conditioned normalization keeps them.
* :func:`embedding_geometry` -- norms and pairwise cosines of the input/output embeddings.

Hats denote normalisation, so the same instruments apply to GPT (whose residual stream is not
on the sphere) for contrast. ``plot_*`` helpers return matplotlib Figures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .sphere import angle, normalize

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "condition_numbers",
    "eigen_learning_rates",
    "embedding_geometry",
    "plot_condition_numbers",
    "plot_eigen_learning_rates",
    "plot_embedding_geometry",
    "plot_trajectory",
    "relative_update_sizes",
    "step_angles",
    "target_cosines",
    "trajectory",
]


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(
            f"expected a spheretorch.models model (GPT, NGPT, GeoNormGPT) with .blocks, got "
            f"{type(model).__name__}"
        )
    return blocks


@torch.no_grad()
def trajectory(model: nn.Module, idx: Tensor) -> Tensor:
    """Hidden states ``(S, B, T, d)``: before the first layer and after each residual update.

    ``S = 2 * n_layer + 1`` for GPT, NGPT and GeoNormGPT. Runs in eval mode (no dropout) and
    restores the model's mode. NGPT's states are unit vectors; GeoNormGPT's keep the norm of
    their embedding row (unit vectors with ``geo_radius="fixed"``).
    """
    hidden_states = getattr(model, "hidden_states", None)
    if hidden_states is None:
        raise TypeError(f"{type(model).__name__} has no hidden_states(idx) method")
    was_training = model.training
    model.eval()
    try:
        return hidden_states(idx).float()
    finally:
        model.train(was_training)


def _unit(states: Tensor) -> Tensor:
    return normalize(states.float(), -1, on_zero="keep")


def step_angles(states: Tensor) -> Tensor:
    r"""Geodesic step per update, ``(S-1, B, T)``: :math:`\theta_s = d(\hat h_s, \hat h_{s+1})`.

    ``states`` is a :func:`trajectory` ``(S, B, T, d)``. Radians in :math:`[0, \pi]`.
    """
    u = _unit(states)
    return angle(u[:-1], u[1:], -1).squeeze(-1)


def relative_update_sizes(states: Tensor) -> Tensor:
    r""":math:`\|h_{s+1} - h_s\| / \|h_s\|`, ``(S-1, B, T)``: the Euclidean step relative to the
    state's size. For unit states it is the chord :math:`2\sin(\theta_s/2)`; for pre-norm GPT
    it shows each update's shrinking effect as the residual stream grows."""
    s = states.float()
    return (s[1:] - s[:-1]).norm(dim=-1) / s[:-1].norm(dim=-1).clamp_min(1e-30)


def _output_embedding(model: nn.Module) -> Tensor:
    head = getattr(model, "lm_head", None)
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise TypeError(f"{type(model).__name__} has no lm_head.weight (V, d)")
    return head.weight


@torch.no_grad()
def target_cosines(model: nn.Module, states: Tensor, targets: Tensor) -> Tensor:
    r"""Cosine between each state and the correct next token's output embedding, ``(S, B, T)``.

    :math:`c_s = \langle \hat h_s, \hat e_{y} \rangle` with :math:`e_y` the row of ``lm_head``
    for target token ``y`` (``targets`` ``(B, T)``). A rising curve over ``s`` means the layers
    move the state towards the target, as an optimizer on the sphere should.
    """
    if targets.shape != states.shape[1:3]:
        raise ValueError(
            f"targets must have shape (B, T) = {tuple(states.shape[1:3])}, got "
            f"{tuple(targets.shape)}"
        )
    e = _unit(_output_embedding(model).detach())[targets]  # (B, T, d)
    return (_unit(states) * e.to(states.device)).sum(-1)


@torch.no_grad()
def eigen_learning_rates(model: nn.Module) -> list[dict[str, Any]]:
    r"""Effective per-layer step sizes after the scale trick.

    NGPT: for each layer, the vectors :math:`|\alpha_A|, |\alpha_M| \in \mathbb{R}^d` as used in
    the forward pass (``alpha_A``, ``alpha_M`` tensors) and their mean and standard deviation.
    GeoNormGPT: the step scales :math:`a_A \delta(l)`, :math:`a_M \delta(l)` (scalars, std 0;
    the angle is :math:`\delta(l)(a\,\theta_0 + b)`, so these are the gains on :math:`\theta_0`).
    GPT has no step sizes: raises ``TypeError`` (use :func:`relative_update_sizes`).
    """
    rows: list[dict[str, Any]] = []
    for layer, block in enumerate(_blocks(model)):
        if hasattr(block, "alpha_a"):
            a, m = block.alpha_a().abs().float(), block.alpha_m().abs().float()
        elif hasattr(block, "s_a"):
            a = (block.s_a() * block.decay).float()
            m = (block.s_m() * block.decay).float()
        else:
            raise TypeError(
                f"{type(model).__name__} has no trained step sizes (nGPT's alpha or GeoNorm's "
                f"s); use relative_update_sizes(trajectory(model, idx)) for contrast"
            )
        rows.append(
            {
                "layer": layer,
                "alpha_A": a.cpu(),
                "alpha_M": m.cpu(),
                "alpha_A_mean": a.mean().item(),
                "alpha_A_std": a.std(unbiased=False).item(),
                "alpha_M_mean": m.mean().item(),
                "alpha_M_std": m.std(unbiased=False).item(),
            }
        )
    return rows


def _cond(w: Tensor) -> float:
    s = torch.linalg.svdvals(w.detach().double())
    return (s[0] / s[-1]).item() if s[-1] > 0 else float("inf")


@torch.no_grad()
def condition_numbers(model: nn.Module) -> list[dict[str, float]]:
    r"""Condition number :math:`\kappa = \sigma_{max}/\sigma_{min}` of every block matrix.

    Per layer: ``q``, ``k``, ``v`` (the ``(d, d)`` slices of the fused ``qkv``), ``o`` (the
    attention output projection), ``u`` and ``gate`` (the two halves of the SwiGLU ``up``) and
    ``down``. Raw weights (nGPT's scaling vectors are diagonal factors outside them).
    """
    rows: list[dict[str, float]] = []
    for layer, block in enumerate(_blocks(model)):
        q, k, v = block.attn.qkv.weight.chunk(3, dim=0)
        u, gate = block.mlp.up.weight.chunk(2, dim=0)
        mats = {"q": q, "k": k, "v": v, "o": block.attn.proj.weight}
        mats |= {"u": u, "gate": gate, "down": block.mlp.down.weight}
        rows.append({"layer": layer, **{name: _cond(w) for name, w in mats.items()}})
    return rows


@torch.no_grad()
def embedding_geometry(
    model: nn.Module, max_rows: int = 1024, generator: torch.Generator | None = None
) -> dict[str, dict[str, Tensor]]:
    r"""Norms and pairwise cosines of the input (``tok_emb``) and output (``lm_head``) embeddings.

    Returns ``{"input": {...}, "output": {...}}`` each with ``norms`` ``(V,)`` and
    ``cosines``: the off-diagonal :math:`\langle \hat e_i, \hat e_j\rangle`, ``i < j``, over at
    most ``max_rows`` rows (a random subset when ``V`` is larger). nGPT's rows have norm 1 by
    construction; the cosine distribution shows how spread out the tokens are on the sphere.
    """
    out: dict[str, dict[str, Tensor]] = {}
    for key, w in (("input", model.tok_emb.weight), ("output", _output_embedding(model))):
        w = w.detach().float().cpu()
        rows = w
        if w.shape[0] > max_rows:
            pick = torch.randperm(w.shape[0], generator=generator)[:max_rows]
            rows = w[pick]
        u = _unit(rows)
        gram = u @ u.T
        i, j = torch.triu_indices(gram.shape[0], gram.shape[1], offset=1)
        out[key] = {"norms": w.norm(dim=-1), "cosines": gram[i, j]}
    return out


# ----------------------------------------------------------------------------- plots


def _subplots(ncols: int, width: float = 4.2, height: float = 3.2) -> tuple[Figure, Any]:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, axes[0]


def _update_labels(n: int) -> list[str]:
    return [f"{layer}{part}" for layer in range(n // 2) for part in ("A", "M")]


def plot_trajectory(
    states: dict[str, Tensor],
    targets: Tensor | None = None,
    models: dict[str, nn.Module] | None = None,
) -> Figure:
    """Step angle per update and, with ``targets`` and ``models``, cosine to target by depth.

    ``states`` maps a label (e.g. ``"nGPT"``) to its :func:`trajectory` ``(S, B, T, d)``;
    curves are means over batch and positions.
    """
    with_cos = targets is not None and models is not None
    fig, axes = _subplots(2 if with_cos else 1)
    for label, s in states.items():
        ang = step_angles(s).mean(dim=(1, 2))
        axes[0].plot(range(1, len(ang) + 1), ang.numpy(), "o-", label=label, ms=3)
        if with_cos:
            cos = target_cosines(models[label], s, targets).mean(dim=(1, 2))
            axes[1].plot(range(len(cos)), cos.numpy(), "o-", label=label, ms=3)
    axes[0].set(xlabel="residual update s", ylabel="step angle (rad)", title="geodesic step")
    axes[0].legend()
    if with_cos:
        axes[1].set(
            xlabel="state s (0 = embedding)", ylabel="cos(h_s, e_target)", title="towards target"
        )
        axes[1].legend()
    fig.tight_layout()
    return fig


def plot_eigen_learning_rates(rows: list[dict[str, Any]]) -> Figure:
    """Mean and spread (one std) of the effective step sizes per layer."""
    fig, axes = _subplots(1)
    ax = axes[0]
    layers = [r["layer"] for r in rows]
    for key in ("alpha_A", "alpha_M"):
        mean = torch.tensor([r[f"{key}_mean"] for r in rows])
        std = torch.tensor([r[f"{key}_std"] for r in rows])
        ax.plot(layers, mean.numpy(), "o-", label=key)
        ax.fill_between(layers, (mean - std).numpy(), (mean + std).numpy(), alpha=0.2)
    ax.set(xlabel="layer", ylabel="effective step size", title="eigen learning rates")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_condition_numbers(results: dict[str, list[dict[str, float]]]) -> Figure:
    """Condition numbers per layer (log scale); ``results`` maps a label to
    :func:`condition_numbers` output. Attention (q, k, v, o) and MLP (u, gate, down) panels."""
    fig, axes = _subplots(2)
    for ax, names, title in (
        (axes[0], "qkvo", "attention"),
        (axes[1], ("u", "gate", "down"), "MLP"),
    ):
        for label, rows in results.items():
            layers = [r["layer"] for r in rows]
            for name in names:
                ax.semilogy(layers, [r[name] for r in rows], "o-", ms=3, label=f"{label} {name}")
        ax.set(xlabel="layer", ylabel="condition number", title=title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_embedding_geometry(results: dict[str, dict[str, dict[str, Tensor]]]) -> Figure:
    """Histograms of embedding norms and pairwise cosines; ``results`` maps a label to
    :func:`embedding_geometry` output."""
    fig, axes = _subplots(2)
    for label, geo in results.items():
        for key in ("input", "output"):
            norms = geo[key]["norms"]
            # nGPT's norms are all 1: pad the range so the histogram has finite-width bins.
            lo, hi = norms.min().item(), norms.max().item()
            pad = max(1e-3, 0.05 * (hi - lo))
            axes[0].hist(
                norms.numpy(),
                bins=40,
                range=(lo - pad, hi + pad),
                alpha=0.5,
                label=f"{label} {key}",
            )
            axes[1].hist(
                geo[key]["cosines"].numpy(),
                bins=60,
                alpha=0.5,
                density=True,
                label=f"{label} {key}",
            )
    axes[0].set(xlabel="row norm", ylabel="count", title="embedding norms")
    axes[1].set(xlabel="cosine between tokens", ylabel="density", title="pairwise cosines")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
