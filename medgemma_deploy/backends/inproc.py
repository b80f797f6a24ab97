"""MedGemma in this process, through the worker's decode core (vLLM's ``InprocClient``).

:class:`InprocMedGemma` is what ``--backend local`` gives at every precision. It owns a
:class:`~medgemma_deploy.worker.engine.report_service.ReportService` over a
:class:`~medgemma_deploy.operators.medgemma.runner.MedGemmaRunner` (torch: auto, fp32, bf16) or a
:class:`~medgemma_deploy.operators.medgemma.gguf_runner.GgufMedGemmaRunner` (llama.cpp: int8,
int4), whose scheduler thread
:meth:`~InprocMedGemma.load` starts and :meth:`~InprocMedGemma.close` stops, and drafts a report
with the calls the worker's GenerateReport makes: ``prepare``, ``submit``, then
``ReportService.outputs`` for the streamed pieces and the result. An in-process report and a worker
report therefore come from one decode loop and one assembly of the result: parity by construction.

Several threads may call :meth:`~InprocMedGemma.generate` at once; their reports decode together
in one batch (on llama.cpp, up to the runner's ``n_parallel``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import closing

import torch

from medgemma_deploy.domain import ModelIdentity, ModelLifecycle, ReportRequest, ReportResult
from medgemma_deploy.operators.medgemma.gguf_runner import GgufMedGemmaRunner
from medgemma_deploy.operators.medgemma.runner import MedGemmaRunner
from medgemma_deploy.worker.engine.report_service import ReportDelta, ReportDone, ReportService

__all__ = ["InprocMedGemma"]


class InprocMedGemma(ModelLifecycle):
    """MedGemma's ``ReportModel`` in this process: a runner behind the continuous-batching core.

    Parameters
    ----------
    runner:
        A ``MedGemmaRunner`` or ``GgufMedGemmaRunner`` (loaded or not); the client owns it from now
        on and closes it.
    max_running:
        Reports decoded together when several threads generate at once.
    stop_timeout:
        Seconds :meth:`close` lets reports still running finish before failing them.

    Examples
    --------
    >>> with InprocMedGemma(MedGemmaRunner(model_dir)) as medgemma:   # doctest: +SKIP
    ...     result = medgemma.generate(request, on_token=print)
    """

    def __init__(
        self,
        runner: MedGemmaRunner | GgufMedGemmaRunner,
        *,
        max_running: int = 8,
        stop_timeout: float = 30.0,
    ) -> None:
        self.runner = runner
        self.max_running = max_running
        self.stop_timeout = stop_timeout
        self._service: ReportService | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"InprocMedGemma({self.runner.model_dir})"

    @property
    def identity(self) -> ModelIdentity:
        return self.runner.identity

    @property
    def is_loaded(self) -> bool:
        return self._service is not None

    @property
    def service(self) -> ReportService:
        """The running core (after :meth:`load`)."""
        service = self._service
        if service is None:
            raise RuntimeError(f"{self!r} is not loaded: call load() or use it in a with block")
        return service

    def load(self) -> InprocMedGemma:
        """Load the model (once) and start the decode loop's thread.

        Raises
        ------
        ModelLoadError
            As ``MedGemmaRunner.load``.
        """
        with self._lock:
            if self._service is None:
                self.runner.load()
                service = ReportService(self.runner, max_running=self.max_running)
                service.start()
                self._service = service
        return self

    def close(self) -> None:
        """Stop the decode loop (its thread ends) and free the model; :meth:`load` may follow."""
        with self._lock:
            service, self._service = self._service, None
            if service is not None:
                service.stop(self.stop_timeout)
            self.runner.close()

    def generate(
        self, request: ReportRequest, *, on_token: Callable[[str], None] | None = None
    ) -> ReportResult:
        """Draft the report of one request.

        Parameters
        ----------
        request:
            Messages, prompt id and settings, from ``build_report_request``.
        on_token:
            Called with each new piece of decoded text while generating (the pieces concatenate
            to ``ReportResult.text``). An exception raised by it (``KeyboardInterrupt`` included)
            cancels the report in the scheduler and propagates.

        Raises
        ------
        InputError
            The processor refuses the messages, or the prompt (images and text) is longer than the
            model's context; ``source`` is ``request.source``.
        RuntimeError
            The client is not loaded, or the device ran out of memory (the message names the
            series and the prompt size).
        """
        if not isinstance(request, ReportRequest):
            raise TypeError(f"request must be a ReportRequest, got {type(request).__name__}")
        service = self.service
        with service.arriving():
            prepared = service.prepare(request)
            stream = service.submit(prepared)
        outputs = service.outputs(prepared, stream, stream_text=on_token is not None)
        try:
            with closing(outputs):
                for output in outputs:
                    if isinstance(output, ReportDelta) and output.text and on_token is not None:
                        on_token(output.text)
                    elif isinstance(output, ReportDone):
                        return output.result
        except torch.cuda.OutOfMemoryError as exc:
            raise RuntimeError(
                f"out of GPU memory drafting the report of {request.source}: {prepared.prompt.n_tokens} "
                f"prompt tokens ({request.n_images} images) + {prepared.max_new_tokens} new tokens"
            ) from exc
        raise RuntimeError(f"{request.source}: the report ended without a result")  # pragma: no cover
