"""SIGTERM and SIGINT during a run: finish the step, checkpoint, stop; a second signal stops at once.

Cluster schedulers send SIGTERM before they stop a job and Ctrl-C sends SIGINT. While the
training loop runs, the first signal is only recorded (:attr:`StopSignals.requested`): the
loop finishes its step, writes a checkpoint and returns. Outside the loop (setting up,
the final evaluation) there is no step to finish, and a second signal means "now": both raise
:class:`Interrupted` at once, which leaves the previous checkpoint as it was (it is replaced
only by an atomic rename).

A signal that arrives within :data:`DUPLICATE_WINDOW_S` of the previous one is the same request
delivered twice, not a second one: Ctrl-C reaches every process of a terminal's foreground
group, and torch's launcher (torchrun, which ``--nproc-per-node`` runs) forwards it to its
workers as well.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
DUPLICATE_WINDOW_S = 1.0
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Interrupted(Exception):
    """The run was stopped at once by a signal; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int, message: str | None = None):
        super().__init__(message or f"stopped at once by {signal_name(signum)}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def die_with_parent(parent: int) -> None:
    """Have Linux kill this process (SIGKILL) when the thread that started it ends; exit now if
    ``parent``, whose child this is, already ended. Elsewhere, nothing."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


class StopSignals:
    """Handle SIGTERM and SIGINT for the duration of a ``with`` block (main thread only).

    Set :attr:`deferring` while a step can be finished cleanly; the loop polls :attr:`requested`.
    """

    def __init__(self) -> None:
        self.requested: int | None = None
        self.deferring = False
        self._last_at: float | None = None  # when the last signal that counted arrived
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        if self._last_at is not None:  # let a duplicate still on its way arrive here, not kill the caller
            time.sleep(max(0.0, self._last_at + DUPLICATE_WINDOW_S - time.monotonic()))
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self._last_at is not None and now - self._last_at < DUPLICATE_WINDOW_S:
            return
        first = self._last_at is None
        self._last_at = now
        if first and self.deferring:
            self.requested = signum
            return
        raise Interrupted(signum)
