"""MedGemma behind the continuous-batching scheduler: the one decode core of every torch report.

:class:`ReportService` drafts reports with a loaded
:class:`~medgemma_deploy.operators.medgemma.runner.MedGemmaRunner` and the
:class:`~medgemma_deploy.worker.engine.scheduler.ReportScheduler`. It is vLLM's ``EngineCore`` for
MedGemma: the gRPC worker (``worker/edge/servicer.py``, GenerateReport) and the in-process client
(:class:`~medgemma_deploy.backends.inproc.InprocMedGemma`, what ``--backend local`` runs) both call
the same three steps, so a report drafted in process and one drafted by a worker come from one
decode loop and one assembly of the result:

1. :meth:`ReportService.prepare`: the runner's processor and chat template build the prompt
   (``runner.prepare_inputs``), the runner's ``token_budget`` fits ``max_new_tokens`` to the
   context (or refuses a prompt that fills it) and its ``effective_settings`` fill in the
   checkpoint's sampling defaults;
2. :meth:`ReportService.submit`: the scheduler prefills and decodes it (greedy, or the request's
   own seeded sampling), stopping at the runner's end-of-turn tokens or at the budget;
3. :meth:`ReportService.outputs`: the request's events become streamed text pieces and, at the end,
   the :class:`~medgemma_deploy.domain.ReportResult` (:meth:`ReportService.finish`: final text and
   the warnings for an empty draft, a draft cut at ``max_new_tokens`` and a stream that differs from
   the final text).

Greedy tokens equal plain transformers ``model.generate`` on the same processor inputs (tested on
the tiny model, in process and through the worker). Prompt building (image processing) runs on
the calling thread, in parallel with the decode loop; only prefill and decoding run on the
scheduler's thread.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from medgemma_deploy.domain import GenerationSettings, ReportRequest, ReportResult
from medgemma_deploy.operators.medgemma.gguf_runner import GgufMedGemmaRunner
from medgemma_deploy.operators.medgemma.runner import MedGemmaRunner
from medgemma_deploy.worker.engine.decode import DecodeBatch, PreparedPrompt, SequenceBatch
from medgemma_deploy.worker.engine.errors import BadRequestError
from medgemma_deploy.worker.engine.events import (
    STREAM_MISMATCH_WARNING,
    Admitted,
    Event,
    Finished,
    ReportStream,
    SchedulerObserver,
    Tokens,
)
from medgemma_deploy.worker.engine.gguf_decode import GgufDecodeBatch
from medgemma_deploy.worker.engine.model_service import ModelService
from medgemma_deploy.worker.engine.scheduler import ReportScheduler

__all__ = [
    "IncrementalDetokenizer",
    "PreparedReport",
    "ReportDelta",
    "ReportDone",
    "ReportOutput",
    "ReportService",
]

logger = logging.getLogger(__name__)


@dataclass
class PreparedReport:
    """A validated, tokenised report request, ready for the scheduler.

    ``settings`` are the effective ones (checkpoint sampling defaults filled in), ``max_new_tokens``
    the budget fitted to the context, ``warnings`` the request's own followed by the budget's.
    """

    request: ReportRequest
    prompt: PreparedPrompt
    settings: GenerationSettings
    max_new_tokens: int
    warnings: list[str] = field(default_factory=list)
    preprocess_seconds: float = 0.0


@dataclass(frozen=True)
class ReportDelta:
    """New text of a running report and the token ids it came from (a final flush has no ids)."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class ReportDone:
    """The finished report, with how long it queued and the mean batch it decoded in."""

    result: ReportResult
    queue_seconds: float
    mean_batch_size: float


#: What :meth:`ReportService.outputs` yields: ``Admitted`` once, ``ReportDelta``s, one ``ReportDone``.
ReportOutput = Admitted | ReportDelta | ReportDone


