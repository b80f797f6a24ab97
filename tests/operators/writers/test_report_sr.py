"""Report SR (TID 2000, Enhanced SR) and its text: validator-clean, round trip, UTF-8, evidence,
UIDs, errors, and Findings/Impression splitting.

Series and requests are built by hand (``test_report_inputs``); results are hand-made
``ReportResult`` objects, so these tests need no model. The tiny-model end-to-end run is in
``test_medgemma.py``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import highdicom
import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes

from medgemma_deploy.domain import (
    AlgorithmInfo,
    GenerationSettings,
    ImageFrame,
    ModelIdentity,
    ReportResult,
    Series,
)
from medgemma_deploy.operators.medgemma.prompts import PromptBook
from medgemma_deploy.operators.medgemma.request import build_report_request
from medgemma_deploy.operators.medgemma.text import clean_report_text, split_report
from medgemma_deploy.operators.writers.common import AI_DISCLAIMER, RANDOM_WEIGHTS_WARNING
from medgemma_deploy.operators.writers.report_sr import DRAFT_REVIEW_NOTE, build_report_sr
from tests.support.dciodvfy import requires_dciodvfy, run_dciodvfy
from tests.support.inputs import PACKAGED_PROMPTS, make_cr_series, make_ct_series
from tests.support.pixelmed import assert_pixelmed_clean, requires_pixelmed

MULTILINGUAL_TEXT = (
    "**Findings:**\nПневмония в нижней доле справа. 肺炎。 Größe des Herzens normal.\n\n"
    "**Impression:**\nПневмония (肺炎), Größe unauffällig."
)
RANDOM_MODEL = ModelIdentity("medgemma-deploy/tiny-random-medgemma", "seed0-abc", Path("/models/mg"), True)
REAL_MODEL = ModelIdentity("google/medgemma-4b-it", "a" * 40, Path("/models/medgemma"), False)
ALGORITHM = AlgorithmInfo(name="google/medgemma-4b-it", version="a" * 40, parameters=(("site", "test"),))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> PromptBook:
    """The packaged prompts with CT limited to 4 slices, so that evidence is a strict subset."""
    document = yaml.safe_load(PACKAGED_PROMPTS.read_text())
    document["families"]["ct"]["max_images"] = 4
    path = tmp_path_factory.mktemp("prompts") / "prompts.yaml"
    path.write_text(yaml.safe_dump(document))
    return PromptBook.load(path)


def _result(request, text: str = MULTILINGUAL_TEXT) -> ReportResult:
    return ReportResult(
        text=text,
        token_ids=[5, 6, 7],
        n_prompt_tokens=100,
        n_generated_tokens=3,
        finish_reason="stop",
        seconds=0.5,
        tokens_per_second=6.0,
        settings=request.settings,
        prompt_id=request.prompt_id,
        prompt_version=request.prompt_version,
    )


@pytest.fixture(scope="module")
def ct_case(prompts):
    series = make_ct_series(10)
    screening = [("pulmonary nodule", 0.83)]  # the draft is grounded on this finding
    settings = GenerationSettings(max_new_tokens=64)
    request = build_report_request(series, prompts, settings=settings, findings_context=screening)
    return series, request, _result(request)


def _content_items(dataset: pydicom.Dataset) -> list[pydicom.Dataset]:
    """Every content item of the tree, depth first."""
    found = []
    for item in dataset.get("ContentSequence", []):
        found.append(item)
        found.extend(_content_items(item))
    return found


def _texts(dataset: pydicom.Dataset, meaning: str) -> list[str]:
    return [
        str(item.TextValue)
        for item in _content_items(dataset)
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeMeaning == meaning
    ]


def _section_text(dataset: pydicom.Dataset, section_code: str) -> list[str]:
    return [
        str(child.TextValue)
        for item in dataset.ContentSequence
        if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue == section_code
        for child in item.ContentSequence
    ]


def _write(document, tmp_path: Path) -> Path:
    path = tmp_path / "report.dcm"
    document.save_as(path, enforce_file_format=True)
    return path


@requires_dciodvfy
def test_ct_report_sr_is_validator_clean(ct_case, tmp_path):
    series, request, result = ct_case
    document = build_report_sr(series, result, request, RANDOM_MODEL, ALGORITHM)
    path = tmp_path / "report.dcm"
    document.save_as(path, enforce_file_format=True)
    assert run_dciodvfy(path) == []


@pytest.fixture(scope="module")
def real_cr_case(prompts):
    """pydicom-data's real chest CR (RG1_UNCI) as a one-image series, its request and a short result."""
    found = get_testdata_file("RG1_UNCI.dcm")
    if found is None:
        pytest.skip("pydicom-data's RG1_UNCI.dcm (real chest CR) is not available")
    dataset = pydicom.dcmread(str(found))
    template = make_cr_series().frames[0]
    frame = ImageFrame(Path(str(found)), dataset, 1, template.values, template.display, "test")
    series = Series(str(dataset.StudyInstanceUID), str(dataset.SeriesInstanceUID), "CR", "CHEST", [frame])
    request = build_report_request(series, prompts, settings=GenerationSettings())
    return series, request, _result(request, "The lungs are clear.")


