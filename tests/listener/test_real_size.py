"""The listener on real-size input: a full-size radiograph and a multi-slice CT sent over C-STORE.

A real listener (SCP on 127.0.0.1, spool, job runner) with the real classify pipeline on the tiny
MedSigLIP, once in process and once on a gRPC worker: what a PACS sends (pydicom-data's 1,955 x
1,841 JPEG 2000 CR and a 20-slice 512 x 512 CT) is processed and its SR and SEG delivered, with
the relevance maps on the source pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from medgemma_deploy.listener.delivery import DeliveryItem
from medgemma_deploy.listener.jobmodel import JobState
from medgemma_deploy.listener.pipelines import PipelineOptions, make_pipeline
from medgemma_deploy.listener.service import Listener, ListenerConfig
from medgemma_deploy.listener.worker_loop import RetryPolicy
from medgemma_deploy.settings import RunSettings
from medgemma_deploy.worker.config import WorkerConfig
from medgemma_deploy.worker.edge.server import WorkerServer
from tests.support.polling import wait_until
from tests.support.real_size import write_multislice_ct, write_real_cr

pytestmark = pytest.mark.network

SEG = "1.2.840.10008.5.1.4.1.1.66.4"


class KeepingDestination:
    """Keeps the headers of what it is given."""

    name = "test:keeping"

    def __init__(self) -> None:
        self.received: list[pydicom.Dataset] = []

    def deliver(self, items: Sequence[DeliveryItem], on_delivered) -> None:
        for item in items:
            self.received.append(pydicom.dcmread(item.path, stop_before_pixels=True))
            on_delivered([item.sop_instance_uid])


@pytest.fixture(scope="module")
def real_size_files(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("real-size")
    return [write_real_cr(folder), *write_multislice_ct(folder, 20)]


def _send_as_stored(port: int, files: list[Path]) -> list[int]:
    """C-STORE each file in its own transfer syntax (the JPEG 2000 CR stays compressed, as PACS send it)."""
    ae = AE(ae_title="STORESCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    for pair in {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in headers}:
        ae.add_requested_context(*pair)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDGEMMA")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(path).Status) for path in files]
    finally:
        assoc.release()


def _listen_and_send(tmp_path: Path, settings: RunSettings, models: Path | None, files: list[Path]):
    pipeline = make_pipeline("classify", PipelineOptions(models_path=models, settings=settings))
    destination = KeepingDestination()
    config = ListenerConfig(
        ae_title="MEDGEMMA",
        spool=tmp_path / "spool",
        destinations=(),
        stow_url="http://unused.invalid",
        host="127.0.0.1",
        port=0,
        allow=("STORESCU@127.0.0.1",),
        quiet_s=0.5,
        min_free_bytes=0,
        retry=RetryPolicy(max_attempts=2, base_s=0.05, max_s=0.2),
        retention_s=None,
        drain_s=10,
    )
    listener = Listener(config, pipeline=pipeline, destinations=[destination])
    listener.start()
    try:
        assert _send_as_stored(listener.port, files) == [0x0000] * len(files)

        def finished():
            found = listener.store.jobs()
            done = [j for j in found if j.state in (JobState.DELIVERED, JobState.FAILED)]
            return found if len(found) == 2 and len(done) == len(found) else None

        jobs = wait_until(finished, 300, 0.2, "the two real-size studies processed and delivered")
    finally:
        listener.stop()
    return jobs, destination.received


def _check(jobs, received: list[pydicom.Dataset]) -> None:
    # The CR and the CT come from two studies: one job each.
    assert sorted((job.state, job.n_instances) for job in jobs) == [
        (JobState.DELIVERED, 1),
        (JobState.DELIVERED, 20),
    ]
    shapes = sorted((int(ds.Rows), int(ds.Columns)) for ds in received if ds.SOPClassUID == SEG)
    assert shapes == [(512, 512), (1955, 1841)], "one SEG per series, on the source pixels"
    assert len(received) == sum(job.n_outputs for job in jobs) >= 4  # an SR and a SEG per series


def test_listener_in_process_on_real_size_input(tmp_path, tiny_medsiglip_dir, real_size_files):
    settings = RunSettings(device="cpu")
    _check(*_listen_and_send(tmp_path, settings, tiny_medsiglip_dir, real_size_files))


def test_listener_on_a_worker_on_real_size_input(tmp_path, tiny_medsiglip_dir, real_size_files):
    worker_config = WorkerConfig(
        listen="127.0.0.1:0", medsiglip=tiny_medsiglip_dir, device="cpu", metrics_port=0, drain_timeout=10
    )
    with WorkerServer(worker_config) as worker:
        settings = RunSettings(backend=f"grpc://{worker.address}")
        _check(*_listen_and_send(tmp_path, settings, None, real_size_files))
