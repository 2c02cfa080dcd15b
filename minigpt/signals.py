"""Ctrl-C and SIGTERM as requests to stop: the first asks the work to stop at a safe point, a second SIGINT aborts.

The training loop checks `StopSignals.received` after each step and saves before it stops.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager


class StopSignals:
    """Turn the first SIGINT/SIGTERM into a request to stop after the current step; a second SIGINT aborts."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop at once
        self.received = signum

    @contextmanager
    def installed(self):
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            pass
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
