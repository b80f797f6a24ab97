"""Structured audit log of the listener: one JSON object per line, UIDs only, never patient data.

Each line has ``ts`` (UTC, ISO 8601), ``event`` and the fields of that event. Field names come from
one allow-list, :data:`AUDIT_FIELDS`: identifiers (UIDs, AE titles, addresses, job ids), counts,
statuses and reasons. There is no field for patient name, ID, birth date or any other attribute
value, so a caller cannot log one by mistake; an unknown field raises ``ValueError``.

Events: ``association-accepted``, ``association-refused``, ``association-released``,
``association-aborted``, ``instance-received``, ``instance-refused``, ``instance-quarantined``,
``study-complete``, ``job-started``, ``job-processed``, ``instance-rejected`` (by the pipeline),
``job-retry``, ``job-failed``, ``delivered``, ``delivery-failed``, ``job-delivered``, ``job-recovered``,
``study-purged``, ``listener-started``, ``listener-stopped``; triage and HL7: ``job-triaged``,
``hl7-queued``, ``hl7-sent``, ``hl7-retry``, ``hl7-failed`` (control ids and priorities, never the
message).
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from medgemma_deploy.listener.jobmodel import Job

__all__ = ["AUDIT_FIELDS", "AuditLog"]

logger = logging.getLogger(__name__)

#: The only field names an audit event may carry (identifiers, counts, statuses, reasons).
AUDIT_FIELDS = frozenset(
    {
        "ack",
        "address",
        "ae_title",
        "association",
        "attempts",
        "bytes",
        "called_aet",
        "calling_aet",
        "control_id",
        "delay_s",
        "destination",
        "duration_s",
        "error",
        "job_id",
        "model",
        "n_instances",
        "n_outputs",
        "n_rejected",
        "outputs",
        "pipeline",
        "port",
        "priority",
        "reason",
        "sop_class_uid",
        "sop_instance_uid",
        "series_instance_uid",
        "stage",
        "state",
        "status",
        "study_instance_uid",
        "tls",
        "transfer_syntax_uid",
        "version",
    }
)


class AuditLog:
    """Append-only JSON-lines audit log, safe to call from any thread.

    Parameters
    ----------
    path:
        The log file (appended to; created with its folder if missing).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file: TextIO | None = self.path.open("a", encoding="utf-8")

    def event(self, name: str, **fields: Any) -> None:
        """Write one event; ``None`` fields are left out.

        Raises
        ------
        ValueError
            A field name is not in :data:`AUDIT_FIELDS` (the allow-list keeps patient data out).
        """
        unknown = sorted(set(fields) - AUDIT_FIELDS)
        if unknown:
            raise ValueError(f"audit event {name!r}: field(s) {', '.join(unknown)} are not in AUDIT_FIELDS")
        record = {"ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": name}
        record.update({key: value for key, value in fields.items() if value is not None})
        line = json.dumps(record, ensure_ascii=False, default=str)
        with self._lock:
            if self._file is None:
                logger.warning("audit log %s is closed; event %s not written", self.path, name)
                return
            self._file.write(line + "\n")
            self._file.flush()

    def job_event(self, name: str, job: Job, **fields: Any) -> None:
        """Write one event about a study version: its ``job_id``, ``study_instance_uid`` and
        ``version``, then ``fields`` (as :meth:`event`)."""
        self.event(
            name, job_id=job.id, study_instance_uid=job.study_instance_uid, version=job.version, **fields
        )

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
