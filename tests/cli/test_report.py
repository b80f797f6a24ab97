"""``medgemma-deploy report`` and ``study`` end to end on the tiny models."""

import json

import highdicom as hd
import pydicom
import pytest

from medgemma_deploy.cli.main import main
from medgemma_deploy.dev.synthetic import write_demo_study
from tests.support.dciodvfy import run_dciodvfy
from tests.support.sr_text import sr_texts

MAX_NEW_TOKENS = "12"


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    write_demo_study(folder)
    return folder


def _results(out):
    return json.loads((out / "results.json").read_text())


def _evidence_uids(ds):
    return {
        item.ReferencedSOPInstanceUID
        for study in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }


def test_report_streams_tokens_and_writes_valid_report_srs(study_dir, tiny_models_root, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        ["report", "-i", str(study_dir), "-o", str(out), "-m", str(tiny_models_root),
         "--max-new-tokens", MAX_NEW_TOKENS]
    )  # fmt: skip
    assert code == 0
    stdout = capsys.readouterr().out
    results = _results(out)
    assert [o["kind"] for o in results["outputs"]] == ["REPORT-SR", "REPORT-SR"]
    for series in results["series"]:
        report = series["report"]
        assert report["n_generated_tokens"] <= int(MAX_NEW_TOKENS)
        assert report["findings_grounded"] is False
        header = f"{series['modality']} series {series['series_instance_uid']} (UNVERIFIED) ---\n"
        assert header in stdout
        streamed = stdout.split(header, 1)[1].split("\n", 1)[0]
        assert streamed.strip(), "no text streamed for the series"
    ct = next(s for s in results["series"] if s["modality"] == "CT")
    assert ct["report"]["prompt_id"] == "medgemma-ct-slices" and ct["report"]["images_sent"] == ct["n_frames"]
    for output in results["outputs"]:
        path = out / output["path"]
        assert run_dciodvfy(path) == [], path.name
        ds = pydicom.dcmread(path)
        sr = hd.sr.EnhancedSR.from_dataset(ds)
        assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "PARTIAL"
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert any("RANDOM WEIGHTS" in text.upper() for text in sr_texts(ds))
        assert any("ai-generated" in text.lower() for text in sr_texts(ds))


def test_report_with_findings_records_the_grounding(study_dir, tiny_models_root, tmp_path):
    out = tmp_path / "out"
    code = main(
        ["report", "-i", str(study_dir), "-o", str(out), "-m", str(tiny_models_root),
         "--max-new-tokens", MAX_NEW_TOKENS, "--with-findings", "--quiet-tokens"]
    )  # fmt: skip
    assert code == 0
    results = _results(out)
    assert {m["name"] for m in results["models"]} == {
        "medgemma-deploy/tiny-random-medsiglip",
        "medgemma-deploy/tiny-random-medgemma",
    }
    # Grounding runs MedSigLIP but writes only the report SRs.
    assert {o["kind"] for o in results["outputs"]} == {"REPORT-SR"}
    for series in results["series"]:
        context = series["report"]["findings_context"]
        assert series["report"]["findings_grounded"] is True and len(context) == 3
        probabilities = [c["probability"] for c in context]
        assert probabilities == sorted(probabilities, reverse=True)
    for output in results["outputs"]:
        texts = sr_texts(pydicom.dcmread(out / output["path"]))
        assert any("findings_grounded=yes" in text for text in texts), texts


def test_study_outputs_all_reference_the_same_sources(study_dir, tiny_models_root, tmp_path):
    out = tmp_path / "out"
    code = main(
        ["study", "-i", str(study_dir), "-o", str(out), "-m", str(tiny_models_root),
         "--max-new-tokens", MAX_NEW_TOKENS, "--quiet-tokens"]
    )  # fmt: skip
    assert code == 0
    results = _results(out)
    by_series = {}
    for output in results["outputs"]:
        by_series.setdefault(output["source_series_instance_uid"], []).append(output)
    assert len(by_series) == 2
    for outputs in by_series.values():
        datasets = {o["kind"]: pydicom.dcmread(out / o["path"]) for o in outputs}
        # Parametric Maps (default relevance format "both") exist only for images in patient coordinates.
        in_patient_coordinates = "FrameOfReferenceUID" in datasets["SEG"]
        expected = {"REPORT-SR", "SEG", "SR"} | ({"PMAP"} if in_patient_coordinates else set())
        assert {o["kind"] for o in outputs} == expected
        seg_sources = {
            ref.ReferencedSOPInstanceUID
            for series in datasets["SEG"].ReferencedSeriesSequence
            for ref in series.ReferencedInstanceSequence
        }
        assert _evidence_uids(datasets["SR"]) >= seg_sources
        assert _evidence_uids(datasets["REPORT-SR"]) == seg_sources
        for kind, ds in datasets.items():
            assert run_dciodvfy(ds) == [], kind


def test_report_usage_errors_are_one_line(study_dir, tmp_path, capsys):
    code = main(["report", "-i", str(study_dir), "-o", str(tmp_path / "o"), "-m", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "not a medgemma model directory" in err and "Traceback" not in err
    code = main(
        ["report", "-i", str(study_dir), "-o", str(tmp_path / "o"), "-m", str(tmp_path),
         "--max-new-tokens", "0"]
    )  # fmt: skip
    assert code == 2
    assert "max_new_tokens must be >= 1" in capsys.readouterr().err
