"""``UserError``: a mistake in what the user asked for (bad flag, missing file, bad text).

The command line prints its message on one line to stderr and exits with status 2, without a
traceback. Library callers get an ordinary ``ValueError`` subclass.
"""

from __future__ import annotations

__all__ = ["TrainingDiverged", "UserError"]


class UserError(ValueError):
    """A user-facing error with a one-line message."""


class TrainingDiverged(RuntimeError):
    """Training stopped because the loss or the gradients were non-finite at
    ``TrainConfig.max_bad_steps`` consecutive steps (see :class:`~spheretorch.train.Trainer`).

    The command line prints its one-line message and exits with status 1.
    """
