"""Geometry of the unit hypersphere: the one home of sphere math in spheretorch.

* :mod:`.functional` -- points and tangent vectors (normalize, project, retract, expmap,
  logmap, dist, transport, random, ...);
* ``.unit`` -- the hot-path normalizer :func:`unit`;
* :mod:`.series` -- functions with removable singularities (sinc, cos_sinc_sq, atanc_sq);
* :mod:`.checks` -- argument checks and the one half-precision policy (:func:`compute_dtype`);
* :mod:`.foreach` -- the same operations on lists of tensors (``_foreach`` ops);
* :mod:`.dtensor` -- DTensor-aware reductions (FSDP2);
* :mod:`.residual` -- nGPT's slerp residual step (the formulas of
  ``spheretorch::slerp_residual``; not re-exported here);
* :mod:`.layout` -- sphere axes (one axis, adjacent axes, the whole tensor) as one
  ``(outer, size, inner)`` view.

Every function of :mod:`.functional` takes ``dim`` as an int, a tuple of adjacent axes or
``None`` (the whole tensor: the Frobenius sphere), and a ``radius`` keyword.

Models, optimizers, :mod:`spheretorch.geodesic` and :mod:`spheretorch.parameter` use only the
names exported here (and :mod:`.foreach`).
"""

from . import foreach
from .checks import (
    UPCAST_DTYPES,
    check_floating,
    check_same_shape,
    check_sphere_dim,
    check_sphere_dims,
    compute_dtype,
    upcast,
)
from .dtensor import global_value, is_dtensor, zeros_per_slice
from .functional import (
    angle,
    antipodal_direction,
    check_radius,
    check_unit,
    dist,
    expmap,
    geodesic_frame,
    inner,
    logmap,
    norm,
    normalize,
    project,
    random,
    retract,
    transport,
    unit_atol,
)
from .layout import SphereLayout, canonical_sphere_dims, sphere_layout
from .series import atanc_sq, cos_sinc_sq, sinc, sqrt0
from .unit import unit

# Old private spellings, kept for code written against v0.1.
_atanc_sq = atanc_sq
_cos_sinc_sq = cos_sinc_sq
_up = upcast

__all__ = [
    "UPCAST_DTYPES",
    "SphereLayout",
    "angle",
    "antipodal_direction",
    "atanc_sq",
    "canonical_sphere_dims",
    "check_floating",
    "check_radius",
    "check_same_shape",
    "check_sphere_dim",
    "check_sphere_dims",
    "check_unit",
    "compute_dtype",
    "cos_sinc_sq",
    "dist",
    "expmap",
    "foreach",
    "geodesic_frame",
    "global_value",
    "inner",
    "is_dtensor",
    "logmap",
    "norm",
    "normalize",
    "project",
    "random",
    "retract",
    "sinc",
    "sphere_layout",
    "sqrt0",
    "transport",
    "unit",
    "unit_atol",
    "upcast",
    "zeros_per_slice",
]