@requires_dciodvfy
def test_report_sr_of_a_real_chest_cr_is_validator_clean(real_cr_case):
    series, request, result = real_cr_case
    document = build_report_sr(series, result, request, REAL_MODEL, ALGORITHM)
    assert run_dciodvfy(document) == []
    assert document.PatientID == series.frames[0].dataset.PatientID


def test_round_trip_structure_flags_and_utf8(ct_case, tmp_path):
    series, request, result = ct_case
    path = _write(build_report_sr(series, result, request, RANDOM_MODEL, ALGORITHM), tmp_path)
    read = highdicom.sr.srread(path)
    assert isinstance(read, highdicom.sr.EnhancedSR)
    assert read.VerificationFlag == "UNVERIFIED"
    assert read.CompletionFlag == "PARTIAL"
    assert read.PreliminaryFlag == "PRELIMINARY"
    assert read.SpecificCharacterSet == "ISO_IR 192"
    assert read.Modality == "SR"
    title = read.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("18748-4", "LN")
    assert read.ContentTemplateSequence[0].TemplateIdentifier == "2000"
    assert read.StudyInstanceUID == series.study_instance_uid
    assert _section_text(read, codes.cid7001.Findings.value) == [
        "Пневмония в нижней доле справа. 肺炎。 Größe des Herzens normal."
    ]
    assert _section_text(read, codes.cid7001.Impressions.value) == ["Пневмония (肺炎), Größe unauffällig."]
    language = next(
        item for item in read.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "121049"
    )
    assert language.ConceptCodeSequence[0].CodingSchemeDesignator == "RFC5646"
    observer_types = [
        item.ConceptCodeSequence[0].CodeMeaning
        for item in read.ContentSequence
        if item.RelationshipType == "HAS OBS CONTEXT" and item.ValueType == "CODE"
    ]
    assert observer_types == ["Device"]
    assert _texts(read, "Device Observer Model Name") == [RANDOM_MODEL.name]


def test_evidence_references_exactly_the_images_sent(ct_case):
    series, request, result = ct_case
    document = build_report_sr(series, result, request, RANDOM_MODEL, ALGORITHM)
    referenced = [
        str(instance.ReferencedSOPInstanceUID)
        for study in document.CurrentRequestedProcedureEvidenceSequence
        for series_item in study.ReferencedSeriesSequence
        for instance in series_item.ReferencedSOPSequence
    ]
    sent = [frame.sop_instance_uid for frame in request.frames]
    assert len(sent) == 4 < len(series.frames)
    assert sorted(referenced) == sorted(sent)


