"""Why a worker request failed, as plain exceptions (no gRPC here).

The servicer maps each class to one gRPC status in a single table
(:data:`medgemma_deploy.worker.edge.servicer.STATUS_TABLE`); the remote client maps statuses back, so
an app sees the same exception whichever backend it used. Messages are one line, name the field or
the queue, and never contain patient data.
"""

from __future__ import annotations

__all__ = [
    "BadRequestError",
    "DeadlineExpiredError",
    "ModelNotAvailableError",
    "NotReadyError",
    "QueueFullError",
    "RequestCancelledError",
    "ServingError",
]


class ServingError(Exception):
    """Base class of the worker's request errors."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class BadRequestError(ServingError):
    """A request field is invalid: the client must change the request (INVALID_ARGUMENT).

    Parameters
    ----------
    field:
        The field path, e.g. ``images[3]`` or ``label_set.findings[0].positive_prompts``.
    reason:
        What is wrong and what is allowed.
    """

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class QueueFullError(ServingError):
    """A bounded queue is full; retry later or elsewhere (RESOURCE_EXHAUSTED)."""

    def __init__(self, queue: str, capacity: int, unit: str) -> None:
        self.queue = queue
        self.capacity = capacity
        super().__init__(f"{queue} queue is full ({capacity} {unit} waiting); retry with backoff")


class NotReadyError(ServingError):
    """The worker is loading or draining; retry with backoff (UNAVAILABLE)."""


class ModelNotAvailableError(ServingError):
    """The model this call needs is not configured or failed to load (FAILED_PRECONDITION)."""

    def __init__(self, kind: str, reason: str) -> None:
        self.kind = kind
        super().__init__(f"{kind}: {reason}")


class DeadlineExpiredError(ServingError):
    """The request's deadline passed before its work was done (DEADLINE_EXCEEDED)."""


class RequestCancelledError(ServingError):
    """The client went away; its work was dropped (CANCELLED)."""
