"""The job store's data model: its SQLite schema and the records read from it (see :mod:`.jobstore`)."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

from medgemma_deploy.domain import TriagePriority

__all__ = [
    "MIGRATIONS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "TERMINAL_STATES",
    "InstanceRecord",
    "Job",
    "JobState",
    "NewInstance",
    "Notification",
    "NotificationState",
    "OutputRecord",
    "RecordOutcome",
    "RejectedInput",
    "instance_from_row",
    "job_from_row",
    "notification_from_row",
]


#: ``PRAGMA user_version`` of the schema below. Version 1 (before triage) is migrated in place on
#: the first read-write open (:data:`MIGRATIONS`); any other version is refused.
SCHEMA_VERSION = 2

#: Columns added to ``jobs`` by version 2, for stores created by version 1 (SQLite cannot
#: ``ADD COLUMN IF NOT EXISTS``: the store checks ``PRAGMA table_info`` first). ``priority`` is the
#: study version's triage level (``TriagePriority``: 0 routine, 1 urgent, 2 stat), NULL until its
#: findings are known; ``triage`` the reasons as JSON (finding keys, probabilities, thresholds,
#: series UIDs: no patient data).
MIGRATIONS: dict[str, str] = {
    "priority": "ALTER TABLE jobs ADD COLUMN priority INTEGER",
    "triage": "ALTER TABLE jobs ADD COLUMN triage TEXT",
}

#: Tables: instances (one row per SOP Instance UID, newest content), jobs (one per study version),
#: outputs (objects a job wrote), deliveries (per object and destination), quarantine, and
#: rejected_inputs (the instances a job's pipeline refused, with the stage and reason), and
#: notifications (the HL7 ORU outbox: one row per study version, whose message text lives in an
#: ER7 file of the spool, never here, because it holds the patient's identifiers). Every
#: statement is ``IF NOT EXISTS``, so a version-1 store made before rejected_inputs existed gets
#: the table on its next read-write open; readers treat its absence as "none recorded".
SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    version INTEGER NOT NULL,
    calling_aet TEXT,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_by_study ON instances (study_instance_uid, version);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_instance_uid TEXT NOT NULL,
    version INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN
        ('received', 'queued', 'running', 'delivering', 'delivered', 'failed')),
    pipeline TEXT,
    n_instances INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    not_before REAL NOT NULL DEFAULT 0,
    n_outputs INTEGER,
    n_rejected INTEGER,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    last_instance_at REAL NOT NULL,
    delivered_at REAL,
    priority INTEGER,
    triage TEXT,
    UNIQUE (study_instance_uid, version)
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, not_before);
CREATE TABLE IF NOT EXISTS outputs (
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    kind TEXT NOT NULL,
    path TEXT NOT NULL,
    PRIMARY KEY (job_id, sop_instance_uid)
);
CREATE TABLE IF NOT EXISTS deliveries (
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    sop_instance_uid TEXT NOT NULL,
    destination TEXT NOT NULL,
    delivered_at REAL NOT NULL,
    PRIMARY KEY (job_id, sop_instance_uid, destination)
);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid TEXT,
    calling_aet TEXT,
    path TEXT NOT NULL,
    reason TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rejected_inputs (
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    sop_instance_uid TEXT,
    path TEXT NOT NULL,
    stage TEXT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (job_id, path)
);
CREATE TABLE IF NOT EXISTS notifications (
    job_id INTEGER PRIMARY KEY REFERENCES jobs (id),
    control_id TEXT NOT NULL UNIQUE,
    endpoint TEXT NOT NULL,
    path TEXT NOT NULL,
    priority INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'sent', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    not_before REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    sent_at REAL,
    ack_code TEXT
);
CREATE INDEX IF NOT EXISTS notifications_by_state ON notifications (state, not_before);
"""