def test_disclaimer_settings_and_grounding_are_recorded(ct_case):
    series, request, result = ct_case
    document = build_report_sr(series, result, request, RANDOM_MODEL, ALGORITHM)
    comments = _texts(document, "Comment")
    assert AI_DISCLAIMER in comments[0]
    assert DRAFT_REVIEW_NOTE in comments[0]
    assert RANDOM_WEIGHTS_WARNING in comments[0]
    assert any("pulmonary nodule (p=0.83)" in comment for comment in comments)
    assert any("4 of 10 slices sampled evenly" in comment for comment in comments)
    parameters = _texts(document, "Algorithm Parameters")
    for expected in (
        f"prompt_id={request.prompt_id}",
        f"prompt_version={request.prompt_version}",
        "decoding=greedy",
        "max_new_tokens=64",
        "findings_grounded=yes",
        "site=test",
    ):
        assert expected in parameters
    assert _texts(document, "Algorithm Name") == [ALGORITHM.name]
    assert _texts(document, "Algorithm Version") == [ALGORITHM.version]
    assert "RANDOM WEIGHTS" in document.SeriesDescription
    real = build_report_sr(series, result, request, REAL_MODEL, ALGORITHM)
    assert RANDOM_WEIGHTS_WARNING not in " ".join(_texts(real, "Comment"))
    assert "RANDOM WEIGHTS" not in real.SeriesDescription


def test_uids_are_deterministic_and_versioned(ct_case, prompts):
    series, request, result = ct_case
    first = build_report_sr(series, result, request, RANDOM_MODEL, ALGORITHM)
    again = build_report_sr(series, result, request, RANDOM_MODEL, ALGORITHM)
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID, again.SeriesInstanceUID)
    bumped = build_report_sr(series, result, request, RANDOM_MODEL, ALGORITHM, result_version=2)
    assert bumped.SOPInstanceUID != first.SOPInstanceUID
    assert bumped.SeriesInstanceUID != first.SeriesInstanceUID
    ungrounded = build_report_request(series, prompts, settings=request.settings)
    other = build_report_sr(series, _result(ungrounded), ungrounded, RANDOM_MODEL, ALGORITHM)
    assert other.SOPInstanceUID != first.SOPInstanceUID
    assert "findings_grounded=no" in _texts(other, "Algorithm Parameters")
    assert first.SeriesNumber == 9903
    assert first.SOPInstanceUID != series.frames[0].sop_instance_uid


def test_text_without_headings_is_all_findings(prompts):
    series = make_cr_series()
    request = build_report_request(series, prompts, settings=GenerationSettings())
    text = "The lungs are clear.<end_of_turn>"
    document = build_report_sr(series, _result(request, text), request, REAL_MODEL, ALGORITHM)
    assert _section_text(document, codes.cid7001.Findings.value) == ["The lungs are clear."]
    assert _section_text(document, codes.cid7001.Impressions.value) == []


def test_invalid_arguments_are_refused(ct_case, prompts):
    series, request, result = ct_case
    with pytest.raises(ValueError, match="nothing to write"):
        build_report_sr(series, _result(request, " <end_of_turn> "), request, RANDOM_MODEL, ALGORITHM)
    other_series = make_cr_series()
    with pytest.raises(ValueError, match="not about series"):
        build_report_sr(other_series, result, request, RANDOM_MODEL, ALGORITHM)
    mismatched = dataclasses.replace(result, prompt_id="another-prompt")
    with pytest.raises(ValueError, match="another-prompt"):
        build_report_sr(series, mismatched, request, RANDOM_MODEL, ALGORITHM)
    with pytest.raises(TypeError, match="algorithm"):
        build_report_sr(series, result, request, RANDOM_MODEL, {"name": "x"})
    with pytest.raises(ValueError, match="series_number"):
        build_report_sr(series, result, request, RANDOM_MODEL, ALGORITHM, series_number=0)
    foreign = dataclasses.replace(request, frames=[*request.frames, other_series.frames[0]])
    with pytest.raises(ValueError, match=r"request\.frames\[4\]"):
        build_report_sr(series, result, foreign, RANDOM_MODEL, ALGORITHM)


# -- section splitting (report_text) ------------------------------------------------------------

