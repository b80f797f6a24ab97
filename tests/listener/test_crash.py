"""The promise under failure, with real processes on 127.0.0.1: SIGKILL, a PACS that is down, load.

Every instance answered Success must end up processed and its study's results delivered exactly
once, whatever happens to the listener or the PACS in between. The listener runs the fast
:class:`~tests.support.listener.MarkerPipeline` (one SR per study version, UIDs derived from the
inputs and the version), so what is tested is the spool, the job store and the delivery.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from medgemma_deploy.listener.jobstore import JobStore
from tests.support.listener import (
    BASIC_TEXT_SR,
    ListenerProcess,
    all_finished,
    jobs,
    read_job_store,
    send_files,
    write_small_studies,
)
from tests.support.orthanc import free_port, running_orthanc
from tests.support.polling import wait_until

# Orthanc is checked where it is started (tests.support.orthanc): missing, it fails at once, naming
# the package.
pytestmark = pytest.mark.network

MARKER = "tests.support.listener:make_marker_pipeline"


def _listener(
    tmp_path: Path, port: int, orthanc_port: int, *extra: str, env: dict | None = None
) -> ListenerProcess:
    args = [
        "--pipeline", MARKER, "--destination", f"ORTHANC@127.0.0.1:{orthanc_port}", "--allow", "STORESCU",
        "--quiet-seconds", "1.5", "--retention-hours", "0", "--backoff-seconds", "0.2",
        "--max-backoff-seconds", "1", "--max-attempts", "60", "--concurrency", "2", *extra,
    ]  # fmt: skip
    return ListenerProcess(tmp_path / "spool", port, args, env=env)


def _instance_count(spool: Path) -> int:
    return read_job_store(spool, JobStore.count_instances, 0)


def _check_exactly_once(spool: Path, orthanc, acknowledged: set[str]) -> list:
    """Every acknowledged instance is in a delivered version; Orthanc holds each result once."""
    store = JobStore(spool / "jobs.sqlite", read_only=True)
    try:
        found = store.jobs()
        assert all(job.state.value == "delivered" for job in found), [(j.id, j.last_error) for j in found]
        in_versions = set()
        outputs = []
        for job in found:
            in_versions |= {
                i.sop_instance_uid for i in store.study_instances(job.study_instance_uid, job.version)
            }
            outputs += [o.sop_instance_uid for o in store.outputs(job.id)]
        for uid in acknowledged:
            record = store.find_instance(uid)
            assert record is not None and store.path.parent.joinpath(record.path).is_file(), uid
        assert acknowledged <= in_versions
    finally:
        store.close()
    assert len(outputs) == len(set(outputs)) == len(found)  # one result per study version
    assert sorted(orthanc.instances_by_sop_class().get(BASIC_TEXT_SR, [])) == sorted(outputs)
    return found


def test_sigkill_mid_receive_loses_no_acknowledged_instance(tmp_path):
    files = write_small_studies(tmp_path / "in", n_studies=4, per_study=80)
    by_study = [files[i * 80 : (i + 1) * 80] for i in range(4)]
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        port = free_port()
        listener = _listener(tmp_path, port, orthanc.dicom_port).start()
        try:
            statuses: dict[str, int] = {}
            senders = [threading.Thread(target=send_files, args=(port, study), kwargs={"statuses": statuses})
                       for study in by_study]  # fmt: skip
            for sender in senders:
                sender.start()
            wait_until(lambda: _instance_count(listener.spool) >= 60, 60, 0.02, "60 instances spooled")
            listener.kill()
            for sender in senders:
                sender.join(60)
            acknowledged = {uid for uid, status in statuses.items() if status == 0}
            # Some stored instances may never have had their Success delivered: only acknowledged ones
            # are promised, and a router re-sends the others.
            assert 0 < len(acknowledged) < len(files), "the kill must land mid-receive"

            listener.start()
            unacknowledged = [f for f in files if _uid(f) not in acknowledged]
            retry = send_files(port, unacknowledged)  # what a router does with failed instances
            assert set(retry.values()) == {0}
            found = wait_until(lambda: all_finished(listener.spool, 4), 120, 0.25, "every study delivered")
            _check_exactly_once(listener.spool, orthanc, acknowledged | set(retry))
            assert {job.study_instance_uid for job in found if job.n_instances == 80} == {
                job.study_instance_uid for job in found
            }  # the newest version of each study holds all 80 instances
        finally:
            listener.stop()


def _uid(path: Path) -> str:
    import pydicom

    return str(
        pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID
    )


def test_sigkill_mid_job_resumes_and_delivers_once(tmp_path):
    files = write_small_studies(tmp_path / "in", n_studies=1, per_study=5)
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        port = free_port()
        listener = _listener(tmp_path, port, orthanc.dicom_port, env={"MARKER_DELAY_S": "3"}).start()
        try:
            assert set(send_files(port, files).values()) == {0}
            wait_until(
                lambda: any(j.state.value == "running" for j in jobs(listener.spool)), 60, 0.05, "running"
            )
            listener.kill()
            assert jobs(listener.spool)[0].state.value == "running"
            listener.start()
            [job] = wait_until(
                lambda: all_finished(listener.spool, 1), 60, 0.25, "the job resumed and delivered"
            )
            assert job.n_instances == 5
            _check_exactly_once(listener.spool, orthanc, {_uid(f) for f in files})
            events = [json.loads(line) for line in (listener.spool / "audit.jsonl").read_text().splitlines()]
            [recovered] = [e for e in events if e["event"] == "job-recovered"]
            assert (recovered["job_id"], recovered["state"], recovered["attempts"]) == (job.id, "queued", 1)
            assert [e["event"] for e in events].count("job-processed") == 1  # the killed run never finished
        finally:
            listener.stop()


def test_destination_down_then_back_gets_the_results(tmp_path):
    files = write_small_studies(tmp_path / "in", n_studies=2, per_study=3)
    orthanc_http, orthanc_dicom, port = free_port(), free_port(), free_port()
    listener = _listener(tmp_path, port, orthanc_dicom).start()
    try:
        assert set(send_files(port, files).values()) == {0}

        def retrying():
            found = jobs(listener.spool)
            return len(found) == 2 and all(j.state.value == "delivering" and j.attempts >= 2 for j in found)

        wait_until(retrying, 60, 0.2, "delivery retries while the PACS is down")
        with running_orthanc(
            tmp_path / "orthanc", http_port=orthanc_http, dicom_port=orthanc_dicom
        ) as orthanc:
            wait_until(lambda: all_finished(listener.spool, 2), 60, 0.2, "delivery once the PACS is back")
            _check_exactly_once(listener.spool, orthanc, {_uid(f) for f in files})
        assert listener.stop() == 0  # SIGTERM: a clean drain and exit
    finally:
        listener.stop()


def test_eight_concurrent_associations_lose_nothing(tmp_path):
    files = write_small_studies(tmp_path / "in", n_studies=8, per_study=40, seed=3)
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        port = free_port()
        listener = _listener(tmp_path, port, orthanc.dicom_port).start()
        try:
            statuses: dict[str, int] = {}
            batches = [files[i * 40 : (i + 1) * 40] for i in range(8)]
            senders = [
                threading.Thread(target=send_files, args=(port, batch), kwargs={"statuses": statuses})
                for batch in batches
            ]
            for sender in senders:
                sender.start()
            for sender in senders:
                sender.join(120)
            assert len(statuses) == 320 and set(statuses.values()) == {0}
            wait_until(lambda: all_finished(listener.spool, 8), 120, 0.25, "all eight studies delivered")
            assert _instance_count(listener.spool) == 320
            _check_exactly_once(listener.spool, orthanc, set(statuses))
        finally:
            listener.stop()
