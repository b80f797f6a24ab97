"""``medgemma-deploy classify`` end to end on the tiny models: outputs, results.json, exit codes."""

import json
import subprocess
import sys

import highdicom as hd
import pydicom
import pytest

from medgemma_deploy.cli.main import main
from medgemma_deploy.dev.synthetic import write_bad_inputs, write_demo_study
from tests.support.dciodvfy import run_dciodvfy
from tests.support.real_size import write_multislice_ct, write_real_cr
from tests.support.sr_text import sr_texts


@pytest.fixture(scope="module")
def demo_study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    return folder, write_demo_study(folder)


@pytest.fixture(scope="module")
def classified(demo_study, tiny_models_root, tmp_path_factory):
    folder, _ = demo_study
    out = tmp_path_factory.mktemp("out")
    code = main(["classify", "-i", str(folder), "-o", str(out), "-m", str(tiny_models_root)])
    return code, out, json.loads((out / "results.json").read_text())


def test_clean_study_exits_zero_and_lists_every_series(classified, demo_study):
    code, _, results = classified
    _, files = demo_study
    assert code == 0
    assert results["status"] == "complete"
    assert results["rejected"] == []
    series_uids = {pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in files}
    assert {s["series_instance_uid"] for s in results["series"]} == series_uids
    for series in results["series"]:
        assert series["findings"], series["modality"]
        for finding in series["findings"]:
            assert 0.0 <= finding["probability"] <= 1.0
            assert len(finding["frame_probabilities"]) == series["n_frames"]


def test_results_say_random_weights_and_unverified(classified):
    _, _, results = classified
    assert results["random_weights"] is True
    assert "RANDOM WEIGHTS" in results["warning"]
    assert results["verified"] is False and results["ai_generated"] is True
    assert results["models"][0]["name"] == "medgemma-deploy/tiny-random-medsiglip"


def test_every_output_is_listed_valid_and_readable(classified):
    _, out, results = classified
    kinds = {o["kind"] for o in results["outputs"]}
    assert {"SR", "SEG"} <= kinds
    for output in results["outputs"]:
        path = out / output["path"]
        ds = pydicom.dcmread(path)
        assert ds.SOPInstanceUID == output["sop_instance_uid"]
        assert ds.SOPClassUID == output["sop_class_uid"]
        assert run_dciodvfy(path) == [], path.name
        if output["kind"] == "SEG":
            seg = hd.seg.Segmentation.from_dataset(ds)
            assert seg.SegmentationType == "FRACTIONAL"
        elif output["kind"] == "PMAP":
            assert ds.SOPClassUID == pydicom.uid.ParametricMapStorage
            assert "RANDOM WEIGHTS" in ds.ImageComments
        else:
            sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
            assert sr.VerificationFlag == "UNVERIFIED"
            texts = sr_texts(ds)
            assert any("RANDOM WEIGHTS" in text.upper() for text in texts), texts


def test_rerun_reproduces_the_same_sop_instance_uids(classified, demo_study, tiny_models_root, tmp_path):
    _, _, first = classified
    folder, _ = demo_study
    assert main(["classify", "-i", str(folder), "-o", str(tmp_path), "-m", str(tiny_models_root)]) == 0
    second = json.loads((tmp_path / "results.json").read_text())
    assert sorted(o["sop_instance_uid"] for o in first["outputs"]) == sorted(
        o["sop_instance_uid"] for o in second["outputs"]
    )


def test_bad_inputs_are_rejected_by_name_and_the_rest_is_processed(
    demo_study, tiny_models_root, tmp_path, capsys
):
    _, files = demo_study
    study = tmp_path / "mixed"
    study.mkdir()
    for f in files:
        (study / f.name).write_bytes(f.read_bytes())
    ct_file = next(f for f in files if pydicom.dcmread(f, stop_before_pixels=True).Modality == "CT")
    bad = write_bad_inputs(study / "bad", ct_file)
    out = tmp_path / "out"
    code = main(["classify", "-i", str(study), "-o", str(out), "-m", str(tiny_models_root)])
    assert code == 3
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "partial"
    reported = {r["source"]: r for r in results["rejected"] + results["skipped"]}
    stderr = capsys.readouterr().err
    for case, path in bad.items():
        assert str(path) in reported, f"{case} ({path.name}) not reported"
        assert reported[str(path)]["reason"], case
        assert path.name in stderr, f"{case} not on stderr"
    assert "Traceback" not in stderr
    # The good series still produced their SR.
    assert {o["kind"] for o in results["outputs"]} >= {"SR"}
    assert len(results["series"]) == 2


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "medgemma_deploy", *args], capture_output=True, text=True, timeout=300
    )


