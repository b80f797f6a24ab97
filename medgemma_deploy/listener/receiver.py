"""From one C-STORE request to a durable spool entry, and the DIMSE status that says so.

:class:`InstanceReceiver` knows nothing of sockets: the SCP hands it the request's UIDs and the
encoded bytes, and it returns the response Dataset (``Status`` and, on failure, ``ErrorComment``).
The order is the promise: decode the header, write and fsync the file, commit the job-store row,
and only then Success. Any failure on the way is a failure status, never a Success that is lost.
The fsyncs and the commit are shared with concurrent stores (:mod:`.groupcommit`); each store
still waits for its own instance to be durable.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from dataclasses import dataclass
from enum import IntEnum
from io import BytesIO

import pydicom
from pydicom.dataset import Dataset

from medgemma_deploy.listener.audit import AuditLog
from medgemma_deploy.listener.groupcommit import GroupCommitter
from medgemma_deploy.listener.jobmodel import NewInstance
from medgemma_deploy.listener.jobstore import JobStore
from medgemma_deploy.listener.metrics import ListenerMetrics
from medgemma_deploy.listener.spool import Spool, SpoolFullError

__all__ = ["STATUS_TABLE", "InstanceReceiver", "StoreRequest", "StoreStatus"]

logger = logging.getLogger(__name__)


class StoreStatus(IntEnum):
    """C-STORE response statuses the listener sends (PS3.4 B.2.3, PS3.7 C.4)."""

    SUCCESS = 0x0000
    PROCESSING_FAILURE = 0x0110
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NOT_AUTHORIZED = 0x0124
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000


#: status → (category, meaning), as in pynetdicom's ``status.py``.
STATUS_TABLE: dict[StoreStatus, tuple[str, str]] = {
    StoreStatus.SUCCESS: ("Success", "Stored durably (spool file fsync'd, job store committed)"),
    StoreStatus.PROCESSING_FAILURE: ("Failure", "Processing failure (unexpected error in the listener)"),
    StoreStatus.SOP_CLASS_NOT_SUPPORTED: ("Failure", "Refused: SOP Class not supported"),
    StoreStatus.NOT_AUTHORIZED: ("Failure", "Refused: not authorized"),
    StoreStatus.OUT_OF_RESOURCES: ("Failure", "Refused: out of resources (disk full or store unavailable)"),
    StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS: ("Failure", "Error: data set does not match SOP Class"),
    StoreStatus.CANNOT_UNDERSTAND: ("Failure", "Error: cannot understand"),
}

#: The only attributes read at receive time (everything else is the pipeline's business).
_HEADER_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"]


@dataclass(frozen=True)
class StoreRequest:
    """What the C-STORE request and its association say about an instance."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    calling_aet: str
    address: str


