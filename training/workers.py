"""Data-loading worker processes that never outlive their run and never hold up its exit.

torch's DataLoader workers are daemon processes of the process that reads the data (training,
evaluation, calibration). Three rules keep an error or a signal from leaving one behind, or
leaving the main process waiting on one after it printed its error:

- A stop signal (SIGTERM, SIGINT) sent to the whole job -- a scheduler's SIGTERM, Ctrl-C at a
  terminal, torchrun's forwarding to a process group -- is left to the main process, which
  finishes its step and then closes the workers (:mod:`training.signals`): a worker killed by it
  would fail the step it feeds. The same signal sent by the main process itself ends the worker:
  it is how torch's shutdown and Python's exit handler (``multiprocessing``'s, which terminates
  daemon children, then joins them) stop a worker that did not stop when asked, e.g. one blocked
  reading a file. A worker that ignored it outright kept its parent in that join forever. (The
  sender is known on Linux, from ``sigwaitinfo``; elsewhere workers ignore both signals.)
- A worker dies with the thread that started it (Linux's parent-death signal): a main process
  killed outright (SIGKILL, a lost machine, SIGTERM in a command without handlers) leaves none.
- A loop over a loader shuts its workers down when it ends, by an error too (:func:`running`),
  not when the iterator is collected: an exception's traceback keeps the iterator alive until
  the interpreter exits, and torch's own shutdown does nothing once exit has begun.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
from typing import Iterable, Iterator

from torch.utils.data import DataLoader

from .signals import STOP_SIGNALS, die_with_parent


def worker_init(parent: int) -> functools.partial:
    """The ``worker_init_fn`` of a loader created by process ``parent`` (this one)."""
    return functools.partial(_start_worker, parent)


def loader(dataset, **options) -> DataLoader:
    """A DataLoader whose workers follow the module's rules."""
    return DataLoader(dataset, worker_init_fn=worker_init(os.getpid()), **options)


@contextlib.contextmanager
def running(batches: Iterable) -> Iterator[Iterator]:
    """An iterator over ``batches`` (a DataLoader) whose workers are shut down when the block
    ends, however it ends."""
    iterator = iter(batches)
    try:
        yield iterator
    finally:
        shut_down(iterator)


def shut_down(iterator) -> None:
    """Stop the workers of a DataLoader iterator now (a no-op without workers)."""
    if hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


def _start_worker(parent: int, worker_id: int) -> None:
    die_with_parent(parent)
    if not hasattr(signal, "sigwaitinfo"):  # macOS: no sender to tell apart; leave them all to the parent
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # the thread below takes them instead
    threading.Thread(target=_stop_when_parent_asks, args=(parent,), name="zoo-stop-signals", daemon=True).start()


def _stop_when_parent_asks(parent: int) -> None:
    while True:
        received = signal.sigwaitinfo(STOP_SIGNALS)
        if received.si_pid == parent:
            os._exit(0)  # as a worker told to stop by its queue does: torch takes another code for a crash
