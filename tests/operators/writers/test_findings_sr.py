"""TID 1500 findings SR: validator-clean, round-trip of findings, references, disclaimer, determinism."""

from __future__ import annotations

import copy
import dataclasses

import highdicom as hd
import pydicom
import pytest
from highdicom.sr.utils import find_content_items
from pydicom.sr.codedict import codes

from medgemma_deploy.errors import InputError
from medgemma_deploy.operators.writers.common import (
    AI_DISCLAIMER,
    RANDOM_WEIGHTS_WARNING,
    derived_uid,
    finding_tracking_uid,
)
from medgemma_deploy.operators.writers.findings_sr import RELEVANCE_MAP_REFERENCE, build_findings_sr
from medgemma_deploy.operators.writers.pmap import build_relevance_parametric_maps
from medgemma_deploy.operators.writers.seg import build_relevance_segmentations
from tests.support.dciodvfy import assert_dciodvfy_clean, requires_dciodvfy
from tests.support.inputs import ALGORITHM
from tests.support.pixelmed import assert_pixelmed_clean, requires_pixelmed
from tests.support.writer_errors import COMMON_VALUE_ERRORS

# pydicom-data's 693_UNCI has a one-component de-identified Patient's Name; highdicom warns when it
# copies it, which is about the test image, not the SR.
pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent:UserWarning")


#: name -> (series fixture, write SEGs first, expected CID 100 procedure code value)
CASES = {
    "ct-4-slices-with-seg": ("ct_series", True, "25045-6"),
    "cr-real-with-seg": ("cr_series", True, "363679005"),
    "cr-2-images-with-segs": ("cr_two_image_series", True, "363679005"),
    "enhanced-ct-with-seg": ("enhanced_ct_series", True, "25045-6"),
    "ct-without-frame-of-reference-no-seg": ("ct_without_frame_of_reference", False, "25045-6"),
}


def _build(request, make_classification, case, **classification_kwargs):
    fixture, with_seg, _ = CASES[case]
    classification = make_classification(request.getfixturevalue(fixture), **classification_kwargs)
    segmentations = build_relevance_segmentations(classification, ALGORITHM) if with_seg else []
    document = build_findings_sr(classification, ALGORITHM, segmentations=segmentations)
    return classification, segmentations, document


def _read(document, tmp_path):
    path = tmp_path / "sr.dcm"
    document.save_as(path, enforce_file_format=True)
    return hd.sr.srread(path)


def _groups(report):
    content = report.content
    # Every finding is a TID 1501 group: TID 1411 (volumetric ROI) would claim the map is its region.
    assert content.get_volumetric_roi_measurement_groups() == []
    return content.get_image_measurement_groups()


def _map_references(group):
    """The group's relevance-map IMAGE items (TID 1501 row 10b), as (SOP Instance UID, segment numbers)."""
    return [
        (item.referenced_sop_instance_uid, item.referenced_segment_numbers)
        for item in find_content_items(group[0], name=RELEVANCE_MAP_REFERENCE)
    ]


def _group_for(report, tracking_uid):
    (group,) = [group for group in _groups(report) if group.tracking_uid == tracking_uid]
    return group


def _texts(item, name):
    return [found.value for found in find_content_items(item, name=name, recursive=True)]


