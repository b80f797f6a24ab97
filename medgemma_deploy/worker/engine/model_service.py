"""What the worker's two model services share: a loaded runner behind one queue thread."""

from __future__ import annotations

from typing import Any

from medgemma_deploy.domain import ModelIdentity
from medgemma_deploy.worker.engine.queue_thread import QueueThread

__all__ = ["ModelService"]


class ModelService:
    """A loaded model behind one :class:`~medgemma_deploy.worker.engine.queue_thread.QueueThread`.

    :class:`~medgemma_deploy.worker.engine.image_service.ImageService` (MedSigLIP behind the
    dynamic batcher) and :class:`~medgemma_deploy.worker.engine.report_service.ReportService`
    (MedGemma behind the report scheduler): the worker names, starts and stops either alike.
    """

    #: Seconds :meth:`stop` lets queued work finish when the caller gives no timeout.
    stop_timeout: float = 30.0

    def __init__(self, runner: Any, queue: QueueThread) -> None:
        self.runner = runner
        self._queue = queue

    @property
    def identity(self) -> ModelIdentity:
        return self.runner.identity

    def start(self) -> None:
        self._queue.start()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new work, let queued work finish (up to ``timeout`` s, :attr:`stop_timeout` by
        default), then end the queue's thread."""
        self._queue.stop(self.stop_timeout if timeout is None else timeout)
