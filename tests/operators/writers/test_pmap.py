"""Relevance Parametric Maps: round trip of the values, geometry, identity, refusals, validators."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pydicom
import pytest
from highdicom.pm import ParametricMap

from medgemma_deploy.errors import InputError
from medgemma_deploy.operators.writers.common import AI_DISCLAIMER, RANDOM_WEIGHTS_WARNING
from medgemma_deploy.operators.writers.findings_sr import RELEVANCE_MAP_REFERENCE, build_findings_sr
from medgemma_deploy.operators.writers.pmap import (
    RELEVANCE_LUT_LABEL,
    NoPatientGeometryError,
    build_relevance_parametric_maps,
)
from medgemma_deploy.results import RunResults
from medgemma_deploy.steps.classify import (
    ClassifyOptions,
    write_parametric_maps,
    write_segmentations,
)
from tests.support.dciodvfy import assert_dciodvfy_clean, requires_dciodvfy
from tests.support.inputs import ALGORITHM
from tests.support.pixelmed import assert_pixelmed_clean, requires_pixelmed

pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent:UserWarning")


CASES = ("ct_series", "mr_series", "enhanced_ct_series")


def _write_read(parametric_map, tmp_path):
    path = tmp_path / "pm.dcm"
    parametric_map.save_as(path, enforce_file_format=True)
    return path, pydicom.dcmread(path)


@pytest.mark.parametrize("fixture", CASES)
def test_round_trip_keeps_every_map_value(fixture, request, make_classification, tmp_path):
    series = request.getfixturevalue(fixture)
    classification = make_classification(series, map_keys=["pneumothorax", "cardiomegaly"])
    maps = build_relevance_parametric_maps(classification, ALGORITHM)
    assert list(maps) == ["pneumothorax", "cardiomegaly"]
    for key, instances in maps.items():
        (parametric_map,) = instances
        _, dataset = _write_read(parametric_map, tmp_path)
        assert dataset.SOPClassUID == pydicom.uid.ParametricMapStorage
        read = ParametricMap.from_dataset(dataset)
        values = read.pixel_array if read.pixel_array.ndim == 3 else read.pixel_array[np.newaxis]
        expected = classification.relevance_maps[key]
        # Each frame of the map is the map of the source frame at the same position (highdicom
        # orders the frames by position, not by the order the slices came in).
        assert values.shape == expected.shape
        source_index = _source_frame_by_position(series)
        for frame, functional_groups in enumerate(dataset.PerFrameFunctionalGroupsSequence):
            position = _position(functional_groups)
            assert np.array_equal(values[frame], expected[source_index[position]]), (key, frame)
        mapping = dataset.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        assert mapping.LUTLabel == RELEVANCE_LUT_LABEL
        assert (float(mapping.RealWorldValueSlope), float(mapping.RealWorldValueIntercept)) == (1.0, 0.0)
        assert dataset.FrameOfReferenceUID == series.frames[0].dataset.FrameOfReferenceUID
        assert AI_DISCLAIMER in dataset.ImageComments and "UNVERIFIED" in dataset.SeriesDescription
        assert dataset.SpecificCharacterSet == "ISO_IR 192"


@requires_dciodvfy
@pytest.mark.parametrize("fixture", CASES)
def test_every_parametric_map_passes_dciodvfy(fixture, request, make_classification, tmp_path):
    classification = make_classification(request.getfixturevalue(fixture), map_keys=["pneumothorax"])
    (parametric_map,) = build_relevance_parametric_maps(classification, ALGORITHM)["pneumothorax"]
    path, _ = _write_read(parametric_map, tmp_path)
    assert_dciodvfy_clean(path)


def test_projection_radiograph_is_refused_naming_the_image(cr_series, make_classification):
    with pytest.raises(NoPatientGeometryError, match="Frame of Reference") as raised:
        build_relevance_parametric_maps(make_classification(cr_series), ALGORITHM)
    assert raised.value.source == cr_series.frames[0].sop_instance_uid
    assert isinstance(raised.value, InputError)


def test_ct_without_frame_of_reference_is_an_input_error(ct_without_frame_of_reference, make_classification):
    with pytest.raises(InputError, match="Frame of Reference UID is missing"):
        build_relevance_parametric_maps(make_classification(ct_without_frame_of_reference), ALGORITHM)


def test_uids_are_deterministic_per_finding_and_versioned(ct_series, make_classification, medsiglip_identity):
    classification = make_classification(ct_series)

    def uids(**kwargs):
        maps = build_relevance_parametric_maps(classification, ALGORITHM, **kwargs)
        return {key: str(instances[0].SOPInstanceUID) for key, instances in maps.items()}

    first = uids()
    assert uids() == first
    assert len(set(first.values())) == len(first)
    assert set(uids(result_version=2).values()).isdisjoint(first.values())


def test_random_weights_are_announced(ct_series, make_classification, medsiglip_identity):
    model = dataclasses.replace(medsiglip_identity, random_weights=True)
    classification = make_classification(ct_series, model=model, map_keys=["pneumothorax"])
    (parametric_map,) = build_relevance_parametric_maps(classification, ALGORITHM)["pneumothorax"]
    assert RANDOM_WEIGHTS_WARNING in parametric_map.ImageComments
    assert "RANDOM WEIGHTS" in parametric_map.SeriesDescription


def test_invalid_finding_keys_are_refused(ct_series, make_classification):
    classification = make_classification(ct_series, map_keys=["pneumothorax"])
    with pytest.raises(ValueError, match="have no relevance map"):
        build_relevance_parametric_maps(classification, ALGORITHM, finding_keys=["cardiomegaly"])
    with pytest.raises(TypeError, match="not the string"):
        build_relevance_parametric_maps(classification, ALGORITHM, finding_keys="pneumothorax")


def test_findings_sr_references_the_map_of_each_finding(ct_series, make_classification):
    classification = make_classification(ct_series, map_keys=["pneumothorax"])
    maps = build_relevance_parametric_maps(classification, ALGORITHM)
    document = build_findings_sr(classification, ALGORITHM, parametric_maps=maps)
    references = [
        (str(reference.ReferencedSOPInstanceUID), str(reference.ReferencedSOPClassUID))
        for item in _content_items(document)
        for reference in item.get("ReferencedSOPSequence", [])
        if item.ValueType == "IMAGE"
        and item.ConceptNameCodeSequence[0].CodeValue == RELEVANCE_MAP_REFERENCE.value
    ]
    (parametric_map,) = maps["pneumothorax"]
    assert references == [(str(parametric_map.SOPInstanceUID), pydicom.uid.ParametricMapStorage)]
    evidence = {
        str(item.ReferencedSOPInstanceUID)
        for study in document.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert str(parametric_map.SOPInstanceUID) in evidence


def test_findings_sr_refuses_maps_of_unknown_findings_or_other_series(
    ct_series, mr_series, make_classification
):
    ct = make_classification(ct_series, map_keys=["pneumothorax"])
    maps = build_relevance_parametric_maps(ct, ALGORITHM)
    with pytest.raises(ValueError, match="not a scored finding"):
        build_findings_sr(ct, ALGORITHM, parametric_maps={"nodule": maps["pneumothorax"]})
    mr = make_classification(mr_series, map_keys=["pneumothorax"])
    with pytest.raises(ValueError, match="not from the classified series"):
        build_findings_sr(mr, ALGORITHM, parametric_maps=maps)
    with pytest.raises(TypeError, match="must be a highdicom ParametricMap"):
        build_findings_sr(ct, ALGORITHM, parametric_maps={"pneumothorax": [ct_series.frames[0].dataset]})


def _position(functional_groups) -> tuple[float, ...]:
    return tuple(round(float(v), 3) for v in functional_groups.PlanePositionSequence[0].ImagePositionPatient)


def _source_frame_by_position(series) -> dict[tuple[float, ...], int]:
    """Series frame index by its patient position (single-frame slices or frames of one instance)."""
    by_position = {}
    for index, frame in enumerate(series.frames):
        dataset = frame.dataset
        if "PerFrameFunctionalGroupsSequence" in dataset:
            position = _position(dataset.PerFrameFunctionalGroupsSequence[frame.frame_number - 1])
        else:
            position = tuple(round(float(v), 3) for v in dataset.ImagePositionPatient)
        by_position[position] = index
    assert len(by_position) == len(series.frames)
    return by_position


def _content_items(dataset):
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


@pytest.mark.parametrize(
    ("relevance_format", "written", "skipped", "rejected"),
    [("both", ["SEG"], ["pmap"], []), ("pmap", [], [], ["pmap"]), ("seg", ["SEG"], [], [])],
    ids=["both", "pmap", "seg"],
)
def test_pipeline_names_the_projection_image_without_parametric_map(
    relevance_format, written, skipped, rejected, cr_series, make_classification, tmp_path, caplog
):
    """A CR's missing Parametric Map is named in results.json: skipped when its SEG carries the maps.

    The expected skip is logged at INFO (every CR/DX gets it); a rejection stays a WARNING.
    """
    classification = make_classification(cr_series, map_keys=["pneumothorax"])
    options = ClassifyOptions(relevance_format=relevance_format)
    results = RunResults(command="classify", disclaimer=AI_DISCLAIMER)
    write_segmentations([classification], tmp_path, options, results)
    with caplog.at_level(logging.INFO, logger="medgemma_deploy.results"):
        maps = write_parametric_maps([classification], tmp_path, options, results)
    skip_levels = [r.levelname for r in caplog.records if r.getMessage().startswith("skipped:")]
    assert skip_levels == ["INFO"] * len(skipped)
    assert maps == {}
    assert [output.kind for output in results.outputs] == written
    assert [entry.stage for entry in results.skipped] == skipped
    assert [entry.stage for entry in results.rejected] == rejected
    for entry in results.skipped + results.rejected:
        # Named by file, like every series-level refusal (the SOP Instance UID goes beside it).
        assert entry.source == str(cr_series.frames[0].path)
        assert entry.sop_instance_uid == cr_series.frames[0].sop_instance_uid
        assert "Parametric Map" in entry.reason and "Frame of Reference" in entry.reason


def test_pipeline_writes_parametric_maps_of_a_ct_only_when_asked(ct_series, make_classification, tmp_path):
    classification = make_classification(ct_series, map_keys=["pneumothorax", "cardiomegaly"])
    for relevance_format, expected in (("pmap", 2), ("both", 2), ("seg", 0)):
        results = RunResults(command="classify", disclaimer=AI_DISCLAIMER)
        options = ClassifyOptions(relevance_format=relevance_format)
        write_parametric_maps([classification], tmp_path, options, results)
        assert [output.kind for output in results.outputs] == ["PMAP"] * expected, relevance_format
    with pytest.raises(ValueError, match="relevance_format must be one of seg, pmap, both"):
        ClassifyOptions(relevance_format="heatmap")


@requires_pixelmed
def test_parametric_maps_through_pixelmed(request, make_classification, tmp_path):
    """PixelMed 20220618 has no Parametric Map IOD: exactly "unknown SOP Class", nothing else.

    If a PixelMed that knows the IOD is installed, this starts checking it for real and fails on
    the known-defect list (tests/support/pixelmed.py), which must then be revisited.
    """
    paths = []
    for fixture in CASES:
        classification = make_classification(request.getfixturevalue(fixture), map_keys=["pneumothorax"])
        (parametric_map,) = build_relevance_parametric_maps(classification, ALGORITHM)["pneumothorax"]
        paths.append(tmp_path / f"{fixture}.dcm")
        parametric_map.save_as(paths[-1], enforce_file_format=True)
    reports = assert_pixelmed_clean(paths)
    assert {report.validator for report in reports} == {"DicomInstanceValidator"}
