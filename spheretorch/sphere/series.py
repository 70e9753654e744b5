r"""Functions with a removable singularity at 0, smooth to every order there.

Below a dtype-dependent threshold each switches to its Taylor series inside ``torch.where``
with sanitised inputs, so neither branch produces a NaN value or gradient. The ``*_sq``
forms take the *squared* argument: polynomials in :math:`z^2 = \|u\|^2` are smooth in the
vector :math:`u` at 0 (going through :math:`\|u\|` gives wrong second derivatives there).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["atanc_sq", "cos_sinc_sq", "sinc", "sqrt0"]


def _series_threshold(dtype: torch.dtype) -> float:
    # Below this the series are exact to the last ulp (sinc: truncation z^8 / 9!) while the
    # closed forms' derivatives would lose digits to cancellation.
    return 1e-2 if dtype == torch.float64 else 0.25


def sinc(theta: Tensor) -> Tensor:
    r"""Unnormalised sinc :math:`\sin\theta / \theta` with :math:`\mathrm{sinc}(0) = 1`.

    Series :math:`1 - \theta^2/6 + \theta^4/120 - \theta^6/5040` for small :math:`|\theta|`.
    """
    small = theta.abs() < _series_threshold(theta.dtype)
    safe = torch.where(small, torch.ones_like(theta), theta)
    t2 = theta * theta
    series = 1 - t2 / 6 * (1 - t2 / 20 * (1 - t2 / 42))
    return torch.where(small, series, torch.sin(safe) / safe)


def sqrt0(z2: Tensor) -> Tensor:
    r""":math:`\sqrt{z_2}` for :math:`z_2 \ge 0` with a finite (zero) gradient at 0."""
    pos = z2 > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, z2, torch.ones_like(z2))), 0.0)


def cos_sinc_sq(n2: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(cos(n), sinc(n))`` for :math:`n = \sqrt{n_2}`, from the squared norm :math:`n_2`.

    Series truncation errors :math:`n^{10}/10!` and :math:`n^8/9!`, below the last ulp.
    """
    thr = _series_threshold(n2.dtype)
    small = n2 < thr * thr
    n = torch.sqrt(torch.where(small, torch.ones_like(n2), n2))
    cos_series = 1 - n2 / 2 * (1 - n2 / 12 * (1 - n2 / 30 * (1 - n2 / 56)))
    sinc_series = 1 - n2 / 6 * (1 - n2 / 20 * (1 - n2 / 42))
    return (
        torch.where(small, cos_series, torch.cos(n)),
        torch.where(small, sinc_series, torch.sin(n) / n),
    )


def atanc_sq(z2: Tensor) -> Tensor:
    r""":math:`\arctan(z)/z` for :math:`z = \sqrt{z_2}`, 1 at 0.

    The series' coefficients decay only like :math:`1/(2k+1)`, so it needs six terms
    (truncation :math:`z^{12}/13`) to be exact to the last ulp below the threshold.
    """
    thr = _series_threshold(z2.dtype)
    small = z2 < thr * thr
    z = torch.sqrt(torch.where(small, torch.ones_like(z2), z2))
    series = 1 - z2 * (1 / 3 - z2 * (1 / 5 - z2 * (1 / 7 - z2 * (1 / 9 - z2 / 11))))
    return torch.where(small, series, torch.atan(z) / z)
