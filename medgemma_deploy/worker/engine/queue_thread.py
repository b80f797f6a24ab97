"""What the dynamic batcher and the report scheduler share: a request queue served by one thread.

Both accept work only between :meth:`QueueThread.start` and ``stop``, and stop in the same three
steps: refuse new work (:meth:`QueueThread._stop_accepting`), let the thread finish what is queued
or running, up to a deadline, then tell it to end (:meth:`QueueThread._drain`), and join it. What
happens to work still left at the deadline is each queue's own: the batcher fails its queued
requests at once, the scheduler's thread fails its reports as it ends.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

from medgemma_deploy.worker.engine.errors import NotReadyError

__all__ = ["QueueObserver", "QueueThread"]


class QueueObserver(Protocol):
    """What a queue reports, by its name (implemented by the worker's metrics)."""

    def queue_wait(self, queue: str, seconds: float) -> None: ...

    def batch_done(self, queue: str, size: int, seconds: float) -> None: ...

    def queue_depth(self, queue: str, depth: int) -> None: ...


class QueueThread:
    """The accepting → draining → stopped lifecycle of a queue and the daemon thread serving it.

    Subclasses implement :meth:`_loop` (the thread's body: it returns once ``_stopping`` is set)
    and :meth:`_has_work` (whether anything is queued or running), and guard their queues with
    ``_condition``, notifying it whenever work arrives or finishes.
    """

    def __init__(self, name: str, thread_name: str, observer: QueueObserver | None) -> None:
        #: The queue's name in logs, metrics and errors (``medsiglip``, ``report``).
        self.name = name
        self.observer = observer
        self._thread_name = thread_name
        self._condition = threading.Condition()
        self._accepting = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._condition:
            if self._thread is not None:
                return
            self._accepting = True
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name=self._thread_name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float) -> None:
        """Refuse new work, let queued work finish (up to ``timeout`` s), then end the thread."""
        raise NotImplementedError

    def _loop(self) -> None:
        raise NotImplementedError

    def _has_work(self) -> bool:
        """Whether anything is queued or running (called holding ``_condition``)."""
        raise NotImplementedError

    def _check_accepting(self) -> None:
        """Refuse work outside start … stop (called holding ``_condition``).

        Raises
        ------
        NotReadyError
            The queue is not started or is draining.
        """
        if not self._accepting:
            raise NotReadyError(f"the {self.name} queue is not accepting work (worker loading or draining)")

    def _stop_accepting(self) -> threading.Thread | None:
        """Refuse new work from now on; the serving thread (None when it never started)."""
        with self._condition:
            self._accepting = False
            self._condition.notify_all()
            return self._thread

    def _drain(self, deadline: float) -> None:
        """Wait until no work is left or ``deadline`` passes, then tell the thread to end.

        Called holding ``_condition``, so that a caller can take what is still queued before the
        thread sees ``_stopping``.
        """
        while self._has_work() and time.monotonic() < deadline:
            self._condition.wait(timeout=0.05)
        self._stopping = True
        self._condition.notify_all()

    def _join(self, thread: threading.Thread, timeout: float) -> None:
        thread.join(timeout=timeout)
        self._thread = None
