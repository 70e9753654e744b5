r""":class:`SphereOptimizer`, the base class of the three optimizers (as torch's
``optimizer.py``): a :class:`torch.optim.Optimizer` that adds the non-finite gradient policy
(``nonfinite="skip" | "raise" | "ignore"``: at most one host synchronisation per step,
none with a device-side skip), sparse-gradient rejection naming the parameter, float32 state
for half-precision sphere parameters across ``load_state_dict``, and torch's
``__setstate__`` defaults for state dicts that lack newer keys. Details: docs/optimizers.md.

Skipped steps are never silent: ``nonfinite="skip"`` warns (``NonfiniteGradientWarning``) on
the first skipped step and again when :data:`WARN_AFTER_CONSECUTIVE_SKIPS` steps in a row
have been skipped (every parameter frozen), then each time that run has doubled. Where the
skip is decided on the device (fused or capturable steps) the host learns of skips without
an extra synchronisation per step: it reads the device-side counters every
:data:`SKIP_CHECK_EVERY` steps (one small read, never while a CUDA graph is being captured or
under ``torch.compile``) and whenever :attr:`SphereOptimizer.skipped_steps` is read.
"""

from __future__ import annotations

import inspect
import warnings
from itertools import chain
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..sphere import UPCAST_DTYPES, compute_dtype, global_value, is_dtensor
from ._functional import (
    compiling,
    new_step,
    nonfinite_flag,
    really_nonfinite,
    run_masked,
    sphere_of,
)

__all__ = [
    "NONFINITE_POLICIES",
    "SKIP_CHECK_EVERY",
    "WARN_AFTER_CONSECUTIVE_SKIPS",
    "NonfiniteGradientWarning",
    "NonfinitePolicy",
    "SphereOptimizer",
]

NonfinitePolicy = Literal["skip", "raise", "ignore"]
NONFINITE_POLICIES: tuple[str, ...] = ("skip", "raise", "ignore")
#: warn again each time this many steps in a row were skipped for non-finite gradients
WARN_AFTER_CONSECUTIVE_SKIPS = 10
#: where the skip is decided on the device, the host reads the skip counters every this many
#: steps
SKIP_CHECK_EVERY = 50


