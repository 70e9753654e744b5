r""":class:`SphereOptimizer`, the base class of the three optimizers (as torch's
``optimizer.py``): a :class:`torch.optim.Optimizer` that adds the non-finite gradient policy
(``nonfinite="skip" | "raise" | "ignore"``: at most one host synchronisation per step,
none with a device-side skip), sparse-gradient rejection naming the parameter, float32 state
for half-precision sphere parameters across ``load_state_dict``, and torch's
``__setstate__`` defaults for state dicts that lack newer keys. Details: docs/optimizers.md.
"""

from __future__ import annotations

from itertools import chain
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..parameter import sphere_dim_of
from ..sphere import UPCAST_DTYPES, compute_dtype, global_value
from ._functional import nonfinite_flag, really_nonfinite

__all__ = ["NONFINITE_POLICIES", "NonfinitePolicy", "SphereOptimizer"]

NonfinitePolicy = Literal["skip", "raise", "ignore"]
NONFINITE_POLICIES: tuple[str, ...] = ("skip", "raise", "ignore")


class SphereOptimizer(Optimizer):
    """Base class of :class:`.RiemannianAdam`, :class:`.RenormAdam` and :class:`.RiemannianSGD`.

    Subclasses implement ``_init_group(group, *lists)`` (gather the parameters with gradients
    of one group into the lists the functional core takes, creating state lazily) and
    ``_update(group, lists, found_inf)``. :meth:`step` runs the closure, collects every
    group, applies the non-finite policy once for the whole step, then updates. State created
    for a step that is then skipped is all zeros, exactly equivalent to no state.
    """

    #: state tensors of sphere parameters kept in the compute dtype (float32 for half types)
    _compute_dtype_state: tuple[str, ...] = ()

    def __init__(
        self, params: Any, defaults: dict[str, Any], *, nonfinite: NonfinitePolicy = "skip"
    ) -> None:
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"nonfinite must be one of {', '.join(map(repr, NONFINITE_POLICIES))}, "
                f"got {nonfinite!r}"
            )
        self.nonfinite: NonfinitePolicy = nonfinite
        self._skipped = 0
        self._skipped_on_device: Tensor | None = None
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ bookkeeping

    @property
    def skipped_steps(self) -> int:
        """Steps skipped so far because a gradient was not finite (``nonfinite="skip"``)."""
        extra = 0 if self._skipped_on_device is None else int(self._skipped_on_device)
        return self._skipped + extra

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["nonfinite"] = self.nonfinite
        state["_skipped"] = self.skipped_steps
        state["_skipped_on_device"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("nonfinite", "skip")
        state.setdefault("_skipped", 0)
        state.setdefault("_skipped_on_device", None)
        super().__setstate__(state)

    def __repr__(self) -> str:
        return super().__repr__().replace("(", f"(nonfinite: {self.nonfinite!r}\n", 1)

    def _sparse_error(self, group: dict[str, Any], p: Tensor) -> RuntimeError:
        gi = next(i for i, g in enumerate(self.param_groups) if g is group)
        pi = next(i for i, q in enumerate(group["params"]) if q is p)
        return RuntimeError(
            f"{type(self).__name__} does not support sparse gradients: "
            f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)}) has a sparse "
            f".grad. Use dense gradients (e.g. nn.Embedding(..., sparse=False))."
        )

    # ------------------------------------------------------------------ non-finite policy

    def _raise_nonfinite(self) -> None:
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is not None and not bool(global_value(torch.isfinite(p.grad).all())):
                    raise FloatingPointError(
                        f"{type(self).__name__}: non-finite gradient (NaN or inf) in "
                        f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)}); nothing "
                        f"was updated (nonfinite='raise'; pass nonfinite='skip' to skip such "
                        f"steps)"
                    )

    # ------------------------------------------------------------------ step

    #: number of lists :meth:`_init_group` fills (parameters, gradients, ..., sphere axes)
    _n_lists = 2

    def _init_group(self, group: dict[str, Any], *lists: list[Any]) -> None:
        """Append the parameters of ``group`` that have a gradient, their gradients, state
        tensors and sphere axes to ``lists`` (``lists[0]``: parameters, ``lists[1]``:
        gradients), creating state lazily; reject sparse gradients.

        Same contract as torch's ``_init_group``: :func:`torch.compile` runs it eagerly (it
        only reads Python state) and traces the rest of the step.
        """
        raise NotImplementedError  # pragma: no cover

    def _update(self, group: dict[str, Any], lists: Any, found_inf: Tensor | None) -> None:
        raise NotImplementedError  # pragma: no cover

    def _uses_device_side_skip(self) -> bool:
        """True when ``_update`` takes a device-side ``found_inf`` flag (no host sync)."""
        return False

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one optimisation step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss; it is
                run with gradients enabled.

        Returns:
            The closure's loss (``None`` without a closure).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        collected = []
        for group in self.param_groups:
            lists = tuple([] for _ in range(self._n_lists))
            self._init_group(group, *lists)
            collected.append(lists)
        found_inf = None
        if self.nonfinite != "ignore":
            grads = [g for lists in collected for g in lists[1]]
            if grads:
                flag = nonfinite_flag(grads)
                if self.nonfinite == "skip" and self._uses_device_side_skip():
                    found_inf = flag.to(torch.float32)
                    if self._skipped_on_device is None:
                        self._skipped_on_device = torch.zeros((), device=flag.device)
                    self._skipped_on_device.add_(found_inf)
                elif bool(flag) and really_nonfinite(grads):  # the one host sync
                    if self.nonfinite == "raise":
                        self._raise_nonfinite()
                    self._skipped += 1
                    return loss

        for group, lists in zip(self.param_groups, collected):
            if lists[0]:
                self._update(group, lists, found_inf)
        return loss

    # ------------------------------------------------------------------ state dtypes

    def _state_dtype(self, p: Tensor) -> torch.dtype:
        """dtype of the floating state of ``p``: compute dtype for sphere parameters."""
        if sphere_dim_of(p) is not None:
            return compute_dtype(p.dtype)
        return p.dtype

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, keeping float32 state of half-precision sphere params.

        torch casts every floating state tensor to its parameter's dtype; the state of a
        float16/bfloat16 sphere parameter is float32 here, so it is restored from
        ``state_dict`` without that lossy round trip (a resumed run stays bitwise exact).
        """
        super().load_state_dict(state_dict)
        if not self._compute_dtype_state:
            return
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid)
            if saved is None or sphere_dim_of(p) is None or p.dtype not in UPCAST_DTYPES:
                continue
            for key in self._compute_dtype_state:
                value = saved.get(key)
                if isinstance(value, Tensor):
                    self.state[p][key] = value.to(
                        device=p.device, dtype=self._state_dtype(p), copy=True
                    )