@requires_dciodvfy
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_sr_passes_dciodvfy(case, request, make_classification, tmp_path):
    _, _, document = _build(request, make_classification, case)
    path = tmp_path / "sr.dcm"
    document.save_as(path, enforce_file_format=True)
    assert_dciodvfy_clean(path)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_round_trip_keeps_every_finding(case, request, make_classification, tmp_path):
    classification, segmentations, document = _build(request, make_classification, case)
    report = _read(document, tmp_path)
    series = classification.series
    source = series.frames[0].dataset
    assert report.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert report.VerificationFlag == "UNVERIFIED"
    assert report.CompletionFlag == "PARTIAL"
    assert report.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert (report.PatientID, report.StudyInstanceUID) == (source.PatientID, series.study_instance_uid)
    assert "UNVERIFIED" in report.SeriesDescription
    root = report.content[0]
    assert AI_DISCLAIMER in _texts(root, codes.DCM.Comment)
    (procedure,) = _texts(root, codes.DCM.ProcedureReported)
    assert procedure.value == CASES[case][2]
    (observer_uid,) = _texts(root, codes.DCM.DeviceObserverUID)
    model = classification.model
    assert observer_uid == derived_uid("device observer", model.name, model.version)
    groups = _groups(report)
    assert len(groups) == len(classification.scores)
    for score in classification.scores:
        finding = score.finding
        tracking_uid = finding_tracking_uid(
            series.series_instance_uid, classification.label_set.name, finding.key
        )
        group = _group_for(report, tracking_uid)
        assert (group.finding_type.value, group.finding_type.scheme_designator) == (
            finding.code.value,
            finding.code.scheme_designator,
        )
        (probability,) = group.get_measurements(name=codes.DCM.Probability)
        assert probability.value == pytest.approx(score.probability, abs=1e-6)
        assert probability.unit.value == "1"
        derivation = probability.derivation.value if probability.derivation is not None else None
        assert derivation == ("56851009" if len(series.frames) > 1 else None)  # SCT Maximum over frames
        (evaluation,) = group.get_qualitative_evaluations()
        assert evaluation.value.value == ("52101004" if score.present else "272519000")
        assert _texts(group[0], codes.DCM.AlgorithmName) == [ALGORITHM.name]
        assert _texts(group[0], codes.DCM.AlgorithmVersion) == [ALGORITHM.version]
        (image,) = probability.referenced_images
        assert image.referenced_sop_instance_uid == series.frames[score.peak_frame_index].sop_instance_uid
        if segmentations:
            ((seg_uid, numbers),) = _map_references(group)
            seg = next(s for s in segmentations if s.SOPInstanceUID == seg_uid)
            (number,) = numbers
            item = seg.SegmentSequence[number - 1]
            assert item.TrackingUID == group.tracking_uid
            assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == finding.code.value
        else:
            assert _map_references(group) == []


def test_only_findings_with_a_map_reference_one(ct_series, make_classification, tmp_path):
    classification = make_classification(ct_series, map_keys=["pneumothorax"])
    segmentations = build_relevance_segmentations(classification, ALGORITHM)
    report = _read(build_findings_sr(classification, ALGORITHM, segmentations=segmentations), tmp_path)
    references = {group.tracking_identifier: _map_references(group) for group in _groups(report)}
    assert references == {
        "Pneumothorax": [(segmentations[0].SOPInstanceUID, [1])],
        "Pleural effusion": [],
        "Cardiomegaly": [],
    }


def test_segment_reference_points_at_the_seg_of_the_peak_image(
    cr_two_image_series, make_classification, tmp_path
):
    classification = make_classification(cr_two_image_series)
    for score, peak in zip(classification.scores, (0, 1, 1), strict=True):
        score.peak_frame_index = peak
    segmentations = build_relevance_segmentations(classification, ALGORITHM)
    report = _read(build_findings_sr(classification, ALGORITHM, segmentations=segmentations), tmp_path)
    seg_of = {
        str(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID): seg
        for seg in segmentations
    }
    for score in classification.scores:
        peak_uid = cr_two_image_series.frames[score.peak_frame_index].sop_instance_uid
        group = _group_for(
            report,
            finding_tracking_uid(
                cr_two_image_series.series_instance_uid, classification.label_set.name, score.finding.key
            ),
        )
        ((seg_uid, _),) = _map_references(group)
        assert seg_uid == seg_of[peak_uid].SOPInstanceUID


def test_present_and_absent_follow_the_classifier(ct_series, make_classification, tmp_path):
    classification = make_classification(ct_series)
    classification.scores[0].present, classification.scores[1].present = True, False
    report = _read(build_findings_sr(classification, ALGORITHM), tmp_path)
    values = {}
    for score in classification.scores[:2]:
        uid = finding_tracking_uid(ct_series.series_instance_uid, "chest-test", score.finding.key)
        (evaluation,) = _group_for(report, uid).get_qualitative_evaluations()
        values[score.finding.key] = evaluation.value.meaning
    assert values == {"pneumothorax": "Present", "pleural_effusion": "Absent"}


