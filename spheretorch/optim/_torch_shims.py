"""Calls into torch's own functional Adam/AdamW and SGD for the Euclidean parameters (so they
get exactly torch's update), smoothing over what those functions accept."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._functional import compiling, pick


def same_strides(params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
    """``grads``, each one laid out as its parameter (a copy where the strides differ).

    torch's fused Adam/SGD kernels walk a parameter and its gradient in memory order: with a
    gradient of other strides (e.g. a transposed one) they silently pair the wrong elements
    (measured: torch 2.11 and 2.13, CPU, ``Adam(fused=True)`` off by ``lr`` per element)."""
    if all(g.stride() == p.stride() for p, g in zip(params, grads)):
        return grads
    return [
        g if g.stride() == p.stride() else torch.empty_like(p).copy_(g)
        for p, g in zip(params, grads)
    ]


def _accepts(fn: Any, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


# torch's functional signature (lists, then keywords), shared on purpose by every core.
def torch_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool,
    fused: bool = False,
    found_inf: Tensor | None = None,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    decoupled_weight_decay: bool,
    capturable: bool = False,
    differentiable: bool = False,
) -> None:
    """torch's own functional Adam/AdamW (``torch.optim.adam.adam``) on Euclidean parameters.

    ``capturable`` is passed on for accelerator tensors only: torch's capturable kernels
    reject CPU ones, where a host-side step costs no synchronisation anyway.
    """
    if not params:
        return
    from torch.optim.adam import adam

    capturable = capturable and not params[0].is_cpu
    if fused:
        grads = same_strides(params, grads)
    if compiling():
        # torch's foreach Adam fails to trace on CPU when called outside torch.optim.Adam
        # ("Expected scalars to be on CPU"); the compiler fuses the single-tensor loop anyway
        foreach = False
    elif isinstance(lr, Tensor) and foreach and not fused and not capturable:
        lr = lr.item()  # torch's foreach Adam takes a tensor lr only with capturable=True
    kwargs: dict[str, Any] = dict(
        foreach=foreach,
        fused=fused,
        found_inf=found_inf,
        has_complex=any(torch.is_complex(p) for p in params),
        amsgrad=amsgrad,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        maximize=maximize,
        capturable=capturable,
        differentiable=differentiable,
    )
    if decoupled_weight_decay and weight_decay != 0:
        if _accepts(adam, "decoupled_weight_decay"):
            kwargs["decoupled_weight_decay"] = True
        else:  # pragma: no cover - torch < 2.6
            from torch.optim.adamw import adamw as adam
    adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **kwargs)


# torch's functional signature (lists, then keywords), shared on purpose by every core.
def torch_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    foreach: bool,
    fused: bool = False,
    found_inf: Tensor | None = None,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """torch's own functional SGD (``torch.optim.sgd.sgd``) on Euclidean parameters.

    ``momentum_buffers`` is updated in place (new buffers are written into the list).
    """
    if not params:
        return
    from torch.optim.sgd import sgd

    if fused:
        grads = same_strides(params, grads)
    if compiling():
        foreach = False  # as in torch_adam: the compiler fuses the loop
    elif isinstance(lr, Tensor) and not fused:
        lr = lr.item()
    extra: dict[str, Any] = {}
    if _accepts(sgd, "has_sparse_grad"):
        extra["has_sparse_grad"] = any(g.is_sparse for g in grads)
    sgd(
        params,
        grads,
        momentum_buffers,
        foreach=foreach,
        fused=fused,
        found_inf=found_inf,
        weight_decay=weight_decay,
        momentum=momentum,
        lr=lr,
        dampening=dampening,
        nesterov=nesterov,
        maximize=maximize,
        **extra,
    )


def torch_adam_on(
    idx: list[int],
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    amsgrad: bool,
    **hyper: Any,
) -> None:
    """:func:`torch_adam` on the parameters at ``idx`` (the Euclidean ones of a group)."""
    lists = (params, grads, exp_avgs, exp_avg_sqs)
    vmax = pick(max_exp_avg_sqs, idx) if amsgrad else []
    torch_adam(
        *(pick(t, idx) for t in lists), vmax, pick(state_steps, idx), amsgrad=amsgrad, **hyper
    )


def torch_sgd_on(
    idx: list[int],
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    **hyper: Any,
) -> None:
    """:func:`torch_sgd` on the parameters at ``idx``; new buffers written back in place."""
    if not idx:
        return
    bufs = pick(momentum_buffers, idx)
    torch_sgd(pick(params, idx), pick(grads, idx), bufs, **hyper)
    for i, b in zip(idx, bufs):
        momentum_buffers[i] = b
