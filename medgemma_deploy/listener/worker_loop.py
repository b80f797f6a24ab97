"""The job runner: queued study versions through the pipeline, then their results to the PACS.

``concurrency`` threads claim due jobs from the store. A claimed ``queued`` job runs the pipeline
(one at a time: the models are loaded once and shared) on a hard-linked snapshot of its
instances, with ``result_version`` = the study version, so a retry of the same version rewrites
the same SOP Instance UIDs and a re-opened study gets new ones. Its outputs are recorded and the
job moves to ``delivering``; each destination then gets the objects it has not acknowledged yet.

Triage (radiology worklist priority, see :mod:`medgemma_deploy.triage`): jobs are
claimed by priority with aging (:meth:`~medgemma_deploy.listener.jobstore.JobStore.claim_next`).
With a staged pipeline (classification cheap, reports expensive: ``classifies_first``), a queued
job is first only *triaged*: classified, its priority recorded, its HL7 ORU queued when an outbox
is configured, and put back in the queue, where its reports and delivery go ahead of routine work
when it is urgent. Every queued study is triaged before any report runs, so an urgent study is
found early. With another pipeline the triage comes with the run itself. The priority lives in
the job store, so it survives restarts; an ORU is queued before the job's state moves on, so a
crash in between re-queues nothing twice (the outbox has one row per study version).

Bad inputs never cost their neighbours: the pipeline rejects each bad instance on its own and
processes the rest, and the job lists the refused instances (stage and reason) and quarantines
them, then delivers what the good ones gave.

Failures: a transient one (worker unavailable, PACS down, disk full) counts an attempt and is
retried after an exponential backoff; so is a crash of the pipeline itself (a bug: it may not be
the input's fault, and a retry after a fix or a restart may succeed), and when its attempts run
out every instance of the job is quarantined with the reason. A permanent one (bad input, objects
refused) fails the job at once, keeping the reason. ``medgemma-deploy jobs --retry ID`` gives a
failed job a new start.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medgemma_deploy.domain import Rejection, SeriesClassification, TriagePriority
from medgemma_deploy.errors import InputError, UsageError
from medgemma_deploy.listener.audit import AuditLog
from medgemma_deploy.listener.background import DueWorkThreads
from medgemma_deploy.listener.delivery import DeliveryError, DeliveryItem, Destination
from medgemma_deploy.listener.jobmodel import InstanceRecord, Job, JobState, OutputRecord, RejectedInput
from medgemma_deploy.listener.jobstore import JobStore
from medgemma_deploy.listener.metrics import ListenerMetrics
from medgemma_deploy.listener.pipelines import Pipeline
from medgemma_deploy.listener.spool import Spool
from medgemma_deploy.triage import StudyTriage

if TYPE_CHECKING:
    from medgemma_deploy.listener.notify import Hl7Outbox

__all__ = ["RetryPolicy", "WorkerLoop", "is_transient"]

logger = logging.getLogger(__name__)

#: gRPC status codes (by name) after which the worker may well answer a later call.
_RETRYABLE_GRPC_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED"})


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: ``base_s × 2^(n−1)`` (±20 % jitter) up to ``max_s``; fail at ``max_attempts``."""

    max_attempts: int = 10
    base_s: float = 5.0
    max_s: float = 600.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.base_s < 0 or self.max_s < self.base_s:
            raise ValueError(f"need 0 <= base_s <= max_s, got base_s={self.base_s}, max_s={self.max_s}")

    def delay(self, failed_attempts: int) -> float:
        """Seconds to wait after the ``failed_attempts``-th failure (1-based)."""
        exponential = self.base_s * 2 ** max(0, failed_attempts - 1)
        return min(self.max_s, exponential) * random.uniform(0.8, 1.2)


def is_transient(exc: BaseException) -> bool:
    """Whether a later attempt may succeed: network, disk, worker unavailability; not bad input.

    Exceptions may say so themselves with a ``transient`` attribute (delivery errors do); gRPC
    errors are judged by their status code; ``OSError`` (which includes connection errors, timeouts
    and a full disk) is transient; anything else (bad input, a bug) is permanent.
    """
    flag = getattr(exc, "transient", None)
    if isinstance(flag, bool):
        return flag
    code = getattr(exc, "code", None)
    if callable(code):
        try:
            name = getattr(code(), "name", None)
        except TypeError:
            name = None
        if name is not None:
            return name in _RETRYABLE_GRPC_CODES
    if isinstance(exc, (InputError, UsageError)):
        return False
    return isinstance(exc, (OSError, MemoryError))