def test_image_library_lists_every_source_and_no_invented_spacing(cr_series, ct_series, make_classification):
    cr_document = build_findings_sr(make_classification(cr_series), ALGORITHM)
    (library,) = find_content_items(cr_document.content[0], name=codes.DCM.ImageLibrary)
    assert not find_content_items(library, name=codes.DCM.HorizontalPixelSpacing, recursive=True)
    ct_document = build_findings_sr(make_classification(ct_series), ALGORITHM)
    (library,) = find_content_items(ct_document.content[0], name=codes.DCM.ImageLibrary)
    images = find_content_items(library, value_type=hd.sr.ValueTypeValues.IMAGE, recursive=True)
    assert sorted(image.referenced_sop_instance_uid for image in images) == sorted(
        frame.sop_instance_uid for frame in ct_series.frames
    )
    spacings = find_content_items(library, name=codes.DCM.HorizontalPixelSpacing, recursive=True)
    assert [item.value for item in spacings] == [float(ct_series.frames[0].dataset.PixelSpacing[1])] * 4


def test_evidence_lists_sources_and_referenced_segs(ct_series, make_classification):
    classification = make_classification(ct_series)
    segmentations = build_relevance_segmentations(classification, ALGORITHM)
    document = build_findings_sr(classification, ALGORITHM, segmentations=segmentations)
    evidence = {
        str(item.ReferencedSOPInstanceUID)
        for study in document.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    expected = {frame.sop_instance_uid for frame in ct_series.frames}
    expected |= {str(seg.SOPInstanceUID) for seg in segmentations}
    assert evidence == expected


def test_random_weights_are_announced(ct_series, make_classification, medsiglip_identity, tmp_path):
    model = dataclasses.replace(medsiglip_identity, random_weights=True)
    report = _read(build_findings_sr(make_classification(ct_series, model=model), ALGORITHM), tmp_path)
    comments = _texts(report.content[0], codes.DCM.Comment)
    assert RANDOM_WEIGHTS_WARNING in comments and AI_DISCLAIMER in comments
    assert "RANDOM WEIGHTS" in report.SeriesDescription


def test_uids_are_deterministic_and_versioned(ct_series, make_classification, medsiglip_identity):
    classification = make_classification(ct_series)

    def uids(result_version=1, model=None):
        c = classification if model is None else dataclasses.replace(classification, model=model)
        document = build_findings_sr(c, ALGORITHM, result_version=result_version)
        return document.SOPInstanceUID, document.SeriesInstanceUID

    first = uids()
    assert uids() == first
    other = uids(model=dataclasses.replace(medsiglip_identity, version="1" * 40))
    assert other[0] != first[0] and other[1] != first[1]
    assert uids(result_version=2)[0] != first[0]


def test_source_datasets_are_not_modified(ct_without_frame_of_reference, make_classification):
    dataset = ct_without_frame_of_reference.frames[0].dataset
    before = copy.deepcopy(dataset)
    build_findings_sr(make_classification(ct_without_frame_of_reference), ALGORITHM)
    assert dataset == before and "DeidentificationMethod" not in dataset


# --- validation: one case per branch -----------------------------------------------------------


def _set_score(attribute, value):
    def mutate(c):
        setattr(c.scores[0], attribute, value)

    return mutate


VALUE_ERRORS = {
    **COMMON_VALUE_ERRORS,
    "no-scores": (lambda c: c.scores.clear(), {}, "scores is empty"),
    "probability-above-one": (_set_score("probability", 1.5), {}, r"probability must be in \[0, 1\]"),
    "probability-nan": (_set_score("probability", float("nan")), {}, "probability must be"),
    "peak-frame-outside-series": (_set_score("peak_frame_index", 4), {}, "peak_frame_index 4"),
    "duplicate-finding": (lambda c: c.scores.append(c.scores[0]), {}, "repeats finding"),
}


@pytest.mark.parametrize(("damage", "kwargs", "message"), list(VALUE_ERRORS.values()), ids=list(VALUE_ERRORS))
def test_invalid_input_raises_value_error_naming_it(damage, kwargs, message, damaged_ct_classification):
    classification = damaged_ct_classification(damage)
    with pytest.raises(ValueError, match=message):
        build_findings_sr(classification, ALGORITHM, **kwargs)


def test_seg_of_another_series_is_refused(ct_series, cr_series, make_classification):
    other = build_relevance_segmentations(make_classification(cr_series), ALGORITHM)
    with pytest.raises(ValueError, match="not from the classified series"):
        build_findings_sr(make_classification(ct_series), ALGORITHM, segmentations=other)


def test_wrong_argument_types_raise_type_error(ct_series, make_classification):
    classification = make_classification(ct_series)
    (seg,) = build_relevance_segmentations(classification, ALGORITHM)
    with pytest.raises(TypeError, match="classification"):
        build_findings_sr(classification.series, ALGORITHM)
    with pytest.raises(TypeError, match="algorithm"):
        build_findings_sr(classification, None)
    with pytest.raises(TypeError, match="not a single one"):
        build_findings_sr(classification, ALGORITHM, segmentations=seg)
    with pytest.raises(TypeError, match=r"segmentations\[0\]"):
        build_findings_sr(classification, ALGORITHM, segmentations=[ct_series.frames[0].dataset])


@requires_dciodvfy
def test_non_ascii_finding_names_survive_in_sr_and_seg(ct_series, make_classification, tmp_path):
    classification = make_classification(ct_series, map_keys=["pneumothorax"])
    renamed = dataclasses.replace(classification.label_set.findings[0], display_name="Épanchement µ")
    classification.label_set = dataclasses.replace(
        classification.label_set, findings=(renamed, *classification.label_set.findings[1:])
    )
    classification.scores[0].finding = renamed
    (seg,) = build_relevance_segmentations(classification, ALGORITHM)
    seg.save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    assert hd.seg.segread(tmp_path / "seg.dcm").SegmentSequence[0].SegmentLabel == "Épanchement µ relevance"
    assert_dciodvfy_clean(tmp_path / "seg.dcm")
    report = _read(build_findings_sr(classification, ALGORITHM, segmentations=[seg]), tmp_path)
    assert "Épanchement µ" in _texts(report.content[0], codes.DCM.TrackingIdentifier)
    assert_dciodvfy_clean(tmp_path / "sr.dcm")


@requires_dciodvfy
def test_sources_with_missing_or_invalid_patient_attributes_still_give_valid_objects(
    cr_two_image_series, make_classification, tmp_path
):
    for frame in cr_two_image_series.frames:
        for keyword in ("PatientBirthDate", "StudyID", "AccessionNumber", "ReferringPhysicianName"):
            if keyword in frame.dataset:
                delattr(frame.dataset, keyword)
        frame.dataset.PatientSex = "X"
    classification = make_classification(cr_two_image_series)
    segmentations = build_relevance_segmentations(classification, ALGORITHM)
    document = build_findings_sr(classification, ALGORITHM, segmentations=segmentations)
    assert "PatientSex" in document and not document.PatientSex
    assert cr_two_image_series.frames[0].dataset.PatientSex == "X"  # the caller's dataset is untouched
    for index, dataset in enumerate([document, *segmentations]):
        path = tmp_path / f"object-{index}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        assert_dciodvfy_clean(path)


def test_highdicom_refusal_becomes_an_input_error_naming_the_source(
    ct_series, make_classification, monkeypatch
):
    def refuse(*args, **kwargs):
        raise ValueError("bad patient attribute")

    monkeypatch.setattr(hd.sr, "Comprehensive3DSR", refuse)
    with pytest.raises(InputError, match="bad patient attribute") as raised:
        build_findings_sr(make_classification(ct_series), ALGORITHM)
    assert raised.value.source == ct_series.frames[0].sop_instance_uid


def test_private_finding_codes_declare_their_coding_scheme(cr_series, make_classification):
    from medgemma_deploy.domain import Code
    from medgemma_deploy.operators.writers.common import declare_private_schemes

    classification = make_classification(cr_series)
    ds = build_findings_sr(classification, ALGORITHM)
    standard_only = {c.scheme_designator for c in (s.finding.code for s in classification.scores)}
    declared = {str(i.CodingSchemeDesignator) for i in ds.get("CodingSchemeIdentificationSequence", [])}
    assert not {d for d in standard_only if d.startswith("99")} - declared
    declare_private_schemes(ds, [Code("MGD0001", "99MEDGEMMA", "private finding")])
    declare_private_schemes(ds, [Code("MGD0002", "99MEDGEMMA", "another")])  # declared once only
    items = [i for i in ds.CodingSchemeIdentificationSequence if i.CodingSchemeDesignator == "99MEDGEMMA"]
    assert len(items) == 1 and items[0].CodingSchemeName == "medgemma-deploy findings"
    assert_dciodvfy_clean(ds)


def test_multi_frame_instance_of_a_single_frame_class_is_referenced_whole(
    two_frame_secondary_capture, make_classification, tmp_path
):
    """Regression: the SR writer crashed here ("The dataset does not represent a multi-frame dataset").

    A single-frame SOP Class cannot carry Referenced Frame Number (dciodvfy), so the instance is
    referenced as a whole, while an Enhanced CT frame is named (``test_round_trip_keeps_every_finding``).
    """
    classification = make_classification(two_frame_secondary_capture, map_keys=[])
    for score, peak in zip(classification.scores, (0, 1, 1), strict=True):
        score.peak_frame_index = peak
    report = _read(build_findings_sr(classification, ALGORITHM), tmp_path)
    for score in classification.scores:
        uid = finding_tracking_uid(
            two_frame_secondary_capture.series_instance_uid, "chest-test", score.finding.key
        )
        (probability,) = _group_for(report, uid).get_measurements(name=codes.DCM.Probability)
        (image,) = probability.referenced_images
        assert image.referenced_sop_instance_uid == two_frame_secondary_capture.frames[0].sop_instance_uid
        assert image.referenced_frame_numbers is None


@requires_dciodvfy
def test_multi_frame_instance_of_a_single_frame_class_gives_a_valid_sr(
    two_frame_secondary_capture, make_classification, tmp_path
):
    document = build_findings_sr(make_classification(two_frame_secondary_capture, map_keys=[]), ALGORITHM)
    path = tmp_path / "sr.dcm"
    document.save_as(path, enforce_file_format=True)
    assert_dciodvfy_clean(path)


def test_frame_of_a_multi_frame_class_is_named(enhanced_ct_series, make_classification, tmp_path):
    classification = make_classification(enhanced_ct_series, map_keys=[])
    for score, peak in zip(classification.scores, (0, 1, 1), strict=True):
        score.peak_frame_index = peak
    report = _read(build_findings_sr(classification, ALGORITHM), tmp_path)
    for score in classification.scores:
        uid = finding_tracking_uid(enhanced_ct_series.series_instance_uid, "chest-test", score.finding.key)
        (probability,) = _group_for(report, uid).get_measurements(name=codes.DCM.Probability)
        (image,) = probability.referenced_images
        assert image.referenced_frame_numbers == [score.peak_frame_index + 1]


@requires_pixelmed
def test_every_sr_passes_pixelmed(request, make_classification, two_frame_secondary_capture, tmp_path):
    """Every case's SR (with SEG references, with Parametric Map references, with none) in one JVM."""
    documents = [_build(request, make_classification, case)[2] for case in CASES]
    ct = make_classification(request.getfixturevalue("ct_series"), map_keys=["pneumothorax"])
    documents.append(
        build_findings_sr(
            ct,
            ALGORITHM,
            segmentations=build_relevance_segmentations(ct, ALGORITHM),
            parametric_maps=build_relevance_parametric_maps(ct, ALGORITHM),
        )
    )
    two_frames = make_classification(two_frame_secondary_capture, map_keys=[])
    documents.append(build_findings_sr(two_frames, ALGORITHM))
    paths = []
    for index, document in enumerate(documents):
        paths.append(tmp_path / f"sr-{index}.dcm")
        document.save_as(paths[-1], enforce_file_format=True)
    reports = assert_pixelmed_clean(paths)
    assert {report.validator for report in reports} == {"DicomSRValidator"}


def test_sr_names_the_model_as_processing_equipment_like_its_device_observer(
    ct_series, make_classification, medsiglip_identity
):
    document = build_findings_sr(make_classification(ct_series), ALGORITHM)
    (equipment,) = [item for item in document.ContributingEquipmentSequence if "DeviceUID" in item]
    purpose = equipment.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("109102", "DCM")
    root = document.content[0]
    (observer_uid,) = _texts(root, codes.DCM.DeviceObserverUID)
    (model_name,) = _texts(root, codes.DCM.DeviceObserverModelName)
    (manufacturer,) = _texts(root, codes.DCM.DeviceObserverManufacturer)
    assert equipment.DeviceUID == observer_uid
    assert equipment.ManufacturerModelName == model_name == medsiglip_identity.name
    assert equipment.Manufacturer == manufacturer
    assert equipment.SoftwareVersions[0] == ALGORITHM.version


def test_tracking_uids_are_kept_by_a_rerun_with_another_model_version(
    ct_series, make_classification, medsiglip_identity, tmp_path
):
    first = make_classification(ct_series)
    second = dataclasses.replace(first, model=dataclasses.replace(medsiglip_identity, version="1" * 40))
    reports = [_read(build_findings_sr(c, ALGORITHM), tmp_path) for c in (first, second)]
    assert reports[0].SOPInstanceUID != reports[1].SOPInstanceUID
    tracking = [{group.tracking_identifier: group.tracking_uid for group in _groups(r)} for r in reports]
    assert tracking[0] == tracking[1]
    assert set(tracking[0]) == {score.finding.display_name for score in first.scores}


@requires_dciodvfy
@requires_pixelmed
def test_triage_is_a_coded_item_with_its_reason(cr_series, make_classification, tmp_path):
    from medgemma_deploy.domain import TriagePriority
    from medgemma_deploy.triage import (
        TRIAGE_PRIORITY_CODES,
        TRIAGE_PRIORITY_CONCEPT,
        TRIAGE_REASON_CONCEPT,
        StudyTriage,
        TriageReason,
    )

    classification = make_classification(cr_series)
    top = max(classification.scores, key=lambda score: score.probability)
    reason = TriageReason(
        classification.series.series_instance_uid, top.finding, top.probability, 0.0, TriagePriority.STAT
    )
    document = build_findings_sr(
        classification, ALGORITHM, triage=StudyTriage(TriagePriority.STAT, (reason,))
    )
    report = _read(document, tmp_path)
    [level] = find_content_items(report.content[0], name=_concept(TRIAGE_PRIORITY_CONCEPT), recursive=True)
    assert level.value.value == TRIAGE_PRIORITY_CODES[TriagePriority.STAT].value == "STAT"
    [text] = _texts(report.content[0], _concept(TRIAGE_REASON_CONCEPT))
    assert text.startswith("STAT: ") and top.finding.display_name in text and "uncalibrated" in text
    declared = {str(i.CodingSchemeDesignator) for i in document.CodingSchemeIdentificationSequence}
    assert "99MEDGEMMA" in declared
    path = tmp_path / "sr.dcm"
    document.save_as(path, enforce_file_format=True)
    assert_dciodvfy_clean(path)
    assert_pixelmed_clean([path])
    # Without triage (a label set without rules) there is no such item.
    plain = _read(build_findings_sr(classification, ALGORITHM), tmp_path)
    assert not find_content_items(plain.content[0], name=_concept(TRIAGE_PRIORITY_CONCEPT), recursive=True)
    with pytest.raises(TypeError, match="triage must be a StudyTriage"):
        build_findings_sr(classification, ALGORITHM, triage="STAT")


def _concept(code):
    from medgemma_deploy.operators.writers.common import to_coded_concept

    return to_coded_concept(code)
