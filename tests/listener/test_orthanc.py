"""End to end with real processes on 127.0.0.1: dcmtk storescu → listener → tiny MedSigLIP → Orthanc.

One Orthanc (with the forwarding plugin of deploy/orthanc) and one listener process (the real
classify pipeline on the tiny random model) serve the whole module; every process is stopped in
teardown.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest

from medgemma_deploy.dev.synthetic import write_bad_inputs, write_demo_study
from medgemma_deploy.listener.jobstore import JobStore
from tests.support import REPO
from tests.support.listener import ListenerProcess, all_finished, jobs, send_as_is, storescu
from tests.support.orthanc import free_port, running_orthanc
from tests.support.polling import wait_until

# Orthanc, its Python plugin and storescu are checked where they are used (tests.support.system_tools): a
# missing one fails at once naming its Debian package; ./run tests installs them.
pytestmark = pytest.mark.network

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
PLUGIN = REPO / "deploy" / "orthanc" / "medgemma_forward.py"


#: storescu's options here: -nh goes on after a refused instance (storescu halts at the first one by
#: default); -R proposes only the SOP classes of the files sent.
STORESCU_OPTIONS = ("-nh", "-R", "+sd", "+r")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, tiny_medsiglip_dir):
    """Orthanc (plugin on, StableAge 1 s) and the listener delivering into it."""
    work = tmp_path_factory.mktemp("e2e")
    listener_port, metrics_port = free_port(), free_port()
    modalities = {"medgemma": {"AET": "MEDGEMMA", "Host": "127.0.0.1", "Port": listener_port}}
    extra = {"StableAge": 1, "UserMetadata": {"MedgemmaForwarded": 4301}}
    with running_orthanc(
        work / "orthanc", modalities=modalities, extra=extra, python_script=PLUGIN
    ) as orthanc:
        listener = ListenerProcess(
            work / "spool",
            listener_port,
            [
                "--pipeline", "classify", "--models", str(tiny_medsiglip_dir),
                "--destination", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
                "--allow", "STORESCU@127.0.0.1", "--allow", "ORTHANC@127.0.0.1",
                "--quiet-seconds", "2", "--retention-hours", "0", "--metrics-port", str(metrics_port),
                "--backoff-seconds", "0.5", "--max-backoff-seconds", "2",
            ],
        )  # fmt: skip
        try:
            listener.start(ready_timeout_s=180)
            yield {"orthanc": orthanc, "listener": listener, "work": work, "metrics_port": metrics_port}
        finally:
            listener.stop()


@pytest.fixture(scope="module")
def first_study(pacs):
    """The demo study plus two instances with broken pixel data and one SR, sent with storescu."""
    folder = pacs["work"] / "study1"
    demo = write_demo_study(folder, seed=0)
    bad = write_bad_inputs(pacs["work"] / "bad", demo[1])
    for case in ("buffer-mismatch", "non-image-sr"):
        shutil.copy(bad[case], folder / f"{case}.dcm")
    # storescu proposes uncompressed syntaxes only unless told otherwise: the JPEG 2000 file goes as is.
    assert send_as_is(pacs["listener"].port, bad["undecodable-jpeg2000"]) == 0x0000
    result = storescu(pacs["listener"].port, folder, options=STORESCU_OPTIONS)
    study_uid = str(pydicom.dcmread(demo[0]).StudyInstanceUID)
    spool = pacs["listener"].spool
    [job] = wait_until(lambda: all_finished(spool, 1), 120, 0.5, "the first study delivered")
    return {"study_uid": study_uid, "job": job, "storescu": result, "demo": demo, "bad": bad}


def _outputs(spool: Path, job_id: int) -> list:
    store = JobStore(spool / "jobs.sqlite", read_only=True)
    try:
        return store.outputs(job_id)
    finally:
        store.close()


def _study_results_in_orthanc(orthanc, study_uid: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for match in orthanc.post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}}):
        tags = orthanc.get(f"/instances/{match}/simplified-tags")
        found.setdefault(tags["SOPClassUID"], set()).add(tags["SOPInstanceUID"])
    return found


def test_study_sent_with_storescu_ends_up_with_its_results_in_orthanc(pacs, first_study):
    job = first_study["job"]
    assert job.state.value == "delivered", job.last_error
    assert job.n_instances == 9  # 7 demo instances + the two with broken pixel data; the SR was refused
    outputs = _outputs(pacs["listener"].spool, job.id)
    parametric_maps = {o.sop_instance_uid for o in outputs if o.kind == "PMAP"}
    # 2 SR + 2 SEG, and (default relevance format "both") a Parametric Map per mapped CT finding.
    assert parametric_maps and job.n_rejected == 2 and job.n_outputs == 4 + len(parametric_maps)
    in_orthanc = _study_results_in_orthanc(pacs["orthanc"], first_study["study_uid"])
    assert in_orthanc[SEG] == {o.sop_instance_uid for o in outputs if o.kind == "SEG"}
    assert in_orthanc[COMPREHENSIVE_3D_SR] == {o.sop_instance_uid for o in outputs if o.kind == "SR"}
    assert in_orthanc[PARAMETRIC_MAP] == parametric_maps
    assert len(in_orthanc[SEG]) == 2 and len(in_orthanc[COMPREHENSIVE_3D_SR]) == 2

    events = [json.loads(line) for line in (pacs["listener"].spool / "audit.jsonl").read_text().splitlines()]
    refused = [e for e in events if e["event"] == "instance-refused"]
    assert [e["status"] for e in refused] == ["0x0122"]
    rejected = {e["sop_instance_uid"] for e in events if e["event"] == "instance-rejected"}
    broken_cases = ("buffer-mismatch", "undecodable-jpeg2000")
    broken = {str(pydicom.dcmread(first_study["bad"][case]).SOPInstanceUID) for case in broken_cases}
    assert rejected == broken


def test_a_late_instance_produces_a_second_version_with_new_uids(pacs, first_study):
    late = pydicom.dcmread(first_study["demo"][2])
    late.SOPInstanceUID = late.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    late.InstanceNumber = 7
    late.ImagePositionPatient = [late.ImagePositionPatient[0], late.ImagePositionPatient[1], -200.0]
    path = pacs["work"] / "late" / "late.dcm"
    path.parent.mkdir()
    late.save_as(path)
    assert storescu(pacs["listener"].port, path, options=STORESCU_OPTIONS).returncode == 0
    spool = pacs["listener"].spool
    found = wait_until(lambda: all_finished(spool, 2), 120, 0.5, "version 2 delivered")
    v1, v2 = sorted(
        (j for j in found if j.study_instance_uid == first_study["study_uid"]), key=lambda j: j.version
    )
    assert (v2.version, v2.n_instances, v2.state.value) == (2, 10, "delivered")
    v1_uids = {o.sop_instance_uid for o in _outputs(spool, v1.id)}
    v2_outputs = _outputs(spool, v2.id)
    v2_uids = {o.sop_instance_uid for o in v2_outputs}
    assert sorted(o.kind for o in v2_outputs if o.kind != "PMAP") == ["SEG", "SEG", "SR", "SR"]
    assert len(v2_uids) == len(v2_outputs) and not v1_uids & v2_uids
    in_orthanc = _study_results_in_orthanc(pacs["orthanc"], first_study["study_uid"])
    ours = in_orthanc[SEG] | in_orthanc[COMPREHENSIVE_3D_SR] | in_orthanc.get(PARAMETRIC_MAP, set())
    assert ours == v1_uids | v2_uids  # each exactly once


def test_orthanc_forwards_stable_studies_and_our_results_do_not_loop(pacs):
    orthanc, spool = pacs["orthanc"], pacs["listener"].spool
    demo = write_demo_study(pacs["work"] / "study2", seed=1)
    study_uid = str(pydicom.dcmread(demo[0]).StudyInstanceUID)
    sent = storescu(
        orthanc.dicom_port, pacs["work"] / "study2", called_aet=orthanc.aet, options=STORESCU_OPTIONS
    )
    assert sent.returncode == 0

    def delivered():
        mine = [j for j in jobs(spool) if j.study_instance_uid == study_uid]
        return mine if mine and all(j.state.value == "delivered" for j in mine) else None

    [job] = wait_until(delivered, 120, 0.5, "the forwarded study processed and delivered")
    assert job.n_instances == 7
    # The results make the study change; once stable again, only our own objects are new: nothing goes back.
    time.sleep(5)
    assert len([j for j in jobs(spool) if j.study_instance_uid == study_uid]) == 1
    output_uids = {o.sop_instance_uid for o in _outputs(spool, job.id)}
    received = {
        e.get("sop_instance_uid")
        for e in map(json.loads, (spool / "audit.jsonl").read_text().splitlines())
        if e["event"] in ("instance-received", "instance-refused")
    }
    assert not output_uids & received
    in_orthanc = _study_results_in_orthanc(orthanc, study_uid)
    ours = in_orthanc[SEG] | in_orthanc[COMPREHENSIVE_3D_SR] | in_orthanc.get(PARAMETRIC_MAP, set())
    assert ours == output_uids
    series = orthanc.get(f"/studies/{orthanc.post('/tools/lookup', study_uid.encode())[0]['ID']}/series")
    images = [i for s in series if s["MainDicomTags"]["Modality"] in ("CR", "CT") for i in s["Instances"]]
    assert len(images) == 7
    assert all(orthanc.get(f"/instances/{i}/metadata?expand").get("MedgemmaForwarded") for i in images)


def test_metrics_and_jobs_command(pacs, first_study):
    with urllib.request.urlopen(f"http://127.0.0.1:{pacs['metrics_port']}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert 'medgemma_listener_instances_total{status="success"}' in metrics
    assert 'medgemma_listener_jobs{state="delivered"}' in metrics
    listing = subprocess.run(
        [sys.executable, "-m", "medgemma_deploy", "jobs", "--spool", str(pacs["listener"].spool)],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert listing.returncode == 0, listing.stderr
    assert first_study["study_uid"] in listing.stdout and "delivered" in listing.stdout


def test_no_patient_data_in_any_log(pacs, first_study):
    """Name, ID and accession number of the test patient appear in no log, audit record or job row."""
    demo = pydicom.dcmread(first_study["demo"][0])
    identifiers = [str(demo.PatientName), str(demo.PatientID), str(demo.AccessionNumber)]
    assert all(len(value) >= 6 for value in identifiers)
    spool = pacs["listener"].spool
    stored = next((spool / "studies").rglob("*.dcm")).read_bytes()
    assert str(demo.PatientID).encode() in stored  # the search below would find them if they leaked
    jobs_json = subprocess.run(
        [sys.executable, "-m", "medgemma_deploy.cli.jobs", "--spool", str(spool), "--json"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    ).stdout  # fmt: skip
    logs = {
        "listener log": pacs["listener"].log_path.read_bytes(),
        "audit log": (spool / "audit.jsonl").read_bytes(),
        "jobs --json": jobs_json.encode(),
        **{f"job store {p.name}": p.read_bytes() for p in spool.glob("jobs.sqlite*")},
    }
    assert logs["audit log"].count(b"\n") > 20 and logs["listener log"]
    for name, content in logs.items():
        for value in identifiers:
            assert value.encode() not in content, f"{value!r} found in the {name}"
            assert value.replace("^", " ").encode() not in content, f"{value!r} found in the {name}"
