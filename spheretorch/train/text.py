"""How a count is written in messages: ``count(1, "step")`` is "1 step", ``count(2, "step")``
"2 steps" (the one place that knows English plurals, so no message says "1 steps")."""

from __future__ import annotations

__all__ = ["count"]


def count(n: int | float, noun: str, plural: str | None = None, fmt: str = "") -> str:
    """``n`` (formatted with ``fmt``, e.g. ``","``) and ``noun``, plural unless ``n == 1``
    (``plural`` when the plural is not ``noun + "s"``)."""
    return f"{n:{fmt}} {noun if n == 1 else (plural or noun + 's')}"