CLEAR, NORMAL = "Clear lungs.", "Normal."
UNHEADED = "Findings are unremarkable. The heart is normal."

#: name -> (generated text, expected Findings, expected Impression or None)
SPLIT_CASES = {
    "plain headings": ("Findings: Clear lungs.\nImpression: Normal.", CLEAR, NORMAL),
    "bold markdown": ("**Findings:**\nClear lungs.\n\n**Impression:**\nNormal.", CLEAR, NORMAL),
    "bold name, colon after": ("**Findings**: Clear lungs.\n**Impression**: Normal.", CLEAR, NORMAL),
    "upper case lines": ("FINDINGS\nClear lungs.\n\nIMPRESSION\nNormal.", CLEAR, NORMAL),
    "markdown titles": ("## Findings\nClear lungs.\n### Impressions\nNormal.", CLEAR, NORMAL),
    "conclusion is the impression": ("Findings: Clear lungs.\nConclusion: Normal.", CLEAR, NORMAL),
    "no headings": (UNHEADED, UNHEADED, None),
    "preamble kept": (
        "Here is a draft:\nFindings: Clear.\nImpression: Normal.",
        "Here is a draft:\n\nClear.",
        NORMAL,
    ),
    "impression only": ("Impression: Normal.", "", NORMAL),
    "bullets kept": (
        "Findings:\n* Clear lungs\n* No effusion\nImpression: Normal.",
        "* Clear lungs\n* No effusion",
        NORMAL,
    ),
    "emphasis in text kept": ("Findings: **No** effusion.", "**No** effusion.", None),
    "chat artefacts": ("Findings: Clear.<end_of_turn>\n<start_of_turn>user\nThanks", "Clear.", None),
    "other headings stay": (
        "Technique: PA view.\nFindings: Clear.\nRecommendation: none.\nImpression: Normal.",
        "Technique: PA view.\n\nClear.\nRecommendation: none.",
        NORMAL,
    ),
}


@pytest.mark.parametrize("case", list(SPLIT_CASES), ids=list(SPLIT_CASES))
def test_split_report_sections(case):
    text, findings, impression = SPLIT_CASES[case]
    sections = split_report(text)
    assert sections.findings == findings
    assert sections.impression == impression


def test_clean_report_text_removes_what_dicom_text_cannot_hold():
    cleaned = clean_report_text("<bos>Lungs\x7f clear\x00.\r\n\r\n\r\n\tNo effusion.  <eos>")
    assert cleaned == "Lungs clear.\n\n    No effusion."
    with pytest.raises(TypeError, match="text"):
        clean_report_text(None)


@requires_pixelmed
def test_report_srs_pass_pixelmed(ct_case, real_cr_case):
    """The TID 2000 report of a CT and of pydicom-data's real chest CR, in one JVM."""
    series, request, result = ct_case
    cr, cr_request, cr_result = real_cr_case
    documents = [
        build_report_sr(series, result, request, RANDOM_MODEL, ALGORITHM),
        build_report_sr(cr, cr_result, cr_request, REAL_MODEL, ALGORITHM),
    ]
    reports = assert_pixelmed_clean(documents)
    assert [report.validator for report in reports] == ["DicomSRValidator"] * 2


def test_report_sr_names_the_model_as_processing_equipment_like_its_device_observer(ct_case):
    series, request, result = ct_case
    document = build_report_sr(series, result, request, REAL_MODEL, ALGORITHM)
    (equipment,) = [item for item in document.ContributingEquipmentSequence if "DeviceUID" in item]
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Equipment"
    observer = {
        item.ConceptNameCodeSequence[0].CodeValue: item
        for item in document.ContentSequence
        if item.RelationshipType == "HAS OBS CONTEXT"
    }
    assert equipment.DeviceUID == observer["121012"].UID
    assert equipment.Manufacturer == observer["121014"].TextValue
    assert equipment.ManufacturerModelName == observer["121015"].TextValue == REAL_MODEL.name
    assert equipment.SoftwareVersions[0] == ALGORITHM.version
