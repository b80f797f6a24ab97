"""Study completion by quiet period, and the spool's retention.

DICOM has no "end of study" message: routers and PACS (Orthanc's ``StableAge``, dcm4chee's
"stable" studies) call a study complete when no instance of it arrived for a quiet period. The
:class:`StudyCompletion` thread does the same: every tick it moves ``received`` jobs whose newest
instance is older than the quiet period to ``queued``. The timestamps are in the job store, so a
restarted listener completes, at once, the studies whose quiet period passed while it was down.

The same thread removes the files of studies that are finished (every version delivered or failed)
and untouched for the retention period; the jobs stay in the store as history.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from medgemma_deploy.listener.audit import AuditLog
from medgemma_deploy.listener.jobmodel import Job
from medgemma_deploy.listener.jobstore import JobStore
from medgemma_deploy.listener.spool import Spool, safe_uid_name

__all__ = ["StudyCompletion", "purge_finished_studies"]

logger = logging.getLogger(__name__)


class StudyCompletion:
    """Background thread: quiet-period completion (and retention) of spooled studies.

    Parameters
    ----------
    store, spool, audit:
        The listener's job store, spool and audit log.
    quiet_s:
        Seconds without a new instance after which a study version is complete.
    on_complete:
        Called with the jobs just queued (the worker loop's wake-up).
    retention_s:
        Remove finished studies' files after this many seconds; ``None`` keeps them.
    """

    def __init__(
        self,
        store: JobStore,
        spool: Spool,
        audit: AuditLog,
        *,
        quiet_s: float,
        on_complete: Callable[[list[Job]], None] | None = None,
        retention_s: float | None = None,
    ) -> None:
        if quiet_s < 0:
            raise ValueError(f"quiet_s must be >= 0, got {quiet_s}")
        self.store, self.spool, self.audit = store, spool, audit
        self.quiet_s = float(quiet_s)
        self.on_complete = on_complete
        self.retention_s = retention_s
        # Tick often enough that a study completes within ~25 % of the quiet period, never busy-loop.
        self.tick_s = min(1.0, max(0.05, self.quiet_s / 4))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_purge = 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="study-completion", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def tick(self, now: float | None = None) -> list[Job]:
        """Complete every study quiet since ``now - quiet_s``; returns the jobs queued."""
        now = time.time() if now is None else now
        completed = self.store.complete_quiet_studies(now - self.quiet_s, now=now)
        for job in completed:
            logger.info(
                "study %s version %d complete: %d instance(s)",
                job.study_instance_uid,
                job.version,
                job.n_instances,
            )
            self.audit.job_event(
                "study-complete",
                job,
                n_instances=job.n_instances,
            )
        if completed and self.on_complete is not None:
            self.on_complete(completed)
        if self.retention_s is not None and now >= self._next_purge:
            self._next_purge = now + 60.0
            purge_finished_studies(self.store, self.spool, self.audit, older_than=now - self.retention_s)
        return completed

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.tick()
            except Exception:  # the thread must survive a failed tick (e.g. database busy)
                logger.exception("study completion tick failed; retrying in %.2f s", self.tick_s)


def purge_finished_studies(store: JobStore, spool: Spool, audit: AuditLog, *, older_than: float) -> int:
    """Remove the spool files of finished studies last touched before ``older_than``.

    Returns
    -------
    int
        How many studies were purged.
    """
    studies = store.studies_past_retention(older_than)
    for study_uid in studies:
        paths = store.forget_instances(study_uid)
        for relative in paths:
            spool.remove(relative)
        for folder in (
            spool.root / "studies" / safe_uid_name(study_uid),
            spool.work_dir(study_uid, 1).parent,
        ):
            if folder.exists():
                spool.remove_tree(folder)
        audit.event("study-purged", study_instance_uid=study_uid, n_instances=len(paths))
        logger.info("purged study %s from the spool (%d files)", study_uid, len(paths))
    return len(studies)
