"""Continuous batching for MedGemma reports: one decode loop, requests join and leave at any step.

Why a scheduler of our own and not transformers' continuous-batching manager
(``model.generate_batch`` / ``init_continuous_batching``, transformers 5.x):

* it takes token ids only (``add_request(input_ids: list[int], …)``): no ``pixel_values``, so
  Gemma 3 cannot merge its image features, nor build its bidirectional image-block attention mask —
  MedGemma prompts are images first;
* per its own source its fast decode path needs flash-attn and is off for sliding-window models such
  as Gemma 3, and it reserves ~90 % of free GPU memory for its paged cache up front;
* measured on an H100 (random weights, MedGemma-4B shapes, 64 prompts of 300 tokens, 128 new
  tokens) it reached 150–169 tok/s where a static-cache ``generate`` reached 1651 tok/s at batch 64
  (``docs/performance.md``, "GPU baselines").

So the loop below is built on transformers' *cache* machinery instead: each prompt is prefilled
alone by the model's own forward (images, masks and positions exactly as ``generate`` computes
them), and the running sequences decode together in one :class:`DecodeBatch` (a left-padded
``DynamicCache``). The loop only sees that batch's five calls (``SequenceBatch``: prefill, join,
step, remove, reset), so the low-bit engine runs under the same loop: at ``--precision int4|int8``
the batch is a ``GgufDecodeBatch``, each report a sequence of llama.cpp's one KV cache. Each
iteration:

1. **admit** up to ``max_prefills_per_step`` waiting requests while fewer than ``max_running``
   decode and the cache budget allows, prefilled together in one padded forward (a new request
   joins without waiting for running ones). When nothing is running and other requests are still
   being prepared (:meth:`ReportScheduler.arriving`: decoding images, tokenizing), the loop waits
   up to ``admission_window_s`` for them, so a burst is prefilled and decoded as one batch instead
   of one prefill and one ragged decode per arrival; nothing running means nobody waits on it;
2. **drop** rows whose client cancelled or whose deadline passed (their slot is free at once);
3. **decode** one token for every running row in a single forward, choose each row's token (greedy,
   or its own sampling settings and seeded generator), stream it, and retire rows that produced an
   end-of-turn token or reached ``max_new_tokens``.

Greedy decoding gives the same tokens as single-stream ``model.generate`` (tests prove it in fp32).
The bounded waiting queue raises :class:`QueueFullError`; a request that fails in prefill fails alone.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from medgemma_deploy.arrivals import Arrivals
from medgemma_deploy.domain import GenerationSettings
from medgemma_deploy.worker.engine.decode import PreparedPrompt, SequenceBatch
from medgemma_deploy.worker.engine.errors import (
    DeadlineExpiredError,
    NotReadyError,
    QueueFullError,
    RequestCancelledError,
)
from medgemma_deploy.worker.engine.events import (
    Admitted,
    Failed,
    Finished,
    ReportStream,
    SchedulerObserver,
    Tokens,
)
from medgemma_deploy.worker.engine.queue_thread import QueueThread
from medgemma_deploy.worker.engine.sampling import choose_tokens

__all__ = ["ReportScheduler"]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Job:
    """One report in the scheduler: queued, then a running row, until it finishes or fails.

    ``generated`` holds its tokens so far; ``batch_size_sum`` / ``steps`` give the mean batch it
    decoded in.
    """

    prompt: PreparedPrompt
    settings: GenerationSettings
    stream: ReportStream
    deadline: float | None
    enqueued_at: float = field(default_factory=time.monotonic)
    admitted_at: float = 0.0
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    batch_size_sum: int = 0
    steps: int = 0
    done: bool = False

    @property
    def reserved_tokens(self) -> int:
        return self.prompt.n_tokens + self.settings.max_new_tokens


class ReportScheduler(QueueThread):
    """The continuous-batching decode loop of one causal LM, on its own thread.

    Parameters
    ----------
    batch:
        The running sequences of the loaded model (empty): a
        :class:`~medgemma_deploy.worker.engine.decode.DecodeBatch` over a torch model, or a
        :class:`~medgemma_deploy.worker.engine.gguf_decode.GgufDecodeBatch` over llama.cpp.
    device:
        The model's device.
    eos_token_ids:
        Tokens that end a report (Gemma 3: ``<eos>`` and ``<end_of_turn>``).
    suppress_token_ids:
        Tokens never chosen (the checkpoint's ``suppress_tokens``, as ``generate`` applies them).
    max_running:
        Sequences decoded together (rows of the batch).
    max_waiting:
        Requests allowed to wait for a row; more raise ``QueueFullError``.
    max_cached_tokens:
        Cache budget in token slots, counted as rows × the longest reservation (prompt +
        ``max_new_tokens``); 0 means unlimited. A request is admitted only if it fits.
    max_prefills_per_step:
        Prompts prefilled together per iteration (one padded forward), so a burst of arrivals is
        prefilled in batches and cannot stall running decodes for long.
    admission_window_s:
        How long an idle loop waits for requests still being prepared (see step 1); never
        waited while sequences are running.

    The four limits have no defaults here: the
    :class:`~medgemma_deploy.worker.engine.report_service.ReportService` that builds the scheduler
    holds them.
    """

    observer: SchedulerObserver | None

    def __init__(
        self,
        batch: SequenceBatch,
        *,
        device: torch.device,
        eos_token_ids: Sequence[int],
        suppress_token_ids: Sequence[int] = (),
        max_running: int,
        max_waiting: int,
        max_cached_tokens: int,
        max_prefills_per_step: int,
        observer: SchedulerObserver | None = None,
        admission_window_s: float = 0.05,
    ) -> None:
        if max_running < 1 or max_waiting < 1 or max_prefills_per_step < 1:
            raise ValueError(
                f"max_running ({max_running}), max_waiting ({max_waiting}) and "
                f"max_prefills_per_step ({max_prefills_per_step}) must be at least 1"
            )
        super().__init__("report", "report-scheduler", observer)
        self.batch = batch
        self.device = device
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.suppress_token_ids = tuple(int(t) for t in suppress_token_ids)
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.max_cached_tokens = max_cached_tokens
        self.max_prefills_per_step = max_prefills_per_step
        self._waiting: deque[_Job] = deque()
        self._running: list[_Job] = []  # row order of self.batch
        self._admitting = 0  # taken from the queue, not yet running (counted by stop's drain)
        self._arriving = Arrivals(self._condition)  # requests being prepared, not yet submitted
        if admission_window_s < 0:
            raise ValueError(f"admission_window_s must be >= 0, got {admission_window_s}")
        self.admission_window_s = admission_window_s

    def arriving(self) -> AbstractContextManager[None]:
        """Wrap preparing and submitting a request, so an idle loop knows to wait for it."""
        return self._arriving.coming()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        with self._condition:
            return len(self._waiting)

    def submit(
        self, prompt: PreparedPrompt, settings: GenerationSettings, *, deadline: float | None = None
    ) -> ReportStream:
        """Queue a prepared prompt; iterate the returned stream for its events.

        Raises
        ------
        QueueFullError
            ``max_waiting`` requests are already waiting.
        NotReadyError
            The scheduler is not started or is draining.
        ValueError
            ``settings.max_new_tokens`` is below 1, or the request alone exceeds the cache budget.
        """
        if settings.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {settings.max_new_tokens}")
        job = _Job(prompt=prompt, settings=settings, stream=ReportStream(), deadline=deadline)
        if self.max_cached_tokens and job.reserved_tokens > self.max_cached_tokens:
            raise ValueError(
                f"prompt ({prompt.n_tokens} tokens) + max_new_tokens ({settings.max_new_tokens}) exceeds the "
                f"worker's cache budget of {self.max_cached_tokens} tokens"
            )
        if settings.do_sample and settings.seed is not None:
            job.generator = torch.Generator(device="cpu").manual_seed(int(settings.seed))
        with self._condition:
            self._check_accepting()
            if len(self._waiting) >= self.max_waiting:
                raise QueueFullError(self.name, self.max_waiting, "requests")
            self._waiting.append(job)
            depth = len(self._waiting)
            self._condition.notify_all()
        if self.observer is not None:
            self.observer.queue_depth(self.name, depth)
        return job.stream

    def stop(self, timeout: float = 60.0) -> None:
        """Stop accepting, let queued and running reports finish (up to ``timeout`` s), then end.

        Reports not finished by then fail with ``NotReadyError`` (the client may retry elsewhere).
        """
        thread = self._stop_accepting()
        if thread is None:
            return
        with self._condition:
            self._drain(time.monotonic() + timeout)
        self._join(thread, 30.0)

    def _has_work(self) -> bool:
        return bool(self._waiting or self._running or self._admitting)

    # The loop -------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while self._iterate():
                pass
        finally:
            self._fail_all(NotReadyError("the worker shut down before this report finished; retry"))

    def _iterate(self) -> bool:
        with self._condition:
            while not self._waiting and not self._running:
                if self._stopping:
                    return False
                self._condition.wait(timeout=0.1)
            if self._stopping:
                return False
            if not self._running and self._waiting:
                # Idle: let requests still being prepared join this prefill (bounded wait).
                admit_by = self._waiting[0].enqueued_at + self.admission_window_s
                while (
                    self._arriving.count
                    and len(self._waiting) < self.max_prefills_per_step
                    and self._accepting
                    and (remaining := admit_by - time.monotonic()) > 0
                ):
                    self._condition.wait(timeout=remaining)
            admitting = self._take_admissible()
            self._admitting = len(admitting)
            depth = len(self._waiting)
        if admitting and self.observer is not None:
            self.observer.queue_depth(self.name, depth)
        if admitting:
            self._admit(admitting)
        with self._condition:
            self._admitting = 0
        self._drop_dead_rows()
        if self._running:
            self._decode_step()
        with self._condition:
            self._condition.notify_all()  # wakes stop() waiting for the drain
        return True

    def _take_admissible(self) -> list[_Job]:
        taken: list[_Job] = []
        rows = len(self._running)
        widest = max((job.reserved_tokens for job in self._running), default=0)
        while self._waiting and rows < self.max_running and len(taken) < self.max_prefills_per_step:
            job = self._waiting[0]
            if job.stream.cancelled or (job.deadline is not None and time.monotonic() >= job.deadline):
                self._waiting.popleft()
                self._finish_dead(job)
                continue
            new_widest = max(widest, job.reserved_tokens)
            if self.max_cached_tokens and rows and (rows + 1) * new_widest > self.max_cached_tokens:
                break  # wait for running reports to finish and free cache
            self._waiting.popleft()
            taken.append(job)
            rows += 1
            widest = new_widest
        return taken

    def _admit(self, jobs: list[_Job]) -> None:
        """Prefill ``jobs`` together, stream their first tokens and add the unfinished ones as rows."""
        now = time.monotonic()
        for job in jobs:
            job.admitted_at = now
            if self.observer is not None:
                self.observer.queue_wait(self.name, now - job.enqueued_at)
        try:
            prefilled = self.batch.prefill([job.prompt for job in jobs])
        except Exception as exc:  # one request's prefill failing must not stop the others
            _empty_device_cache(self.device)
            if len(jobs) > 1:
                logger.warning("prefill of %d reports failed (%s); prefilling each alone", len(jobs), exc)
                for job in jobs:
                    self._admit([job])
                return
            logger.warning("report prefill failed (%d prompt tokens): %s", jobs[0].prompt.n_tokens, exc)
            jobs[0].stream.emit(Failed(exc))
            return
        running = len(self._running) + len(jobs)
        tokens = self._choose(prefilled.logits, jobs)
        prefill_seconds = time.monotonic() - now
        keep = []
        for row, (job, token) in enumerate(zip(jobs, tokens, strict=True)):
            job.stream.emit(
                Admitted(job.prompt.n_tokens, job.admitted_at - job.enqueued_at, running, prefill_seconds)
            )
            if not self._accept_token(job, token):
                keep.append(row)
        self.batch.join(prefilled, keep)
        self._running.extend(jobs[row] for row in keep)

    def _drop_dead_rows(self) -> None:
        now = time.monotonic()
        dead = [
            row
            for row, job in enumerate(self._running)
            if job.stream.cancelled or (job.deadline is not None and now >= job.deadline)
        ]
        if not dead:
            return
        for row in dead:
            self._finish_dead(self._running[row])
        self._remove_rows(dead)

    def _decode_step(self) -> None:
        started = time.monotonic()
        last_tokens = torch.tensor([job.generated[-1] for job in self._running], dtype=torch.long)
        try:
            logits = self.batch.step(last_tokens)
        except Exception as exc:  # the batch state is unknown after a failed step: fail its rows only
            logger.error("decode step of %d sequences failed: %s", len(self._running), exc)
            failed = list(self._running)
            self._running.clear()
            self.batch.reset()
            _empty_device_cache(self.device)
            for job in failed:
                job.stream.emit(Failed(RuntimeError(f"decoding failed: {exc}")))
            return
        rows = len(self._running)
        tokens = self._choose(logits, self._running)
        finished = []
        for row, (job, token) in enumerate(zip(self._running, tokens, strict=True)):
            job.batch_size_sum += rows
            job.steps += 1
            if self._accept_token(job, token):
                finished.append(row)
        self._remove_rows(finished)
        if self.observer is not None:
            self.observer.batch_done(self.name, rows, time.monotonic() - started)
            self.observer.tokens_generated(rows)

    def _accept_token(self, job: _Job, token: int) -> bool:
        """Record and stream one token; finish the job when it ends. Returns True when finished."""
        job.generated.append(token)
        job.stream.emit(Tokens((token,)))
        if token in self.eos_token_ids:
            reason = "stop"
        elif len(job.generated) >= job.settings.max_new_tokens:
            reason = "length"
        else:
            return False
        job.done = True
        seconds = time.monotonic() - job.admitted_at
        mean_batch = job.batch_size_sum / job.steps if job.steps else 1.0
        job.stream.emit(Finished(reason, len(job.generated), seconds, mean_batch))
        return True

    def _remove_rows(self, rows: list[int]) -> None:
        if not rows:
            return
        self.batch.remove(rows)
        drop = set(rows)
        self._running = [job for row, job in enumerate(self._running) if row not in drop]

    def _finish_dead(self, job: _Job) -> None:
        if job.stream.cancelled:
            job.stream.emit(Failed(RequestCancelledError("the client cancelled the report")))
        else:
            job.stream.emit(
                Failed(DeadlineExpiredError(f"deadline passed after {len(job.generated)} tokens"))
            )

    def _fail_all(self, error: BaseException) -> None:
        with self._condition:
            jobs = list(self._waiting) + list(self._running)
            self._waiting.clear()
            self._running = []
            self.batch.reset()
            self._condition.notify_all()
        for job in jobs:
            job.stream.emit(Failed(error))

    def _choose(self, logits: torch.Tensor, jobs: Sequence[_Job]) -> list[int]:
        if self.suppress_token_ids:
            suppressed = torch.tensor(self.suppress_token_ids, dtype=torch.long, device=logits.device)
            logits = logits.index_fill(1, suppressed, float("-inf"))
        return choose_tokens(
            logits,
            [job.settings for job in jobs],
            [lambda job=job: [*job.prompt.input_ids[0].tolist(), *job.generated] for job in jobs],
            [job.generator for job in jobs],
        )


def _empty_device_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