class NonfiniteGradientWarning(UserWarning):
    """A step was skipped because a gradient held a NaN or an infinity (``nonfinite="skip"``)."""


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
    #: the param-group key that marks this class's family in a state dict ("betas": Adam's,
    #: "momentum": SGD's); state of the other family cannot be loaded
    _family_key = "betas"

    def __init__(
        self, params: Any, defaults: dict[str, Any], *, nonfinite: NonfinitePolicy = "skip"
    ) -> None:
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"nonfinite must be one of {', '.join(map(repr, NONFINITE_POLICIES))}, "
                f"got {nonfinite!r}"
            )
        if defaults.get("fused"):
            if defaults.get("differentiable"):
                raise RuntimeError("`fused` does not support `differentiable`")
            if defaults.get("foreach"):
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if defaults.get("capturable") and nonfinite == "raise":
            raise ValueError(
                "capturable=True cannot raise on a non-finite gradient (that needs a host "
                "synchronisation); use nonfinite='skip' (skips on the device) or 'ignore'"
            )
        self.nonfinite: NonfinitePolicy = nonfinite
        super().__init__(params, defaults)
        self._reset_skip_counters(0)

    # ------------------------------------------------------------------ bookkeeping

    def _reset_skip_counters(self, skipped: int) -> None:
        """Host and device skip counters. The device ones (total, and the current run of
        consecutive skips) exist from the start, on the first parameter's device, so that a
        compiled step only updates them in place (torch.compile cannot create attributes)."""
        first = next((p for g in self.param_groups for p in g["params"]), None)
        device = first.device if first is not None and not is_dtensor(first) else "cpu"
        self._skipped = skipped  # decided on the host
        self._consecutive = 0  # current run of host-side skips
        self._skipped_on_device = torch.zeros((), device=device)
        self._consecutive_on_device = torch.zeros((), device=device)
        self._seen_on_device = 0.0  # device total at the last host read
        self._steps_since_check = 0
        self._warned_first = skipped > 0
        self._last_run_warned = 0  # the run of consecutive skips last warned about

    @property
    def skipped_steps(self) -> int:
        """Steps skipped so far because a gradient was not finite (``nonfinite="skip"``)."""
        self._check_device_skips()
        return self._skipped + int(self._seen_on_device)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["nonfinite"] = self.nonfinite
        state["_skipped"] = self.skipped_steps
        for key in (
            "_skipped_on_device",
            "_consecutive_on_device",
            "_seen_on_device",
            "_consecutive",
            "_steps_since_check",
            "_warned_first",
            "_last_run_warned",
        ):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """torch's contract: param groups of an older or another class's state dict get the
        keys they lack (from this optimizer's defaults), and a ``step`` saved as a number
        becomes a tensor where this optimizer keeps it."""
        state.setdefault("nonfinite", "skip")
        # a pickled optimizer brings its count; load_state_dict (which also calls this)
        # keeps the current one
        skipped = state.pop("_skipped", None)
        state.pop("_skipped_on_device", None)
        super().__setstate__(state)
        if skipped is not None or not hasattr(self, "_skipped_on_device"):
            self._reset_skip_counters(int(skipped or 0))
        fill = {**self._signature_defaults(), **self.defaults}
        for group in self.param_groups:
            for key, value in fill.items():
                group.setdefault(key, value)
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if "step" in p_state and not torch.is_tensor(p_state["step"]):
                    step = new_step(p, bool(group.get("fused")), bool(group.get("capturable")))
                    p_state["step"] = step.fill_(float(p_state["step"]))

    @classmethod
    def _signature_defaults(cls) -> dict[str, Any]:
        return {
            k: v.default
            for k, v in inspect.signature(cls.__init__).parameters.items()
            if v.default is not inspect.Parameter.empty and k != "nonfinite"
        }

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

    def _takes_found_inf(self, group: dict[str, Any]) -> bool:
        """True when ``_update`` skips on a device-side ``found_inf`` itself (fused kernels)."""
        return bool(group.get("fused"))

    def _uses_device_side_skip(self) -> bool:
        """Skip non-finite steps on the device (no host sync): every group fused or capturable,
        and no DTensors (whose flag is all-reduced, a synchronisation anyway)."""
        return all(g.get("fused") or g.get("capturable") for g in self.param_groups) and not any(
            is_dtensor(p) for g in self.param_groups for p in g["params"]
        )

    def _update_masked(self, group: dict[str, Any], lists: Any, found_inf: Tensor) -> None:
        """Device-side skip for a path without a ``found_inf`` input (capturable foreach):
        snapshot what the update writes, update, restore where ``found_inf`` is set. The
        measured angles (``state["angle"]``, replaced by each step) keep those of the last
        step taken (zeros where there was none)."""
        written = [t for i, lst in enumerate(lists) if i != 1 for t in lst if torch.is_tensor(t)]
        angles = {
            id(p): self.state[p]["angle"].clone()
            for p in lists[0]
            if isinstance(self.state.get(p, {}).get("angle"), Tensor)
        }
        run_masked(found_inf, written, lambda: self._update(group, lists, None))
        skip = found_inf.to(torch.bool)
        for p in lists[0]:
            new = self.state.get(p, {}).get("angle")
            if isinstance(new, Tensor):
                old = angles.get(id(p))
                self.state[p]["angle"] = torch.where(
                    skip, torch.zeros_like(new) if old is None else old, new
                )

    # ------------------------------------------------------------------ skip warnings

    def _warn_first_skip(self, where: str) -> None:
        if self._warned_first:
            return
        self._warned_first = True
        warnings.warn(
            f"{type(self).__name__}: skipped a step because a gradient is not finite (NaN or "
            f"inf){where}; parameters and state were left unchanged (nonfinite='skip'; pass "
            f"nonfinite='raise' to stop instead; optimizer.skipped_steps counts them)",
            NonfiniteGradientWarning,
            stacklevel=4,
        )

    def _warn_run(self, run: int) -> None:
        """Warn about ``run`` consecutive skips once it reaches
        :data:`WARN_AFTER_CONSECUTIVE_SKIPS`, then each time it has doubled since the last
        warning (10, 20, 40, ... in a row), so a frozen run is reported without flooding."""
        if run < WARN_AFTER_CONSECUTIVE_SKIPS or run < 2 * self._last_run_warned:
            return
        self._last_run_warned = run
        warnings.warn(
            f"{type(self).__name__}: the last {run} steps were all skipped for non-finite "
            f"gradients: nothing is training",
            NonfiniteGradientWarning,
            stacklevel=4,
        )

    def _where_nonfinite(self) -> str:
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is not None and not bool(global_value(torch.isfinite(p.grad).all())):
                    return f" in param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)})"
        return ""

    def _check_device_skips(self) -> None:
        """Read the device-side skip counters (one small host read) and warn about new skips;
        never while compiling or capturing a CUDA graph."""
        if compiling() or self._skipped_on_device is None:
            return
        if self._skipped_on_device.is_cuda and torch.cuda.is_current_stream_capturing():
            return
        self._steps_since_check = 0
        total = float(self._skipped_on_device)
        if total == self._seen_on_device:
            return
        self._seen_on_device = total
        self._warn_first_skip("")
        run = int(self._consecutive_on_device)
        if run == 0:
            self._last_run_warned = 0
        self._warn_run(run)

    #: torch's GradScaler hands this optimizer ``found_inf`` (and ``grad_scale``) instead of
    #: unscaling, checking and skipping on the host (the protocol of torch's fused Adam)
    _step_supports_amp_scaling = True

    def _unscale(self, grads: list[Tensor]) -> None:
        """Divide the gradients by ``self.grad_scale`` in place (GradScaler's protocol: set when
        the gradients are still scaled, ``None`` once ``unscale_`` ran)."""
        scale = getattr(self, "grad_scale", None)
        if scale is None:
            return
        by_device: dict[torch.device, list[Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        for device, gs in by_device.items():
            s = scale.to(device=device, dtype=torch.float32)
            for g in gs:  # dense, sparse and half-type gradients alike (a 0-d divisor)
                g.div_(s)

    def _count_device_skip(self, found_inf: Tensor) -> Tensor:
        """Add a device-side skip decision (float32 0-d, 1.0 = skip) to the device counters
        (total, current run of consecutive skips) without a host read; return it."""
        counter = self._skipped_on_device
        if counter.device != found_inf.device and not compiling():
            counter = self._skipped_on_device = counter.to(found_inf.device)
            self._consecutive_on_device = self._consecutive_on_device.to(found_inf.device)
        counter.add_(found_inf)
        # the run of consecutive skips: +1 on a skipped step, back to 0 otherwise
        self._consecutive_on_device.add_(1).mul_(found_inf)
        if not compiling():
            self._steps_since_check += 1
            if self._steps_since_check >= SKIP_CHECK_EVERY:
                self._check_device_skips()
        return found_inf

    def step(self, closure: Any = None) -> Any:
        """Perform one optimisation step (with autograd recording it when the optimizer was
        built with ``differentiable=True``, as torch's optimizers do).

        Args:
            closure: optional callable that re-evaluates the model and returns the loss; it is
                run with gradients enabled.

        Returns:
            The closure's loss (``None`` without a closure).
        """
        with torch.set_grad_enabled(bool(self.defaults.get("differentiable"))):
            return self._step(closure)

    def _step(self, closure: Any = None) -> Any:
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
        external = getattr(self, "found_inf", None)
        if external is not None:
            # torch's GradScaler protocol (``_step_supports_amp_scaling``), also the trainer's
            # device-side decision: the caller has decided and counts (as with torch's fused
            # Adam, no warning, no ``skipped_steps``); unscale if it says so, and skip on the
            # device where ``found_inf`` is nonzero, whatever ``nonfinite`` says.
            self._unscale([g for lists in collected for g in lists[1]])
            found_inf = external.to(torch.float32)
        elif self.nonfinite != "ignore":
            # a sparse gradient (torch's SGD takes them) is checked through its values
            grads = [
                g.coalesce().values() if g.is_sparse else g for lists in collected for g in lists[1]
            ]
            if grads:
                flag = nonfinite_flag(grads)
                if self.nonfinite == "skip" and self._uses_device_side_skip():
                    found_inf = self._count_device_skip(
                        torch.tensor(float(flag))
                        if isinstance(flag, bool)
                        else flag.to(torch.float32)
                    )
                elif bool(flag) and really_nonfinite(grads):  # the one host sync
                    if self.nonfinite == "raise":
                        self._raise_nonfinite()
                    self._skipped += 1
                    self._consecutive += 1
                    if not self._warned_first:
                        self._warn_first_skip(self._where_nonfinite())
                    self._warn_run(self._consecutive)
                    return loss
                else:
                    self._consecutive = self._last_run_warned = 0

        for group, lists in zip(self.param_groups, collected):
            if not lists[0]:
                continue
            if found_inf is not None and not self._takes_found_inf(group):
                self._update_masked(group, lists, found_inf)
            else:
                self._update(group, lists, found_inf)
        return loss

    # ------------------------------------------------------------------ state dtypes

    def _check_loadable(self, state_dict: dict[str, Any]) -> None:
        ours = type(self).__name__
        saved_groups = state_dict.get("param_groups", [])
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            source = _saved_by(saved)
            if self._family_key not in saved:
                raise ValueError(
                    f"cannot load a state dict saved by {source} into {ours}: its "
                    f"param_groups[{gi}] has no {self._family_key!r} (a different optimizer)"
                )
            merged = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            problem = self._group_problem(saved, group)
            for pi, (pid, p) in enumerate(zip(saved.get("params", []), group["params"])):
                if problem is not None:
                    break
                p_state = state_dict.get("state", {}).get(pid)
                if p_state:
                    problem = self._state_problem(p, merged, p_state)
                    if problem is not None:
                        problem = f"param_groups[{gi}]['params'][{pi}] {problem}"
            if problem is not None:
                raise ValueError(
                    f"cannot load a state dict saved by {source} into {ours}: {problem}"
                )

    def _group_problem(self, saved: dict[str, Any], group: dict[str, Any]) -> str | None:
        """Why a saved param group cannot be loaded into ``group`` (None: it can)."""
        return None

    def _state_layout(self, p: Tensor, group: dict[str, Any]) -> dict[str, tuple[Any, bool]]:
        """``{key: (shape, required)}`` of the per-parameter state this optimizer keeps."""
        return {}

    def _state_problem(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> str | None:
        """Why a saved per-parameter state cannot be used for ``p`` (None: it can)."""
        for key, (shape, required) in self._state_layout(p, group).items():
            value = state.get(key)
            if value is None:
                if required:
                    return f"has no {key!r} state"
            elif torch.is_tensor(value) and tuple(value.shape) != tuple(shape):
                return (
                    f"has {key!r} of shape {tuple(value.shape)} where {type(self).__name__} "
                    f"keeps {tuple(shape)}"
                )
        return None

    def _state_dtype(self, p: Tensor) -> torch.dtype:
        """dtype of the floating state of ``p``: compute dtype for sphere parameters."""
        if sphere_of(p) is not None:
            return compute_dtype(p.dtype)
        return p.dtype

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, checked first and keeping float32 state of
        half-precision sphere parameters.

        State of a compatible class loads (torch ``Adam``/``AdamW`` <-> ``RenormAdam`` <->
        ``RiemannianAdam`` where the state has the layout this optimizer keeps; torch
        ``SGD`` <-> ``RiemannianSGD``), group keys it lacks filled from this optimizer's
        defaults. Anything else fails here, with a one-line ``ValueError`` naming both
        classes, instead of at the next ``step()``. torch casts every floating state tensor to
        its parameter's dtype; a half-precision sphere parameter's state is restored in
        float32 instead (a resumed run stays bitwise exact).
        """
        self._check_loadable(state_dict)
        super().load_state_dict(state_dict)
        if not self._compute_dtype_state:
            return
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid)
            if saved is None or sphere_of(p) is None or p.dtype not in UPCAST_DTYPES:
                continue
            for key in self._compute_dtype_state:
                value = saved.get(key)
                if isinstance(value, Tensor):
                    self.state[p][key] = value.to(
                        device=p.device, dtype=self._state_dtype(p), copy=True
                    )


def _saved_by(group: dict[str, Any]) -> str:
    """The optimizer class(es) a saved param group's keys point to, for error messages."""
    if "second_moment" in group:
        return "RiemannianAdam"
    if "betas" in group:
        return "torch Adam/AdamW or RenormAdam"
    if "momentum" in group:
        return "RiemannianSGD" if "retraction" in group else "torch SGD"
    return "another optimizer class"
