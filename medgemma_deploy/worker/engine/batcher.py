"""Dynamic batching for Classify and Embed: concurrent requests coalesced into model batches.

Triton's dynamic batcher, in plain Python. Requests queue with a cost (their image count); one
thread takes them in arrival order until the batch holds ``max_batch_size`` images or the oldest
request has waited ``max_queue_delay`` seconds, then runs the batch. The wait is adaptive: it ends
as soon as as many requests are queued as the previous batch held, so a lone client (batches of
one) never pays the delay, and N steady clients wait only until all N are back; the first batch
after start waits the full delay, as it has nothing to go by. Then:

* requests whose client went away or whose deadline passed are dropped before any model work
  (a cancelled client frees its place at once);
* the taken requests are split into groups whose ``group_key`` is equal (same label set, same
  outputs) and each group is one model call (``run_group``), which returns one result or one
  exception per request, in order (Triton's "one response per request");
* if a whole group call fails, each request of the group is retried alone, so one bad request
  fails alone and everyone else is still answered;
* the queue is bounded in images: :meth:`MicroBatcher.submit` raises
  :class:`~medgemma_deploy.worker.engine.errors.QueueFullError` instead of queueing unbounded work.

A request larger than ``max_batch_size`` runs alone (the model runner splits it into its own
micro-batches).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from medgemma_deploy.worker.engine.errors import (
    DeadlineExpiredError,
    NotReadyError,
    QueueFullError,
    RequestCancelledError,
)
from medgemma_deploy.worker.engine.queue_thread import QueueObserver, QueueThread

__all__ = ["BatchedRequest", "MicroBatcher"]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class BatchedRequest:
    """One queued request and the future its caller waits on."""

    payload: Any
    cost: int
    group_key: Hashable
    deadline: float | None
    is_cancelled: Callable[[], bool]
    future: Future = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    #: Images in the batch this request ran in (reported back to the client).
    batch_size: int = 0
    compute_seconds: float = 0.0

    def cancel(self) -> None:
        """The client went away: drop the request if it has not started."""
        if not self.future.done() and self.started_at is None:
            self.future.set_exception(RequestCancelledError("the client cancelled the request"))


RunGroup = Callable[[Sequence[BatchedRequest]], Sequence[Any]]


class MicroBatcher(QueueThread):
    """A bounded request queue and the thread that runs it in batches.

    Parameters
    ----------
    name:
        Queue name used in logs, metrics and ``QueueFullError`` messages (``classify``, ``embed``).
    run_group:
        Runs requests with equal ``group_key`` as one model call; returns, per request and in
        order, a result or an ``Exception`` instance for that request alone.
    max_batch_size:
        Images per batch (≥ 1).
    max_queue_delay:
        Seconds the oldest request may wait for the batch to fill (≥ 0).
    max_queued:
        Images allowed to wait; more raise ``QueueFullError``.
    observer:
        Receives queue-wait, batch-size and depth measurements.
    """

    def __init__(
        self,
        name: str,
        run_group: RunGroup,
        *,
        max_batch_size: int,
        max_queue_delay: float,
        max_queued: int,
        observer: QueueObserver | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_queue_delay < 0:
            raise ValueError(f"max_queue_delay must be at least 0 s, got {max_queue_delay}")
        if max_queued < 1:
            raise ValueError(f"max_queued must be at least 1, got {max_queued}")
        super().__init__(name, f"batcher-{name}", observer)
        self.run_group = run_group
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay
        self.max_queued = max_queued
        self._queue: deque[BatchedRequest] = deque()
        self._queued_cost = 0
        #: Requests in the previous batch: how many to wait for before the delay is up
        #: (``None`` until a first batch ran).
        self._expected_requests: int | None = None

    @property
    def queued(self) -> int:
        """Images waiting (not yet in a batch)."""
        with self._condition:
            return self._queued_cost

    def submit(
        self,
        payload: Any,
        *,
        cost: int,
        group_key: Hashable,
        deadline: float | None = None,
        is_cancelled: Callable[[], bool] = lambda: False,
    ) -> BatchedRequest:
        """Queue a request; wait on ``request.future`` for its result.

        Raises
        ------
        QueueFullError
            Accepting ``cost`` more images would exceed ``max_queued``.
        NotReadyError
            The batcher is not started or is draining.
        """
        request = BatchedRequest(
            payload=payload,
            cost=max(1, cost),
            group_key=group_key,
            deadline=deadline,
            is_cancelled=is_cancelled,
        )
        with self._condition:
            self._check_accepting()
            if self._queue and self._queued_cost + request.cost > self.max_queued:
                raise QueueFullError(self.name, self.max_queued, "images")
            self._queue.append(request)
            self._queued_cost += request.cost
            depth = self._queued_cost
            self._condition.notify_all()
        if self.observer is not None:
            self.observer.queue_depth(self.name, depth)
        return request

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, finish what is queued (up to ``timeout`` s), then end the thread.

        Requests still queued after the timeout fail with ``NotReadyError``.
        """
        thread = self._stop_accepting()
        if thread is None:
            return
        deadline = time.monotonic() + timeout
        with self._condition:
            self._drain(deadline)
            leftovers = list(self._queue)
            self._queue.clear()
            self._queued_cost = 0
        for request in leftovers:
            _fail(request, NotReadyError("the worker shut down before this request ran; retry"))
        self._join(thread, max(1.0, deadline - time.monotonic()))

    def _has_work(self) -> bool:
        return bool(self._queue)

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[BatchedRequest] | None:
        with self._condition:
            while not self._queue:
                if self._stopping:
                    return None
                self._condition.wait(timeout=0.1)
            # Fill: wait until the batch is full, or as many requests are queued as the last batch
            # held (the clients seen last time are back), or the oldest has waited long enough.
            fill_until = self._queue[0].enqueued_at + self.max_queue_delay
            while (
                self._queued_cost < self.max_batch_size
                and (self._expected_requests is None or len(self._queue) < self._expected_requests)
                and self._accepting
                and (remaining := fill_until - time.monotonic()) > 0
            ):
                self._condition.wait(timeout=remaining)
            batch: list[BatchedRequest] = []
            size = 0
            while self._queue and (not batch or size + self._queue[0].cost <= self.max_batch_size):
                request = self._queue.popleft()
                self._queued_cost -= request.cost
                batch.append(request)
                size += request.cost
            self._expected_requests = len(batch)
            depth = self._queued_cost
            self._condition.notify_all()
        if self.observer is not None:
            self.observer.queue_depth(self.name, depth)
        return batch

    def _run(self, batch: list[BatchedRequest]) -> None:
        now = time.monotonic()
        live: list[BatchedRequest] = []
        for request in batch:
            if request.future.done():  # cancelled while queued
                continue
            if request.is_cancelled():
                _fail(request, RequestCancelledError("the client cancelled the request"))
            elif request.deadline is not None and now >= request.deadline:
                _fail(
                    request,
                    DeadlineExpiredError(f"deadline passed after {now - request.enqueued_at:.3f} s in queue"),
                )
            else:
                request.started_at = now
                live.append(request)
                if self.observer is not None:
                    self.observer.queue_wait(self.name, now - request.enqueued_at)
        groups: dict[Hashable, list[BatchedRequest]] = {}
        for request in live:
            groups.setdefault(request.group_key, []).append(request)
        for group in groups.values():
            self._run_group(group)

    def _run_group(self, group: list[BatchedRequest]) -> None:
        started = time.monotonic()
        size = sum(request.cost for request in group)
        try:
            results = list(self.run_group(group))
            if len(results) != len(group):
                raise RuntimeError(f"run_group returned {len(results)} results for {len(group)} requests")
        except Exception as exc:  # isolate the culprit: retry each request alone below
            if len(group) == 1:
                logger.warning("%s request failed: %s", self.name, exc)
                _fail(group[0], exc)
                return
            logger.warning(
                "%s batch of %d requests failed (%s); retrying each alone", self.name, len(group), exc
            )
            for request in group:
                self._run_group([request])
            return
        seconds = time.monotonic() - started
        if self.observer is not None:
            self.observer.batch_done(self.name, size, seconds)
        for request, result in zip(group, results, strict=True):
            request.batch_size = size
            request.compute_seconds = seconds
            if isinstance(result, Exception):
                _fail(request, result)
            elif not request.future.done():
                request.future.set_result(result)


def _fail(request: BatchedRequest, error: BaseException) -> None:
    if not request.future.done():
        request.future.set_exception(error)
