r"""What the sphere-aware optimizers share: :class:`SphereOptimizer`, a thin
:class:`torch.optim.Optimizer` subclass that adds

* the **non-finite gradient policy** (``nonfinite="skip" | "raise" | "ignore"``), checked for
  all parameter groups at once before anything is changed, with at most one host
  synchronisation per step;
* **sparse-gradient rejection** with a message that names the parameter;
* the choice of implementation (``foreach=None`` means the multi-tensor path on CPU and CUDA);
* **state dtypes**: the optimizer state of a sphere parameter is kept in the compute dtype
  (float32 for float16/bfloat16 parameters) and ``load_state_dict`` keeps it there, so a
  resumed run is bitwise identical to an uninterrupted one.

A parameter lives on the sphere when :func:`spheretorch.parameter.sphere_dim_of` returns an
axis for it: a :class:`~spheretorch.SphereParameter`, or any tensor (DTensor included) that
carries a ``sphere_dim`` attribute. Everything else is Euclidean and gets torch's own update.

Non-finite gradients
--------------------
``"skip"`` (default)
    If any gradient of the step holds a NaN or an infinity, the whole step is skipped: no
    parameter, moment or step counter changes, and :attr:`SphereOptimizer.skipped_steps`
    grows by one. The test is one full reduction per gradient (one extra read of the
    gradients) and one host synchronisation per step. ``RenormAdam(fused=True)`` hands the
    flag to torch's fused kernel instead and does not synchronise at all (there a finite
    gradient whose entries are around 1e19 or larger may count as non-finite; the host-side
    path re-checks such a step exactly).
``"raise"``
    Raise :class:`FloatingPointError` naming the first offending parameter, before anything
    is changed (same cost as ``"skip"``).
``"ignore"``
    No test (zero cost): torch's behaviour, NaNs propagate into the parameters.

With sharded (DTensor, FSDP2) gradients the test is reduced over all shards (one
all-reduce per device mesh), so every rank skips or raises on the same step, even when the
NaN sits in one rank's shard only.

Under :func:`torch.compile` the host synchronisation of ``"skip"``/``"raise"`` splits the
compiled step in two graphs (a graph break); pass ``nonfinite="ignore"`` for a single graph
(for example when a :class:`torch.amp.GradScaler` already skips steps with infinities).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import chain
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..parameter import sphere_dim_of
from ..sphere import compute_dtype

__all__ = [
    "NONFINITE_POLICIES",
    "NonfinitePolicy",
    "SphereOptimizer",
    "default_foreach",
    "global_value",
    "zeros_per_slice",
]

NonfinitePolicy = Literal["skip", "raise", "ignore"]
NONFINITE_POLICIES: tuple[str, ...] = ("skip", "raise", "ignore")
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_FOREACH_DEVICES = ("cpu", "cuda")
_BIG = 1 << 16  # gradients with at least this many elements are checked one by one


def is_dtensor(t: Tensor) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (without importing distributed)."""
    return type(t).__name__ == "DTensor"


def global_value(t: Tensor) -> Tensor:
    """An ordinary tensor holding the value of ``t`` over all shards.

    A reduction of a DTensor (``sum``, ``all``, ``norm``) may be *pending*: its placement is
    ``Partial`` and each rank holds only its shard's contribution (``bool()`` or ``.item()``
    would read that local part, so ranks could disagree). ``full_tensor()`` completes the
    reduction (an all-reduce) and returns the same numbers on every rank. Plain tensors are
    returned unchanged.
    """
    return t.full_tensor() if is_dtensor(t) else t  # type: ignore[attr-defined]


