"""``UserError``: a mistake in what the user asked for (bad flag, missing file, bad text).

The command line prints its message on one line to stderr and exits with status 2, without a
traceback. Library callers get an ordinary ``ValueError`` subclass.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """A user-facing error with a one-line message."""
