"""``listen --index``: a study sent by dcmtk's storescu to a real listener process is indexed.

The listener runs the classify pipeline on the tiny MedSigLIP and indexes every study it
classifies into an SQLite index; delivery goes to a closed port (it is not what this test is about),
so the test waits for the index rows rather than for a delivered job.
"""

import shutil
import subprocess

import pydicom
import pytest

from medgemma_deploy.dev.synthetic import DEMO_PATIENT_ID, DEMO_PATIENT_NAME, write_demo_study
from medgemma_deploy.search.store import open_store
from tests.support.listener import ListenerProcess
from tests.support.orthanc import free_port
from tests.support.polling import wait_until

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(
        shutil.which("storescu") is None, reason="dcmtk is not installed (apt-get install dcmtk)"
    ),
]


def indexed_rows(url):
    with open_store(url) as store:
        return sum(count for _, _, count in store.models())


def test_a_study_sent_by_storescu_is_indexed(tmp_path, tiny_medsiglip_dir):
    study = tmp_path / "study"
    files = write_demo_study(study)
    index_file = tmp_path / "index.db"
    url = f"sqlite:///{index_file}"
    listener = ListenerProcess(
        tmp_path / "spool",
        free_port(),
        [
            "--pipeline", "classify", "--models", str(tiny_medsiglip_dir),
            "--index", "--store", url,
            "--destination", f"NOWHERE@127.0.0.1:{free_port()}",
            "--allow", "STORESCU@127.0.0.1",
            "--quiet-seconds", "1", "--max-attempts", "1", "--retention-hours", "0",
        ],
    )  # fmt: skip
    try:
        listener.start(ready_timeout_s=180)
        sent = subprocess.run(
            [
                "storescu",
                "-aet",
                "STORESCU",
                "-aec",
                "MEDGEMMA",
                "+sd",
                "+r",
                "127.0.0.1",
                str(listener.port),
                study,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert sent.returncode == 0, sent.stderr
        wait_until(lambda: indexed_rows(url) == len(files), 180, 0.5, "the study's frames in the index")
    finally:
        listener.stop()
    with open_store(url) as store:
        ((_, _, rows),) = store.models()
        source = pydicom.dcmread(files[0], stop_before_pixels=True)
        hits = store.search(
            _first_embedding(index_file), model_name=store.models()[0][0], model_version=store.models()[0][1]
        )
    assert rows == len(files)
    assert {hit.study_instance_uid for hit in hits} == {source.StudyInstanceUID}
    content = index_file.read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("index.db-*"))
    assert DEMO_PATIENT_NAME.encode() not in content and DEMO_PATIENT_ID.encode() not in content


def _first_embedding(index_file):
    import apsw
    import numpy as np

    connection = apsw.Connection(str(index_file), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        (blob,) = connection.execute("SELECT embedding FROM index_rows LIMIT 1").fetchone()
    finally:
        connection.close()
    return np.frombuffer(blob, np.float32)