def _io(tmp, models, input_name=None, models_path=None):
    if input_name is None:  # a non-empty input folder; the model check comes first anyway
        input_name = "in"
        (tmp / "in").mkdir(exist_ok=True)
        (tmp / "in" / "file.dcm").write_bytes(b"not read")
    return [
        "-i", str(tmp / input_name),
        "-o", str(tmp / "o"),
        "-m", str(models_path(tmp) if models_path else models),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda tmp, models: _io(tmp, models, input_name="missing"), "does not exist"),
        (lambda tmp, models: _io(tmp, models, models_path=lambda t: t / "no-models"), "does not exist"),
        (lambda tmp, models: _io(tmp, models, models_path=lambda t: t), "not a medsiglip model"),
        (lambda tmp, models: [*_io(tmp, models), "--device", "tpu"], "device"),
        (lambda tmp, models: _io(tmp, models, input_name=(tmp / "empty").mkdir() or "empty"), "is empty"),
    ],
    ids=["missing-input", "missing-models", "not-a-model-dir", "bad-device", "empty-input"],
)
def test_usage_errors_exit_2_with_one_line_and_no_traceback(make_args, message, tiny_models_root, tmp_path):
    proc = _cli("classify", *make_args(tmp_path, tiny_models_root))
    assert proc.returncode == 2, proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(error_lines) == 1 and message in error_lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_real_size_radiograph_and_a_multislice_ct_through_the_cli(tiny_models_root, tmp_path):
    """pydicom-data's 1,955 x 1,841 JPEG 2000 CR and a 20-slice 512 x 512 CT, as a PACS sends them."""
    folder = tmp_path / "in"
    write_real_cr(folder)
    write_multislice_ct(folder, 20)
    out = tmp_path / "out"
    assert main(["classify", "-i", str(folder), "-o", str(out), "-m", str(tiny_models_root)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert sorted((s["modality"], s["n_frames"]) for s in results["series"]) == [("CR", 1), ("CT", 20)]
    segmentations = [out / o["path"] for o in results["outputs"] if o["kind"] == "SEG"]
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in segmentations]
    shapes = sorted((int(ds.Rows), int(ds.Columns)) for ds in headers)
    assert shapes == [(512, 512), (1955, 1841)], "relevance maps on the source pixels"


def test_a_worker_that_stops_answering_mid_run_ends_in_one_line_and_exit_4(
    demo_study, tiny_medsiglip_dir, tmp_path, monkeypatch, capsys
):
    import medgemma_deploy.engine as engine_module
    from medgemma_deploy.worker.config import WorkerConfig
    from medgemma_deploy.worker.edge.server import WorkerServer

    folder, _ = demo_study
    config = WorkerConfig(
        listen="127.0.0.1:0", medsiglip=tiny_medsiglip_dir, device="cpu", metrics_port=0, drain_timeout=5
    )
    worker = WorkerServer(config).__enter__()
    read_study = engine_module.load_study_input

    def read_then_lose_the_worker(*args, **kwargs):
        # The models were described and the label sets sent at open(); the worker goes away before
        # the first image is scored, as a worker killed mid-run would.
        worker.shutdown(drain_timeout=0)
        return read_study(*args, **kwargs)

    monkeypatch.setattr(engine_module, "load_study_input", read_then_lose_the_worker)
    try:
        code = main(["classify", "-i", str(folder), "-o", str(tmp_path / "out"), "--backend",
                     f"grpc://{worker.address}"])  # fmt: skip
    finally:
        worker.shutdown(drain_timeout=0)
    err = capsys.readouterr().err
    assert code == 4
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("medgemma-deploy: error:")]
    assert len(lines) == 1 and worker.address in lines[0] and "retry later" in lines[0], err


def test_results_json_and_the_srs_carry_each_studys_triage(classified):
    _, out, results = classified
    [triage] = results["triage"]  # the demo study; the packaged label sets have triage rules
    assert triage["study_instance_uid"] == results["series"][0]["study_instance_uid"]
    assert triage["uncalibrated"] is True
    probabilities = {
        (series["series_instance_uid"], finding["key"]): finding["probability"]
        for series in results["series"]
        for finding in series["findings"]
    }
    levels = {"ROUTINE": 0, "URGENT": 1, "STAT": 2}
    for reason in triage["reasons"]:  # every reason is a rule the scores really reached
        assert probabilities[(reason["series_instance_uid"], reason["finding"])] >= reason["threshold"]
    expected = max((levels[r["priority"]] for r in triage["reasons"]), default=0)
    assert levels[triage["priority"]] == expected
    for output in results["outputs"]:
        if output["kind"] == "SR":
            texts = sr_texts(pydicom.dcmread(out / output["path"]))
            assert "AI triage priority" in texts
            assert any(text.startswith(f"{triage['priority']}: ") for text in texts)