class InstanceReceiver:
    """Spools instances and answers their statuses (thread-safe; one per listener).

    Parameters
    ----------
    spool, store, audit, metrics:
        Where files and rows go, and where events are reported.
    committer:
        Makes each instance durable, sharing fsyncs and commits with concurrent stores; by
        default one over ``spool`` and ``store``.
    """

    def __init__(
        self,
        spool: Spool,
        store: JobStore,
        audit: AuditLog,
        metrics: ListenerMetrics | None = None,
        committer: GroupCommitter | None = None,
    ) -> None:
        self.spool, self.store, self.audit = spool, store, audit
        self.metrics = metrics or ListenerMetrics()
        self.committer = committer or GroupCommitter(spool, store)

    def refuse(self, request: StoreRequest, status: StoreStatus, reason: str) -> Dataset:
        """Answer ``status`` without storing anything, and audit it."""
        return self._refusal("instance-refused", request, status, reason)

    def receive(self, request: StoreRequest, header: bytes, stream: bytes) -> Dataset:
        """Store one instance: ``header`` is preamble + file meta, ``stream`` the encoded data set."""
        try:
            return self._receive(request, header, stream)
        except Exception as exc:  # a handler crash must still answer, and say what happened
            logger.exception("C-STORE of %s failed unexpectedly", request.sop_instance_uid)
            return self.refuse(
                request, StoreStatus.PROCESSING_FAILURE, f"{type(exc).__name__} in the listener"
            )

    def _receive(self, request: StoreRequest, header: bytes, stream: bytes) -> Dataset:
        try:
            ds = pydicom.dcmread(
                BytesIO(header + stream), stop_before_pixels=True, specific_tags=_HEADER_TAGS
            )
            study_uid = str(ds.get("StudyInstanceUID", "") or "").strip()
            sop_uid = str(ds.get("SOPInstanceUID", "") or "").strip()
            sop_class = str(ds.get("SOPClassUID", "") or "").strip()
            series_uid = str(ds.get("SeriesInstanceUID", "") or "").strip() or None
        except Exception as exc:  # pydicom raises many types on garbage; all mean "cannot decode"
            return self._quarantine(
                request, header + stream, f"data set cannot be decoded ({type(exc).__name__})"
            )
        if not study_uid or not sop_uid:
            return self._quarantine(request, header + stream, "Study or SOP Instance UID missing")
        if sop_uid != request.sop_instance_uid:
            return self._quarantine(request, header + stream, "SOP Instance UID differs from the request")
        if sop_class != request.sop_class_uid:
            return self.refuse(
                request,
                StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "SOP Class UID differs from the request",
            )

        digest = hashlib.sha256(request.transfer_syntax_uid.encode() + b"\0")
        digest.update(stream)
        sha = digest.hexdigest()
        existing = self.store.find_instance(sop_uid)
        if (
            existing is not None
            and existing.sha256 == sha
            and existing.study_instance_uid == study_uid
            and self.spool.path(existing.path).is_file()
        ):
            self._audit_received(request, study_uid, series_uid, existing.version, None, duplicate=True)
            return self._response(StoreStatus.SUCCESS)

        relative = self.spool.instance_path(study_uid, sop_uid, sha)
        instance = NewInstance(
            sop_instance_uid=sop_uid,
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            sop_class_uid=sop_class,
            transfer_syntax_uid=request.transfer_syntax_uid,
            path=relative,
            sha256=sha,
            size=len(header) + len(stream),
            calling_aet=request.calling_aet,
        )
        with self.committer.writing():
            try:
                self.spool.check_free_space(len(header) + len(stream))
                pending = self.spool.write_pending(relative, [header, stream])
            except SpoolFullError as exc:
                logger.error("spool full, refusing %s: %s", sop_uid, exc)
                return self.refuse(request, StoreStatus.OUT_OF_RESOURCES, "spool disk full")
            except OSError as exc:  # any write failure: refuse rather than promise what is not on disk
                logger.error("cannot write %s to the spool: %s", sop_uid, exc)
                return self.refuse(
                    request, StoreStatus.OUT_OF_RESOURCES, f"spool write failed ({exc.strerror})"
                )
            try:
                # Blocks until the file and the row are durable (shared with concurrent stores).
                outcome = self.committer.commit(pending, instance)
            except SpoolFullError as exc:
                logger.error("spool full, refusing %s: %s", sop_uid, exc)
                self._discard_unrecorded(relative, sop_uid, sha)
                return self.refuse(request, StoreStatus.OUT_OF_RESOURCES, "spool disk full")
            except OSError as exc:
                logger.error("cannot make %s durable in the spool: %s", sop_uid, exc)
                self._discard_unrecorded(relative, sop_uid, sha)
                return self.refuse(
                    request, StoreStatus.OUT_OF_RESOURCES, f"spool write failed ({exc.strerror})"
                )
            except sqlite3.Error as exc:
                logger.error("job store write failed for %s: %s", sop_uid, exc)
                self._discard_unrecorded(relative, sop_uid, sha)
                return self.refuse(request, StoreStatus.OUT_OF_RESOURCES, "job store unavailable")
        if outcome.new_job and outcome.version > 1:
            logger.info("study %s re-opened as version %d", study_uid, outcome.version)
        self._audit_received(
            request,
            study_uid,
            series_uid,
            outcome.version,
            outcome.job_id,
            duplicate=outcome.duplicate,
            size=len(header) + len(stream),
        )
        return self._response(StoreStatus.SUCCESS)

    def _discard_unrecorded(self, relative: str, sop_uid: str, sha: str) -> None:
        """Remove the spool file of a store that failed, unless a committed row names it.

        A concurrent store of the same content (same path) may have committed in another batch;
        its file must stay. When the store cannot even be read, the file stays too: an orphan file
        costs disk space, removing a recorded one would lose an instance.
        """
        try:
            recorded = self.store.find_instance(sop_uid)
        except sqlite3.Error as exc:
            logger.warning("keeping %s: cannot check the job store (%s)", relative, exc)
            return
        if recorded is None or recorded.path != relative or recorded.sha256 != sha:
            self.spool.remove(relative)

    def _quarantine(self, request: StoreRequest, data: bytes, reason: str) -> Dataset:
        try:
            stored = self.spool.quarantine(request.sop_instance_uid, data)
            self.store.record_quarantine(
                request.sop_instance_uid, request.calling_aet, stored.relative_path, reason
            )
        except (OSError, sqlite3.Error) as exc:
            logger.error("cannot quarantine %s: %s", request.sop_instance_uid, exc)
            return self.refuse(request, StoreStatus.OUT_OF_RESOURCES, f"cannot store: {reason}")
        logger.warning("quarantined %s from %s: %s", request.sop_instance_uid, request.calling_aet, reason)
        return self._refusal("instance-quarantined", request, StoreStatus.CANNOT_UNDERSTAND, reason)

    def _refusal(self, event: str, request: StoreRequest, status: StoreStatus, reason: str) -> Dataset:
        """Audit ``event`` for an instance not stored, and answer ``status`` with ``reason``."""
        self.audit.event(
            event,
            sop_instance_uid=request.sop_instance_uid,
            sop_class_uid=request.sop_class_uid,
            calling_aet=request.calling_aet,
            address=request.address,
            status=f"0x{int(status):04X}",
            reason=reason,
        )
        return self._response(status, reason)

    def _audit_received(
        self,
        request: StoreRequest,
        study_uid: str,
        series_uid: str | None,
        version: int,
        job_id: int | None,
        *,
        duplicate: bool,
        size: int | None = None,
    ) -> None:
        self.audit.event(
            "instance-received",
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            sop_instance_uid=request.sop_instance_uid,
            sop_class_uid=request.sop_class_uid,
            transfer_syntax_uid=request.transfer_syntax_uid,
            calling_aet=request.calling_aet,
            address=request.address,
            version=version,
            job_id=job_id,
            bytes=size,
            state="duplicate" if duplicate else "stored",
            status="0x0000",
        )

    def _response(self, status: StoreStatus, comment: str | None = None) -> Dataset:
        self.metrics.instance(status.name.lower())
        response = Dataset()
        response.Status = int(status)
        if comment:
            response.ErrorComment = comment[:64]  # LO: at most 64 characters
        return response
