r"""Optimizers for parameters on the sphere.

* :class:`RiemannianAdam` -- Riemannian gradient, moments in the tangent space, retraction and
  transported momentum; by default step-for-step :class:`geoopt.optim.RiemannianAdam`.
* :class:`RenormAdam` -- torch's Adam/AdamW on every parameter, then sphere parameters
  renormalised (the nGPT recipe); :class:`RenormAdamW`, the same with AdamW's defaults.
* :class:`RiemannianSGD` -- SGD with (Nesterov) momentum on the sphere, torch's conventions.

A parameter is on the sphere when :func:`spheretorch.optim._functional.sphere_of` says so (a
:class:`~spheretorch.SphereParameter`, or any tensor with a ``sphere_dim``: one axis, adjacent
axes, or the whole tensor, of radius ``sphere_radius``, default 1); the others
get exactly torch's Adam/AdamW/SGD step in the same optimizer. Each optimizer is a thin
:class:`torch.optim.Optimizer` over a functional core
(:func:`spheretorch.optim.riemannian_adam.riemannian_adam`,
:func:`spheretorch.optim.renorm_adam.renorm_adam`,
:func:`spheretorch.optim.riemannian_sgd.riemannian_sgd`, as ``torch.optim.adam.adam``) with a
single-tensor and a multi-tensor (``_foreach``) implementation; the latter is the default on
CPU and CUDA.

Beyond Adam (:mod:`.sphere_steps` holds their formulas, reusable by the classes above):

* :class:`SphereMuon` -- Muon's orthogonalized momentum on sphere parameters (row spheres and
  the whole-tensor Frobenius sphere), steps whose angle is the learning rate; Euclidean
  matrices get torch.optim.Muon's step, the rest torch's AdamW;
* :class:`AdamH` -- hyperball Adam: weight norm and update norm fixed per sphere.
"""

from . import sphere_steps
from .adamh import AdamH
from .optimizer import (
    NONFINITE_POLICIES,
    NonfiniteGradientWarning,
    NonfinitePolicy,
    SphereOptimizer,
)
from .renorm_adam import RenormAdam, RenormAdamW
from .riemannian_adam import RiemannianAdam
from .riemannian_sgd import RiemannianSGD
from .sphere_muon import SphereMuon

__all__ = [
    "NONFINITE_POLICIES",
    "AdamH",
    "NonfiniteGradientWarning",
    "NonfinitePolicy",
    "RenormAdam",
    "RenormAdamW",
    "RiemannianAdam",
    "RiemannianSGD",
    "SphereMuon",
    "SphereOptimizer",
    "sphere_steps",
]
