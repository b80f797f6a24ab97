"""Triage notification end to end with real processes and peers on 127.0.0.1: dcmtk storescu →
listener (classify pipeline, tiny MedSigLIP, a chest label set whose STAT rules always fire) →
Orthanc for the SR and hl7apy's MLLP server for the ORU^R01 (parsed in strict v2.5.1 validation).

The second test kills the listener with SIGKILL after the study was classified and its ORU queued,
while the interface engine is still unreachable: the results reach Orthanc meanwhile, ``jobs``
shows the message waiting, and after the restart the ORU arrives exactly once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from medgemma_deploy.dev.bench.triage_bench import write_triage_label_sets
from medgemma_deploy.dev.synthetic import write_demo_study
from medgemma_deploy.listener.hl7 import message_control_id
from medgemma_deploy.listener.jobstore import JobStore
from tests.support import REPO
from tests.support.listener import ListenerProcess, all_finished, read_job_store, storescu
from tests.support.orthanc import free_port, running_orthanc
from tests.support.polling import wait_until
from tests.support.triage import running_mllp_receiver

pytestmark = pytest.mark.network

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def _storescu(port: int, folder: Path) -> None:
    sent = storescu(port, folder)
    assert sent.returncode == 0, sent.stderr


def _listener(work: Path, port: int, orthanc_port: int, hl7_port: int, models: Path) -> ListenerProcess:
    labels = write_triage_label_sets(work / "labels")
    args = [
        "--pipeline", "classify", "--models", str(models),
        "--labels", str(labels[0]), "--labels", str(labels[1]),
        "--destination", f"ORTHANC@127.0.0.1:{orthanc_port}", "--allow", "STORESCU@127.0.0.1",
        "--quiet-seconds", "1.5", "--retention-hours", "0", "--backoff-seconds", "0.5",
        "--max-backoff-seconds", "1", "--max-attempts", "200", "--timeout-seconds", "5",
        "--hl7", f"127.0.0.1:{hl7_port}", "--hl7-receiving-application", "RIS",
        "--hl7-receiving-facility", "HOSP",
    ]  # fmt: skip
    return ListenerProcess(work / "spool", port, args)


def _notifications(spool: Path) -> list:
    return read_job_store(spool, JobStore.notifications, [])


def _jobs_table(spool: Path) -> str:
    listing = subprocess.run(
        [sys.executable, "-m", "medgemma_deploy", "jobs", "--spool", str(spool)],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert listing.returncode == 0, listing.stderr
    return listing.stdout


def _srs_in_orthanc(orthanc, study_uid: str) -> list[dict]:
    found = []
    for match in orthanc.post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}}):
        tags = orthanc.get(f"/instances/{match}/simplified-tags")
        if tags["SOPClassUID"] == COMPREHENSIVE_3D_SR:
            found.append(tags)
    return found


def _no_patient_data(listener: ListenerProcess, demo: pydicom.Dataset) -> None:
    identifiers = [str(demo.PatientName), str(demo.PatientID), str(demo.AccessionNumber)]
    spool = listener.spool
    places = {
        "listener log": listener.log_path.read_bytes(),
        "audit log": (spool / "audit.jsonl").read_bytes(),
        **{f"job store {p.name}": p.read_bytes() for p in spool.glob("jobs.sqlite*")},
    }
    for name, content in places.items():
        for value in identifiers:
            assert value.encode() not in content, f"{value!r} found in the {name}"
            assert value.replace("^", " ").encode() not in content, f"{value!r} found in the {name}"


def test_a_stat_study_sent_with_storescu_gets_its_oru_and_its_sr(tmp_path, tiny_medsiglip_dir):
    demo_files = write_demo_study(tmp_path / "study", seed=3)
    demo = pydicom.dcmread(demo_files[0])
    study_uid = str(demo.StudyInstanceUID)
    with running_orthanc(tmp_path / "orthanc") as orthanc, running_mllp_receiver() as receiver:
        listener = _listener(
            tmp_path, free_port(), orthanc.dicom_port, receiver.server_address[1], tiny_medsiglip_dir
        ).start(ready_timeout_s=180)
        try:
            _storescu(listener.port, tmp_path / "study")
            [job] = wait_until(lambda: all_finished(listener.spool, 1), 120, 0.25, "the study delivered")
            wait_until(lambda: receiver.received, 60, 0.1, "the ORU")
            time.sleep(1.0)  # a duplicate would arrive now
            table = _jobs_table(listener.spool)
        finally:
            listener.stop()
        assert job.state.value == "delivered" and job.priority_name == "STAT", job.last_error
        [oru] = receiver.received  # exactly once, and it parsed in strict v2.5.1 validation
        assert oru.msh.msh_10.to_er7() == message_control_id(study_uid, 1)
        assert (oru.msh.msh_5.to_er7(), oru.msh.msh_6.to_er7()) == ("RIS", "HOSP")
        order = oru.oru_r01_patient_result.oru_r01_order_observation
        assert order.obr.obr_5.to_er7() == "S"
        assert order.oru_r01_timing_qty.tq1.tq1_9.to_er7() == "S^Stat^HL70485"
        assert order.obr.obr_18.to_er7() == str(demo.AccessionNumber)
        assert oru.oru_r01_patient_result.oru_r01_patient.pid.pid_3.to_er7().startswith(str(demo.PatientID))
        observations = order.oru_r01_observation
        coded = [o.obx for o in observations if o.obx.obx_2.to_er7() == "NM"]
        assert coded and all(0.0 <= float(obx.obx_5.to_er7()) <= 1.0 for obx in coded)
        srs = _srs_in_orthanc(orthanc, study_uid)
        assert srs and any(
            "AI triage priority" in json.dumps(sr) and '"STAT"' in json.dumps(sr) for sr in srs
        )
    assert "STAT" in table and "HL7 " in table and ": sent (AA)" in table
    assert not list((listener.spool / "hl7").glob("*.er7"))  # sent: the message file is gone
    _no_patient_data(listener, demo)


def test_sigkill_after_classification_then_the_oru_arrives_exactly_once(tmp_path, tiny_medsiglip_dir):
    demo_files = write_demo_study(tmp_path / "study", seed=4)
    study_uid = str(pydicom.dcmread(demo_files[0]).StudyInstanceUID)
    hl7_port = free_port()  # nothing listens there yet: the interface engine is down
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        listener = _listener(tmp_path, free_port(), orthanc.dicom_port, hl7_port, tiny_medsiglip_dir)
        listener.start(ready_timeout_s=180)
        try:
            _storescu(listener.port, tmp_path / "study")
            # DICOM delivery is not held up by the unreachable interface engine.
            [job] = wait_until(lambda: all_finished(listener.spool, 1), 120, 0.25, "DICOM delivery")
            assert job.state.value == "delivered" and _srs_in_orthanc(orthanc, study_uid)
            wait_until(
                lambda: any(n.attempts >= 2 for n in _notifications(listener.spool)), 60, 0.2, "HL7 retries"
            )
            table = _jobs_table(listener.spool)
            assert "queued, will retry" in table and f"mllp://127.0.0.1:{hl7_port}" in table
            listener.kill()
            [queued] = _notifications(listener.spool)
            assert queued.state.value == "queued" and queued.sent_at is None
            with running_mllp_receiver(hl7_port) as receiver:
                listener.start(ready_timeout_s=180)
                wait_until(
                    lambda: [n for n in _notifications(listener.spool) if n.state.value == "sent"],
                    60,
                    0.2,
                    "the ORU sent after the restart",
                )
                time.sleep(1.5)  # a duplicate would arrive now
                [oru] = receiver.received
                assert oru.msh.msh_10.to_er7() == message_control_id(study_uid, 1)
                assert oru.oru_r01_patient_result.oru_r01_order_observation.obr.obr_5.to_er7() == "S"
        finally:
            listener.stop()
    events = [json.loads(line) for line in (listener.spool / "audit.jsonl").read_text().splitlines()]
    names = [event["event"] for event in events]
    assert names.count("job-processed") == 1 and names.count("hl7-queued") == 1
    assert names.count("hl7-sent") == 1 and names.count("hl7-retry") >= 2
