"""SIGINT and SIGTERM during training: finish the step in flight, checkpoint, stop (the trainer
then reports ``interrupted``); a second Ctrl-C stops at once (checkpoints stay atomic)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["StopSignals"]


class StopSignals:
    """While :meth:`catching`, SIGINT/SIGTERM only record the signal in ``received``, which the
    training loop checks after every step."""

    def __init__(self) -> None:
        self.received: int | None = None

    @contextlib.contextmanager
    def catching(self, enabled: bool = True) -> Iterator[None]:
        self.received = None
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if signum == signal.SIGINT and self.received is not None:
                raise KeyboardInterrupt  # the second Ctrl-C
            self.received = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    @property
    def name(self) -> str:
        """The signal's name; SIGTERM when another rank got it (torchrun forwards signals)."""
        return signal.Signals(self.received or signal.SIGTERM).name