class IncrementalDetokenizer:
    """Text pieces from token ids as they come, concatenating to the decoding of all ids.

    Decode everything so far, pass on the new suffix, and hold it back while it ends in an
    incomplete UTF-8 sequence (byte-fallback tokens of a multi-byte character); :meth:`flush`
    passes on whatever is left at the end.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._token_ids: list[int] = []
        self.text = ""

    def push(self, token_ids: Sequence[int]) -> str:
        self._token_ids.extend(int(token) for token in token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        text = self._tokenizer.decode(self._token_ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return ""
        if text.startswith(self.text) and len(text) > len(self.text):
            piece = text[len(self.text) :]
            self.text = text
            return piece
        return ""


class ReportService(ModelService):
    """Report generation for many concurrent clients on one loaded MedGemma.

    Parameters
    ----------
    runner:
        A loaded ``MedGemmaRunner`` (torch: its model decodes in a ``DecodeBatch``) or
        ``GgufMedGemmaRunner`` (llama.cpp, ``--precision int4|int8``: a ``GgufDecodeBatch``); its
        processor, stop tokens and rules either way.
    max_running, max_waiting, max_cached_tokens, max_prefills_per_step:
        See :class:`~medgemma_deploy.worker.engine.scheduler.ReportScheduler`. On llama.cpp,
        ``max_running`` is capped at the runner's ``n_parallel`` (its sequence ids) and
        ``max_cached_tokens`` at its KV cache (``n_ctx`` cells, shared by all sequences).
    default_max_new_tokens, max_new_tokens:
        Budget when a request gives none, and the most a request may ask for.
    """

    runner: MedGemmaRunner | GgufMedGemmaRunner
    stop_timeout = 60.0

    def __init__(
        self,
        runner: MedGemmaRunner | GgufMedGemmaRunner,
        *,
        max_running: int = 32,
        max_waiting: int = 64,
        max_cached_tokens: int = 0,
        max_prefills_per_step: int = 8,
        default_max_new_tokens: int = 512,
        max_new_tokens: int = 2048,
        observer: SchedulerObserver | None = None,
    ) -> None:
        self.default_max_new_tokens = default_max_new_tokens
        self.max_new_tokens = max_new_tokens
        device = torch.device(runner.device or "cpu")
        batch: SequenceBatch
        if isinstance(runner, MedGemmaRunner):
            pad_token_id = int(runner.processor.tokenizer.pad_token_id or 0)
            batch = DecodeBatch(runner.model, device, pad_token_id=pad_token_id)
        else:
            batch = GgufDecodeBatch(runner)
            max_running = min(max_running, runner.n_parallel)
            cells = runner.kv_cells
            max_cached_tokens = min(max_cached_tokens, cells) if max_cached_tokens else cells
        self.scheduler = ReportScheduler(
            batch,
            device=device,
            eos_token_ids=runner.eos_token_ids,
            suppress_token_ids=runner.suppress_token_ids,
            max_running=max_running,
            max_waiting=max_waiting,
            max_cached_tokens=max_cached_tokens,
            max_prefills_per_step=max_prefills_per_step,
            observer=observer,
        )
        super().__init__(runner, self.scheduler)

    @property
    def max_context_tokens(self) -> int:
        return int(self.runner.context_length or 0)

    def warm_up(self) -> None:
        """A two-token report with an image, through prefill and one batched decode step."""
        started = time.monotonic()
        image = Image.fromarray(np.full((32, 32, 3), 128, np.uint8), "RGB")
        messages = [
            {
                "role": "user",
                "content": [{"type": "image", "image": image}, {"type": "text", "text": "Warm-up."}],
            }
        ]
        request = ReportRequest.for_chat(messages, GenerationSettings(max_new_tokens=2), source="warm-up")
        for _ in self.submit(self.prepare(request)):
            pass
        logger.info("MedGemma warm-up took %.2f s", time.monotonic() - started)

    def prepare(self, request: ReportRequest) -> PreparedReport:
        """Tokenise the chat with the runner's processor and fit the token budget to the context.

        Raises
        ------
        InputError
            The processor refuses the messages, or the prompt alone fills the model's context;
            ``source`` is ``request.source``.
        """
        started = time.perf_counter()
        inputs = dict(self.runner.prepare_inputs(request))
        input_ids = torch.as_tensor(inputs.pop("input_ids"))
        if "pixel_values" in inputs and isinstance(self.runner, MedGemmaRunner):
            inputs["pixel_values"] = inputs["pixel_values"].to(self.runner.model.dtype)
        warnings = list(request.warnings)
        budget = self.runner.token_budget(request, int(input_ids.shape[1]), warnings)
        effective = self.runner.effective_settings(request.settings)
        return PreparedReport(
            request,
            PreparedPrompt(input_ids, inputs),
            effective,
            budget,
            warnings,
            preprocess_seconds=time.perf_counter() - started,
        )

    def arriving(self) -> AbstractContextManager[None]:
        """Wrap preparing and submitting a report (see :meth:`ReportScheduler.arriving`)."""
        return self.scheduler.arriving()

    def submit(self, prepared: PreparedReport, *, deadline: float | None = None) -> ReportStream:
        """Queue a prepared report (raises ``QueueFullError`` / ``NotReadyError`` / ``BadRequestError``)."""
        try:
            # The effective settings, with the token budget fitted to the context.
            settings = dataclasses.replace(prepared.settings, max_new_tokens=prepared.max_new_tokens)
            return self.scheduler.submit(prepared.prompt, settings, deadline=deadline)
        except ValueError as exc:
            raise BadRequestError("settings", str(exc)) from exc

    def outputs(
        self,
        prepared: PreparedReport,
        stream: ReportStream,
        *,
        stream_text: bool = True,
        coalesce: bool = False,
        on_idle: Callable[[], None] | None = None,
        poll_s: float = 0.25,
    ) -> Iterator[ReportOutput]:
        """What a submitted report gives its client: the one place where the scheduler's events
        become text pieces and the :class:`ReportResult` (the worker's GenerateReport and the
        in-process client both iterate it).

        Yields ``Admitted`` as the scheduler sent it, a :class:`ReportDelta` per ``Tokens`` event
        (decoded token by token by an :class:`IncrementalDetokenizer`; its pieces concatenate to
        the final text), a last ``ReportDelta`` with the text held back until the end, if any, then
        one :class:`ReportDone` (:meth:`finish`) and stops. A ``Failed`` event raises its error.

        Parameters
        ----------
        stream_text:
            Decode text pieces as tokens come (else deltas carry token ids only, and the result
            has no stream-mismatch warning: nothing was streamed).
        coalesce:
            Put the ``Tokens`` events already waiting into one delta (a slow reader, such as a
            network client, gets fewer, larger deltas).
        on_idle:
            Called whenever no event came for ``poll_s`` seconds; it may raise to give up (the
            client went away).

        Stopping early (closing the iterator, or an exception from ``on_idle`` or thrown in by
        the caller) cancels the request in the scheduler, which frees its row at the next step.
        """
        decoder = IncrementalDetokenizer(self.runner.processor.tokenizer) if stream_text else None
        generated: list[int] = []
        queue_seconds = prefill_seconds = 0.0
        ended = False
        pending: Event | None = None
        try:
            while True:
                event, pending = pending or stream.next_event(timeout=poll_s), None
                if event is None:
                    if on_idle is not None:
                        on_idle()
                elif isinstance(event, Admitted):
                    queue_seconds, prefill_seconds = event.queue_seconds, event.prefill_seconds
                    yield event
                elif isinstance(event, Tokens):
                    ids: list[int] = []
                    pieces: list[str] = []
                    while isinstance(event, Tokens):
                        ids.extend(event.token_ids)
                        if decoder is not None:
                            pieces.append(decoder.push(event.token_ids))
                        event = stream.next_event(timeout=0) if coalesce else None
                    pending = event
                    generated.extend(ids)
                    yield ReportDelta("".join(pieces), tuple(ids))
                elif isinstance(event, Finished):
                    ended = True
                    tail = decoder.flush() if decoder is not None else ""
                    if tail:
                        yield ReportDelta(tail, ())
                    result = self.finish(
                        prepared,
                        generated,
                        event,
                        streamed_text=decoder.text if decoder is not None else None,
                        first_token_seconds=prefill_seconds,
                    )
                    yield ReportDone(result, queue_seconds, event.mean_batch_size)
                    return
                else:  # Failed: the request already left the scheduler
                    ended = True
                    raise event.error
        finally:
            if not ended:
                stream.cancel()

    def finish(
        self,
        prepared: PreparedReport,
        token_ids: Sequence[int],
        finished: Finished,
        *,
        streamed_text: str | None = None,
        first_token_seconds: float = 0.0,
    ) -> ReportResult:
        """The result of a finished report: final text, figures and warnings.

        The warnings are the prepared ones, then, in this order: :data:`STREAM_MISMATCH_WARNING`
        when ``streamed_text`` (what the streamed pieces concatenate to; None when nothing was
        streamed) is not the final text, an empty draft, and a draft cut at ``max_new_tokens``.
        """
        text = self.runner.processor.tokenizer.decode(list(token_ids), skip_special_tokens=True)
        warnings = list(prepared.warnings)
        if streamed_text is not None and streamed_text != text:
            warnings.append(STREAM_MISMATCH_WARNING)
        if not text.strip():
            warnings.append(
                f"MedGemma generated no text ({len(token_ids)} token(s), "
                f"finish reason {finished.finish_reason}); "
                "there is no draft to report"
            )
        if finished.finish_reason == "length":
            warnings.append(
                f"cut off at max_new_tokens={prepared.max_new_tokens}: the draft may be incomplete"
            )
        request, seconds, n_generated = prepared.request, finished.seconds, len(token_ids)
        result = ReportResult(
            text=text,
            token_ids=[int(token) for token in token_ids],
            n_prompt_tokens=prepared.prompt.n_tokens,
            n_generated_tokens=n_generated,
            finish_reason="stop" if finished.finish_reason == "stop" else "length",
            seconds=seconds,
            tokens_per_second=n_generated / seconds if seconds > 0 else 0.0,
            settings=prepared.settings,
            prompt_id=request.prompt_id,
            prompt_version=request.prompt_version,
            preprocess_seconds=prepared.preprocess_seconds,
            warnings=warnings,
            engine_parameters=self.runner.engine_parameters,
            first_token_seconds=first_token_seconds,
        )
        logger.info(
            "%s: %d prompt tokens (%d images), %d generated in %.2f s (%.1f tok/s), finish %s",
            request.source,
            result.n_prompt_tokens,
            request.n_images,
            n_generated,
            seconds,
            result.tokens_per_second,
            result.finish_reason,
        )
        return result
