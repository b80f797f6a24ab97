"""The listener's job store: received instances, study versions and their jobs, in SQLite (WAL).

One row per study *version* is a job. Its states::

    received ──(quiet period)──▶ queued ──▶ running ──▶ delivering ──▶ delivered
        ▲                          │  ▲        │            │  ▲
        └── late instance ─────────┘  └─retry──┘            └──┘ retry (backoff)
                                      failed  (permanent error, or attempts exhausted)

A job's ``priority`` is its study version's triage level (routine, urgent, stat), known once its
findings are; :meth:`JobStore.claim_next` serves due work by that level with aging, so an urgent
study goes first and a routine one still advances (see there). The ``notifications`` table is the
HL7 ORU outbox, one row per study version (see :mod:`medgemma_deploy.listener.notify`).

A late instance for a study whose newest job is still ``received`` or ``queued`` joins that job; once
the job is ``running`` or beyond, it opens version N+1 (a new job), so nothing is silently dropped.
Every commit is durable (``synchronous=FULL``): a row that exists survived a crash, which is what
lets the C-STORE handler answer Success only after :meth:`JobStore.record_instance` returned.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medgemma_deploy.listener.jobmodel import (
    MIGRATIONS,
    SCHEMA,
    SCHEMA_VERSION,
    InstanceRecord,
    Job,
    JobState,
    NewInstance,
    Notification,
    NotificationState,
    OutputRecord,
    RecordOutcome,
    RejectedInput,
    instance_from_row,
    job_from_row,
    notification_from_row,
)

__all__ = ["JobStore"]  # the records it stores are defined in jobmodel

_INSTANCE_COLUMNS = (*(f.name for f in dataclasses.fields(NewInstance)), "version", "received_at")

#: How long a study waits before it counts one triage level higher (``claim_next``), by default.
DEFAULT_AGING_S = 600.0


class JobStore:
    """SQLite job store shared by the listener's threads (one connection, serialized by a lock).

    Parameters
    ----------
    path:
        The database file; created with its schema if missing.
    busy_timeout_s:
        How long a write waits for another process (``medgemma-deploy jobs --retry``) to finish.
    """

    def __init__(self, path: Path, *, busy_timeout_s: float = 30.0, read_only: bool = False) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._claimed: set[int] = set()
        self._claimed_notifications: set[int] = set()
        self._transaction_depth = 0
        if read_only and not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no job store here (has a listener used this spool?)")
        target = f"file:{self.path}?mode=ro" if read_only else str(self.path)
        self._db = sqlite3.connect(
            target, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False, uri=read_only
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA foreign_keys=ON")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, 1, SCHEMA_VERSION):
            raise RuntimeError(
                f"{self.path}: job store schema version {version}, this software reads {SCHEMA_VERSION}"
            )
        if not read_only:
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before it returns, so Success is only sent for durable rows.
            self._db.execute("PRAGMA synchronous=FULL")
            # executescript runs outside our transactions; every statement is idempotent.
            self._db.executescript(SCHEMA)
            self._migrate()
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _migrate(self) -> None:
        """Bring a version-1 store's ``jobs`` table to version 2 (columns it lacks, in one transaction).

        Existing jobs get ``priority`` NULL (not triaged): queued ones are triaged when they run,
        finished ones show no priority in ``jobs``.
        """
        with self._transaction():
            present = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
            for column, statement in MIGRATIONS.items():
                if column not in present:
                    self._db.execute(statement)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- instances ------------------------------------------------------------------------------

    def find_instance(self, sop_instance_uid: str) -> InstanceRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
        return instance_from_row(row) if row else None

    def record_instance(self, instance: NewInstance, *, now: float | None = None) -> RecordOutcome:
        """Record an instance durably and attach it to its study's open version (see module doc)."""
        now = time.time() if now is None else now
        with self._transaction():
            existing = self._db.execute(
                "SELECT * FROM instances WHERE sop_instance_uid = ?", (instance.sop_instance_uid,)
            ).fetchone()
            latest = self._db.execute(
                "SELECT id, version, state FROM jobs WHERE study_instance_uid = ? "
                "ORDER BY version DESC LIMIT 1",
                (instance.study_instance_uid,),
            ).fetchone()
            if (
                existing is not None
                and existing["sha256"] == instance.sha256
                and existing["study_instance_uid"] == instance.study_instance_uid
                and latest is not None
            ):
                return RecordOutcome(job_id=latest["id"], version=existing["version"], duplicate=True)
            new_job = reopened = False
            if latest is not None and latest["state"] in (JobState.RECEIVED.value, JobState.QUEUED.value):
                job_id, version = latest["id"], latest["version"]
                reopened = latest["state"] == JobState.QUEUED.value
                # A new instance may change the findings: the version is triaged again.
                self._db.execute(
                    "UPDATE jobs SET state = 'received', last_instance_at = ?, updated_at = ?, "
                    "priority = NULL, triage = NULL WHERE id = ?",
                    (now, now, job_id),
                )
            else:
                version = 1 if latest is None else latest["version"] + 1
                job_id = self._db.execute(
                    "INSERT INTO jobs (study_instance_uid, version, state, created_at, updated_at, "
                    "last_instance_at) VALUES (?, ?, 'received', ?, ?, ?)",
                    (instance.study_instance_uid, version, now, now, now),
                ).lastrowid
                new_job = True
            self._db.execute(
                f"INSERT OR REPLACE INTO instances ({', '.join(_INSTANCE_COLUMNS)}) "
                f"VALUES ({', '.join(':' + c for c in _INSTANCE_COLUMNS)})",
                {**dataclasses.asdict(instance), "version": version, "received_at": now},
            )
            self._db.execute(
                "UPDATE jobs SET n_instances = (SELECT COUNT(*) FROM instances WHERE study_instance_uid = ? "
                "AND version <= ?) WHERE id = ?",
                (instance.study_instance_uid, version, job_id),
            )
        replaced = existing["path"] if existing is not None and existing["path"] != instance.path else None
        return RecordOutcome(
            job_id=job_id, version=version, new_job=new_job, reopened=reopened, replaced_path=replaced
        )

    def record_instances(
        self, instances: Sequence[NewInstance], *, now: float | None = None
    ) -> list[RecordOutcome]:
        """:meth:`record_instance` for each, in order, in one transaction: one commit (one WAL
        fsync) for all of them, which is what lets concurrent C-STOREs share their durability cost
        (:mod:`medgemma_deploy.listener.groupcommit`). All or none are recorded.
        """
        now = time.time() if now is None else now
        with self._transaction():
            return [self.record_instance(instance, now=now) for instance in instances]

    def record_quarantine(
        self, sop_instance_uid: str | None, calling_aet: str | None, path: str, reason: str
    ) -> int:
        with self._transaction():
            return self._db.execute(
                "INSERT INTO quarantine (sop_instance_uid, calling_aet, path, reason, received_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (sop_instance_uid, calling_aet, path, reason, time.time()),
            ).lastrowid

    def record_rejected(self, rejected: Sequence[RejectedInput], *, calling_aet: str | None = None) -> None:
        """List a job's refused instances with the job, and quarantine each with its reason.

        The spool file stays where it is (other versions of the study may still use it); the
        quarantine row names it so an operator can find it. Recording the same job again (a
        retry) replaces its list instead of adding duplicates.
        """
        with self._transaction():
            for item in rejected:
                exists = self._db.execute(
                    "SELECT 1 FROM rejected_inputs WHERE job_id = ? AND path = ?", (item.job_id, item.path)
                ).fetchone()
                self._db.execute(
                    "INSERT OR REPLACE INTO rejected_inputs (job_id, sop_instance_uid, path, stage, reason) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (item.job_id, item.sop_instance_uid, item.path, item.stage, item.reason),
                )
                if exists is None:
                    self._db.execute(
                        "INSERT INTO quarantine (sop_instance_uid, calling_aet, path, reason, received_at) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (
                            item.sop_instance_uid,
                            calling_aet,
                            item.path,
                            f"job {item.job_id}, {item.stage}: {item.reason}",
                            time.time(),
                        ),
                    )

    def rejected_inputs(self, job_id: int | None = None) -> list[RejectedInput]:
        """The refused instances of one job (or of every job), in job then path order."""
        query = "SELECT job_id, sop_instance_uid, path, stage, reason FROM rejected_inputs"
        params: tuple[int, ...] = ()
        if job_id is not None:
            query += " WHERE job_id = ?"
            params = (job_id,)
        with self._lock:
            try:
                rows = self._db.execute(query + " ORDER BY job_id, path", params).fetchall()
            except sqlite3.OperationalError:  # a store from before the table, opened read-only
                return []
        return [RejectedInput(**dict(row)) for row in rows]

    def quarantined(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._db.execute("SELECT * FROM quarantine ORDER BY id")]

    def study_instances(self, study_instance_uid: str, version: int) -> list[InstanceRecord]:
        """The instances of study version ``version``: every instance recorded up to that version."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM instances WHERE study_instance_uid = ? AND version <= ? "
                "ORDER BY sop_instance_uid",
                (study_instance_uid, version),
            ).fetchall()
        return [instance_from_row(r) for r in rows]

    def count_instances(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM instances").fetchone()[0]

    # -- completion -----------------------------------------------------------------------------

    def complete_quiet_studies(self, cutoff: float, *, now: float | None = None) -> list[Job]:
        """Move ``received`` jobs whose last instance arrived before ``cutoff`` to ``queued``."""
        now = time.time() if now is None else now
        with self._transaction():
            rows = self._db.execute(
                "UPDATE jobs SET state = 'queued', updated_at = ?, not_before = 0 "
                "WHERE state = 'received' AND last_instance_at <= ? RETURNING *",
                (now, cutoff),
            ).fetchall()
        return [job_from_row(r) for r in rows]

    # -- job execution --------------------------------------------------------------------------

    def claim_next(
        self,
        *,
        allow_processing: bool,
        triage_first: bool = False,
        by_priority: bool = True,
        aging_s: float = DEFAULT_AGING_S,
        now: float | None = None,
    ) -> Job | None:
        """Claim the next due job for this process: a queued one (→ running) or one to deliver.

        Order (radiology triage: an urgent study is read first, a routine one is never starved):

        1. with ``triage_first`` (a pipeline whose classification is a cheap first stage), queued
           versions not yet triaged (``priority`` NULL), oldest first, so an urgent study is found
           before any expensive report runs;
        2. then by *effective arrival*: the last instance's time minus ``priority × aging_s``. A
           stat study counts as if it had arrived ``2 × aging_s`` earlier, so it overtakes every
           routine study younger than that, and a routine study that has waited longer than that
           goes before a newly arrived stat one (no starvation). Untriaged jobs count as routine.

        With ``by_priority`` False (``--triage-queue off``) the order is first due, first served.

        A version waits while an earlier version of its study is queued or running, so versions are
        processed in order. Claimed delivering jobs are remembered in memory (the state does not
        change) until :meth:`release`.
        """
        if aging_s <= 0:
            raise ValueError(f"aging_s must be > 0, got {aging_s}")
        now = time.time() if now is None else now
        states = "'queued', 'delivering'" if allow_processing else "'delivering'"
        untriaged_first = "(state = 'queued' AND priority IS NULL) DESC, " if triage_first else ""
        order, params = "not_before, id", (now,)
        if by_priority:
            order = f"{untriaged_first}last_instance_at - COALESCE(priority, 0) * ?, id"
            params = (now, aging_s)
        with self._transaction():
            rows = self._db.execute(
                f"SELECT * FROM jobs AS j WHERE state IN ({states}) AND not_before <= ? "
                "AND NOT EXISTS (SELECT 1 FROM jobs AS e WHERE e.study_instance_uid = j.study_instance_uid "
                "AND e.version < j.version AND e.state IN ('queued', 'running')) "
                f"ORDER BY {order} LIMIT 64",
                params,
            ).fetchall()
            for row in rows:
                if row["id"] in self._claimed:
                    continue
                if row["state"] == JobState.QUEUED.value:
                    row = self._db.execute(
                        "UPDATE jobs SET state = 'running', updated_at = ? WHERE id = ? RETURNING *",
                        (now, row["id"]),
                    ).fetchone()
                self._claimed.add(row["id"])
                return job_from_row(row)
        return None

    def set_triage(self, job_id: int, priority: int, reasons_json: str, *, requeue: bool) -> Job:
        """Record a version's triage level and reasons; with ``requeue``, a running job goes back to
        ``queued`` (its classification stage is done, its reports wait their turn by priority)."""
        now = time.time()
        state_change = "state = 'queued', not_before = 0, " if requeue else ""
        assignments = f"{state_change}priority = ?, triage = ?, updated_at = ?"
        return self._update_job(job_id, assignments, (int(priority), reasons_json, now))

    def release(self, job_id: int) -> None:
        with self._lock:
            self._claimed.discard(job_id)

    def set_processed(
        self,
        job_id: int,
        outputs: Sequence[OutputRecord],
        *,
        pipeline: str,
        n_rejected: int,
        priority: int | None = None,
        triage: str | None = None,
    ) -> Job:
        """Record the pipeline's outputs; the job moves to ``delivering`` with a fresh attempt count.

        ``priority``/``triage``, when the run triaged the study, replace what the job had (its
        delivery is then ordered by them); None keeps the job's own.
        """
        now = time.time()
        with self._transaction():
            self._db.execute("DELETE FROM outputs WHERE job_id = ?", (job_id,))
            self._db.executemany(
                "INSERT INTO outputs (job_id, sop_instance_uid, sop_class_uid, kind, path) "
                "VALUES (?, ?, ?, ?, ?)",
                [(job_id, o.sop_instance_uid, o.sop_class_uid, o.kind, o.path) for o in outputs],
            )
            row = self._db.execute(
                "UPDATE jobs SET state = 'delivering', pipeline = ?, n_outputs = ?, n_rejected = ?, "
                "attempts = 0, last_error = NULL, not_before = 0, updated_at = ?, "
                "priority = COALESCE(?, priority), triage = COALESCE(?, triage) WHERE id = ? RETURNING *",
                (pipeline, len(outputs), n_rejected, now, priority, triage, job_id),
            ).fetchone()
        return job_from_row(row)

    def outputs(self, job_id: int) -> list[OutputRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM outputs WHERE job_id = ? ORDER BY kind, sop_instance_uid", (job_id,)
            ).fetchall()
        return [OutputRecord(r["sop_instance_uid"], r["sop_class_uid"], r["kind"], r["path"]) for r in rows]

    def pending_outputs(self, job_id: int, destination: str) -> list[OutputRecord]:
        """Outputs of the job not yet acknowledged by ``destination``."""
        with self._lock:
            delivered = {
                r[0]
                for r in self._db.execute(
                    "SELECT sop_instance_uid FROM deliveries WHERE job_id = ? AND destination = ?",
                    (job_id, destination),
                )
            }
        return [o for o in self.outputs(job_id) if o.sop_instance_uid not in delivered]

    def mark_delivered(self, job_id: int, sop_instance_uids: Iterable[str], destination: str) -> None:
        now = time.time()
        with self._transaction():
            self._db.executemany(
                "INSERT OR IGNORE INTO deliveries (job_id, sop_instance_uid, destination, delivered_at) "
                "VALUES (?, ?, ?, ?)",
                [(job_id, uid, destination, now) for uid in sop_instance_uids],
            )

    def finish_delivered(self, job_id: int) -> Job:
        now = time.time()
        return self._update_job(
            job_id, "state = 'delivered', delivered_at = ?, updated_at = ?, last_error = NULL", (now, now)
        )

    def retry_later(self, job_id: int, error: str, *, delay_s: float, max_attempts: int) -> Job:
        """Count a failed attempt; retry after ``delay_s``, or fail once ``max_attempts`` is reached.

        A job that failed while running goes back to ``queued`` (the pipeline runs again); one that
        failed while delivering stays ``delivering``.
        """
        now = time.time()
        with self._transaction():
            row = self._db.execute("SELECT state, attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
            attempts = row["attempts"] + 1
            if attempts >= max_attempts:
                state, error = JobState.FAILED.value, f"{error} (gave up after {attempts} attempts)"
            elif row["state"] == JobState.RUNNING.value:
                state = JobState.QUEUED.value
            else:
                state = row["state"]
            updated = self._db.execute(
                "UPDATE jobs SET state = ?, attempts = ?, last_error = ?, not_before = ?, updated_at = ? "
                "WHERE id = ? RETURNING *",
                (state, attempts, error, now + delay_s, now, job_id),
            ).fetchone()
        return job_from_row(updated)

    def fail(self, job_id: int, error: str) -> Job:
        now = time.time()
        return self._update_job(
            job_id, "state = 'failed', attempts = attempts + 1, last_error = ?, updated_at = ?", (error, now)
        )

    def recover(self, *, max_attempts: int) -> list[Job]:
        """After a restart: jobs left ``running`` count one failed attempt and go back to ``queued``.

        A job that keeps killing the process (out of memory, a crash in a native library) therefore
        ends ``failed`` after ``max_attempts`` instead of looping for ever.
        """
        recovered = []
        for job in self.jobs(states=[JobState.RUNNING]):
            recovered.append(
                self.retry_later(
                    job.id,
                    "interrupted: the listener stopped while the pipeline was running",
                    delay_s=0.0,
                    max_attempts=max_attempts,
                )
            )
        return recovered

    def requeue_failed(self, job_id: int) -> Job:
        """Give a failed job a fresh start (``jobs --retry``): delivering if it has outputs, else queued."""
        now = time.time()
        with self._transaction():
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(f"no job with id {job_id}")
            if row["state"] != JobState.FAILED.value:
                raise ValueError(f"job {job_id} is {row['state']}, only failed jobs can be retried")
            has_outputs = self._db.execute(
                "SELECT COUNT(*) FROM outputs WHERE job_id = ?", (job_id,)
            ).fetchone()[0]
            state = JobState.DELIVERING.value if has_outputs else JobState.QUEUED.value
            row = self._db.execute(
                "UPDATE jobs SET state = ?, attempts = 0, not_before = 0, updated_at = ? "
                "WHERE id = ? RETURNING *",
                (state, now, job_id),
            ).fetchone()
        return job_from_row(row)

    # -- HL7 outbox -----------------------------------------------------------------------------

    def add_notification(self, job_id: int, control_id: str, endpoint: str, path: str, priority: int) -> bool:
        """Queue a study version's ORU (its ER7 file must already be durable at ``path``).

        Exactly one row per job: a second call (a retry of the job, a restart) changes nothing and
        returns False, so a study version is notified once whatever happens in between.
        """
        now = time.time()
        with self._transaction():
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO notifications (job_id, control_id, endpoint, path, priority, state, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'queued', ?, ?)",
                (job_id, control_id, endpoint, path, int(priority), now, now),
            )
        return cursor.rowcount == 1

    def notification(self, job_id: int) -> Notification | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM notifications WHERE job_id = ?", (job_id,)).fetchone()
        return notification_from_row(row) if row else None

    def notifications(self) -> list[Notification]:
        """Every ORU in the outbox, by job; none for a store from before the outbox (read-only)."""
        with self._lock:
            try:
                rows = self._db.execute("SELECT * FROM notifications ORDER BY job_id").fetchall()
            except sqlite3.OperationalError:
                return []
        return [notification_from_row(r) for r in rows]

    def claim_notification(self, *, now: float | None = None) -> Notification | None:
        """The next due queued ORU (most urgent first, then oldest), remembered until released."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM notifications WHERE state = 'queued' AND not_before <= ? "
                "ORDER BY priority DESC, job_id LIMIT 64",
                (now,),
            ).fetchall()
            for row in rows:
                if row["job_id"] not in self._claimed_notifications:
                    self._claimed_notifications.add(row["job_id"])
                    return notification_from_row(row)
        return None

    def release_notification(self, job_id: int) -> None:
        with self._lock:
            self._claimed_notifications.discard(job_id)

    def notification_sent(self, job_id: int, ack_code: str) -> Notification:
        now = time.time()
        with self._transaction():
            row = self._db.execute(
                "UPDATE notifications SET state = 'sent', sent_at = ?, ack_code = ?, last_error = NULL, "
                "updated_at = ? WHERE job_id = ? RETURNING *",
                (now, ack_code, now, job_id),
            ).fetchone()
        return notification_from_row(row)

    def notification_retry(
        self, job_id: int, error: str, *, delay_s: float, max_attempts: int
    ) -> Notification:
        """Count a failed send; retry after ``delay_s``, or mark it failed at ``max_attempts``."""
        now = time.time()
        with self._transaction():
            attempts = (
                self._db.execute("SELECT attempts FROM notifications WHERE job_id = ?", (job_id,)).fetchone()[
                    0
                ]
                + 1
            )
            state = NotificationState.QUEUED.value
            if attempts >= max_attempts:
                state, error = NotificationState.FAILED.value, f"{error} (gave up after {attempts} attempts)"
            row = self._db.execute(
                "UPDATE notifications SET state = ?, attempts = ?, last_error = ?, not_before = ?, "
                "updated_at = ? WHERE job_id = ? RETURNING *",
                (state, attempts, error, now + delay_s, now, job_id),
            ).fetchone()
        return notification_from_row(row)

    def requeue_notification(self, job_id: int) -> Notification:
        """Give a failed ORU a fresh start (``jobs --retry`` on a job whose message gave up)."""
        now = time.time()
        with self._transaction():
            row = self._db.execute(
                "UPDATE notifications SET state = 'queued', attempts = 0, not_before = 0, updated_at = ? "
                "WHERE job_id = ? AND state = 'failed' RETURNING *",
                (now, job_id),
            ).fetchone()
        if row is None:
            raise ValueError(f"job {job_id} has no failed HL7 message to retry")
        return notification_from_row(row)

    def next_notification_due(self) -> float | None:
        with self._lock:
            return self._db.execute(
                "SELECT MIN(not_before) FROM notifications WHERE state = 'queued'"
            ).fetchone()[0]

    # -- queries --------------------------------------------------------------------------------

    def job(self, job_id: int) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return job_from_row(row) if row else None

    def jobs(
        self,
        *,
        states: Iterable[JobState | str] | None = None,
        study_instance_uid: str | None = None,
        limit: int | None = None,
    ) -> list[Job]:
        query, params = "SELECT * FROM jobs WHERE 1 = 1", []
        if states is not None:
            values = [JobState(s).value for s in states]
            query += f" AND state IN ({', '.join('?' for _ in values)})"
            params += values
        if study_instance_uid is not None:
            query += " AND study_instance_uid = ?"
            params.append(study_instance_uid)
        query += " ORDER BY id"
        if limit is not None:
            query += " LIMIT ?"
            params.append(int(limit))
        with self._lock:
            return [job_from_row(r) for r in self._db.execute(query, params)]

    def counts_by_state(self) -> dict[str, int]:
        with self._lock:
            counts = dict(self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        return {state.value: counts.get(state.value, 0) for state in JobState}

    def next_due(self) -> float | None:
        """When the next queued/delivering job becomes due (for the worker loop's sleep)."""
        with self._lock:
            return self._db.execute(
                "SELECT MIN(not_before) FROM jobs WHERE state IN ('queued', 'delivering')"
            ).fetchone()[0]

    def studies_past_retention(self, cutoff: float) -> list[str]:
        """Studies with files whose every job is finished and untouched since ``cutoff``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT study_instance_uid FROM jobs GROUP BY study_instance_uid "
                "HAVING SUM(state NOT IN ('delivered', 'failed')) = 0 AND MAX(updated_at) < ? "
                "AND study_instance_uid IN (SELECT DISTINCT study_instance_uid FROM instances)",
                (cutoff,),
            ).fetchall()
        return [r[0] for r in rows]

    def forget_instances(self, study_instance_uid: str) -> list[str]:
        """Delete the study's instance rows (jobs stay as history); returns their spool paths."""
        with self._transaction():
            rows = self._db.execute(
                "DELETE FROM instances WHERE study_instance_uid = ? RETURNING path", (study_instance_uid,)
            ).fetchall()
        return [r[0] for r in rows]

    def _update_job(self, job_id: int, assignments: str, parameters: Sequence[object]) -> Job:
        """``UPDATE jobs SET <assignments>`` of one job, in a transaction of its own; the job as it now is."""
        with self._transaction():
            row = self._db.execute(
                f"UPDATE jobs SET {assignments} WHERE id = ? RETURNING *", (*parameters, job_id)
            ).fetchone()
        return job_from_row(row)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on error) under the store's lock.

        Nested use joins the outer transaction (the outer one commits or rolls back), so
        :meth:`record_instances` can run :meth:`record_instance` several times in one commit.
        """
        with self._lock:
            # A depth count, not ``in_transaction``: a transaction left open by a failed COMMIT
            # must never be mistaken for an outer one (its rows would never be committed).
            if self._transaction_depth:
                self._transaction_depth += 1
                try:
                    yield self._db
                finally:
                    self._transaction_depth -= 1
                return
            self._db.execute("BEGIN IMMEDIATE")
            self._transaction_depth = 1
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            finally:
                self._transaction_depth = 0
            self._db.execute("COMMIT")
