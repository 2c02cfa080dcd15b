"""Ctrl-C and SIGTERM as requests to stop: the first asks the work to stop at a safe point, a second SIGINT aborts.

The training loop checks `StopSignals.received` after each step and saves before it stops; a
second Ctrl-C there raises `SecondInterrupt`. Outside the loop a Ctrl-C is Python's plain
KeyboardInterrupt; `stopped_while` names the work it interrupted, for the one-line message.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager


class SecondInterrupt(KeyboardInterrupt):
    """A second Ctrl-C during training, after the first asked it to stop: stop at once, without saving."""


@contextmanager
def stopped_while(doing: str, outcome: str):
    """Name the work in this block for a Ctrl-C that interrupts it: `stopped by SIGINT (Ctrl-C) while DOING: OUTCOME`.

    The innermost name wins; it travels on the KeyboardInterrupt as `exc.stopped_while`."""
    try:
        yield
    except KeyboardInterrupt as exc:
        if not hasattr(exc, "stopped_while"):
            exc.stopped_while = (doing, outcome)
        raise


class StopSignals:
    """Turn the first SIGINT/SIGTERM into a request to stop after the current step; a second SIGINT aborts."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise SecondInterrupt  # second Ctrl-C: stop at once
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
