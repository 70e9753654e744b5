"""spheretorch: learning on the hypersphere with PyTorch.

* :mod:`spheretorch.sphere` -- geometry (normalize, project, retract, expmap, logmap, ...).
* :mod:`spheretorch.geodesic` -- residual ops (slerp, nlerp, geodesic_update).
* :class:`SphereParameter` -- a parameter with unit-norm slices along ``sphere_dim``.
* :mod:`spheretorch.optim` -- RiemannianAdam, RenormAdam, RiemannianSGD.
"""

from . import geodesic, models, optim, sphere
from .parameter import (
    SphereParameter,
    from_geoopt,
    renormalize_,
    sphere_,
    sphere_dim_of,
    to_geoopt,
)

__version__ = "0.2.0"

__all__ = [
    "SphereParameter",
    "__version__",
    "from_geoopt",
    "geodesic",
    "models",
    "optim",
    "renormalize_",
    "sphere",
    "sphere_",
    "sphere_dim_of",
    "to_geoopt",
]
