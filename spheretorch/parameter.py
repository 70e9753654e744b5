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


def _rebuild_sphere_parameter(
    data: Tensor,
    requires_grad: bool,
    sphere_dim: int | tuple[int, ...],
    sphere_radius: float = 1.0,
) -> Any:
    """Unpickling hook: rebuild without re-projecting (the data were saved on the sphere).
    ``sphere_radius`` is absent from files saved before spheres of other radii existed."""
    p = SphereParameter.__new__(
        SphereParameter, data, sphere_dim, requires_grad, radius=sphere_radius, _project=False
    )
    return p


class SphereParameter(nn.Parameter):
    r"""A parameter constrained to the unit sphere along ``dim`` (or to one sphere of radius
    :math:`\|x\|`: ``dim=None``).

    Each slice ``x[..., :, ...]`` along ``dim`` satisfies :math:`\|x\| = 1`. The data are
    projected at construction (:math:`x \leftarrow x / \|x\|`); after that, keeping them on the
    sphere is the optimizer's job (:class:`spheretorch.optim.RiemannianAdam`,
    :class:`spheretorch.optim.RenormAdam`, :class:`spheretorch.optim.RiemannianSGD`) or
    :func:`~spheretorch.parameter.renormalize_`'s.

    Args:
        data: floating-point tensor of any shape with at least one axis.
        dim: the sphere axes (``.dim()`` stays torch's method), stored as ``.sphere_dim``:

            * an int (or NumPy int): the slices along that axis are unit vectors;
              ``.sphere_dim`` is the non-negative int;
            * a tuple of adjacent axes, e.g. ``(1, 2, 3)`` for a conv weight ``(out, in, kh,
              kw)``: each ``x[o]`` (the axes flattened) is one unit vector; ``.sphere_dim`` is
              the ascending tuple (an int for a one-element tuple);
            * ``None``: the whole tensor is one point on the sphere of radius
              :math:`\|x\|_F` (the hyperball recipe: the weight's norm is kept, its
              direction learned); ``.sphere_dim`` is the tuple of every axis (the int 0 for a
              1-D tensor) and ``.sphere_radius`` the norm.
        requires_grad: as for ``nn.Parameter``.
        on_zero: a slice of zero norm raises (``"raise"``) or becomes the fixed point
            :math:`e_0` (``"fixed"``, e.g. an embedding's all-zero padding row).
        radius: keyword, the radius of every sphere (``.sphere_radius``, a float): default 1,
            and :math:`\|x\|_F` at construction for ``dim=None``. The optimizers keep it.

    Raises:
        TypeError: non-floating dtype or ``dim`` not an int, a tuple of ints or None.
        ValueError: ``dim`` out of range or not adjacent axes, a slice of zero norm, NaN/inf
            entries, or a non-positive ``radius``.

    The class, ``sphere_dim`` and ``sphere_radius`` survive ``copy.deepcopy``, ``pickle``,
    ``torch.save`` /
    ``torch.load``, ``Module.to()`` and ``Module.load_state_dict``. When
    ``Module.load_state_dict`` brings slices whose norm is off 1 by more than the dtype's
    tolerance (:func:`spheretorch.sphere.check_unit`), they are renormalized and a
    ``UserWarning`` names the key; slices with zero or non-finite norm fail the load
    (torch's ``RuntimeError``, naming the key). Values within the tolerance are copied
    bitwise (a resumed run stays exact). A parameter that is one sphere of radius other than
    1 (``dim=None``) takes the norm of the loaded tensor as its ``sphere_radius`` (the radius
    is part of the weights; a state dict stores only tensors). A module's ``state_dict``
    holds plain tensors, so ``torch.load(..., weights_only=True)`` reads it. (Only
    ``load_state_dict(..., assign=True)`` loses the class: torch then replaces every parameter
    object with a plain ``nn.Parameter``; load without ``assign`` to copy into the existing one.)
    """

    sphere_dim: int | tuple[int, ...]
    sphere_radius: float

    def __new__(
        cls,
        data: Tensor | None = None,
        dim: int | tuple[int, ...] | None = -1,
        requires_grad: bool = True,
        *,
        on_zero: str = "raise",
        radius: float | None = None,
        _project: bool = True,
    ) -> SphereParameter:
        if data is None:
            raise TypeError("SphereParameter needs data: a floating-point tensor")
        sphere.check_floating(data, "data")
        sphere_dim = sphere.check_sphere_dims(data, dim, "dim", min_size=2)
        if on_zero not in ("raise", "fixed"):  # "keep" would leave a zero slice off the sphere
            raise ValueError(f"on_zero must be 'raise' or 'fixed', got {on_zero!r}")
        if radius is not None:
            radius = sphere.check_radius(radius)
        elif dim is None and data.is_meta:
            radius = 1.0  # no values to measure: a meta build has unit radius
        elif dim is None:
            norm = float(sphere.norm(data.detach(), sphere_dim).flatten()[0])
            if not (0 < norm < float("inf")):
                raise ValueError(
                    f"SphereParameter(dim=None) takes its radius from the data's norm, which "
                    f"is {norm}; pass data with a finite non-zero norm (or radius=)"
                )
            radius = norm
        else:
            radius = 1.0
        if _project and not data.is_meta:  # a meta tensor has no values to project
            with torch.no_grad():
                data = sphere.normalize(data.detach(), sphere_dim, on_zero=on_zero, radius=radius)
        self = torch.Tensor._make_subclass(cls, data, requires_grad)
        self.sphere_dim = sphere_dim
        self.sphere_radius = radius
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # all work happens in __new__
        super().__init__()

    def __deepcopy__(self, memo: dict[int, Any]) -> SphereParameter:
        if id(self) in memo:
            return memo[id(self)]
        data = self.data.clone(memory_format=torch.preserve_format)
        result = SphereParameter(
            data,
            self.sphere_dim,
            self.requires_grad,
            radius=self.sphere_radius,
            _project=False,
        )
        memo[id(self)] = result
        for key, value in self.__dict__.items():
            if key not in ("sphere_dim", "sphere_radius"):
                setattr(result, key, copy.deepcopy(value, memo))
        return result

    def __reduce_ex__(self, proto: int) -> tuple[Any, ...]:
        args = (self.data, self.requires_grad, self.sphere_dim, self.sphere_radius)
        return (_rebuild_sphere_parameter, args)

    def __repr__(self) -> str:
        r = getattr(self, "sphere_radius", 1.0)
        radius = "" if r == 1.0 else f", radius={r:g}"
        return f"SphereParameter(dim={self.sphere_dim}{radius}) containing:\n{self.data!r}"


