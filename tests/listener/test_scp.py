"""The listener in-process on 127.0.0.1: real associations, DIMSE statuses, spool, jobs and delivery.

The pipeline is the fast :class:`MarkerPipeline` and the destination a recording one, so these
tests are about the network entry itself; tests/listener/test_orthanc.py runs the real models
and a real PACS.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pydicom
import pytest
from pydicom.uid import MRImageStorage, generate_uid
from pynetdicom import _config

from medgemma_deploy.dev.synthetic import write_bad_inputs, write_demo_study
from medgemma_deploy.listener.audit import AuditLog
from medgemma_deploy.listener.delivery import (
    DeliveryItem,
    PermanentDeliveryError,
    StowDestination,
    TransientDeliveryError,
)
from medgemma_deploy.listener.jobmodel import JobState
from medgemma_deploy.listener.jobstore import JobStore
from medgemma_deploy.listener.receiver import InstanceReceiver, StoreStatus
from medgemma_deploy.listener.scp import StorageSCP
from medgemma_deploy.listener.service import Listener, ListenerConfig, server_ssl_context
from medgemma_deploy.listener.spool import Spool
from medgemma_deploy.listener.worker_loop import RetryPolicy
from medgemma_deploy.settings import RunSettings
from tests.support.listener import MarkerPipeline, echo, send_as_is, send_files
from tests.support.polling import wait_until

pytestmark = pytest.mark.network


class RecordingDestination:
    """A destination that keeps what it got; ``fail_next`` transient failures first."""

    name = "test:recording"

    def __init__(self, fail_next: int = 0) -> None:
        self.received: list[str] = []
        self.fail_next = fail_next
        self.calls = 0

    def deliver(self, items: Sequence[DeliveryItem], on_delivered) -> None:
        self.calls += 1
        for item in items:
            if self.fail_next:
                self.fail_next -= 1
                raise TransientDeliveryError("PACS down (test)")
            assert pydicom.dcmread(item.path).SOPInstanceUID == item.sop_instance_uid
            self.received.append(item.sop_instance_uid)
            on_delivered([item.sop_instance_uid])


@contextlib.contextmanager
def running_listener(tmp_path: Path, destination: RecordingDestination, **overrides) -> Iterator[Listener]:
    settings = {
        "ae_title": "MEDGEMMA",
        "spool": tmp_path / "spool",
        "destinations": (),
        "stow_url": "http://unused.invalid",
        "host": "127.0.0.1",
        "port": 0,
        "allow": ("STORESCU@127.0.0.1", "OTHER@10.9.9.9"),
        "quiet_s": 0.3,
        "min_free_bytes": 0,
        "retry": RetryPolicy(max_attempts=5, base_s=0.05, max_s=0.2),
        "retention_s": None,
        "drain_s": 10,
    }
    settings.update(overrides)
    listener = Listener(ListenerConfig(**settings), pipeline=MarkerPipeline(), destinations=[destination])
    listener.start()
    try:
        yield listener
    finally:
        listener.stop()


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory) -> list[Path]:
    return write_demo_study(tmp_path_factory.mktemp("demo"))


def _audit_events(spool: Path) -> list[dict]:
    return [json.loads(line) for line in (spool / "audit.jsonl").read_text().splitlines()]


def _delivered(listener: Listener, count: int) -> list:
    def done():
        found = listener.store.jobs()
        finished = [j for j in found if j.state in (JobState.DELIVERED, JobState.FAILED)]
        return found if len(found) >= count and len(finished) == len(found) else None

    return wait_until(done, 30, 0.05, f"{count} job(s) finished")


def test_study_is_spooled_completed_processed_and_delivered(tmp_path, demo_files):
    destination = RecordingDestination(fail_next=2)
    with running_listener(tmp_path, destination) as listener:
        statuses = send_files(listener.port, demo_files)
        assert set(statuses.values()) == {0x0000} and len(statuses) == 7
        [job] = _delivered(listener, 1)
        assert job.state is JobState.DELIVERED and job.n_instances == 7 and job.n_outputs == 1
        assert destination.calls == 3 and len(destination.received) == 1  # two transient failures, then once
        for record in listener.store.study_instances(job.study_instance_uid, 1):
            assert pydicom.dcmread(listener.spool.path(record.path)).SOPInstanceUID == record.sop_instance_uid

        # The same instances again (a router retrying): idempotent, no new version.
        assert set(send_files(listener.port, demo_files[:3]).values()) == {0x0000}
        # A late instance re-opens the study: version 2, new result UIDs.
        late = pydicom.dcmread(demo_files[1])
        late.SOPInstanceUID = late.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        late.save_as(tmp_path / "late.dcm")
        assert send_files(listener.port, [tmp_path / "late.dcm"]) == {late.SOPInstanceUID: 0}
        jobs = _delivered(listener, 2)
        assert [(j.version, j.n_instances, j.state) for j in jobs] == [
            (1, 7, JobState.DELIVERED),
            (2, 8, JobState.DELIVERED),
        ]
        assert len(set(destination.received)) == 2
    events = [e["event"] for e in _audit_events(tmp_path / "spool")]
    for name in ("association-accepted", "instance-received", "study-complete", "job-retry", "job-delivered"):
        assert name in events
    assert events.count("job-delivered") == 2


def test_allow_list_refuses_unknown_titles_and_unpaired_ones(tmp_path):
    with running_listener(tmp_path, RecordingDestination()) as listener:
        assert echo(listener.port, calling_aet="STORESCU") == 0x0000
        assert echo(listener.port, calling_aet="STRANGER") is None  # A-ASSOCIATE-RJ
        assert (
            echo(listener.port, calling_aet="OTHER") == StoreStatus.NOT_AUTHORIZED
        )  # allowed only from 10.9.9.9
    refused = [e for e in _audit_events(tmp_path / "spool") if e["event"] == "association-refused"]
    assert {e["calling_aet"] for e in refused} == {"STRANGER", "OTHER"}


def test_connections_from_addresses_off_the_allow_list_are_closed(tmp_path):
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    store = JobStore(spool.root / "jobs.sqlite")
    audit = AuditLog(tmp_path / "audit.jsonl")
    scp = StorageSCP(
        "MEDGEMMA", InstanceReceiver(spool, store, audit), allow_list=_allow(["STORESCU@10.9.9.9"])
    )
    scp.start("127.0.0.1", 0)
    try:
        assert echo(scp.port) is None
    finally:
        scp.stop()
        store.close()
    assert any(
        e["event"] == "association-refused" and e["address"] == "127.0.0.1" for e in _audit_events_in(audit)
    )


def _allow(entries):
    from medgemma_deploy.listener.allowlist import AllowList

    return AllowList(entries)


def _audit_events_in(audit: AuditLog) -> list[dict]:
    audit.close()
    return [json.loads(line) for line in audit.path.read_text().splitlines()]


def test_bad_instances_get_their_status_and_good_ones_still_go_through(tmp_path, demo_files, monkeypatch):
    bad = write_bad_inputs(tmp_path / "bad", demo_files[1])
    garbage = tmp_path / "garbage.dcm"  # valid file meta, then bytes that are no data set
    meta_source = pydicom.dcmread(demo_files[1])
    meta_source.file_meta.MediaStorageSOPInstanceUID = garbage_uid = generate_uid()
    pydicom.dcmwrite(garbage, _only_meta(meta_source), enforce_file_format=True)
    garbage.write_bytes(garbage.read_bytes() + b"\x08\x00\x16\x00UI\xff\xff" + bytes(range(256)) * 4)
    mismatch = tmp_path / "mismatch.dcm"  # says MR in the request, CT in the data set
    ds = pydicom.dcmread(demo_files[2])
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.save_as(mismatch)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send bytes as they are on disk
    with running_listener(tmp_path, RecordingDestination()) as listener:
        statuses = {}
        for path in (bad["non-image-sr"], garbage, mismatch, bad["buffer-mismatch"], demo_files[0]):
            meta = pydicom.filereader.read_file_meta_info(path)
            statuses[str(meta.MediaStorageSOPInstanceUID)] = send_as_is(listener.port, path)
        assert statuses[str(pydicom.dcmread(bad["non-image-sr"]).SOPInstanceUID)] == 0x0122
        assert statuses[garbage_uid] == StoreStatus.CANNOT_UNDERSTAND
        assert statuses[str(ds.SOPInstanceUID)] == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
        assert (
            statuses[str(pydicom.dcmread(bad["buffer-mismatch"]).SOPInstanceUID)] == 0x0000
        )  # pipeline's call
        assert statuses[str(pydicom.dcmread(demo_files[0]).SOPInstanceUID)] == 0x0000
        [quarantined] = listener.store.quarantined()
        assert (
            quarantined["sop_instance_uid"] == garbage_uid
            and listener.spool.path(quarantined["path"]).is_file()
        )
        assert listener.store.count_instances() == 2
        _delivered(listener, 1)


def _only_meta(ds: pydicom.Dataset) -> pydicom.Dataset:
    empty = pydicom.Dataset()
    empty.file_meta = ds.file_meta
    return empty


def test_disk_below_the_free_space_floor_is_out_of_resources(tmp_path, demo_files):
    with running_listener(tmp_path, RecordingDestination(), min_free_bytes=2**62) as listener:
        statuses = send_files(listener.port, demo_files[:2])
        assert set(statuses.values()) == {StoreStatus.OUT_OF_RESOURCES}
        assert listener.store.count_instances() == 0 and listener.store.jobs() == []
        assert not any((listener.spool.root / "studies").rglob("*.dcm"))


@pytest.fixture
def tiny_filesystem(tmp_path) -> Iterator[Path]:
    """A 1 MiB tmpfs, where writes really fail with ENOSPC (needs mount rights; skipped without)."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_is_refused_and_never_acknowledged(tmp_path, demo_files, tiny_filesystem):
    source = pydicom.dcmread(demo_files[0])  # the 160 KiB chest CR
    copies = []
    for index in range(10):
        source.SOPInstanceUID = source.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        copies.append(tmp_path / f"cr{index}.dcm")
        source.save_as(copies[-1])
    with running_listener(tiny_filesystem, RecordingDestination(), quiet_s=60) as listener:
        statuses = send_files(listener.port, copies)
        stored = {uid for uid, status in statuses.items() if status == 0}
        refused = {uid for uid, status in statuses.items() if status == StoreStatus.OUT_OF_RESOURCES}
        assert stored and refused and stored | refused == set(statuses)
        for uid in stored:
            record = listener.store.find_instance(uid)
            assert pydicom.dcmread(listener.spool.path(record.path)).SOPInstanceUID == uid
        assert all(listener.store.find_instance(uid) is None for uid in refused)


