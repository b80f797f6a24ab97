"""What a report request yields while it runs, and the settings it runs with.

A :class:`ReportStream` is the caller's end of one request to the
:class:`~medgemma_deploy.worker.engine.scheduler.ReportScheduler`: ``Admitted`` once the prompt is
prefilled, ``Tokens`` as they are chosen, then ``Finished`` — or ``Failed`` with the reason.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from medgemma_deploy.worker.engine.queue_thread import QueueObserver

__all__ = [
    "STREAM_MISMATCH_WARNING",
    "Admitted",
    "Event",
    "Failed",
    "Finished",
    "ReportStream",
    "SchedulerObserver",
    "Tokens",
]


#: The warning of a streamed report whose pieces do not concatenate to the final text (invalid
#: byte sequences from a byte-fallback tokenizer); a report that was not streamed never has it.
STREAM_MISMATCH_WARNING = "the streamed text differs from the final text; use the final text"


@dataclass(frozen=True)
class Admitted:
    """The request left the queue: prefilled (in ``prefill_seconds``, its first token chosen) and
    decoding with ``running`` others."""

    n_prompt_tokens: int
    queue_seconds: float
    running: int
    prefill_seconds: float = 0.0


@dataclass(frozen=True)
class Tokens:
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" or "length"
    n_generated_tokens: int
    seconds: float
    mean_batch_size: float


@dataclass(frozen=True)
class Failed:
    error: BaseException


Event = Admitted | Tokens | Finished | Failed


class SchedulerObserver(QueueObserver, Protocol):
    """What the scheduler reports (implemented by the worker's metrics): its queue, and tokens."""

    def tokens_generated(self, count: int) -> None: ...


class ReportStream:
    """The caller's end of one request: iterate events, or cancel."""

    def __init__(self) -> None:
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Drop the request (queued or running); its slot is freed at the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event, or ``None`` if none came within ``timeout`` seconds."""
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def __iter__(self) -> Iterator[Event]:
        """Events until (and including) ``Finished``; a ``Failed`` event raises its error."""
        while True:
            event = self._events.get()
            if isinstance(event, Failed):
                raise event.error
            yield event
            if isinstance(event, Finished):
                return

    def emit(self, event: Event) -> None:
        self._events.put(event)
