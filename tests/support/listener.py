"""Helpers for the listener tests: a listener subprocess, DICOM senders, small studies, a fast pipeline.

:class:`MarkerPipeline` (``--pipeline tests.support.listener:make_marker_pipeline``) stands in for
the model pipelines where a test is about the network and the job machinery, not the models: it
reads the inputs' headers and writes one Basic Text SR per study version, whose SOP Instance UID
is derived from the input UIDs and the version like the real writers do. ``MARKER_DELAY_S`` in its
environment makes it slow, so a test can kill the listener mid-job.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from medgemma_deploy.dev.synthetic import write_ct_studies
from medgemma_deploy.listener.jobmodel import Job, NewInstance
from medgemma_deploy.listener.jobstore import JobStore
from medgemma_deploy.listener.pipelines import PipelineOptions, PipelineOutput, PipelineRun
from medgemma_deploy.listener.spool import Spool
from tests.support import REPO
from tests.support.polling import wait_until
from tests.support.system_tools import require

PATIENT_NAME = "DEMO^SYNTHETIC"
PATIENT_ID = "DEMO-0001"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"

T = TypeVar("T")


# -- a fast stand-in pipeline -------------------------------------------------------------------


class MarkerPipeline:
    """One Basic Text SR per study version (see the module docstring)."""

    name = "marker"

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def process(self, input_dir: Path, output_dir: Path, *, result_version: int) -> PipelineRun:
        sources = [pydicom.dcmread(path, stop_before_pixels=True) for path in sorted(input_dir.iterdir())]
        if self.delay_s:
            time.sleep(self.delay_s)
        output_dir.mkdir(parents=True, exist_ok=True)
        uids = sorted(str(ds.SOPInstanceUID) for ds in sources)
        uid = generate_uid(entropy_srcs=["|".join(["marker", *uids, str(result_version)])])
        sr = _marker_sr(sources[0], uid, len(uids))
        path = output_dir / f"marker-{sr.SOPInstanceUID}.dcm"
        sr.save_as(path, enforce_file_format=True)
        return PipelineRun(
            outputs=(PipelineOutput(path, BASIC_TEXT_SR, str(sr.SOPInstanceUID), "SR"),), models=("marker 1",)
        )


def make_marker_pipeline(options: PipelineOptions) -> MarkerPipeline:
    return MarkerPipeline(delay_s=float(os.environ.get("MARKER_DELAY_S", "0")))


def _marker_sr(source: Dataset, sop_instance_uid: str, n_inputs: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.SOPClassUID, ds.SOPInstanceUID = BASIC_TEXT_SR, sop_instance_uid
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyID",
    ):
        setattr(ds, keyword, source.get(keyword, ""))
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "SR", 999, 1
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[sop_instance_uid, "series"])
    ds.Manufacturer = "medgemma-deploy"
    ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
    ds.ContinuityOfContent = "SEPARATE"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = (
        "18748-4",
        "LN",
        "Diagnostic imaging report",
    )
    ds.ConceptNameCodeSequence = [concept]
    text = Dataset()
    text.RelationshipType, text.ValueType = "CONTAINS", "TEXT"
    text.ConceptNameCodeSequence = [concept]
    text.TextValue = f"test marker over {n_inputs} instance(s); AI-generated, unverified"
    ds.ContentSequence = [text]
    ds.ContentDate, ds.ContentTime = "20250101", "000000"
    return ds


# -- small studies ------------------------------------------------------------------------------


def write_small_studies(
    out_dir: Path, n_studies: int, per_study: int, *, seed: int = 0, size: int = 16
) -> list[Path]:
    """:func:`~medgemma_deploy.dev.synthetic.write_ct_studies` carrying this module's test patient, whose
    name and ID the leak checks grep for in logs, audit and job store."""
    return write_ct_studies(
        out_dir, n_studies, per_study, size=size, seed=seed, patient=(PATIENT_NAME, PATIENT_ID, "19700101")
    )


def spool_studies(spool: Spool, store: JobStore, files: Iterable[Path]) -> dict[str, int]:
    """Record ``files`` as received (written to the spool, as the C-STORE handler does) and complete
    their studies at once; Study Instance UID → job id."""
    job_ids: dict[str, int] = {}
    for path in files:
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        relative = spool.instance_path(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), sha)
        spool.write(relative, [data])
        outcome = store.record_instance(
            NewInstance(str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), None, str(ds.SOPClassUID), None,
                        relative, sha, len(data), "T")
        )  # fmt: skip
        job_ids[str(ds.StudyInstanceUID)] = outcome.job_id
    store.complete_quiet_studies(time.time() + 1)
    return job_ids


# -- a DICOM sender -----------------------------------------------------------------------------


def send_files(
    port: int,
    files: Iterable[Path],
    *,
    calling_aet: str = "STORESCU",
    called_aet: str = "MEDGEMMA",
    statuses: dict[str, int] | None = None,
    stop: threading.Event | None = None,
) -> dict[str, int]:
    """C-STORE ``files`` on one association; returns SOP Instance UID → status (-1: no response).

    Instances after a lost association are recorded with -1 and not sent.
    """
    statuses = {} if statuses is None else statuses
    files = list(files)
    ae = AE(ae_title=calling_aet)
    # pynetdicom notices a peer killed mid-request only at the DIMSE timeout: keep it short.
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for sop_class in {pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID for f in files[:1]} | {
        CTImageStorage
    }:
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
    uids = [
        str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
        for f in files
    ]
    assoc = ae.associate("127.0.0.1", port, ae_title=called_aet)
    no_delay(assoc)
    try:
        for path, uid in zip(files, uids, strict=True):
            if (stop is not None and stop.is_set()) or not assoc.is_established:
                statuses[uid] = -1
                continue
            try:
                response = assoc.send_c_store(path)
            except (RuntimeError, ValueError, OSError):
                statuses[uid] = -1
                continue
            statuses[uid] = int(response.Status) if "Status" in response else -1
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def storescu(
    port: int, *paths: Path, called_aet: str = "MEDGEMMA", options: Sequence[str] = ("+sd", "+r")
) -> subprocess.CompletedProcess:
    """dcmtk's storescu as STORESCU from 127.0.0.1 (a missing storescu fails the test, naming its package).

    ``options`` are storescu's own: the default scans the folders given, recursively; add ``-nh``
    to go on after a refused instance (storescu halts at the first one by default).
    """
    require("storescu")
    command = ["storescu", "-aet", "STORESCU", "-aec", called_aet, *options, "127.0.0.1", str(port)]
    return subprocess.run([*command, *map(str, paths)], capture_output=True, text=True, timeout=120)


def no_delay(assoc: Any) -> None:
    """Turn Nagle's algorithm off on an established association (as dcmtk does with TCP_NODELAY=1)."""
    raw = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if assoc.is_established and raw is not None:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def send_as_is(port: int, path: Path, *, calling_aet: str = "STORESCU", called_aet: str = "MEDGEMMA") -> int:
    """C-STORE one file in its own transfer syntax (pynetdicom reads it with the file's meta only)."""
    meta = pydicom.filereader.read_file_meta_info(path)
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title=called_aet)
    if not assoc.is_established:
        return -1
    try:
        response = assoc.send_c_store(path)
        return int(response.Status) if "Status" in response else -1
    finally:
        assoc.release()