def sphere_dim_of(p: Tensor) -> int | tuple[int, ...] | None:
    """The sphere axes of ``p`` (a non-negative int, or an ascending tuple of adjacent axes) or
    ``None`` for a Euclidean tensor. Its radius: ``getattr(p, "sphere_radius", 1.0)``."""
    d = getattr(p, "sphere_dim", None)
    if d is None:
        return None
    if isinstance(d, int):
        return d % p.dim()
    return sphere.canonical_sphere_dims(p.dim(), d, "sphere_dim")


def sphere_(
    module: nn.Module,
    name: str = "weight",
    dim: int | tuple[int, ...] | None = -1,
    *,
    on_zero: str = "raise",
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
    Each goes back to its own radius (``sphere_radius``, default 1).
    Returns the number of parameters renormalized.
    """
    params = _sphere_params(params_or_module)
    for p in params:
        r = getattr(p, "sphere_radius", 1.0)
        p.copy_(sphere.normalize(p, sphere_dim_of(p), on_zero="keep", radius=r))
    return len(params)


def to_geoopt(p: SphereParameter) -> Any:
    """Convert to ``geoopt.ManifoldParameter`` on ``geoopt.Sphere`` (needs the last axis)."""
    import geoopt

    dim = sphere_dim_of(p)
    if dim is None:
        raise TypeError("to_geoopt expects a SphereParameter (a tensor with sphere_dim)")
    radius = getattr(p, "sphere_radius", 1.0)
    if not isinstance(dim, int) or radius != 1.0:
        raise ValueError(
            f"geoopt.Sphere is the unit sphere along the last axis; this parameter's spheres "
            f"span dim={dim} with radius {radius:g} (to_geoopt takes one axis, radius 1)"
        )
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
        r = p.sphere_radius
        n = sphere.norm(value.detach(), dim)
        if r != 1.0 and n.numel() == 1:
            # one sphere whose radius is not 1 (SphereParameter(x, dim=None)): the radius is a
            # property of the weights, so the loaded tensor's norm becomes the radius
            adopted = float(n)
            if 0 < adopted < float("inf"):
                p.sphere_radius = adopted
                continue
        off = float((n / r - 1).abs().amax())
        if off <= sphere.unit_atol(value.dtype):
            continue  # on the sphere to rounding: copied bitwise
        try:
            fixed = sphere.normalize(value.detach(), dim, on_zero="raise", radius=r)
        except ValueError as bad:
            error_msgs.append(f'While copying the parameter named "{key}": {bad}')
            state_dict[key] = p.detach()  # the load fails: keep the parameter as it was
            continue
        warnings.warn(
            f"load_state_dict: {key!r} has slices off the "
            f"{'unit sphere' if r == 1.0 else f'sphere of radius {r:g}'} along dim={dim} "
            f"(max |norm / radius - 1| = {off:.3g}); loaded them renormalized",
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
