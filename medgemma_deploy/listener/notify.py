"""The HL7 ORU outbox: a triaged study version's results message, durable and sent exactly once.

Radiology worklists are prioritised by HL7 v2 results messages from the site's interface engine;
this outbox is how a study with a suspected critical finding reaches it. It works like DICOM
delivery (:mod:`medgemma_deploy.listener.worker_loop`):

1. :meth:`Hl7Outbox.enqueue` builds the ORU^R01 (:func:`~medgemma_deploy.listener.hl7.build_oru`,
   strict HL7 v2.5.1) as soon as the study's triage is known, writes its ER7 text to
   ``SPOOL/hl7/<control id>.er7`` atomically (temporary file, fsync, rename, fsync of the folder),
   and only then inserts the job store row (``queued``). The message holds the patient's identifiers
   (PID), so its text never enters SQLite, the logs or the audit log: the row names the file.
   One row per study version (the job's id is the key): a retry or a restart queues nothing twice.
2. A sender thread sends due messages, most urgent first, over MLLP
   (:func:`~medgemma_deploy.listener.mllp.send_message`). AA/CA: the row becomes ``sent`` and the ER7
   file is deleted (the patient data is not kept longer than needed). No answer, a dropped
   connection or an AE/AR acknowledgement: an attempt is counted and the message is retried after
   the listener's exponential backoff; ``failed`` once the attempts are spent (``jobs`` shows it,
   ``jobs --retry`` starts it again). The thread is its own: an unreachable interface engine never
   holds up DICOM delivery, and DICOM delivery never holds up a notification.

The control id (MSH-10) is derived from the study version, so the rare resend after a crash
between the ACK and recording it carries the same id, which the receiver can drop as a duplicate.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from medgemma_deploy.domain import SeriesClassification, TriagePriority
from medgemma_deploy.listener.audit import AuditLog
from medgemma_deploy.listener.background import DueWorkThreads
from medgemma_deploy.listener.hl7 import Hl7Identity, build_oru
from medgemma_deploy.listener.jobmodel import Job, Notification, NotificationState
from medgemma_deploy.listener.jobstore import JobStore
from medgemma_deploy.listener.metrics import ListenerMetrics
from medgemma_deploy.listener.mllp import Hl7Ack, Hl7DeliveryError, Hl7Endpoint, send_message
from medgemma_deploy.listener.spool import Spool
from medgemma_deploy.triage import StudyTriage

__all__ = ["HL7_FOLDER", "Hl7Outbox", "Hl7Settings"]

logger = logging.getLogger(__name__)

#: The spool folder of queued ER7 files.
HL7_FOLDER = "hl7"


@dataclass(frozen=True)
class Hl7Settings:
    """Where and what to notify (``--hl7``, ``--hl7-min-priority``, ``--hl7-all``, identity)."""

    endpoint: Hl7Endpoint
    identity: Hl7Identity = field(default_factory=Hl7Identity)
    #: Studies at or above this level are notified (triage products notify critical findings).
    min_priority: TriagePriority = TriagePriority.URGENT
    #: Notify every triaged study, routine ones too (``--hl7-all``).
    send_all: bool = False

    def wants(self, priority: TriagePriority) -> bool:
        return self.send_all or priority >= self.min_priority


class Hl7Outbox:
    """Queue and send a study version's ORU exactly once (see the module docstring).

    Parameters
    ----------
    store:
        The listener's job store, which holds the outbox rows (one per study version).
    spool:
        The listener's spool, whose ``hl7`` folder holds the queued ER7 files.
    audit, metrics:
        Where each queued, sent, retried and failed message is recorded and counted.
    settings:
        Endpoint, MSH identity and which priorities are sent.
    max_attempts, backoff:
        Attempts before a message is ``failed``; ``backoff(n)`` the seconds to wait after the n-th
        failure (the listener passes its :class:`~medgemma_deploy.listener.worker_loop.RetryPolicy`).
    idle_poll_s:
        The longest the idle sender sleeps before looking for due messages again.
    send:
        The MLLP client (tests may pass another).
    """

    def __init__(
        self,
        store: JobStore,
        spool: Spool,
        audit: AuditLog,
        settings: Hl7Settings,
        *,
        max_attempts: int,
        backoff: Callable[[int], float],
        metrics: ListenerMetrics | None = None,
        idle_poll_s: float = 1.0,
        send: Callable[[Hl7Endpoint, str, str], Hl7Ack] = send_message,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.store, self.spool, self.audit, self.settings = store, spool, audit, settings
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.metrics = metrics or ListenerMetrics()
        self._send = send
        self._sender = DueWorkThreads(
            ["hl7-sender"], self.send_due, store.next_notification_due, idle_poll_s=idle_poll_s
        )

    # -- queueing -------------------------------------------------------------------------------

    def enqueue(self, job: Job, triage: StudyTriage, classifications: Sequence[SeriesClassification]) -> bool:
        """Queue the study version's ORU if its priority is sent and it is not queued yet.

        Returns True when a message was queued now. The header (patient, order, study attributes)
        is the first classified instance's: every instance of a study carries the same.
        """
        if not self.settings.wants(triage.priority):
            return False
        if self.store.notification(job.id) is not None:
            return False
        header = next((c.series.datasets[0] for c in classifications if c.series.frames), None)
        if header is None:
            raise ValueError(f"job {job.id}: no classified instance to take the patient and order from")
        message = build_oru(
            header,
            triage,
            classifications,
            study_version=job.version,
            identity=self.settings.identity,
            created=datetime.now(),
        )
        relative = f"{HL7_FOLDER}/{message.control_id}.er7"
        _write_durably(self.spool.path(relative), message.er7)
        queued = self.store.add_notification(
            job.id, message.control_id, str(self.settings.endpoint), relative, int(triage.priority)
        )
        if queued:
            self.audit.job_event(
                "hl7-queued",
                job,
                control_id=message.control_id,
                priority=triage.priority.name,
                destination=str(self.settings.endpoint),
            )
            logger.info(
                "study %s version %d: HL7 %s (%s) queued for %s",
                job.study_instance_uid,
                job.version,
                message.control_id,
                triage.priority.name,
                self.settings.endpoint,
            )
            self.wake()
        return queued

    # -- sending --------------------------------------------------------------------------------

    def start(self) -> None:
        self._sender.start()

    def wake(self) -> None:
        self._sender.wake()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._sender.stop(timeout_s)

    def send_due(self) -> bool:
        """Send the next due message, if any; True when one was attempted."""
        notification = self.store.claim_notification()
        if notification is None:
            return False
        try:
            self._attempt(notification)
        finally:
            self.store.release_notification(notification.job_id)
        return True

    def _attempt(self, notification: Notification) -> None:
        job = self.store.job(notification.job_id)
        study = job.study_instance_uid if job else None
        version = job.version if job else None
        path = self.spool.path(notification.path)
        try:
            er7 = path.read_bytes().decode("utf-8")  # bytes: segments end with CR, kept as they are
            ack = self._send(self.settings.endpoint, er7, notification.control_id)
        except (Hl7DeliveryError, OSError) as exc:
            reason = " ".join(str(exc).split()) if isinstance(exc, Hl7DeliveryError) else f"{path}: {exc}"
            failed = notification.attempts + 1
            delay = self.backoff(failed)
            updated = self.store.notification_retry(
                notification.job_id, reason, delay_s=delay, max_attempts=self.max_attempts
            )
            self.metrics.delivery(str(self.settings.endpoint), "failed")
            gave_up = updated.state is NotificationState.FAILED
            (logger.error if gave_up else logger.warning)(
                "HL7 %s (job %d): attempt %d failed%s: %s",
                notification.control_id,
                notification.job_id,
                updated.attempts,
                "; giving up" if gave_up else f", retry in {delay:.1f} s",
                reason,
            )
            self.audit.event(
                "hl7-failed" if gave_up else "hl7-retry",
                job_id=notification.job_id,
                study_instance_uid=study,
                version=version,
                control_id=notification.control_id,
                attempts=updated.attempts,
                delay_s=None if gave_up else round(delay, 2),
                reason=updated.last_error,
                destination=str(self.settings.endpoint),
            )
            return
        self.store.notification_sent(notification.job_id, ack.code)
        path.unlink(missing_ok=True)  # sent: the patient data in it is not kept
        self.metrics.delivery(str(self.settings.endpoint), "delivered")
        self.audit.event(
            "hl7-sent",
            job_id=notification.job_id,
            study_instance_uid=study,
            version=version,
            control_id=notification.control_id,
            priority=TriagePriority(notification.priority).name,
            ack=ack.code,
            attempts=notification.attempts + 1,
            destination=str(self.settings.endpoint),
        )


def _write_durably(target: Path, text: str) -> None:
    """Write ``text`` to ``target`` so that it is complete on disk before this returns.

    Temporary file in the same folder, fsync, rename over the target, fsync of the folder: after a
    crash the file is either absent or whole, never half written.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("wb", dir=target.parent, delete=False, suffix=".tmp") as f:
        f.write(text.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
        temporary = Path(f.name)
    os.replace(temporary, target)
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
