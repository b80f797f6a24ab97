"""Threads on their way to a leader that batches their work.

The listener's group commit and the worker's report scheduler both cut a batch when work is
queued, and both would cut it a moment too early if a thread that is still preparing its item (writing
the file, tokenising the prompt) were not counted: the leader waits, up to its window, while
:attr:`Arrivals.count` says more is coming. One count, guarded by the leader's own condition, so
that the wait and the count never disagree.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Arrivals"]


class Arrivals:
    """How many threads are inside :meth:`coming`, under ``condition`` (the leader's)."""

    def __init__(self, condition: threading.Condition) -> None:
        self._condition = condition
        #: Threads preparing work they will queue soon; read it with ``condition`` held.
        self.count = 0

    @contextmanager
    def coming(self) -> Iterator[None]:
        """Count this thread while it prepares and queues its work; wake the leader when it leaves."""
        with self._condition:
            self.count += 1
        try:
            yield
        finally:
            with self._condition:
                self.count -= 1
                self._condition.notify_all()