def test_dicom_tls_with_client_certificates(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    store = JobStore(spool.root / "jobs.sqlite")
    scp = StorageSCP(
        "MEDGEMMA",
        InstanceReceiver(spool, store, AuditLog(tmp_path / "audit.jsonl")),
        ssl_context=server_ssl_context(cert, key, cert),
    )
    scp.start("127.0.0.1", 0)
    try:
        with_cert = ssl.create_default_context(cafile=str(cert))
        with_cert.load_cert_chain(str(cert), str(key))
        assert echo(scp.port, tls_args=(with_cert, "127.0.0.1")) == 0x0000
        assert echo(scp.port, tls_args=(ssl.create_default_context(cafile=str(cert)), "127.0.0.1")) is None
        assert echo(scp.port) is None  # plain DICOM on the TLS port
    finally:
        scp.stop()
        store.close()


class _StowHandler(BaseHTTPRequestHandler):
    responses: ClassVar[list[tuple[int, bytes]]] = []
    bodies: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.bodies.append(self.rfile.read(length))
        code, body = self.responses.pop(0) if self.responses else (200, b"")
        self.send_response(code)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_stow_rs_delivery_statuses(tmp_path, demo_files):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StowHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        destination = StowDestination(f"http://127.0.0.1:{server.server_address[1]}/dicom-web")
        items = [DeliveryItem(p, str(pydicom.dcmread(p).SOPClassUID), str(pydicom.dcmread(p).SOPInstanceUID))
                 for p in demo_files[1:3]]  # fmt: skip
        refused_item = {
            "00081155": {"vr": "UI", "Value": [items[1].sop_instance_uid]},  # ReferencedSOPInstanceUID
            "00081197": {"vr": "US", "Value": [272]},  # FailureReason 0x0110
        }
        failed = {"00081198": {"vr": "SQ", "Value": [refused_item]}}  # FailedSOPSequence
        _StowHandler.responses = [(503, b""), (400, b""), (200, json.dumps(failed).encode()), (200, b"")]
        delivered: list[str] = []
        with pytest.raises(TransientDeliveryError, match="HTTP 503"):
            destination.deliver(items, delivered.extend)
        with pytest.raises(PermanentDeliveryError, match="HTTP 400"):
            destination.deliver(items, delivered.extend)
        with pytest.raises(PermanentDeliveryError, match="refused 1 object"):
            destination.deliver(items, delivered.extend)
        assert delivered == [items[0].sop_instance_uid]
        destination.deliver(items, delivered.extend)
        assert delivered[1:] == [item.sop_instance_uid for item in items]
        assert all(body.count(b"application/dicom") == 2 for body in _StowHandler.bodies)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk is not installed (apt-get install dcmtk)")
def test_three_good_slices_are_delivered_although_a_neighbour_has_an_empty_number_of_frames(
    tmp_path, tiny_models_root
):
    """Issue 12: one malformed instance used to fail its whole study's job (12 acknowledged lost)."""
    from pydicom.data import get_testdata_file

    from medgemma_deploy.cli.jobs import describe_status
    from medgemma_deploy.listener.pipelines import PipelineOptions, make_pipeline

    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder = tmp_path / "study"
    folder.mkdir()
    series_uid = generate_uid(entropy_srcs=["issue 12 listener series"])
    good_uids = []
    for index in range(4):
        ds = source.copy()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
            entropy_srcs=["issue 12 listener", str(index)]
        )
        ds.InstanceNumber = index + 1
        x, y, z = (float(v) for v in source.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 5.0 * index]
        if index == 3:
            ds.NumberOfFrames = None  # the bad neighbour
            bad_uid = str(ds.SOPInstanceUID)
        else:
            good_uids.append(str(ds.SOPInstanceUID))
        ds.save_as(folder / f"slice{index}.dcm", enforce_file_format=True)
    destination = RecordingDestination()
    settings = {
        "ae_title": "MEDGEMMA", "spool": tmp_path / "spool", "destinations": (), "stow_url": "http://unused.invalid",
        "host": "127.0.0.1", "port": 0, "allow": ("STORESCU@127.0.0.1",), "quiet_s": 0.5, "min_free_bytes": 0,
        "retry": RetryPolicy(max_attempts=3, base_s=0.05, max_s=0.2), "retention_s": None, "drain_s": 30,
    }  # fmt: skip
    options = PipelineOptions(models_path=tiny_models_root, settings=RunSettings(device="cpu"))
    pipeline = make_pipeline("classify", options)
    listener = Listener(ListenerConfig(**settings), pipeline=pipeline, destinations=[destination])
    listener.start()
    try:
        command = ["storescu", "-nh", "-aet", "STORESCU", "-aec", "MEDGEMMA", "+sd", "127.0.0.1"]
        command += [str(listener.port), str(folder)]
        subprocess.run(command, check=True, capture_output=True, timeout=120)
        [job] = wait_until(
            lambda: [j for j in listener.store.jobs() if j.state in (JobState.DELIVERED, JobState.FAILED)],
            300,
            0.2,
            "the study's job finished",
        )
        assert job.state is JobState.DELIVERED and job.n_instances == 4 and job.n_rejected == 1
        [rejected] = listener.store.rejected_inputs(job.id)
        assert rejected.sop_instance_uid == bad_uid
        assert "'Number of Frames' is present but empty" in rejected.reason
        assert any(q["sop_instance_uid"] == bad_uid for q in listener.store.quarantined())
        assert "rejected input: 1 instance(s) quarantined" in describe_status(job)
        outputs = listener.store.outputs(job.id)
        assert set(destination.received) == {o.sop_instance_uid for o in outputs}
        srs = [pydicom.dcmread(listener.spool.path(o.path)) for o in outputs if o.kind == "SR"]
        assert len(srs) == 1
        evidence = {
            str(item.ReferencedSOPInstanceUID)
            for study in srs[0].CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for item in series.ReferencedSOPSequence
        }
        maps = {o.sop_instance_uid for o in outputs if o.kind in ("SEG", "PMAP")}
        # The three good slices (and our relevance maps), not the bad one.
        assert evidence == set(good_uids) | maps
    finally:
        listener.stop()
