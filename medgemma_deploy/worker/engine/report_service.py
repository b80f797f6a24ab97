"""MedGemma behind the continuous-batching scheduler: prompts in, streamed report text out.

:class:`ReportService` uses the same :class:`~medgemma_deploy.operators.medgemma.runner.MedGemmaRunner`
as the in-process pipeline for everything but the decode loop: the runner's processor and chat
template build the prompt (``runner.prepare_inputs``), its end-of-turn tokens stop a report, and
its rules for context limits, decoding and warnings are mirrored here, so a report drafted by the
worker is the one the runner would have drafted (greedy tokens and text are tested equal).

The context budget and the checkpoint's sampling defaults come from the runner's public
``token_budget`` and ``effective_settings``, and the result warnings repeat the runner's two
messages; the parity tests compare tokens, text and warnings with ``MedGemmaRunner.generate``
so that any drift fails a test.

Prompt building (image processing) runs on the calling RPC thread, in parallel with the decode
loop; only prefill and decoding run on the scheduler's thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from medgemma_deploy.domain import GenerationSettings, ModelIdentity, ReportRequest
from medgemma_deploy.operators.medgemma.runner import MedGemmaRunner
from medgemma_deploy.worker.engine.decode import PreparedPrompt
from medgemma_deploy.worker.engine.errors import BadRequestError
from medgemma_deploy.worker.engine.events import (
    STREAM_MISMATCH_WARNING,
    Finished,
    ReportStream,
    SamplingSettings,
    SchedulerObserver,
)
from medgemma_deploy.worker.engine.scheduler import ReportScheduler

__all__ = [
    "IncrementalDetokenizer",
    "PreparedReport",
    "ReportService",
]

logger = logging.getLogger(__name__)


@dataclass
class PreparedReport:
    """A validated, tokenised report request, ready for the scheduler."""

    prompt: PreparedPrompt
    settings: GenerationSettings
    max_new_tokens: int
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FinishedText:
    text: str
    warnings: list[str]


class IncrementalDetokenizer:
    """Text pieces from token ids as they come, concatenating to the decoding of all ids.

    The same rule as the runner's streamer: decode everything so far, pass on the new suffix, and
    hold it back while it ends in an incomplete UTF-8 sequence (byte-fallback tokens).
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


class ReportService:
    """Report generation for many concurrent clients on one loaded MedGemma.

    Parameters
    ----------
    runner:
        A loaded ``MedGemmaRunner``.
    max_running, max_waiting, max_cached_tokens, max_prefills_per_step:
        See :class:`~medgemma_deploy.worker.engine.scheduler.ReportScheduler`.
    default_max_new_tokens, max_new_tokens:
        Budget when a request gives none, and the most a request may ask for.
    """

    def __init__(
        self,
        runner: MedGemmaRunner,
        *,
        max_running: int = 32,
        max_waiting: int = 64,
        max_cached_tokens: int = 0,
        max_prefills_per_step: int = 8,
        default_max_new_tokens: int = 512,
        max_new_tokens: int = 2048,
        observer: SchedulerObserver | None = None,
    ) -> None:
        self.runner = runner
        self.default_max_new_tokens = default_max_new_tokens
        self.max_new_tokens = max_new_tokens
        self.scheduler = ReportScheduler(
            runner.model,
            device=torch.device(runner.device or "cpu"),
            eos_token_ids=runner.eos_token_ids,
            max_running=max_running,
            max_waiting=max_waiting,
            max_cached_tokens=max_cached_tokens,
            max_prefills_per_step=max_prefills_per_step,
            pad_token_id=int(runner.processor.tokenizer.pad_token_id or 0),
            observer=observer,
        )

    @property
    def identity(self) -> ModelIdentity:
        return self.runner.identity

    @property
    def max_context_tokens(self) -> int:
        return int(self.runner.context_length or 0)

    def start(self) -> None:
        self.scheduler.start()

    def stop(self, timeout: float = 60.0) -> None:
        self.scheduler.stop(timeout)

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
        prepared = self.prepare(messages, GenerationSettings(max_new_tokens=2), source="warm-up")
        for _ in self.submit(prepared):
            pass
        logger.info("MedGemma warm-up took %.2f s", time.monotonic() - started)

    def prepare(
        self,
        messages: list[dict[str, Any]],
        settings: GenerationSettings,
        *,
        prompt_id: str = "",
        source: str = "grpc",
    ) -> PreparedReport:
        """Tokenise the chat with the runner's processor and fit the token budget to the context.

        Raises
        ------
        InputError
            The processor refuses the messages, or the prompt alone fills the model's context.
        """
        request = ReportRequest(
            source=source,
            messages=messages,
            prompt_id=prompt_id,
            prompt_version="",
            settings=settings,
            frames=[],
            modality="",
        )
        inputs = dict(self.runner.prepare_inputs(request))
        input_ids = inputs.pop("input_ids")
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.runner.model.dtype)
        warnings: list[str] = []
        # The runner's own rules (context budget, checkpoint sampling defaults), so that the worker
        # and the in-process runner cannot drift apart. They are private methods today: see the
        # module docstring.
        budget = self.runner.token_budget(request, int(input_ids.shape[1]), warnings)
        effective = self.runner.effective_settings(settings)
        return PreparedReport(PreparedPrompt(input_ids, inputs), effective, budget, warnings)

    def arriving(self) -> AbstractContextManager[None]:
        """Wrap preparing and submitting a report (see :meth:`ReportScheduler.arriving`)."""
        return self.scheduler.arriving()

    def submit(self, prepared: PreparedReport, *, deadline: float | None = None) -> ReportStream:
        """Queue a prepared report (raises ``QueueFullError`` / ``NotReadyError`` / ``BadRequestError``)."""
        s = prepared.settings
        sampling = SamplingSettings(
            max_new_tokens=prepared.max_new_tokens,
            do_sample=s.do_sample,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            repetition_penalty=s.repetition_penalty,
            seed=s.seed,
        )
        try:
            return self.scheduler.submit(prepared.prompt, sampling, deadline=deadline)
        except ValueError as exc:
            raise BadRequestError("settings", str(exc)) from exc

    def detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.runner.processor.tokenizer)

    def finish(
        self,
        prepared: PreparedReport,
        token_ids: Sequence[int],
        finished: Finished,
        *,
        streamed_text: str | None = None,
    ) -> FinishedText:
        """The final text and warnings, by the runner's rules (and in its order).

        ``streamed_text`` is what the deltas sent so far concatenate to; when it is not the final
        text, :data:`STREAM_MISMATCH_WARNING` is added where the runner adds it (a client that did
        not stream drops it again, as the runner adds it only with ``on_token``).
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
        return FinishedText(text, warnings)
