"""Group commit: concurrent C-STOREs share their fsyncs and their job-store commit.

Making one instance durable costs an fsync of its file, an fsync of its folder and a SQLite commit
(a WAL fsync). Paid per instance, that caps ingest; shared, it does not. Each C-STORE handler
writes its file (no fsync) and hands it to :meth:`GroupCommitter.commit`, which blocks until that
instance is durable. The first caller to find no commit under way becomes the *leader*: it waits a
few milliseconds for the other handlers that are still writing (never when none is), takes every
instance queued, fsyncs their files, renames them into place, fsyncs each folder once and records
their rows in one transaction, then wakes the *followers* whose instances it committed. No thread
of its own, so there is nothing to start or stop.

The durability rule is unchanged: ``commit`` returns only once the file and the row are on disk,
so Success is still sent only for durable instances. If any step of a batch fails, ``commit``
raises in every caller of that batch and none of them is answered Success.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

from medgemma_deploy.arrivals import Arrivals
from medgemma_deploy.listener.jobmodel import NewInstance, RecordOutcome
from medgemma_deploy.listener.jobstore import JobStore
from medgemma_deploy.listener.spool import PendingFile, Spool

__all__ = ["CommitObserver", "GroupCommitter"]

logger = logging.getLogger(__name__)


class CommitObserver(Protocol):
    """Told about each batch the committer made durable (tests count them; metrics could)."""

    def batch_committed(self, size: int, seconds: float) -> None: ...


@dataclass(eq=False)
class _Ticket:
    """One instance waiting to be made durable, and what became of it."""

    pending: PendingFile
    instance: NewInstance
    done: bool = False
    outcome: RecordOutcome | None = None
    error: BaseException | None = field(default=None)

    def result(self) -> RecordOutcome:
        if self.error is not None:
            raise self.error
        assert self.outcome is not None  # done without error means recorded
        return self.outcome


class GroupCommitter:
    """Makes spooled instances durable in shared batches (see the module docstring).

    Parameters
    ----------
    spool, store:
        Where the files and the rows go.
    window_s:
        How long a leader waits for handlers that are still writing their files to join its batch.
        It waits only while such handlers exist, so a lone association never pays it.
    max_batch:
        Instances per batch at most (bounds how long one transaction holds the store).
    observer:
        Told the size and duration of every batch.
    """

    def __init__(
        self,
        spool: Spool,
        store: JobStore,
        *,
        window_s: float = 0.003,
        max_batch: int = 64,
        observer: CommitObserver | None = None,
    ) -> None:
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0, got {window_s}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.spool, self.store = spool, store
        self.window_s = float(window_s)
        self.max_batch = int(max_batch)
        self.observer = observer
        self._condition = threading.Condition()
        self._queue: deque[_Ticket] = deque()
        self._leading = False
        #: Handlers inside :meth:`writing`: they will call :meth:`commit` soon.
        self._writers = Arrivals(self._condition)

    @property
    def queued(self) -> int:
        """Instances waiting for a batch (not yet taken by a leader)."""
        with self._condition:
            return len(self._queue)

    def writing(self) -> AbstractContextManager[None]:
        """Wrap writing a file and committing it, so a leader knows to wait for this handler."""
        return self._writers.coming()

    def commit(self, pending: PendingFile, instance: NewInstance) -> RecordOutcome:
        """Make ``pending`` durable and record ``instance``; return once both are on disk.

        Raises
        ------
        OSError, sqlite3.Error
            The batch this instance was in failed (its file is not durable and its row is not
            recorded; the temporary file is removed, a renamed one is left to the caller).
        """
        ticket = _Ticket(pending, instance)
        with self._condition:
            self._queue.append(ticket)
            self._condition.notify_all()  # a leader in its window may be waiting for this one
            while not ticket.done:
                if not self._leading:
                    self._leading = True
                    break
                self._condition.wait()
            else:
                return ticket.result()
        try:
            while not ticket.done:
                self._lead_one_batch()
        finally:
            with self._condition:
                self._leading = False
                self._condition.notify_all()  # the next leader, if instances are still queued
        return ticket.result()

    def _lead_one_batch(self) -> None:
        with self._condition:
            deadline = time.monotonic() + self.window_s
            # Wait while handlers are still writing and have not queued yet; a lone one never waits.
            while len(self._queue) < min(self._writers.count, self.max_batch):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._condition.wait(remaining)
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch))]
        started = time.monotonic()
        try:
            self.spool.make_durable([ticket.pending for ticket in batch])
            outcomes = self.store.record_instances([ticket.instance for ticket in batch])
        except BaseException as exc:  # every caller of the batch must hear of it, whatever it is
            logger.error("group commit of %d instance(s) failed: %s", len(batch), exc)
            for ticket in batch:
                ticket.error = exc
        else:
            for ticket, outcome in zip(batch, outcomes, strict=True):
                ticket.outcome = outcome
            if self.observer is not None:
                self.observer.batch_committed(len(batch), time.monotonic() - started)
        with self._condition:
            for ticket in batch:
                ticket.done = True
            self._condition.notify_all()
