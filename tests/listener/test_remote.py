"""The listener with its models on the shared gRPC worker (``--backend grpc://``), real processes.

storescu → listener → worker (tiny MedSigLIP) → listener → Orthanc, and the worker killed and
restarted while a study waits: the study is processed and delivered once the worker is back.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from medgemma_deploy.dev.synthetic import write_demo_study
from tests.support import REPO
from tests.support.listener import ListenerProcess, all_finished, jobs, storescu
from tests.support.orthanc import free_port, running_orthanc
from tests.support.polling import wait_until

# Orthanc and storescu are checked where they are used (tests.support.system_tools): a missing one fails at
# once naming its Debian package; ./run tests installs them.
pytestmark = pytest.mark.network


class Worker:
    """``medgemma-deploy worker`` on a fixed loopback port, restartable."""

    def __init__(self, medsiglip: Path, port: int, log: Path) -> None:
        self.medsiglip, self.port, self.log = medsiglip, port, log
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "medgemma_deploy", "worker", "--medsiglip", str(self.medsiglip),
                   "--listen", f"127.0.0.1:{self.port}"]  # fmt: skip
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(40)
            except subprocess.TimeoutExpired:
                self.kill()


def _storescu(port: int, folder: Path) -> None:
    sent = storescu(port, folder, options=("-nh", "+sd"))
    assert sent.returncode == 0, sent.stderr


def test_listener_on_a_remote_worker_survives_a_worker_outage(tmp_path, tiny_medsiglip_dir):
    worker = Worker(tiny_medsiglip_dir, free_port(), tmp_path / "worker.log")
    worker.start()
    try:
        with running_orthanc(tmp_path / "orthanc") as orthanc:
            listener = ListenerProcess(
                tmp_path / "spool",
                free_port(),
                ["--pipeline", "classify", "--backend", f"grpc://127.0.0.1:{worker.port}",
                 "--destination", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", "--allow", "STORESCU@127.0.0.1",
                 "--quiet-seconds", "1", "--backoff-seconds", "0.5", "--max-backoff-seconds", "2"],
                # SEG only, so that each study's output count is fixed (2 SR + 2 SEG); Parametric Map
                # delivery is tested in test_listener_orthanc.
                env={"MEDGEMMA_DEPLOY_RELEVANCE_FORMAT": "seg"},
            )  # fmt: skip
            try:
                listener.start(ready_timeout_s=180)  # start-up waits for the worker to serve
                _storescu(listener.port, write_demo_study(tmp_path / "study1", seed=0)[0].parent)
                [first] = wait_until(
                    lambda: all_finished(listener.spool, 1), 120, 0.5, "first study delivered"
                )
                assert (first.state.value, first.n_outputs) == ("delivered", 4), first.last_error

                worker.kill()  # the GPU box goes away
                _storescu(listener.port, write_demo_study(tmp_path / "study2", seed=1)[0].parent)

                def second_waiting() -> bool:
                    return any(
                        j.id == 2 and j.state.value in ("running", "queued") for j in jobs(listener.spool)
                    )

                wait_until(second_waiting, 60, 0.2, "the second study waiting for the worker")
                time.sleep(2)
                assert jobs(listener.spool)[1].state.value in ("running", "queued")  # not failed, not lost
                worker.start()
                found = wait_until(
                    lambda: all_finished(listener.spool, 2), 180, 0.5, "second study delivered"
                )
                assert [(j.state.value, j.n_outputs) for j in found] == [("delivered", 4), ("delivered", 4)]
                assert (
                    sum(len(uids) for uids in orthanc.instances_by_sop_class().values()) == 8
                )  # 2 SR + 2 SEG each
            finally:
                listener.stop()
    finally:
        worker.stop()