class WorkerLoop:
    """Threads that run claimed jobs; see the module docstring.

    Parameters
    ----------
    store, spool, audit, metrics:
        The listener's job store, spool, audit log and metrics.
    pipeline:
        An opened pipeline.
    destinations:
        Where results go; a job is delivered when every destination acknowledged every object.
    concurrency:
        Worker threads (pipeline runs are still one at a time; the others deliver meanwhile).
    retry:
        Backoff and attempt limit.
    idle_poll_s:
        The longest an idle thread sleeps before looking for due jobs again.
    outbox:
        The HL7 ORU outbox, or None when no ``--hl7`` endpoint is configured.
    aging_s:
        Seconds of waiting that count as one triage level (starvation freedom, ``claim_next``).
    triage_queue:
        Order work by triage priority and classify first (default); False: first come, first
        served, the triage only recorded and notified with the run (``--triage-queue off``).
    """

    def __init__(
        self,
        store: JobStore,
        spool: Spool,
        pipeline: Pipeline,
        destinations: Sequence[Destination],
        audit: AuditLog,
        *,
        metrics: ListenerMetrics | None = None,
        concurrency: int = 2,
        retry: RetryPolicy | None = None,
        idle_poll_s: float = 1.0,
        outbox: Hl7Outbox | None = None,
        aging_s: float = 600.0,
        triage_queue: bool = True,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if not destinations:
            raise ValueError("at least one destination is needed")
        self.store, self.spool, self.pipeline, self.audit = store, spool, pipeline, audit
        self.destinations = list(destinations)
        self.metrics = metrics or ListenerMetrics()
        self.concurrency = concurrency
        self.retry = retry or RetryPolicy()
        self.outbox = outbox
        self.aging_s = aging_s
        #: Classification is a stage of its own, run on every queued study before any report.
        self.triage_queue = triage_queue
        self.staged = triage_queue and bool(getattr(pipeline, "classifies_first", False))
        self._processing = threading.Semaphore(1)
        self._workers = DueWorkThreads(
            [f"job-worker-{index}" for index in range(concurrency)],
            self._run_one,
            store.next_due,
            idle_poll_s=idle_poll_s,
        )

    def start(self) -> None:
        self._workers.start()

    def wake(self, *_: object) -> None:
        """Tell idle threads that new work may be due."""
        self._workers.wake()

    def stop(self, timeout_s: float = 60.0) -> bool:
        """Claim nothing new; wait up to ``timeout_s`` for running jobs. True if all threads ended."""
        return self._workers.stop(timeout_s)

    # -- one job --------------------------------------------------------------------------------

    def _run_one(self) -> bool:
        have_slot = self._processing.acquire(blocking=False)
        try:
            claimed = self.store.claim_next(
                allow_processing=have_slot,
                triage_first=self.staged,
                by_priority=self.triage_queue,
                aging_s=self.aging_s,
            )
            if claimed is None:
                return False
            try:
                job: Job | None = claimed
                if claimed.state is JobState.RUNNING and self.staged and claimed.priority is None:
                    job = self._triage(claimed)
                elif claimed.state is JobState.RUNNING:
                    job = self._process(claimed)
                if have_slot:  # delivering is network work: free the pipeline for the next study
                    self._processing.release()
                    have_slot = False
                if job is not None and job.state is JobState.DELIVERING:
                    self._deliver(job)
            finally:
                self.store.release(claimed.id)
            return True
        finally:
            if have_slot:
                self._processing.release()

    # -- triage ---------------------------------------------------------------------------------

    def _triage(self, job: Job) -> None:
        """The staged pipeline's first stage: classify, record the priority, queue the ORU, requeue."""
        started = time.perf_counter()
        work = self.spool.work_dir(job.study_instance_uid, job.version)
        try:
            instances = self.store.study_instances(job.study_instance_uid, job.version)
            self.spool.link_inputs([i.path for i in instances], work / "input")
            staged = self.pipeline.triage(work / "input")  # type: ignore[attr-defined]
        except Exception as exc:
            self._stage_failed(job, "triage", exc)
            return None
        triage = staged.triage
        if triage is None:  # no label set with rules: routine, nothing to notify
            triage = StudyTriage(priority=TriagePriority.ROUTINE)
        self._notify(job, triage, staged.classifications)
        self.store.set_triage(job.id, int(triage.priority), triage.reasons_json(), requeue=True)
        self._audit_triage(job, triage, time.perf_counter() - started)
        return None

    def _notify(self, job: Job, triage: StudyTriage, classifications: Sequence[SeriesClassification]) -> None:
        """Queue the ORU (before the job's state moves on: see the module docstring)."""
        if self.outbox is None:
            return
        try:
            self.outbox.enqueue(job, triage, classifications)
        except ValueError as exc:  # a header hl7apy refuses: the DICOM results still go out
            reason = " ".join(str(exc).split())
            logger.error("job %d: no HL7 message: %s", job.id, reason)
            self.audit.job_event(
                "hl7-failed",
                job,
                stage="build",
                reason=reason,
            )

    def _audit_triage(self, job: Job, triage: StudyTriage, seconds: float) -> None:
        logger.info(
            "study %s version %d triaged %s in %.1f s (%d rule(s) fired)",
            job.study_instance_uid,
            job.version,
            triage.priority.name,
            seconds,
            len(triage.reasons),
        )
        self.audit.job_event(
            "job-triaged",
            job,
            priority=triage.priority.name,
            reason="; ".join(f"{r.finding.key} {r.probability:.4f}>={r.threshold:g}" for r in triage.reasons)
            or None,
            duration_s=round(seconds, 3),
        )

    # -- processing -----------------------------------------------------------------------------

    def _process(self, job: Job) -> Job | None:
        started = time.perf_counter()
        work = self.spool.work_dir(job.study_instance_uid, job.version)
        self.audit.job_event(
            "job-started",
            job,
            attempts=job.attempts,
            pipeline=self.pipeline.name,
        )
        try:
            instances = self.store.study_instances(job.study_instance_uid, job.version)
            n_inputs = self.spool.link_inputs([i.path for i in instances], work / "input")
            output_dir = work / "output"
            if output_dir.exists():
                self.spool.remove_tree(output_dir)  # a previous attempt's partial output
            run = self.pipeline.process(work / "input", output_dir, result_version=job.version)
        except Exception as exc:
            self._stage_failed(job, "process", exc)
            return None
        seconds = time.perf_counter() - started
        self._record_rejected(job, instances, run.rejected)
        self.metrics.pipeline_seconds(seconds)
        for rejection in run.rejected:
            self.audit.job_event(
                "instance-rejected",
                job,
                series_instance_uid=rejection.series_instance_uid,
                sop_instance_uid=rejection.sop_instance_uid,
                stage=rejection.stage,
                reason=rejection.reason,
            )
        if not run.outputs:
            reason = (
                f"no results from {n_inputs} instance(s): "
                f"{len(run.rejected)} rejected, {len(run.skipped)} skipped"
            )
            if run.rejected:
                reason += f"; first: {run.rejected[0].reason}"
            return self._fail(job, reason)
        outputs = [
            OutputRecord(
                sop_instance_uid=o.sop_instance_uid,
                sop_class_uid=o.sop_class_uid,
                kind=o.kind,
                path=o.path.resolve().relative_to(self.spool.root.resolve()).as_posix(),
            )
            for o in run.outputs
        ]
        if run.triage is not None:
            self._notify(job, run.triage, run.classifications)
            if job.priority is None:
                self._audit_triage(job, run.triage, seconds)
        processed = self.store.set_processed(
            job.id,
            outputs,
            pipeline=self.pipeline.name,
            n_rejected=len(run.rejected),
            priority=None if run.triage is None else int(run.triage.priority),
            triage=None if run.triage is None else run.triage.reasons_json(),
        )
        self.metrics.job("processed")
        logger.info(
            "study %s version %d: %s wrote %d object(s) in %.1f s (%d input(s) rejected)",
            job.study_instance_uid,
            job.version,
            self.pipeline.name,
            len(outputs),
            seconds,
            len(run.rejected),
        )
        self.audit.job_event(
            "job-processed",
            job,
            pipeline=self.pipeline.name,
            model=", ".join(run.models) or None,
            n_instances=n_inputs,
            n_outputs=len(outputs),
            n_rejected=len(run.rejected),
            duration_s=round(seconds, 3),
            outputs=[{"sop_instance_uid": o.sop_instance_uid, "kind": o.kind} for o in outputs],
        )
        return processed

    def _record_rejected(
        self, job: Job, instances: Sequence[InstanceRecord], rejected: Sequence[Rejection]
    ) -> None:
        """List the refused instances with the job and quarantine them (matched by spool file name)."""
        by_name = {Path(instance.path).name: instance for instance in instances}
        records: dict[str, RejectedInput] = {}
        for rejection in rejected:
            for source in (rejection.source, *rejection.files):
                instance = by_name.get(Path(source).name)
                if instance is None or instance.path in records:
                    continue
                records[instance.path] = RejectedInput(
                    job_id=job.id,
                    sop_instance_uid=instance.sop_instance_uid,
                    path=instance.path,
                    stage=rejection.stage,
                    reason=rejection.reason,
                )
        if records:
            self.store.record_rejected(list(records.values()))

    def _stage_failed(self, job: Job, stage: str, exc: BaseException) -> None:
        """A pipeline stage raised: bad input or a transient failure fails (or retries) the job as
        usual; anything else is a crash of the pipeline itself."""
        if is_transient(exc) or isinstance(exc, (InputError, UsageError)):
            self._failed(job, stage, exc)
        else:
            self._crashed(job, exc)

    def _crashed(self, job: Job, exc: BaseException) -> None:
        """The pipeline itself failed: retry with backoff; once attempts run out, quarantine the inputs."""
        logger.error("job %d process crashed", job.id, exc_info=exc)
        reason = f"process crashed: {type(exc).__name__}: {' '.join(str(exc).split())}"
        updated = self._retry(job, "process", reason)
        if updated.state is JobState.FAILED:
            instances = self.store.study_instances(job.study_instance_uid, job.version)
            self.store.record_rejected(
                [
                    RejectedInput(job.id, i.sop_instance_uid, i.path, "process", updated.last_error or reason)
                    for i in instances
                ]
            )

    # -- delivery -------------------------------------------------------------------------------

    def _deliver(self, job: Job) -> None:
        for destination in self.destinations:
            pending = self.store.pending_outputs(job.id, destination.name)
            if not pending:
                continue
            items = [
                DeliveryItem(self.spool.path(o.path), o.sop_class_uid, o.sop_instance_uid) for o in pending
            ]

            def on_delivered(uids: list[str], destination: Destination = destination) -> None:
                self.store.mark_delivered(job.id, uids, destination.name)
                self.metrics.delivery(destination.name, "delivered", len(uids))
                for uid in uids:
                    self.audit.job_event(
                        "delivered",
                        job,
                        sop_instance_uid=uid,
                        destination=destination.name,
                    )

            try:
                destination.deliver(items, on_delivered)
            except Exception as exc:  # every failure is classified (transient: retry; else: failed)
                self.metrics.delivery(destination.name, "failed")
                self._failed(job, "deliver", exc, destination=destination.name)
                return
        delivered = self.store.finish_delivered(job.id)
        self.metrics.job("delivered")
        logger.info("study %s version %d delivered", job.study_instance_uid, job.version)
        self.audit.job_event(
            "job-delivered",
            job,
            n_outputs=delivered.n_outputs,
            destination=", ".join(d.name for d in self.destinations),
        )

    # -- failures -------------------------------------------------------------------------------

    def _failed(self, job: Job, stage: str, exc: BaseException, *, destination: str | None = None) -> None:
        reason = f"{stage}: {type(exc).__name__}: {' '.join(str(exc).split())}"
        if not is_transient(exc):
            if not isinstance(exc, (DeliveryError, InputError, UsageError)):
                logger.error("job %d %s failed", job.id, stage, exc_info=exc)
            self._fail(job, reason)
            return
        self._retry(job, stage, reason, destination=destination)

    def _retry(self, job: Job, stage: str, reason: str, *, destination: str | None = None) -> Job:
        """Count a failed attempt and schedule the next after a backoff, or fail the job for good
        once the attempts are spent; returns the job as it now stands."""
        current = self.store.job(job.id)
        delay = self.retry.delay((current.attempts if current else 0) + 1)
        updated = self.store.retry_later(job.id, reason, delay_s=delay, max_attempts=self.retry.max_attempts)
        if updated.state is JobState.FAILED:
            self.metrics.job("failed")
            logger.error(
                "job %d (study %s v%d) failed: %s", job.id, job.study_instance_uid, job.version, reason
            )
            self.audit.job_event(
                "job-failed",
                job,
                attempts=updated.attempts,
                reason=updated.last_error,
                destination=destination,
            )
            return updated
        self.metrics.job("retry")
        logger.warning(
            "job %d (study %s v%d) attempt %d failed, retry in %.1f s: %s",
            job.id,
            job.study_instance_uid,
            job.version,
            updated.attempts,
            delay,
            reason,
        )
        self.audit.job_event(
            "job-retry",
            job,
            attempts=updated.attempts,
            delay_s=round(delay, 2),
            reason=reason,
            destination=destination,
            stage=stage,
        )
        return updated

    def _fail(self, job: Job, reason: str) -> None:
        failed = self.store.fail(job.id, reason)
        self.metrics.job("failed")
        logger.error("job %d (study %s v%d) failed: %s", job.id, job.study_instance_uid, job.version, reason)
        self.audit.job_event(
            "job-failed",
            job,
            attempts=failed.attempts,
            reason=reason,
        )
        return None
