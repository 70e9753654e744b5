r"""The reusable pieces of a step on a sphere: Newton-Schulz orthogonalization, the Adam
direction, the orderings of "Adam" and "stay on the sphere", and steps whose angle is the
learning rate. :class:`.SphereMuon` and :class:`.AdamH` are built from these; the other sphere
optimizers take their ``ordering=`` / ``angular=`` options from here (one reference each).

Notation: a sphere parameter ``x`` of radius :math:`r` (``sphere_radius``) whose spheres are
laid out by :func:`spheretorch.sphere.sphere_layout` as ``(outer, size, inner)``; its *rows*
:math:`Z \in \mathbb{R}^{k \times s}` are the :math:`k = outer \cdot inner` spheres, one per
row (:func:`rows` / :func:`from_rows`). :math:`\hat z_i = z_i / r` is a unit vector and the
tangent space at :math:`x` is :math:`\{\Delta : \langle \hat z_i, \delta_i \rangle = 0\ \forall
i\}`: per row for a row/column/filter sphere, the one Frobenius inner product
:math:`\langle \hat X, \Delta\rangle_F = 0` for the whole-tensor sphere (``k = 1``).

**Orderings** of an Adam-type step on a sphere (:data:`ORDERINGS`), with :math:`D` the Adam
direction :math:`\hat m / (\sqrt{\hat v} + \epsilon)` of the moments of the gradient :math:`g`:

* ``"renorm"`` (nGPT, :class:`.RenormAdam`, the hyperball recipe): moments of :math:`g`,
  step along :math:`D`, renormalize;
* ``"oblique"`` (NVIDIA Emerging-Optimizers' ObliqueAdam): moments of :math:`g`, then
  :math:`D` projected onto the tangent space, step, retract;
* ``"riemannian"`` (:class:`.RiemannianAdam`): :math:`g` projected first, moments of the
  Riemannian gradient, step, retract.

**Step sizes** (:data:`STEP_RULES`) of :func:`sphere_step` along a direction :math:`D`:

* ``"adam"``: :math:`x \leftarrow r\,\mathrm{normalize}(x(1 - \eta\lambda) - \eta D)` (the
  plain Adam step, then retraction; :math:`\lambda` weight decay as Emerging-Optimizers);
* ``"hyperball"``: per sphere :math:`\|u\| = \eta r`: :math:`u = \eta r D / \|D\|`,
  :math:`x \leftarrow r\,\mathrm{normalize}(x - u)` (turns by :math:`\arctan \eta` when
  :math:`D` is tangent);
* ``"angular"``: the step turns each sphere by exactly :math:`\eta` radians along the tangent
  part :math:`D_T` of :math:`D`: :math:`\hat z \leftarrow \cos\theta\,\hat z - \sin\theta\,
  D_T / \|D_T\|` (the exponential map), :math:`\theta = \eta` per sphere
  (``angle_per="sphere"``) or :math:`\theta_i = \eta \|d_{T,i}\| / \mathrm{rms}_j \|d_{T,j}\|`
  (``angle_per="tensor"``: the root-mean-square angle over the tensor's spheres is
  :math:`\eta`, relative sizes kept). A sphere whose :math:`D_T` is zero does not move.

Every step returns the *measured* angle each sphere turned, :math:`\mathrm{atan2}(\|\hat z'
- c \hat z\|, c)`, :math:`c = \langle \hat z, \hat z'\rangle` (shape ``(k,)``), for analysis.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from .. import sphere
from ..sphere import SphereLayout, compute_dtype, is_dtensor
from ..sphere.foreach import STACK_MAX_NUMEL

__all__ = [
    "NS_COEFFICIENTS",
    "ORDERINGS",
    "STEP_RULES",
    "Ordering",
    "StepRule",
    "adam_direction",
    "adam_directions",
    "adam_sphere_update_",
    "check_sphere_options",
    "from_rows",
    "hyperball_step_",
    "matrix_of",
    "newton_schulz",
    "orthogonalize",
    "project_rows",
    "rows",
    "sgd_sphere_angular_",
    "sphere_option_steps",
    "sphere_step",
    "sphere_step_",
    "split_sphere_lists",
    "step_angle",
]

#: Muon's quintic Newton-Schulz coefficients (Keller Jordan's; slope 3.4445 at zero)
NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)

Ordering = Literal["renorm", "oblique", "riemannian"]
#: the orderings of an Adam-type step on a sphere (module docstring)
ORDERINGS: tuple[str, ...] = ("renorm", "oblique", "riemannian")
StepRule = Literal["adam", "hyperball", "angular"]
#: the step sizes of :func:`sphere_step` (module docstring)
STEP_RULES: tuple[str, ...] = ("adam", "hyperball", "angular")


# ----------------------------------------------------------------------------- layouts


def rows(t: Tensor, layout: SphereLayout) -> Tensor:
    """``t`` as its ``(k, size)`` rows, one sphere per row (a view when ``inner == 1``)."""
    v = layout.view(t) if t.is_contiguous() else t.reshape(layout.outer, layout.size, -1)
    if layout.inner == 1:
        return v.reshape(layout.outer, layout.size)
    return v.permute(0, 2, 1).reshape(layout.count, layout.size)


def from_rows(z: Tensor, layout: SphereLayout, shape: torch.Size) -> Tensor:
    """The inverse of :func:`rows`: ``(k, size)`` back to a tensor of ``shape``."""
    if layout.inner == 1:
        return z.reshape(shape)
    v = z.reshape(layout.outer, layout.inner, layout.size).permute(0, 2, 1)
    return v.reshape(shape)


def matrix_of(t: Tensor, layout: SphereLayout) -> Tensor:
    r"""The matrix a sphere parameter's update is orthogonalized as:

    * several spheres (``k > 1``): the ``(k, size)`` rows, one sphere per row (a row sphere
      as it is, a column sphere transposed, a conv weight with ``dim=(1, 2, 3)`` flattened to
      ``(out, in*kh*kw)``);
    * one sphere (``k = 1``, ``dim=None``): the tensor itself as Muon sees it,
      ``t.reshape(t.shape[0], -1)`` (a 1-D tensor: one row).
    """
    if layout.count > 1 or t.dim() < 2:
        return rows(t, layout)
    return t.reshape(t.shape[0], -1)


def project_rows(z: Tensor, d: Tensor, radius: float, whole: bool) -> Tensor:
    r"""Tangent projection of ``d`` at the points ``z`` (radius ``radius``): per row
    (``whole=False``) or with the one Frobenius inner product (``whole=True``)."""
    if whole:
        zf = z.reshape(1, -1)
        return sphere.project(zf, d.reshape(1, -1), -1, radius=radius).reshape(d.shape)
    return sphere.project(z, d, -1, radius=radius)


# ----------------------------------------------------------------------------- Newton-Schulz


def newton_schulz(
    g: Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype | None = torch.bfloat16,
) -> Tensor:
    r"""Muon's quintic Newton-Schulz iteration: an approximate polar factor of ``g``.

    ``g``: ``(m, n)`` or a stack ``(B, m, n)`` of same-shape matrices (one batched matmul per
    product: ``torch.bmm``). With :math:`X_0 = G / \max(\|G\|_F, \epsilon)` (per matrix; the
    transpose when :math:`m > n`, so that :math:`X X^\top` is the smaller Gram matrix),
    :math:`A = X X^\top`, :math:`X \leftarrow aX + (bA + cA^2)X`, ``steps`` times. The
    singular values of the result lie near 1 (roughly in [0.7, 1.2] for the default
    coefficients): :math:`\approx UV^\top` for :math:`G = U\Sigma V^\top`.

    ``dtype``: the matmul dtype (bfloat16 as torch.optim.Muon and Keller Jordan's Muon;
    ``None``: ``g``'s own dtype, e.g. float64 for reference checks). Returned in that dtype.
    For a 2-D ``g`` the operations are exactly :class:`torch.optim.Muon`'s.
    """
    if steps >= 100:
        raise ValueError(f"ns_steps must be less than 100, got {steps}")
    a, b, c = coefficients
    x = g if dtype is None else g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    if x.dim() == 2:
        x = x.div(x.norm().clamp(min=eps))
        for _ in range(steps):
            gram = x @ x.T
            update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.addmm(x, update, x, beta=a)
    else:
        x = x.div(torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps))
        for _ in range(steps):
            gram = torch.bmm(x, x.mT)
            update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.baddbmm(x, update, x, beta=a)
    return x.mT if tall else x


def orthogonalize(
    mats: list[Tensor],
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype | None = torch.bfloat16,
    batch: bool = True,
) -> list[Tensor]:
    """:func:`newton_schulz` of every matrix of ``mats``; with ``batch``, same-shape matrices
    (on one device, of one dtype) are stacked and iterated together (``torch.bmm``: one
    kernel per product for the whole stack, the CUDA fast path).

    Sharded matrices (DTensors, e.g. FSDP2's parameters): Newton-Schulz needs the whole
    matrix, so each is gathered (``full_tensor()``), iterated on every rank like a local one
    (the same numbers as one process: no reduction in bfloat16 across shards), and its
    result handed back with the input's placements (a local slice, no communication)."""
    out: list[Tensor | None] = [None] * len(mats)
    sharded = {i: m for i, m in enumerate(mats) if is_dtensor(m)}
    if sharded:
        mats = [m.full_tensor() if i in sharded else m for i, m in enumerate(mats)]  # type: ignore[attr-defined]
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        key = (tuple(m.shape), m.device, m.dtype) if batch else (i,)
        groups.setdefault(key, []).append(i)
    for idx in groups.values():
        if len(idx) == 1:
            out[idx[0]] = newton_schulz(mats[idx[0]], steps, coefficients, eps, dtype)
            continue
        # each matrix cast before stacking: one pass over the float32 values, not two
        stack = torch.stack([mats[i] if dtype is None else mats[i].to(dtype) for i in idx])
        stacked = newton_schulz(stack, steps, coefficients, eps, dtype)
        for j, i in enumerate(idx):
            out[i] = stacked[j]
    for i, m in sharded.items():
        from torch.distributed.tensor import DTensor, Replicate

        full = DTensor.from_local(
            out[i], m.device_mesh, [Replicate()] * m.device_mesh.ndim, run_check=False
        )
        out[i] = full.redistribute(m.device_mesh, m.placements)
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------- Adam


def adam_direction(
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: float | Tensor,
    betas: tuple[float, float],
    eps: float,
) -> Tensor:
    r"""The bias-corrected Adam direction :math:`\hat m / (\sqrt{\hat v} + \epsilon)`,
    :math:`\hat m = m / (1 - \beta_1^t)`, :math:`\sqrt{\hat v} = \sqrt{v} / \sqrt{1 - \beta_2^t}`.

    ``step``: :math:`t` as a number, or a float64 0-d tensor on the moments' device (capturable
    steps: the bias corrections computed there, no host read).

    (Emerging-Optimizers' ObliqueAdam divides :math:`\sqrt v` by :math:`1 - \beta_2^t` instead
    of its square root; fixed here: this is Adam's correction, as torch.optim.Adam.)
    """
    bc1 = 1 - betas[0] ** step
    if isinstance(step, Tensor):
        bc2_sqrt: float | Tensor = (1 - betas[1] ** step).sqrt()
    else:
        bc2_sqrt = math.sqrt(1 - betas[1] ** step)
    return (exp_avg / bc1) / (exp_avg_sq.sqrt() / bc2_sqrt + eps)


def adam_directions(
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[float] | list[Tensor],
    betas: tuple[float, float],
    eps: float,
    *,
    up_to_scale: bool = False,
) -> list[Tensor]:
    r""":func:`adam_direction` of every tensor of the lists, as ``_foreach`` ops (the same
    operations in the same order: equal bit for bit); tensor steps one tensor at a time.

    ``up_to_scale``: each direction times :math:`1 - \beta_1^t`, i.e. :math:`m / (\sqrt{v} /
    \sqrt{1 - \beta_2^t} + \epsilon)`, a positive multiple of the direction that every step
    normalizing it (``"hyperball"``, ``"angular"``) treats alike; one new tensor each instead
    of two (on the CPU, where a fresh buffer costs page faults, written in place)."""
    if any(isinstance(t, Tensor) for t in steps):
        return [
            adam_direction(m, v, t, betas, eps) for m, v, t in zip(exp_avgs, exp_avg_sqs, steps)
        ]
    bc2_sqrt = [math.sqrt(1 - betas[1] ** t) for t in steps]
    if up_to_scale:
        den = list(torch._foreach_sqrt(exp_avg_sqs))
        torch._foreach_div_(den, bc2_sqrt)
        torch._foreach_add_(den, eps)
        # a large CPU tensor: into its own buffer (a fresh one costs page faults); the rest,
        # small or on an accelerator: one _foreach op (launches dominate there)
        big = [i for i, d in enumerate(den) if d.is_cpu and d.numel() > STACK_MAX_NUMEL]
        if len(big) < len(den):
            rest = sorted(set(range(len(den))) - set(big))
            new = torch._foreach_div([exp_avgs[i] for i in rest], [den[i] for i in rest])
            for i, d in zip(rest, new):
                den[i] = d
        for i in big:
            torch.div(exp_avgs[i], den[i], out=den[i])
        return den
    num = torch._foreach_div(exp_avgs, [1 - betas[0] ** t for t in steps])
    den = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(den, bc2_sqrt)
    torch._foreach_add_(den, eps)
    torch._foreach_div_(num, den)
    return list(num)


# ----------------------------------------------------------------------------- steps


def step_angle(z_old: Tensor, z_new: Tensor, radius: float = 1.0, whole: bool = False) -> Tensor:
    """The angle each sphere turned from ``z_old`` to ``z_new`` (``(k,)`` rows; ``(1,)`` for a
    whole-tensor sphere), from ``atan2``: exact near 0 and pi."""
    if whole:
        z_old, z_new = z_old.reshape(1, -1), z_new.reshape(1, -1)
    return sphere.angle(z_old, z_new, -1, radius=radius).reshape(-1)


def sphere_step(
    z: Tensor,
    d: Tensor,
    lr: float | Tensor,
    *,
    radius: float = 1.0,
    whole: bool = False,
    project: bool = True,
    rule: StepRule = "angular",
    angle_per: Literal["sphere", "tensor"] = "sphere",
    weight_decay: float = 0.0,
    measure: bool = False,
    blocks: int = 1,
) -> tuple[Tensor, Tensor | None]:
    r"""One descent step on the spheres of ``z`` along ``-d``: the new points (same shape and
    dtype as ``z``) and, with ``measure``, the angle each sphere turned (``(k,)``, float32 or
    float64).

    Args:
        z: points, ``(k, size)`` rows (``whole=False``: one sphere per row) or any shape
            (``whole=True``: one sphere of all entries). Norm ``radius``.
        d: the direction (same shape), e.g. an Adam direction or an orthogonalized momentum.
        lr: the learning rate: the step length (``"adam"``), the update norm over the radius
            (``"hyperball"``), or the angle in radians (``"angular"``); a float or a 0-d
            tensor (no host read: capturable steps).
        project: remove the radial part of ``d`` first (the ``"oblique"`` ordering; always
            done for ``"angular"``, whose angle is defined along the sphere).
        rule: ``"adam"``, ``"hyperball"`` or ``"angular"`` (module docstring).
        angle_per: for ``"angular"``: every sphere turns by ``lr`` (``"sphere"``), or the
            RMS angle over the spheres is ``lr`` (``"tensor"``).
        weight_decay: the ``"adam"`` rule's decoupled decay before the step (then undone by the
            retraction up to the step's relative size, as in Emerging-Optimizers).
        blocks: ``z`` holds the rows of this many same-shape tensors, stacked (one call for
            all of them); ``angle_per="tensor"`` takes its RMS per block.
    """
    r = radius
    cdt = compute_dtype(z.dtype)
    zu, du = z.to(cdt), d.to(cdt)
    shape = z.shape
    if whole:
        zu, du = zu.reshape(1, -1), du.reshape(1, -1)
    if project or rule == "angular":
        du = sphere.project(zu, du, -1, radius=r)
    if rule == "adam":
        new = sphere.normalize(zu * (1 - lr * weight_decay) - lr * du, -1, on_zero="keep", radius=r)
    elif rule == "hyperball":
        n = sphere.norm(du, -1)
        # the unit direction first: lr * r / max(n, tiny) overflows for lr * r >= 4, and a
        # zero direction (a zero gradient) would then give 0 * inf = NaN
        u = (du / n.clamp_min(torch.finfo(cdt).tiny)) * (lr * r)
        new = sphere.normalize(zu - u, -1, on_zero="keep", radius=r)
    elif rule == "angular":
        n = sphere.norm(du, -1)
        moving = n > 0
        if angle_per == "sphere" or du.shape[0] == blocks:
            full = lr.to(n.dtype).expand_as(n) if isinstance(lr, Tensor) else torch.full_like(n, lr)
            theta = torch.where(moving, full, torch.zeros_like(n))
        elif angle_per == "tensor":
            nb = n.reshape(blocks, -1)
            rms = nb.square().mean(dim=1, keepdim=True).sqrt().expand_as(nb).reshape(n.shape)
            theta = lr * n / rms.clamp_min(torch.finfo(cdt).tiny)
        else:
            raise ValueError(f"angle_per must be 'sphere' or 'tensor', got {angle_per!r}")
        unit_d = du / n.clamp_min(torch.finfo(cdt).tiny)
        # the exponential map along -d of angle theta (x/r and unit_d orthonormal)
        new = torch.cos(theta) * zu - (r * torch.sin(theta)) * unit_d
        new = sphere.normalize(new, -1, on_zero="keep", radius=r)
    else:
        raise ValueError(f"rule must be one of {', '.join(map(repr, STEP_RULES))}, got {rule!r}")
    angle = None
    if measure:
        angle = step_angle(zu, new, r)
    return new.reshape(shape).to(z.dtype), angle


@torch.no_grad()
def hyperball_step_(
    z: Tensor, d: Tensor, lr: float, *, radius: float = 1.0, project: bool = False
) -> None:
    r""":func:`sphere_step`'s ``"hyperball"`` rule in place, for a caller that owns ``d``: per
    row of ``z`` (``(k, size)``; one row for a whole-tensor sphere), :math:`u = \eta r D /
    \|D\|` (:math:`D` projected onto the tangent space first with ``project``),
    :math:`z \leftarrow r (z - u) / \|z - u\|`. ``d`` (same shape and dtype as ``z``,
    contiguous) is overwritten with :math:`z - u`. No other buffer of ``z``'s size: the CPU
    path of :class:`.AdamH` (equal to :func:`sphere_step` up to rounding: tested)."""
    tiny = torch.finfo(z.dtype).tiny
    if project:
        # <z, d> per row as a batched matrix product: no buffer of z's size
        c = (z.unsqueeze(-2) @ d.unsqueeze(-1)).squeeze(-1) / (radius * radius)
        d.addcmul_(z, c, value=-1)
    n = torch.linalg.vector_norm(d, dim=-1, keepdim=True).clamp_min_(tiny)
    d.div_(n)  # the unit direction first (a zero row stays zero: no 0 * inf)
    torch.add(z, d, alpha=-lr * radius, out=d)
    ny = torch.linalg.vector_norm(d, dim=-1, keepdim=True).clamp_min_(tiny)
    torch.div(d, ny.div_(radius), out=z)


@torch.no_grad()
def sphere_step_(
    p: Tensor,
    d: Tensor,
    lr: float | Tensor,
    *,
    project: bool = True,
    rule: StepRule = "angular",
    angle_per: Literal["sphere", "tensor"] = "sphere",
    weight_decay: float = 0.0,
    measure: bool = False,
) -> Tensor | None:
    """:func:`sphere_step` on a sphere parameter ``p`` in place, along its own spheres
    (``sphere_dim``: one axis, adjacent axes or the whole tensor) and radius
    (``sphere_radius``, default 1). ``d``: the direction, shaped like ``p``. Returns the angle
    each sphere turned (``(k,)``, in the order of :func:`rows`) with ``measure``.

    The one call an optimizer needs for the ``"oblique"`` ordering (``rule="adam",
    project=True`` on the Adam direction) or angular steps (``rule="angular"``).
    """
    from ..parameter import sphere_dim_of

    dims = sphere_dim_of(p)
    if dims is None:
        raise ValueError("sphere_step_ needs a sphere parameter (a tensor with sphere_dim)")
    layout = sphere.sphere_layout(p.shape, dims)
    radius = float(getattr(p, "sphere_radius", 1.0))
    whole = layout.count == 1
    z, dz = (p, d) if whole else (rows(p, layout), rows(d, layout))
    new, angle = sphere_step(
        z,
        dz,
        lr,
        radius=radius,
        whole=whole,
        project=project,
        rule=rule,
        angle_per=angle_per,
        weight_decay=weight_decay,
        measure=measure,
    )
    p.copy_(new if whole else from_rows(new, layout, p.shape))
    return angle


@torch.no_grad()
def adam_sphere_update_(
    p: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    ordering: Ordering,
    angular: bool,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> Tensor | None:
    """One Adam-type step of the sphere parameter ``p`` in the given ``ordering``, in place:
    the ``ordering=``/``angular=`` options of :class:`.RiemannianAdam` and :class:`.RenormAdam`.

    ``exp_avg_sq`` is per coordinate (``p``'s shape) or one value per sphere (the sphere axes
    of size 1: RiemannianAdam's ``second_moment="row"``, the sum of squares over the sphere).
    ``"riemannian"`` projects the gradient (and moves ``exp_avg`` to the current point by
    projection) first; ``"renorm"``/``"oblique"`` take the Euclidean gradient. The step:
    ``angular``: turn each sphere by exactly ``lr`` along the tangent part of the Adam
    direction (returns the angles, ``(k,)``); else Emerging-Optimizers' ObliqueAdam step
    (tangent part, decoupled decay, step of ``lr`` along it, retraction; returns None).
    Coupled ``weight_decay`` (L2) is added to the gradient as Adam does.
    """
    from ..parameter import sphere_dim_of

    dims = sphere_dim_of(p)
    radius = float(getattr(p, "sphere_radius", 1.0))
    step += 1
    t = float(step)
    g = (-grad if maximize else grad).to(exp_avg.dtype)
    if weight_decay and not decoupled_weight_decay:
        g = g + weight_decay * p.detach().to(g.dtype)
    if ordering == "riemannian":
        g = sphere.project(p.detach(), g, dims, radius=radius)
        exp_avg.copy_(sphere.project(p.detach(), exp_avg, dims, radius=radius))
    exp_avg.lerp_(g, 1 - betas[0])
    exp_avg_sq.mul_(betas[1])
    if exp_avg_sq.shape == p.shape:
        exp_avg_sq.addcmul_(g, g, value=1 - betas[1])
    else:
        exp_avg_sq.add_(sphere.inner(g, g, dims).reshape(exp_avg_sq.shape), alpha=1 - betas[1])
    d = adam_direction(exp_avg, exp_avg_sq, t, betas, eps)
    decay = weight_decay if decoupled_weight_decay else 0.0
    return sphere_step_(
        p,
        d,
        lr,
        project=True,
        rule="angular" if angular else "adam",
        weight_decay=0.0 if angular else decay,
        measure=angular,
    )


def check_sphere_options(
    ordering: str, angular: bool, orderings: tuple[str, ...], default: str, flags: dict
) -> None:
    """The checks of the ``ordering=``/``angular=`` options of the Adam variants: a known
    ordering, a bool, and none of the flags their reference path lacks."""
    if ordering not in orderings:
        raise ValueError(
            f"ordering must be one of {', '.join(map(repr, orderings))}, got {ordering!r}"
        )
    if not isinstance(angular, bool):
        raise TypeError(f"angular must be True or False, got {angular!r}")
    if ordering != default or angular:
        bad = [k for k in ("fused", "capturable", "differentiable", "amsgrad") if flags.get(k)]
        if bad:
            raise ValueError(
                f"ordering={ordering!r}, angular={angular} take the reference step "
                f"(spheretorch.optim.sphere_steps); it has no {bad[0]}={flags[bad[0]]!r}"
            )


def split_sphere_lists(lists: tuple[list, ...]) -> tuple[tuple[list, ...], list[int]]:
    """``(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, dims)`` without the
    sphere parameters (amsgrad off: ``max_exp_avg_sqs`` empty), and the sphere indices."""
    params, grads, avgs, sqs, maxs, steps, dims = lists
    on = [i for i, d in enumerate(dims) if d is not None]
    off = [i for i, d in enumerate(dims) if d is None]
    rest = tuple([lst[i] for i in off] for lst in (params, grads, avgs, sqs))
    return (*rest, maxs, [steps[i] for i in off], [dims[i] for i in off]), on


def sphere_option_steps(
    group: dict, lists: tuple[list, ...], ordering: Ordering, state: dict
) -> tuple[list, ...]:
    """Take the sphere parameters of an Adam variant's lists (``params, grads, exp_avgs,
    exp_avg_sqs, max_exp_avg_sqs, steps, dims``) through :func:`adam_sphere_update_` (angles
    into ``state[p]["angle"]`` with ``angular``); returns the lists of the others."""
    rest, on = split_sphere_lists(lists)
    params, grads, avgs, sqs, _, steps, _ = lists
    lr = float(group["lr"])
    b1, b2 = (float(b) for b in group["betas"])
    for i in on:
        angle = adam_sphere_update_(
            params[i],
            grads[i],
            avgs[i],
            sqs[i],
            steps[i],
            lr=lr,
            betas=(b1, b2),
            eps=group["eps"],
            ordering=ordering,
            angular=bool(group["angular"]),
            weight_decay=group["weight_decay"],
            decoupled_weight_decay=bool(group.get("decoupled_weight_decay")),
            maximize=bool(group["maximize"]),
        )
        if angle is not None:
            state[params[i]]["angle"] = angle
    return rest


@torch.no_grad()
def sgd_sphere_angular_(
    p: Tensor,
    grad: Tensor,
    buf: Tensor | None,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> tuple[Tensor | None, Tensor]:
    """RiemannianSGD's ``angular=True`` step of the sphere parameter ``p``, in place: the
    Riemannian gradient (L2 ``weight_decay`` added first, as torch's SGD), momentum as torch's
    SGD on it with the buffer moved to the current point by projection, then a turn of exactly
    ``lr`` radians along the result. Returns ``(buffer, angles)`` (``buffer`` None without
    momentum)."""
    from ..parameter import sphere_dim_of

    dims = sphere_dim_of(p)
    radius = float(getattr(p, "sphere_radius", 1.0))
    g = -grad if maximize else grad
    if weight_decay:
        g = g + weight_decay * p.detach()
    r = sphere.project(p.detach(), g, dims, radius=radius)
    d = r
    if momentum:
        if buf is None:
            buf = r.clone()
        else:
            buf.copy_(sphere.project(p.detach(), buf, dims, radius=radius))
            buf.mul_(momentum).add_(r, alpha=1 - dampening)
        d = r.add(buf, alpha=momentum) if nesterov else buf
    angle = sphere_step_(p, d, lr, project=True, rule="angular", measure=True)
    assert angle is not None
    return buf, angle