def zeros_per_slice(p: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """Zeros of ``p``'s shape with size 1 along ``dim``: one number per slice of ``p``.

    For a DTensor ``p`` the result is a DTensor on the same mesh: sharded like ``p`` along the
    other axes (each rank keeps the statistics of its own slices) and **replicated** over
    any mesh dimension that shards ``dim`` itself (a slice spread across ranks has one
    statistic, which every one of those ranks keeps and updates from all-reduced values).
    Made without communication (``p.narrow(dim, 0, 1)`` would all-gather ``p`` there).
    """
    if not is_dtensor(p):
        return torch.zeros_like(p.narrow(dim, 0, 1), dtype=dtype)
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor import zeros as dtensor_zeros

    placements = [
        Replicate() if isinstance(pl, Shard) and pl.dim == dim else pl
        for pl in p.placements  # type: ignore[attr-defined]
    ]
    shape = list(p.shape)
    shape[dim] = 1
    return dtensor_zeros(
        shape,
        dtype=dtype,
        device_mesh=p.device_mesh,  # type: ignore[attr-defined]
        placements=placements,
    )


def default_foreach(tensors: Iterable[Tensor]) -> bool:
    """``foreach=None`` resolves to ``True`` when every tensor is a plain CPU or CUDA tensor.

    DTensors (FSDP2) take the single-tensor path, whose reductions along a sharded axis are
    ordinary DTensor ops.
    """
    return all(t.device.type in _FOREACH_DEVICES and not is_dtensor(t) for t in tensors)


def compiling() -> bool:
    return torch.compiler.is_compiling()


def scalar_value(x: Tensor | float) -> Tensor | float:
    """A step counter or hyper-parameter as a Python number (a tensor while compiling)."""
    if isinstance(x, Tensor) and not compiling():
        return x.item()
    return x


def check_hyperparameters(lr: Any, betas: Any = None, eps: Any = None, weight_decay: Any = 0.0):
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("a Tensor lr must have exactly one element")
    elif not lr >= 0.0:
        raise ValueError(f"invalid learning rate: {lr} (must be >= 0)")
    if eps is not None and not eps >= 0.0:
        raise ValueError(f"invalid epsilon value: {eps} (must be >= 0)")
    if betas is not None:
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        for i, b in enumerate(betas):
            if not 0.0 <= float(b) < 1.0:
                raise ValueError(f"invalid beta parameter at index {i}: {b} (need 0 <= b < 1)")
    if not weight_decay >= 0.0:
        raise ValueError(f"invalid weight_decay value: {weight_decay} (must be >= 0)")


class SphereOptimizer(Optimizer):
    """Base class of :class:`RiemannianAdam`, :class:`RenormAdam` and :class:`RiemannianSGD`.

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

    @staticmethod
    def _nonfinite_flag(grads: Sequence[Tensor]) -> Tensor:
        """0-d bool tensor, True when some gradient may hold a NaN or an infinity. No sync.

        One full reduction per gradient, accumulated in float32 for half types: a sum for
        large gradients (the cheapest reduction, ~1.7x faster than a norm on CPU; the max-abs
        norm would be exact but is ~30x slower), one ``torch._foreach_norm`` call for all
        small ones. A finite gradient whose sum of squares or sum overflows the accumulation
        dtype (float32: entries around 1e19 or 1e34) is flagged too; the host-side policies
        re-check such a step exactly before skipping it.
        """
        by_key: dict[tuple[Any, ...], list[Tensor]] = {}
        for g in grads:
            # DTensor gradients (FSDP2) are grouped by mesh: their flag is reduced over it
            mesh = g.device_mesh if is_dtensor(g) else None  # type: ignore[attr-defined]
            by_key.setdefault((g.device, g.dtype, g.numel() >= _BIG, mesh), []).append(g)
        flag: Tensor | None = None
        for (_, dtype, big, _), gs in by_key.items():
            acc = torch.float32 if dtype in _LOW_PRECISION else None
            if big:  # a plain sum is the cheapest full reduction (NaN/inf propagate)
                sums = torch.stack([g.sum(dtype=acc) for g in gs])
            else:  # one call for many small tensors
                sums = torch.stack(torch._foreach_norm(gs, 2, dtype=acc))
            # one all-reduce per mesh for sharded gradients: every rank gets the same flag,
            # so all skip (or raise on) the same step
            bad = global_value(~torch.isfinite(sums).all())
            flag = bad if flag is None else flag | bad.to(flag.device)
        assert flag is not None
        return flag

    @staticmethod
    def _really_nonfinite(grads: Sequence[Tensor]) -> bool:
        """Exact re-check (syncs) of a step flagged by :meth:`_nonfinite_flag`."""
        return any(not bool(global_value(torch.isfinite(g).all())) for g in grads)

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
                flag = self._nonfinite_flag(grads)
                if self.nonfinite == "skip" and self._uses_device_side_skip():
                    found_inf = flag.to(torch.float32)
                    if self._skipped_on_device is None:
                        self._skipped_on_device = torch.zeros((), device=flag.device)
                    self._skipped_on_device.add_(found_inf)
                elif bool(flag) and self._really_nonfinite(grads):  # the one host sync
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
            if saved is None or sphere_dim_of(p) is None or p.dtype not in _LOW_PRECISION:
                continue
            for key in self._compute_dtype_state:
                value = saved.get(key)
                if isinstance(value, Tensor):
                    self.state[p][key] = value.to(
                        device=p.device, dtype=self._state_dtype(p), copy=True
                    )


# ---------------------------------------------------------------------- shared list handling


def scalar_dtype() -> torch.dtype:
    """dtype of a host-side step counter (torch's convention: float64 under a float64 default)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def increment_steps(steps: list[Tensor]) -> None:
    """``step += 1`` for a list of step counters, as torch's foreach Adam does it."""
    if not steps:
        return
    if not compiling() and steps[0].is_cpu:
        # one wrapped scalar instead of one per tensor on the CPU slow path
        torch._foreach_add_(steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
    else:
        torch._foreach_add_(steps, 1)


def group_by_axis(
    params: Sequence[Tensor], sphere_dims: Sequence[int | None]
) -> tuple[list[int], dict[tuple[torch.device, torch.dtype, int], list[int]]]:
    """Split indices into Euclidean ones and sphere ones keyed by (device, dtype, sphere axis)."""
    euclidean: list[int] = []
    spheres: dict[tuple[torch.device, torch.dtype, int], list[int]] = {}
    for i, (p, d) in enumerate(zip(params, sphere_dims)):
        if d is None:
            euclidean.append(i)
        else:
            spheres.setdefault((p.device, p.dtype, d), []).append(i)
    return euclidean, spheres


def pick(seq: Sequence[Any], idx: Sequence[int]) -> list[Any]:
    return [seq[i] for i in idx]


def _accepts(fn: Any, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


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
) -> None:
    """torch's own functional Adam/AdamW (``torch.optim.adam.adam``) on Euclidean parameters."""
    if not params:
        return
    from torch.optim.adam import adam

    if compiling():
        # torch's foreach Adam fails to trace on CPU when called outside torch.optim.Adam
        # ("Expected scalars to be on CPU"); the compiler fuses the single-tensor loop anyway
        foreach = False
    elif isinstance(lr, Tensor) and foreach and not fused:
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
    )
    if decoupled_weight_decay and weight_decay != 0:
        if _accepts(adam, "decoupled_weight_decay"):
            kwargs["decoupled_weight_decay"] = True
        else:  # pragma: no cover - torch < 2.6
            from torch.optim.adamw import adamw as adam
    adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **kwargs)


def torch_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    foreach: bool,
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

    if compiling():
        foreach = False  # as in torch_adam: the compiler fuses the loop
    elif isinstance(lr, Tensor):
        lr = lr.item()
    sgd(
        params,
        grads,
        momentum_buffers,
        foreach=foreach,
        fused=False,
        weight_decay=weight_decay,
        momentum=momentum,
        lr=lr,
        dampening=dampening,
        nesterov=nesterov,
        maximize=maximize,
    )