class JobState(str, Enum):
    """States of a study-version job (see the module docstring for the transitions)."""

    RECEIVED = "received"  #: collecting instances; completes after the quiet period
    QUEUED = "queued"  #: waiting for a pipeline slot (or for its retry time)
    RUNNING = "running"  #: the pipeline is processing it
    DELIVERING = "delivering"  #: results written; sending them (or waiting to retry)
    DELIVERED = "delivered"  #: every result reached every destination
    FAILED = "failed"  #: permanent error or attempts exhausted; ``last_error`` says why


TERMINAL_STATES = (JobState.DELIVERED, JobState.FAILED)


@dataclass(frozen=True)
class NewInstance:
    """An instance just written to the spool, to be recorded."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str | None
    sop_class_uid: str
    transfer_syntax_uid: str | None
    path: str
    sha256: str
    size: int
    calling_aet: str | None


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str | None
    sop_class_uid: str
    path: str
    sha256: str
    size: int
    version: int


@dataclass(frozen=True)
class RecordOutcome:
    """What recording an instance did to its study.

    ``duplicate``: the same content was already recorded (nothing changed). ``new_job``: the
    instance opened a new study version. ``reopened``: it re-opened a queued version.
    ``replaced_path``: the spool file of the previous content of this SOP Instance UID.
    """

    job_id: int
    version: int
    duplicate: bool = False
    new_job: bool = False
    reopened: bool = False
    replaced_path: str | None = None


@dataclass(frozen=True)
class Job:
    id: int
    study_instance_uid: str
    version: int
    state: JobState
    pipeline: str | None
    n_instances: int
    attempts: int
    last_error: str | None
    not_before: float
    n_outputs: int | None
    n_rejected: int | None
    created_at: float
    updated_at: float
    last_instance_at: float
    delivered_at: float | None
    #: Triage level (0 routine, 1 urgent, 2 stat); None until the study's findings are known.
    priority: int | None = None
    #: The reasons for the level as JSON (see :meth:`triage_reasons`).
    triage: str | None = None

    @property
    def priority_name(self) -> str | None:
        return None if self.priority is None else TriagePriority(self.priority).name

    def triage_reasons(self) -> list[dict[str, Any]]:
        """The rules that fired (``TriageReason.to_json`` records), most urgent first."""
        return list(json.loads(self.triage)) if self.triage else []

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["state"] = self.state.value
        data["priority"] = self.priority_name
        data["triage"] = self.triage_reasons()
        return data


class NotificationState(str, Enum):
    """States of a study version's HL7 ORU in the outbox."""

    QUEUED = "queued"  #: waiting to be sent (or for its retry time)
    SENT = "sent"  #: acknowledged AA/CA by the interface engine
    FAILED = "failed"  #: attempts exhausted; ``jobs`` shows the last error


@dataclass(frozen=True)
class Notification:
    """One ORU in the outbox: where its ER7 file is (spool-relative) and how its delivery stands."""

    job_id: int
    control_id: str
    endpoint: str
    path: str
    priority: int
    state: NotificationState
    attempts: int
    last_error: str | None
    not_before: float
    created_at: float
    updated_at: float
    sent_at: float | None
    ack_code: str | None

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["state"] = self.state.value
        data["priority"] = TriagePriority(self.priority).name
        return data


@dataclass(frozen=True)
class RejectedInput:
    """An instance of a job that its pipeline refused: where it is in the spool, the stage and why."""

    job_id: int
    sop_instance_uid: str | None
    path: str
    stage: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class OutputRecord:
    sop_instance_uid: str
    sop_class_uid: str
    kind: str
    path: str


def instance_from_row(row: sqlite3.Row) -> InstanceRecord:
    """The record from an ``instances`` row (which has more columns than the record keeps)."""
    return InstanceRecord(**{f.name: row[f.name] for f in fields(InstanceRecord)})


def job_from_row(row: sqlite3.Row) -> Job:
    data = dict(row)
    data["state"] = JobState(data["state"])
    return Job(**data)


def notification_from_row(row: sqlite3.Row) -> Notification:
    data = dict(row)
    data["state"] = NotificationState(data["state"])
    return Notification(**data)