def echo(
    port: int, *, calling_aet: str = "STORESCU", called_aet: str = "MEDGEMMA", tls_args: Any = None
) -> int | None:
    """C-ECHO status, or ``None`` if no association."""
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title=called_aet, tls_args=tls_args)
    if not assoc.is_established:
        return None
    try:
        response = assoc.send_c_echo()
        return int(response.Status) if "Status" in response else None
    finally:
        assoc.release()


# -- the listener as a real process -------------------------------------------------------------


class ListenerProcess:
    """``python -m medgemma_deploy.apps.listener`` with the given options, logging to a file."""

    def __init__(
        self, spool: Path, port: int, args: Sequence[str], *, env: dict[str, str] | None = None
    ) -> None:
        self.spool, self.port, self.args = spool, port, list(args)
        self.env = dict(os.environ, **(env or {}))
        self.log_path = spool.parent / f"{spool.name}-listener.log"
        self.process: subprocess.Popen | None = None

    def start(self, ready_timeout_s: float = 120.0) -> ListenerProcess:
        command = [
            sys.executable,
            "-m",
            "medgemma_deploy.apps.listener",
            "--ae-title",
            "MEDGEMMA",
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--spool",
            str(self.spool),
            *self.args,
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=self.env
            )

        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"listener exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            return echo(self.port) == 0

        wait_until(ready, ready_timeout_s, 0.25, "the listener to answer C-ECHO")
        return self

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, like a crash or an OOM kill."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.terminate()
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def read_job_store(spool: Path, read: Callable[[JobStore], T], missing: T) -> T:
    """``read`` on the spool's job store, opened read-only beside the running listener; ``missing``
    before the listener has created the store."""
    if not (spool / "jobs.sqlite").exists():
        return missing
    store = JobStore(spool / "jobs.sqlite", read_only=True)
    try:
        return read(store)
    finally:
        store.close()


def jobs(spool: Path) -> list[Job]:
    return read_job_store(spool, JobStore.jobs, [])


def all_finished(spool: Path, expected_jobs: int | None = None) -> list[Job] | None:
    """The jobs if every one is delivered/failed (and there are ``expected_jobs`` of them), else None."""
    found = jobs(spool)
    if not found or (expected_jobs is not None and len(found) < expected_jobs):
        return None
    return found if all(job.state.value in ("delivered", "failed") for job in found) else None
