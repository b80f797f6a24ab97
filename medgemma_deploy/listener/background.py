"""The threads behind the job runner and the HL7 outbox: do the next due piece of work, else sleep.

Both keep their work in the job store with a ``not_before`` time, so an idle thread need not poll
fast: it sleeps until the earliest due time (or the poll interval, whichever comes first), and a
producer that queues new work calls :meth:`DueWorkThreads.wake`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

__all__ = ["DueWorkThreads"]

logger = logging.getLogger(__name__)


class DueWorkThreads:
    """Threads that call ``step`` until stopped.

    A step that raises is logged and the thread carries on: a database hiccup must not stop the
    work for good.

    Parameters
    ----------
    names:
        One thread per name.
    step:
        Does one piece of due work; returns False when there was none.
    next_due:
        The epoch time at which the next piece of work falls due, or None.
    idle_poll_s:
        The longest an idle thread sleeps before looking again.
    """

    def __init__(
        self,
        names: Sequence[str],
        step: Callable[[], bool],
        next_due: Callable[[], float | None],
        *,
        idle_poll_s: float,
    ) -> None:
        self.names = tuple(names)
        self.step = step
        self.next_due = next_due
        self.idle_poll_s = idle_poll_s
        self._wake = threading.Condition()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for name in self.names:
            thread = threading.Thread(target=self._run, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        """Tell idle threads that new work may be due."""
        with self._wake:
            self._wake.notify_all()

    def stop(self, timeout_s: float) -> bool:
        """Start nothing new; wait up to ``timeout_s`` in all for running steps. True if all threads ended."""
        self._stopping.set()
        self.wake()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                worked = self.step()
            except Exception:  # keep the thread alive (see the class docstring)
                logger.exception("%s: iteration failed", threading.current_thread().name)
                worked = False
            if not worked:
                self._idle()

    def _idle(self) -> None:
        due = self.next_due()
        wait = self.idle_poll_s if due is None else min(self.idle_poll_s, max(0.01, due - time.time()))
        with self._wake:
            if not self._stopping.is_set():
                self._wake.wait(wait)
