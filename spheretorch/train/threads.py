"""How many CPU threads a command computes with: ``--threads``, else the preset's, else the
cores that are idle now.

torch's default (one thread per physical core) assumes the machine is ours alone. On a shared
machine every busy core makes a thread wait for it, and a run slowed down five to ten times by
oversubscription is common (two cores with other load: 2.4 s per step with torch's default, 0.5
s with one thread). So without ``--threads`` and without a preset's count, a command takes
``torch's default - the 1-minute load average`` threads, at least 1 (``docs/quickstart.md``);
with ``OMP_NUM_THREADS`` set (by the user, or by ``torchrun``), torch's default as it is.
The same count goes to the tokenizers' Rust thread pool (``RAYON_NUM_THREADS``) for
``prepare``.
"""

from __future__ import annotations

import logging
import os

import torch

__all__ = ["default_threads", "set_threads"]

logger = logging.getLogger(__name__)


def _cores() -> int:
    """Logical CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_threads() -> tuple[int, str]:
    """The thread count for a machine's present load, and why (for a notice): torch's default
    (physical cores) less the busy ones (the 1-minute load average, rounded), at least 1;
    torch's default as it is when ``OMP_NUM_THREADS`` is set."""
    full = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):  # chosen by the user (or torchrun: 1 per rank)
        return full, "OMP_NUM_THREADS"
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - no load average (Windows)
        return full, "torch's default"
    idle = _cores() - round(load)
    n = max(1, min(full, idle))
    return n, f"{_cores()} CPUs, load {load:.1f}"


def set_threads(requested: int | None = None, preset: int | None = None) -> int:
    """Set torch's (and the tokenizers') thread count: ``requested`` (``--threads``), else
    ``preset``, else :func:`default_threads`; returns the count."""
    full = torch.get_num_threads()
    n = requested or preset
    if n is None:
        n, why = default_threads()
        if n < full:  # debug only: a notice would be a second line beside every error
            logger.debug("using %d CPU threads of %d (%s)", n, full, why)
    torch.set_num_threads(n)
    os.environ.setdefault("RAYON_NUM_THREADS", str(n))
    return n
