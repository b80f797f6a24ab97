"""Triage in the listener without a DICOM network: the job store's priority order with aging, its
migration, the HL7 ORU outbox against a real MLLP receiver (hl7apy's server on 127.0.0.1, strict
v2.5.1 parsing), and the job runner's staging (every study classified before any report)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from medgemma_deploy.cli import jobs as jobs_command
from medgemma_deploy.domain import ImageFrame, Series, TriagePriority
from medgemma_deploy.listener.audit import AuditLog
from medgemma_deploy.listener.delivery import DeliveryItem
from medgemma_deploy.listener.hl7 import Hl7Identity, message_control_id
from medgemma_deploy.listener.jobmodel import SCHEMA, JobState, NewInstance, NotificationState
from medgemma_deploy.listener.jobstore import JobStore
from medgemma_deploy.listener.mllp import Hl7Endpoint
from medgemma_deploy.listener.notify import Hl7Outbox, Hl7Settings
from medgemma_deploy.listener.pipelines import PipelineOutput, PipelineRun, PipelineTriage
from medgemma_deploy.listener.spool import Spool
from medgemma_deploy.listener.worker_loop import RetryPolicy, WorkerLoop
from medgemma_deploy.triage import triage_study
from tests.support.listener import PATIENT_ID, PATIENT_NAME, spool_studies, write_small_studies
from tests.support.polling import wait_until
from tests.support.triage import classification, running_mllp_receiver

AGING_S = 600.0


def _instance(study: str, n: int) -> NewInstance:
    return NewInstance(f"{study}.{n}", study, None, "1.2.840.10008.5.1.4.1.1.2", None, f"p/{study}.{n}",
                       f"{study}{n}", 1, "T")  # fmt: skip


def _queue(store: JobStore, study: str, at: float) -> int:
    outcome = store.record_instance(_instance(study, 1), now=at)
    store.complete_quiet_studies(at, now=at)
    return outcome.job_id


# -- job store ------------------------------------------------------------------------------------


def test_a_version_1_store_is_migrated_in_place_and_keeps_its_jobs(tmp_path):
    path = tmp_path / "jobs.sqlite"
    version_1 = SCHEMA.replace("    priority INTEGER,\n    triage TEXT,\n", "")
    version_1 = version_1[: version_1.index("CREATE TABLE IF NOT EXISTS notifications")]
    with sqlite3.connect(path) as db:
        db.executescript(version_1 + "PRAGMA user_version=1;")
        db.execute(
            "INSERT INTO jobs (study_instance_uid, version, state, created_at, updated_at, last_instance_at) "
            "VALUES ('1.2.9', 1, 'queued', 1, 1, 1)"
        )
    store = JobStore(path)
    try:
        [job] = store.jobs()
        assert (job.study_instance_uid, job.priority, job.triage_reasons()) == ("1.2.9", None, [])
        assert store.notifications() == []
        assert store.set_triage(job.id, 2, "[]", requeue=False).priority_name == "STAT"
        assert store._db.execute("PRAGMA user_version").fetchone()[0] == 2
    finally:
        store.close()


def test_untriaged_work_comes_first_then_priority_with_aging(store):
    now = 10_000.0
    old_routine = _queue(store, "1.1", now - 3 * AGING_S)  # waited longer than 2 × aging
    routine = _queue(store, "1.2", now - 60)
    stat = _queue(store, "1.3", now - 10)
    untriaged = _queue(store, "1.4", now - 1)
    for job_id, level in ((old_routine, 0), (routine, 0), (stat, 2)):
        store.set_triage(job_id, level, "[]", requeue=False)

    def order() -> list[int]:
        claimed = []
        while (job := store.claim_next(allow_processing=True, triage_first=True, now=now)) is not None:
            claimed.append(job.id)
        return claimed

    # The untriaged study is classified first; the stat one overtakes the routine study that
    # arrived 50 s before it, but not the one that has waited longer than two aging periods.
    assert order() == [untriaged, old_routine, stat, routine]


def test_without_staging_untriaged_jobs_count_as_routine(store):
    first = _queue(store, "2.1", 100.0)
    urgent = _queue(store, "2.2", 200.0)
    store.set_triage(urgent, 1, "[]", requeue=False)
    claimed = store.claim_next(allow_processing=True, triage_first=False, aging_s=AGING_S, now=300.0)
    assert claimed.id == urgent
    assert store.claim_next(allow_processing=True, now=300.0).id == first


def test_with_the_triage_queue_off_the_order_is_first_come_first_served(store):
    first = _queue(store, "5.1", 100.0)
    stat = _queue(store, "5.2", 200.0)
    store.set_triage(stat, 2, "[]", requeue=False)
    assert store.claim_next(allow_processing=True, by_priority=False, now=300.0).id == first


def test_a_late_instance_has_the_study_triaged_again(store):
    job_id = _queue(store, "3.1", 100.0)
    store.set_triage(job_id, 2, '[{"finding": "pneumothorax"}]', requeue=False)
    store.record_instance(_instance("3.1", 2), now=150.0)
    job = store.job(job_id)
    assert (job.state, job.priority, job.triage) == (JobState.RECEIVED, None, None)


def test_an_outbox_row_is_added_once_per_study_version(store):
    job_id = _queue(store, "4.1", 1.0)
    assert store.add_notification(job_id, "MGD1", "mllp://h:1", "hl7/MGD1.er7", 2)
    assert not store.add_notification(job_id, "MGD1", "mllp://h:1", "hl7/MGD1.er7", 2)
    assert len(store.notifications()) == 1
    with pytest.raises(ValueError, match="no failed HL7 message"):
        store.requeue_notification(job_id)


# -- the outbox against a real MLLP receiver ------------------------------------------------------


def _header_series(path: Path) -> Series:
    dataset = pydicom.dcmread(path)
    dataset.AccessionNumber = "ACC-77"
    zeros = np.zeros((2, 2), np.float32)
    frame = ImageFrame(path, dataset, 1, zeros, zeros, "min-max")
    return Series(str(dataset.StudyInstanceUID), "1.2.3.1", "CR", "CHEST", [frame])


def _triaged(path: Path, probabilities: Mapping[str, float]):
    classified = classification(dict(probabilities))
    classified.series = _header_series(path)
    return triage_study([classified]), [classified]


@pytest.fixture
def outbox_setting(tmp_path):
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    store = JobStore(spool.root / "jobs.sqlite")
    audit = AuditLog(spool.root / "audit.jsonl")
    [path] = write_small_studies(tmp_path / "in", 1, 1)
    job_id = _queue(store, str(pydicom.dcmread(path).StudyInstanceUID), time.time())
    yield {"spool": spool, "store": store, "audit": audit, "path": path, "job": store.job(job_id)}
    store.close()
    audit.close()


def _outbox(setting, port: int, *, max_attempts: int = 5, **settings) -> Hl7Outbox:
    hl7 = Hl7Settings(
        endpoint=Hl7Endpoint("127.0.0.1", port, timeout_s=3),
        identity=Hl7Identity(receiving_application="RIS"),
        **settings,
    )
    return Hl7Outbox(
        setting["store"], setting["spool"], setting["audit"], hl7, max_attempts=max_attempts,
        backoff=lambda attempts: 0.0,
    )  # fmt: skip


def _no_patient_data(*paths: Path) -> None:
    for path in paths:
        data = path.read_bytes()
        for value in (PATIENT_ID, PATIENT_NAME, PATIENT_NAME.split("^")[1]):
            assert value.encode() not in data, f"{value} found in {path.name}"


@pytest.mark.parametrize(
    ("script", "attempts"), [([], 1), (["AE"], 2), (["DROP"], 2)], ids=["accepted", "AE-first", "dropped"]
)
def test_a_stat_study_reaches_the_receiver_once_with_priority_s(outbox_setting, script, attempts):
    store, job = outbox_setting["store"], outbox_setting["job"]
    triage, classified = _triaged(outbox_setting["path"], {"pneumothorax": 0.9})
    with running_mllp_receiver() as receiver:
        receiver.codes = list(script)
        outbox = _outbox(outbox_setting, receiver.server_address[1])
        assert outbox.enqueue(job, triage, classified)
        assert not outbox.enqueue(job, triage, classified)  # once per study version
        queued = store.notification(job.id)
        er7_file = outbox_setting["spool"].path(queued.path)
        assert queued.state is NotificationState.QUEUED and er7_file.is_file()
        while outbox.send_due():
            pass
        sent = store.notification(job.id)
        assert (sent.state, sent.attempts, sent.ack_code) == (NotificationState.SENT, attempts - 1, "AA")
        assert receiver.answers == [*script, "AA"]
        # Every delivery attempt carried the same message: one control id per study version.
        control_ids = {message.msh.msh_10.to_er7() for message in receiver.received}
        assert control_ids == {message_control_id(job.study_instance_uid, job.version)}
        order = receiver.received[-1].oru_r01_patient_result.oru_r01_order_observation
        assert order.obr.obr_5.to_er7() == "S"
        assert order.oru_r01_timing_qty.tq1.tq1_9.to_er7() == "S^Stat^HL70485"
        assert order.obr.obr_18.to_er7() == "ACC-77"
        pid = receiver.received[-1].oru_r01_patient_result.oru_r01_patient.pid
        assert pid.pid_3.to_er7().startswith(PATIENT_ID)
    assert not er7_file.exists()  # sent: the patient data is not kept
    events = [json.loads(line)["event"] for line in (outbox_setting["spool"].root / "audit.jsonl").open()]
    assert events.count("hl7-sent") == 1 and events.count("hl7-retry") == len(script)
    _no_patient_data(
        outbox_setting["spool"].root / "jobs.sqlite", outbox_setting["spool"].root / "audit.jsonl"
    )


def test_routine_studies_are_sent_only_when_asked(outbox_setting):
    triage, classified = _triaged(outbox_setting["path"], {"pneumothorax": 0.1})
    assert triage.priority is TriagePriority.ROUTINE
    assert not _outbox(outbox_setting, 9).enqueue(outbox_setting["job"], triage, classified)
    assert _outbox(outbox_setting, 9, send_all=True).enqueue(outbox_setting["job"], triage, classified)


def test_an_unreachable_endpoint_is_retried_then_failed_and_shown_in_jobs(outbox_setting, unused_port):
    store, job = outbox_setting["store"], outbox_setting["job"]
    triage, classified = _triaged(outbox_setting["path"], {"consolidation": 0.8})
    outbox = _outbox(outbox_setting, unused_port, max_attempts=3)
    outbox.enqueue(job, triage, classified)
    assert outbox.send_due()
    retrying = store.notification(job.id)
    assert (retrying.state, retrying.attempts) == (NotificationState.QUEUED, 1)
    status = jobs_command.describe_notification(retrying)
    assert "queued, will retry (attempt 1 failed" in status and f"127.0.0.1:{unused_port}" in status
    while outbox.send_due():
        pass
    failed = store.notification(job.id)
    assert (failed.state, failed.attempts) == (NotificationState.FAILED, 3)
    table = jobs_command.format_table(store.jobs(), {}, {n.job_id: n for n in store.notifications()})
    assert f"mllp://127.0.0.1:{unused_port}: failed after 3 attempt(s)" in table
    assert store.requeue_notification(job.id).state is NotificationState.QUEUED


# -- the job runner: classification first, urgent reports first ------------------------------------


class StagedPipeline:
    """Triage from a scripted probability per study; process writes one SR-like output per study."""

    name = "staged"
    classifies_first = True

    def __init__(self, probabilities: Mapping[str, Mapping[str, float]]) -> None:
        self.probabilities = probabilities
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def _study(self, input_dir: Path) -> tuple[str, Path]:
        first = sorted(input_dir.iterdir())[0]
        return str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID), first

    def triage(self, input_dir: Path) -> PipelineTriage:
        study, first = self._study(input_dir)
        with self._lock:
            self.calls.append(("triage", study))
        triage, classified = _triaged(first, self.probabilities.get(study, {}))
        return PipelineTriage(triage=triage, classifications=tuple(classified))

    def process(self, input_dir: Path, output_dir: Path, *, result_version: int) -> PipelineRun:
        study, first = self._study(input_dir)
        with self._lock:
            self.calls.append(("process", study))
        output_dir.mkdir(parents=True, exist_ok=True)
        ds = pydicom.dcmread(first)
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[study, str(result_version)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(output_dir / "out.dcm")
        output = PipelineOutput(output_dir / "out.dcm", str(ds.SOPClassUID), str(ds.SOPInstanceUID), "SR")
        return PipelineRun(outputs=(output,))


class Collecting:
    name = "test:collect"

    def __init__(self) -> None:
        self.received: list[str] = []

    def deliver(self, items, on_delivered) -> None:
        for item in items:
            assert isinstance(item, DeliveryItem)
            self.received.append(item.sop_instance_uid)
            on_delivered([item.sop_instance_uid])


def test_every_study_is_classified_before_any_report_and_the_stat_one_is_reported_first(tmp_path):
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    store = JobStore(spool.root / "jobs.sqlite")
    audit = AuditLog(spool.root / "audit.jsonl")
    files = write_small_studies(tmp_path / "in", 4, 1)
    studies = [str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files]
    stat_study = studies[-1]  # the last to arrive
    pipeline = StagedPipeline({stat_study: {"pneumothorax": 0.95}})
    job_ids = spool_studies(spool, store, files)
    destination = Collecting()
    with running_mllp_receiver() as receiver:
        hl7 = Hl7Settings(endpoint=Hl7Endpoint("127.0.0.1", receiver.server_address[1], timeout_s=3))
        outbox = Hl7Outbox(store, spool, audit, hl7, max_attempts=3, backoff=lambda n: 0.0)
        loop = WorkerLoop(
            store, spool, pipeline, [destination], audit, concurrency=1,
            retry=RetryPolicy(max_attempts=3, base_s=0.01, max_s=0.02), idle_poll_s=0.02, outbox=outbox,
        )  # fmt: skip
        loop.start()
        outbox.start()
        try:
            wait_until(lambda: len(destination.received) == 4, 30, 0.05, "four studies delivered")
            wait_until(lambda: receiver.received, 10, 0.05, "the ORU")
        finally:
            loop.stop(10)
            outbox.stop()
        assert [kind for kind, _ in pipeline.calls[:4]] == ["triage"] * 4
        assert pipeline.calls[4] == ("process", stat_study)
        assert sorted(study for kind, study in pipeline.calls if kind == "process") == sorted(studies)
        [oru] = receiver.received  # routine studies are not notified (default: URGENT and above)
        assert oru.oru_r01_patient_result.oru_r01_order_observation.obr.obr_5.to_er7() == "S"
    stat_job = store.job(job_ids[stat_study])
    assert (stat_job.priority_name, stat_job.state) == ("STAT", JobState.DELIVERED)
    assert stat_job.triage_reasons()[0]["finding"] == "pneumothorax"
    assert {store.job(job_ids[s]).priority_name for s in studies[:-1]} == {"ROUTINE"}
    store.close()
    audit.close()
    _no_patient_data(spool.root / "jobs.sqlite", spool.root / "audit.jsonl")


def test_an_unreachable_interface_engine_never_holds_up_dicom_delivery(tmp_path, unused_port):
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    store = JobStore(spool.root / "jobs.sqlite")
    audit = AuditLog(spool.root / "audit.jsonl")
    files = write_small_studies(tmp_path / "in", 1, 2)
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    [job_id] = spool_studies(spool, store, files).values()
    destination = Collecting()
    hl7 = Hl7Settings(endpoint=Hl7Endpoint("127.0.0.1", unused_port, timeout_s=2))
    outbox = Hl7Outbox(store, spool, audit, hl7, max_attempts=50, backoff=lambda n: 0.05)
    loop = WorkerLoop(
        store, spool, StagedPipeline({study: {"pneumothorax": 0.99}}), [destination], audit,
        retry=RetryPolicy(max_attempts=3, base_s=0.01, max_s=0.02), idle_poll_s=0.02, outbox=outbox,
    )  # fmt: skip
    loop.start()
    outbox.start()
    try:
        wait_until(lambda: store.job(job_id).state is JobState.DELIVERED, 30, 0.05, "DICOM delivery")
        wait_until(lambda: store.notification(job_id).attempts >= 2, 30, 0.05, "two failed HL7 attempts")
    finally:
        loop.stop(10)
        outbox.stop()
    notification = store.notification(job_id)
    assert notification.state is NotificationState.QUEUED
    assert "mllp://127.0.0.1" in notification.last_error
    assert destination.received  # the results reached the PACS while the message waits
    store.close()
    audit.close()


def test_the_triage_stage_classifies_without_maps_or_files(tmp_path, tiny_medsiglip_dir):
    from medgemma_deploy.dev.bench.triage_bench import write_triage_label_sets
    from medgemma_deploy.dev.synthetic import write_demo_study
    from medgemma_deploy.engine import EngineOptions, PipelineEngine

    study = tmp_path / "study"
    write_demo_study(study, seed=1)
    before = sorted(study.rglob("*"))
    labels = write_triage_label_sets(tmp_path / "labels")
    options = EngineOptions(label_files=tuple(labels), device="cpu")
    with PipelineEngine("classify", tiny_medsiglip_dir, options) as engine:
        assert not engine.classifies_first  # classification is the whole job: nothing to stage
        findings = engine.triage(study)
    assert findings.triage is not None and findings.triage.priority is TriagePriority.STAT
    assert {r.finding.key for r in findings.triage.reasons} <= {
        s.finding.key for c in findings.classifications if c.series.modality == "CR" for s in c.scores
    }
    assert {c.series.modality for c in findings.classifications} == {"CR", "CT"}
    assert all(not c.relevance_maps for c in findings.classifications)
    assert sorted(study.rglob("*")) == before
