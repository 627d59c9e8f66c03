"""Ctrl-C and SIGTERM delivered only where a trial can be failed cleanly.

Optuna marks a trial failed when the objective raises, but an interrupt that lands in `ask` (after the trial row
is written) or in `tell` (while its value is written) leaves the trial RUNNING in the storage for good. While a
search runs, the two signals raise `KeyboardInterrupt` inside the objective only; anywhere else they are held and
raised at the next safe point: the start of the next trial (which Optuna then fails and we queue again) or the
return of `optimize` (after the finished trial is stored).
"""

from __future__ import annotations

import contextlib
import signal
import threading


class SafePoints:
    """Holds interrupts outside the objective. `inside()` wraps the objective; `check()` raises a held one.

    >>> points = SafePoints()
    >>> with points.installed():
    ...     points.held = True  # as if a signal had come between two trials
    ...     try:
    ...         points.check()
    ...     except KeyboardInterrupt:
    ...         print("raised at the safe point")
    raised at the safe point
    """

    def __init__(self):
        self.held = False
        self._inside = False

    def _handle(self, signum, frame):
        if self._inside:
            raise KeyboardInterrupt
        self.held = True

    def check(self) -> None:
        if self.held:
            self.held = False
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def inside(self):
        self.check()
        self._inside = True
        try:
            yield
        finally:
            self._inside = False

    @contextlib.contextmanager
    def installed(self):
        """Hold SIGINT and SIGTERM while the block runs (main thread only: elsewhere signals never arrive)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s, handler in previous.items():
            if callable(handler):  # a Python handler that raises; SIG_DFL and SIG_IGN keep their meaning
                signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        self.check()
