"""Geometry of the unit hypersphere: the one home of sphere math in spheretorch.

Public names are re-exported here; models, optimizers, :mod:`spheretorch.geodesic`,
:mod:`spheretorch.parameter` and :mod:`spheretorch.distributed` use only these.
"""

from .functional import *  # noqa: F403
from .functional import __all__ as _functional_all
from .functional import (  # noqa: F401  (semi-public helpers used inside the package)
    _atanc_sq,
    _cos_sinc_sq,
    _up,
    check_floating,
    check_same_shape,
    geodesic_frame,
)

__all__ = list(_functional_all)
