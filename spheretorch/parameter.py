r"""``SphereParameter``: an ``nn.Parameter`` whose slices along one axis are unit vectors.

"Is this on the sphere?" has one answer everywhere: :func:`sphere_dim_of` (any tensor with a
``sphere_dim`` attribute, e.g. a DTensor made by :func:`spheretorch.distributed.fully_shard`).
``Module.load_state_dict`` puts off-sphere rows back on the sphere, with a warning.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from . import sphere

__all__ = [
    "SphereParameter",
    "from_geoopt",
    "renormalize_",
    "sphere_",
    "sphere_dim_of",
    "to_geoopt",
]


def _rebuild_sphere_parameter(data: Tensor, requires_grad: bool, sphere_dim: int) -> Any:
    """Unpickling hook: rebuild without re-projecting (the data were saved unit-norm)."""
    p = SphereParameter.__new__(SphereParameter, data, sphere_dim, requires_grad, _project=False)
    return p


class SphereParameter(nn.Parameter):
    r"""A parameter constrained to the unit sphere along ``dim``.

    Each slice ``x[..., :, ...]`` along ``dim`` satisfies :math:`\|x\| = 1`. The data are
    projected at construction (:math:`x \leftarrow x / \|x\|`); after that, keeping them on the
    sphere is the optimizer's job (:class:`spheretorch.optim.RiemannianAdam`,
    :class:`spheretorch.optim.RenormAdam`, :class:`spheretorch.optim.RiemannianSGD`) or
    :func:`~spheretorch.parameter.renormalize_`'s.

    Args:
        data: floating-point tensor of any shape with at least one axis.
        dim: the sphere axis; stored as the non-negative int ``.sphere_dim``
            (``.dim()`` stays torch's method).
        requires_grad: as for ``nn.Parameter``.
        on_zero: a slice of zero norm raises (``"raise"``) or becomes the fixed point
            :math:`e_0` (``"fixed"``, e.g. an embedding's all-zero padding row).

    Raises:
        TypeError: non-floating dtype or non-int ``dim``.
        ValueError: ``dim`` out of range, a slice of zero norm, or NaN/inf entries.

    The class and ``sphere_dim`` survive ``copy.deepcopy``, ``pickle``, ``torch.save`` /
    ``torch.load``, ``Module.to()`` and ``Module.load_state_dict``. When
    ``Module.load_state_dict`` brings slices whose norm is off 1 by more than the dtype's
    tolerance (:func:`spheretorch.sphere.check_unit`), they are renormalized and a
    ``UserWarning`` names the key; slices with zero or non-finite norm fail the load
    (torch's ``RuntimeError``, naming the key). Values within the tolerance are copied
    bitwise (a resumed run stays exact). A module's ``state_dict``
    holds plain tensors, so ``torch.load(..., weights_only=True)`` reads it. (Only
    ``load_state_dict(..., assign=True)`` loses the class: torch then replaces every parameter
    object with a plain ``nn.Parameter``; load without ``assign`` to copy into the existing one.)
    """

    sphere_dim: int

    def __new__(
        cls,
        data: Tensor | None = None,
        dim: int = -1,
        requires_grad: bool = True,
        *,
        on_zero: str = "raise",
        _project: bool = True,
    ) -> SphereParameter:
        if data is None:
            raise TypeError("SphereParameter needs data: a floating-point tensor")
        sphere.check_floating(data, "data")
        sphere_dim = sphere.check_sphere_dim(data, dim, "dim", min_size=2)
        if on_zero not in ("raise", "fixed"):  # "keep" would leave a zero slice off the sphere
            raise ValueError(f"on_zero must be 'raise' or 'fixed', got {on_zero!r}")
        if _project and not data.is_meta:  # a meta tensor has no values to project
            with torch.no_grad():
                data = sphere.normalize(data.detach(), sphere_dim, on_zero=on_zero)
        self = torch.Tensor._make_subclass(cls, data, requires_grad)
        self.sphere_dim = sphere_dim
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # all work happens in __new__
        super().__init__()

    def __deepcopy__(self, memo: dict[int, Any]) -> SphereParameter:
        if id(self) in memo:
            return memo[id(self)]
        data = self.data.clone(memory_format=torch.preserve_format)
        result = SphereParameter(data, self.sphere_dim, self.requires_grad, _project=False)
        memo[id(self)] = result
        for key, value in self.__dict__.items():
            if key != "sphere_dim":
                setattr(result, key, copy.deepcopy(value, memo))
        return result

    def __reduce_ex__(self, proto: int) -> tuple[Any, ...]:
        return (_rebuild_sphere_parameter, (self.data, self.requires_grad, self.sphere_dim))

    def __repr__(self) -> str:
        return f"SphereParameter(dim={self.sphere_dim}) containing:\n{self.data!r}"


def sphere_dim_of(p: Tensor) -> int | None:
    """The sphere axis of ``p`` (a non-negative int) or ``None`` for a Euclidean tensor."""
    d = getattr(p, "sphere_dim", None)
    if d is None:
        return None
    return d % p.dim()


def sphere_(
    module: nn.Module, name: str = "weight", dim: int = -1, *, on_zero: str = "raise"
) -> nn.Module:
    """Turn ``module.<name>`` into a :class:`SphereParameter` along ``dim``, in place.

    The parameter object is kept: its class becomes :class:`SphereParameter` and its data
    are projected onto the sphere in place, so a weight tied to another module (e.g. an LM
    head sharing the embedding) stays tied, and an optimizer built before holds it still.
    ``on_zero`` as for :class:`SphereParameter`. Returns ``module`` for chaining, e.g.
    ``sphere_(nn.Linear(8, 4), dim=1)`` makes each output neuron's weight row a unit vector.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    param = module._parameters.get(name)
    if param is None:
        available = ", ".join(n for n, p in module.named_parameters(recurse=False)) or "none"
        raise ValueError(
            f"{type(module).__name__} has no registered parameter {name!r} "
            f"(its direct parameters: {available})"
        )
    if type(param) not in (nn.Parameter, SphereParameter):  # e.g. a lazy module's
        raise TypeError(
            f"sphere_ converts an nn.Parameter; {type(module).__name__}.{name} is of type "
            f"{type(param).__name__}"
        )
    # validate and project on a new object, then move its data and attributes into `param`
    # (class assignment keeps the identity the tie and the optimizer hold)
    made = SphereParameter(param.detach(), dim, param.requires_grad, on_zero=on_zero)
    with torch.no_grad():
        param.copy_(made)
    param.__class__ = SphereParameter
    param.__dict__.update(made.__dict__)
    setattr(module, name, param)  # registers the load_state_dict check on the module
    return module


def _sphere_params(params_or_module: nn.Module | Iterable[Tensor] | Tensor) -> list[Tensor]:
    if isinstance(params_or_module, nn.Module):
        params: Iterable[Tensor] = params_or_module.parameters()
    elif isinstance(params_or_module, Tensor):
        params = [params_or_module]
    else:
        params = params_or_module
    return [p for p in params if sphere_dim_of(p) is not None]


@torch.no_grad()
def renormalize_(params_or_module: nn.Module | Iterable[Tensor] | Tensor) -> int:
    """Re-project every sphere parameter (``sphere_dim`` set) onto the sphere, in place.

    Norms are computed in float32 for half types. Zero slices are left as they are (no NaN).
    Returns the number of parameters renormalized.
    """
    params = _sphere_params(params_or_module)
    for p in params:
        p.copy_(sphere.normalize(p, sphere_dim_of(p), on_zero="keep"))
    return len(params)


def to_geoopt(p: SphereParameter) -> Any:
    """Convert to ``geoopt.ManifoldParameter`` on ``geoopt.Sphere`` (needs the last axis)."""
    import geoopt

    dim = sphere_dim_of(p)
    if dim is None:
        raise TypeError("to_geoopt expects a SphereParameter (a tensor with sphere_dim)")
    if dim != p.dim() - 1:
        raise ValueError(
            f"geoopt.Sphere works on the last axis; this parameter's sphere_dim is {dim} of "
            f"{p.dim()} axes (transpose it first, e.g. p.data.movedim({dim}, -1))"
        )
    return geoopt.ManifoldParameter(
        p.data.clone(), manifold=geoopt.Sphere(), requires_grad=p.requires_grad
    )


def from_geoopt(p: Any) -> SphereParameter:
    """Convert a ``geoopt.ManifoldParameter`` on ``geoopt.Sphere`` to a :class:`SphereParameter`."""
    import geoopt

    manifold = getattr(p, "manifold", None)
    if not isinstance(manifold, geoopt.Sphere):
        raise TypeError(
            f"from_geoopt expects a geoopt.ManifoldParameter on geoopt.Sphere, got manifold "
            f"{type(manifold).__name__}"
        )
    return SphereParameter(p.data.clone(), dim=-1, requires_grad=p.requires_grad)


def _renormalize_on_load(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """``load_state_dict`` pre-hook: put incoming off-sphere slices of sphere parameters back
    on the sphere (warning), or report slices that cannot be (zero or non-finite norm)."""
    for name, p in module._parameters.items():
        key = prefix + name
        value = state_dict.get(key)
        if (
            not isinstance(p, SphereParameter)
            or not isinstance(value, Tensor)
            or value.shape != p.shape
            or not value.is_floating_point()
            or value.device.type == "meta"
            or sphere.is_dtensor(value)
        ):
            continue
        dim = p.sphere_dim
        off = float((sphere.norm(value.detach(), dim) - 1).abs().amax())
        if off <= sphere.unit_atol(value.dtype):
            continue  # on the sphere to rounding: copied bitwise
        try:
            fixed = sphere.normalize(value.detach(), dim, on_zero="raise")
        except ValueError as bad:
            error_msgs.append(f'While copying the parameter named "{key}": {bad}')
            state_dict[key] = p.detach()  # the load fails: keep the parameter as it was
            continue
        warnings.warn(
            f"load_state_dict: {key!r} has slices off the unit sphere along dim={dim} "
            f"(max |norm - 1| = {off:.3g}); loaded them renormalized",
            UserWarning,
            stacklevel=4,
        )
        state_dict[key] = fixed.to(value.dtype)


def _on_parameter_registration(module: nn.Module, name: str, param: Any) -> None:
    """Global hook: a module that gets a :class:`SphereParameter` checks it on load."""
    if not isinstance(param, SphereParameter):
        return
    hooks = module._load_state_dict_pre_hooks.values()
    if not any(getattr(h, "hook", None) is _renormalize_on_load for h in hooks):
        module.register_load_state_dict_pre_hook(_renormalize_on_load)


nn.modules.module.register_module_parameter_registration_hook(_on_parameter_registration)

# Let torch.load(weights_only=True) rebuild a pickled SphereParameter (the rebuild function only
# constructs the parameter from a tensor, a bool and an int).
torch.serialization.add_safe_globals([SphereParameter, _rebuild_sphere_parameter])
