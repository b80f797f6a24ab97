"""FRACTIONAL relevance SEGs: validator-clean, round-trip, geometry, determinism, validation.

Also covers the shared helpers of ``operators/writers/common.py`` they are built with.
"""

from __future__ import annotations

import copy
import dataclasses

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from medgemma_deploy.domain import ImageFrame
from medgemma_deploy.errors import InputError
from medgemma_deploy.operators.medsiglip.relevance import grid_to_source
from medgemma_deploy.operators.writers import seg as seg_module
from medgemma_deploy.operators.writers.common import (
    AI_DISCLAIMER,
    RANDOM_WEIGHTS_WARNING,
    derived_uid,
    finding_tracking_uid,
    prepare_sources,
)
from medgemma_deploy.operators.writers.seg import SEGMENT_DESCRIPTION, build_relevance_segmentations
from tests.support.dciodvfy import assert_dciodvfy_clean, requires_dciodvfy
from tests.support.inputs import ALGORITHM, read_testdata, series_from
from tests.support.pixelmed import assert_pixelmed_clean, requires_pixelmed
from tests.support.writer_errors import COMMON_VALUE_ERRORS

#: name -> (series fixture, expected number of SEG instances, has a frame of reference)
CASES = {
    "ct-4-slices": ("ct_series", 1, True),
    "cr-real-monochrome1-zero-spacing": ("cr_series", 1, False),
    "cr-2-images": ("cr_two_image_series", 2, False),
    "enhanced-ct-2-frames": ("enhanced_ct_series", 1, True),
}


def _write_and_read(segmentation, path):
    segmentation.save_as(path, enforce_file_format=True)
    return hd.seg.segread(path)


def _source_uids(segmentation) -> list[str]:
    return [
        str(instance.ReferencedSOPInstanceUID)
        for series in segmentation.ReferencedSeriesSequence
        for instance in series.ReferencedInstanceSequence
    ]


def _read_maps(segmentation, frames) -> np.ndarray:
    """The SEG's segments at the given source frames, rescaled to [0, 1]: (n, rows, cols, segments)."""
    first = frames[0].dataset
    if "NumberOfFrames" in first:
        return segmentation.get_pixels_by_source_frame(
            source_sop_instance_uid=str(first.SOPInstanceUID),
            source_frame_numbers=[frame.frame_number for frame in frames],
            combine_segments=False,
            rescale_fractional=True,
        )
    return segmentation.get_pixels_by_source_instance(
        [frame.sop_instance_uid for frame in frames], combine_segments=False, rescale_fractional=True
    )


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_round_trip_keeps_segments_and_probabilities(case, request, make_classification, tmp_path):
    fixture, expected_count, _ = CASES[case]
    series = request.getfixturevalue(fixture)
    classification = make_classification(series)
    segmentations = build_relevance_segmentations(classification, ALGORITHM)
    assert len(segmentations) == expected_count
    findings = classification.label_set.findings
    covered: list[str] = []
    for index, built in enumerate(segmentations):
        seg = _write_and_read(built, tmp_path / f"seg-{index}.dcm")
        assert seg.SOPClassUID == pydicom.uid.SegmentationStorage
        assert seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL
        assert seg.segmentation_fractional_type == hd.seg.SegmentationFractionalTypeValues.PROBABILITY
        assert seg.StudyInstanceUID == series.study_instance_uid
        assert seg.PatientID == series.frames[0].dataset.PatientID
        assert "UNVERIFIED" in seg.SeriesDescription
        assert seg.ImageComments == AI_DISCLAIMER
        assert seg.ContentQualification == "RESEARCH"
        labels = [item.SegmentLabel for item in seg.SegmentSequence]
        assert labels == [f"{finding.display_name} relevance" for finding in findings]
        for item, finding in zip(seg.SegmentSequence, findings, strict=True):
            description = seg.get_segment_description(int(item.SegmentNumber))
            assert description.segmented_property_type.value == finding.code.value
            assert description.segmented_property_type.scheme_designator == finding.code.scheme_designator
            assert description.segmented_property_category == codes.cid7150.MorphologicallyAbnormalStructure
            assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
            assert description.algorithm_identification[0].AlgorithmName == ALGORITHM.name
            assert description.algorithm_identification[0].AlgorithmVersion == ALGORITHM.version
            assert item.SegmentDescription == SEGMENT_DESCRIPTION
            assert item.TrackingUID == finding_tracking_uid(
                series.series_instance_uid, classification.label_set.name, finding.key
            )
        uids = set(_source_uids(seg))
        frame_indices = [i for i, frame in enumerate(series.frames) if frame.sop_instance_uid in uids]
        stored = _read_maps(seg, [series.frames[i] for i in frame_indices])
        for segment_index, finding in enumerate(findings):
            expected = classification.relevance_maps[finding.key][frame_indices]
            # 8-bit storage (Maximum Fractional Value 255): at most half a step off.
            assert np.abs(stored[..., segment_index] - expected).max() <= 0.5 / 255 + 1e-6
        covered.extend(uids)
    assert sorted(covered) == sorted({frame.sop_instance_uid for frame in series.frames})


@requires_dciodvfy
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_every_seg_passes_dciodvfy(case, request, make_classification, tmp_path):
    series = request.getfixturevalue(CASES[case][0])
    segmentations = build_relevance_segmentations(make_classification(series), ALGORITHM)
    for index, segmentation in enumerate(segmentations):
        path = tmp_path / f"seg-{index}.dcm"
        segmentation.save_as(path, enforce_file_format=True)
        assert_dciodvfy_clean(path)


@requires_dciodvfy
def test_lossy_jpeg2000_cr_source_passes_dciodvfy(make_classification, tmp_path):
    path, dataset = read_testdata("RG1_J2KI.dcm")
    classification = make_classification(series_from([dataset], [path]), map_keys=["pneumothorax"])
    (segmentation,) = build_relevance_segmentations(classification, ALGORITHM)
    assert segmentation.LossyImageCompression == "01"  # derived from a lossy image, and says so
    assert_dciodvfy_clean(segmentation)


def test_ct_seg_has_the_source_geometry(ct_series, make_classification):
    (seg,) = build_relevance_segmentations(make_classification(ct_series), ALGORITHM)
    source = ct_series.frames[0].dataset
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == pytest.approx(
        [float(v) for v in source.PixelSpacing]
    )
    positions = {
        tuple(round(float(v), 3) for v in frame.PlanePositionSequence[0].ImagePositionPatient)
        for frame in seg.PerFrameFunctionalGroupsSequence
    }
    expected = {tuple(round(float(v), 3) for v in f.dataset.ImagePositionPatient) for f in ct_series.frames}
    assert positions == expected


def test_cr_seg_has_no_invented_geometry(cr_series, make_classification):
    (seg,) = build_relevance_segmentations(make_classification(cr_series), ALGORITHM)
    assert "FrameOfReferenceUID" not in seg
    assert "PixelMeasuresSequence" not in seg.SharedFunctionalGroupsSequence[0]
    assert "PatientOrientation" in seg and not seg.PatientOrientation
    assert "Laterality" not in seg and seg.ImageLaterality in {"L", "R", "B", "U"}


def test_source_datasets_are_not_modified(cr_series, make_classification):
    dataset = cr_series.frames[0].dataset
    before = copy.deepcopy(dataset)
    build_relevance_segmentations(make_classification(cr_series), ALGORITHM)
    assert dataset == before
    assert [float(v) for v in dataset.PixelSpacing] == [0.0, 0.0]


def test_uids_are_deterministic_and_versioned(ct_series, make_classification, medsiglip_identity):
    classification = make_classification(ct_series)

    def uids(result_version=1, model=None, keys=None):
        c = classification if model is None else dataclasses.replace(classification, model=model)
        (seg,) = build_relevance_segmentations(c, ALGORITHM, finding_keys=keys, result_version=result_version)
        return seg.SOPInstanceUID, seg.SeriesInstanceUID

    first = uids()
    assert uids() == first
    other_version = dataclasses.replace(medsiglip_identity, version="1" * 40)
    assert uids(model=other_version)[0] != first[0]
    assert uids(model=other_version)[1] != first[1]
    assert uids(result_version=2)[0] != first[0]
    assert uids(keys=["cardiomegaly"])[0] != first[0]


def test_random_weights_are_announced(ct_series, make_classification, medsiglip_identity):
    model = dataclasses.replace(medsiglip_identity, random_weights=True)
    (seg,) = build_relevance_segmentations(make_classification(ct_series, model=model), ALGORITHM)
    assert "RANDOM WEIGHTS" in seg.SeriesDescription
    assert seg.ImageComments.startswith(RANDOM_WEIGHTS_WARNING)


def test_finding_keys_choose_and_order_segments(ct_series, make_classification):
    classification = make_classification(ct_series)
    keys = ["cardiomegaly", "pneumothorax"]
    (seg,) = build_relevance_segmentations(classification, ALGORITHM, finding_keys=keys)
    labels = [item.SegmentLabel for item in seg.SegmentSequence]
    assert labels == ["Cardiomegaly relevance", "Pneumothorax relevance"]


def test_default_keys_are_the_mapped_findings_in_label_set_order(ct_series, make_classification):
    classification = make_classification(ct_series, map_keys=["cardiomegaly", "pneumothorax"])
    (seg,) = build_relevance_segmentations(classification, ALGORITHM)
    labels = [item.SegmentLabel for item in seg.SegmentSequence]
    assert labels == ["Pneumothorax relevance", "Cardiomegaly relevance"]


# --- validation: one case per branch -----------------------------------------------------------


def _set_map(key, value):
    def mutate(c):
        c.relevance_maps[key] = value(c.relevance_maps[key]) if callable(value) else value

    return mutate


def _resize_frame(c):
    frame = c.series.frames[1]
    dataset = copy.deepcopy(frame.dataset)
    dataset.Rows = 64
    c.series.frames[1] = dataclasses.replace(frame, dataset=dataset)


VALUE_ERRORS = {
    **COMMON_VALUE_ERRORS,
    "map-key-not-in-label-set": (
        lambda c: c.relevance_maps.update(atelectasis=c.relevance_maps["pneumothorax"]),
        {},
        "not findings",
    ),
    "no-maps": (lambda c: c.relevance_maps.clear(), {}, "relevance_maps is empty"),
    "empty-finding-keys": (None, {"finding_keys": []}, "finding_keys is empty"),
    "duplicate-finding-keys": (None, {"finding_keys": ["pneumothorax"] * 2}, "duplicates"),
    "finding-key-without-map": (
        lambda c: c.relevance_maps.pop("cardiomegaly"),
        {"finding_keys": ["cardiomegaly"]},
        "no relevance map",
    ),
    "frames-of-different-size": (_resize_frame, {}, "one matrix size"),
    "map-not-an-array": (_set_map("pneumothorax", [[0.5]]), {}, "numpy array"),
    "map-wrong-shape": (_set_map("pneumothorax", lambda m: m[:2]), {}, "has shape"),
    "map-integer-dtype": (_set_map("pneumothorax", lambda m: m.astype(np.uint8)), {}, "floating point"),
    "map-nan": (_set_map("pneumothorax", lambda m: np.where(m > 0.5, np.nan, m)), {}, "NaN"),
    "map-above-one": (_set_map("pneumothorax", lambda m: m * 2), {}, r"in \[0, 1\]"),
    "map-below-zero": (_set_map("pneumothorax", lambda m: m - 1), {}, r"in \[0, 1\]"),
}


@pytest.mark.parametrize(("damage", "kwargs", "message"), list(VALUE_ERRORS.values()), ids=list(VALUE_ERRORS))
def test_invalid_input_raises_value_error_naming_it(damage, kwargs, message, damaged_ct_classification):
    classification = damaged_ct_classification(damage)
    with pytest.raises(ValueError, match=message):
        build_relevance_segmentations(classification, ALGORITHM, **kwargs)


def test_long_algorithm_name_is_refused(ct_series, make_classification):
    algorithm = dataclasses.replace(ALGORITHM, name="x" * 65)
    with pytest.raises(ValueError, match=r"algorithm\.name"):
        build_relevance_segmentations(make_classification(ct_series), algorithm)


def test_wrong_argument_types_raise_type_error(ct_series, make_classification):
    classification = make_classification(ct_series)
    with pytest.raises(TypeError, match="classification"):
        build_relevance_segmentations(classification.series, ALGORITHM)
    with pytest.raises(TypeError, match="algorithm"):
        build_relevance_segmentations(classification, {"name": "x"})
    with pytest.raises(TypeError, match="finding_keys"):
        build_relevance_segmentations(classification, ALGORITHM, finding_keys="pneumothorax")


def test_ct_without_frame_of_reference_is_an_input_error(ct_without_frame_of_reference, make_classification):
    uid = ct_without_frame_of_reference.frames[0].sop_instance_uid
    with pytest.raises(InputError, match="Frame of Reference UID") as raised:
        build_relevance_segmentations(make_classification(ct_without_frame_of_reference), ALGORITHM)
    assert raised.value.source == uid


def test_ct_without_slice_thickness_is_an_input_error(ct_series, make_classification):
    for frame in ct_series.frames:
        frame.dataset.SliceThickness = None
    with pytest.raises(InputError, match="Slice Thickness"):
        build_relevance_segmentations(make_classification(ct_series), ALGORITHM)


def test_ct_with_zero_pixel_spacing_is_an_input_error(ct_series, make_classification):
    for frame in ct_series.frames:
        frame.dataset.PixelSpacing = [0, 0]
    with pytest.raises(InputError, match="Pixel Spacing"):
        build_relevance_segmentations(make_classification(ct_series), ALGORITHM)


def test_multi_frame_without_frame_of_reference_is_an_input_error(make_classification):
    path, dataset = read_testdata("SC_rgb_2frame.dcm")
    series = series_from([dataset], [path])
    series.frames.append(dataclasses.replace(series.frames[0], frame_number=2))
    with pytest.raises(InputError, match="multi-frame") as raised:
        build_relevance_segmentations(make_classification(series), ALGORITHM)
    assert raised.value.source == str(dataset.SOPInstanceUID)


def test_frame_number_outside_the_instance_is_an_input_error(enhanced_ct_series, make_classification):
    frames = enhanced_ct_series.frames
    frames[1] = dataclasses.replace(frames[1], frame_number=3)
    with pytest.raises(InputError, match="frame_number 3"):
        build_relevance_segmentations(make_classification(enhanced_ct_series), ALGORITHM)


# --- pixels: quantised levels, byte-identical to highdicom's float path ----------------------------


@pytest.fixture
def cr_j2k_series():
    """pydicom-data's chest CR as the benchmark classifies it: 1,955 x 1,841, JPEG 2000, MONOCHROME1."""
    path, dataset = read_testdata("RG1_J2KR.dcm")
    return series_from([dataset], [path])


def _highdicom_float_path(maps, group, max_fractional_value):
    """What the writer gave highdicom before: the maps in a zero-filled float32 array, for it to quantise."""
    first = group.sources[0]
    pixel_array = np.zeros((group.n_planes, first.Rows, first.Columns, len(maps)), np.float32)
    for segment_index, relevance in enumerate(maps):
        for frame_index, plane in group.frames:
            pixel_array[plane, :, :, segment_index] = relevance[frame_index]
    return pixel_array


def _half_level_sweep() -> np.ndarray:
    """Each float32 at and next to (k + 0.5) / 255: where float32 rounding, half to even, decides."""
    steps = ((np.arange(255) + 0.5) / 255).astype(np.float32)
    below, above = np.nextafter(steps, np.float32(0)), np.nextafter(steps, np.float32(1))
    return np.concatenate([below, steps, above, np.float32([0.0, 1.0])])


def _model_like_maps(series, seed=0):
    """Maps as the model makes them (rectified patch grids, peak 1, resized onto the source pixels).

    pneumothorax also holds :func:`_half_level_sweep` in its first row(s); pleural effusion stays
    below half a level (every frame of that segment is omitted); on a series of several frames,
    every map is exactly 0 on frame 1 (that plane is left out altogether).
    """
    rng = np.random.default_rng(seed)
    rows, columns = int(series.frames[0].dataset.Rows), int(series.frames[0].dataset.Columns)
    maps = {}
    for key in ("pneumothorax", "pleural_effusion", "cardiomegaly"):
        grids = np.clip(rng.normal(0.2, 0.4, (len(series.frames), 32, 32)), 0.0, None).astype(np.float32)
        grids /= grids.max(axis=(1, 2), keepdims=True)
        maps[key] = grid_to_source(grids, rows, columns)  # one grid per frame
    sweep = _half_level_sweep()
    maps["pneumothorax"][0].reshape(-1)[: sweep.size] = sweep
    maps["pleural_effusion"] *= np.float32(0.49 / 255)
    if len(series.frames) > 1:
        for relevance in maps.values():
            relevance[1] = 0.0
    return maps


def _run_independent(segmentation):
    """A copy without what differs between two runs: creation times and highdicom's random UID."""
    copied = copy.deepcopy(segmentation)
    for keyword in ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime"):
        if keyword in copied:
            delattr(copied, keyword)
    for item in copied.ContributingEquipmentSequence:
        if "ContributionDateTime" in item:
            del item.ContributionDateTime
    for item in (*copied.DimensionOrganizationSequence, *copied.DimensionIndexSequence):
        item.DimensionOrganizationUID = "1.2.3"
    return copied


PARITY_CASES = {
    "cr-real-1955x1841-j2k": "cr_j2k_series",
    "ct-4-slices": "ct_series",
    "enhanced-ct-2-frames": "enhanced_ct_series",
}


@pytest.mark.parametrize("case", list(PARITY_CASES), ids=list(PARITY_CASES))
def test_levels_write_exactly_what_highdicoms_float_path_writes(
    case, request, make_classification, monkeypatch
):
    series = request.getfixturevalue(PARITY_CASES[case])
    classification = make_classification(series)
    classification.relevance_maps.update(_model_like_maps(series))
    fast = build_relevance_segmentations(classification, ALGORITHM)
    assert all(isinstance(built, seg_module._FractionalLevelsSegmentation) for built in fast)

    monkeypatch.setattr(seg_module, "_fractional_levels", _highdicom_float_path)
    monkeypatch.setattr(seg_module, "_FractionalLevelsSegmentation", hd.seg.Segmentation)
    plain = build_relevance_segmentations(classification, ALGORITHM)

    assert len(fast) == len(plain)
    for built, reference in zip(fast, plain, strict=True):
        assert type(reference) is hd.seg.Segmentation
        assert built.PixelData == reference.PixelData
        assert built.NumberOfFrames == reference.NumberOfFrames
        # pleural effusion's frames are all omitted, so fewer frames than planes x segments
        assert built.NumberOfFrames < len(built.SegmentSequence) * len(series.frames)
        assert built.SegmentsOverlap == reference.SegmentsOverlap == "UNDEFINED"
        assert _run_independent(built) == _run_independent(reference)


def test_levels_round_half_to_even_in_float32(cr_j2k_series):
    sweep = _half_level_sweep()
    source = cr_j2k_series.frames[0].dataset
    relevance = np.zeros((1, int(source.Rows), int(source.Columns)), np.float32)
    relevance[0].reshape(-1)[: sweep.size] = sweep
    (group,) = seg_module.group_frames(cr_j2k_series.frames, "SEG")
    levels = seg_module._fractional_levels([relevance], group, 255)
    assert levels.shape == (1, relevance.shape[1], relevance.shape[2], 1)
    assert levels.dtype == np.uint8
    expected = np.around(sweep * np.float32(255)).astype(np.uint8)
    assert np.array_equal(levels[0, :, :, 0].reshape(-1)[: sweep.size], expected)
    # float64 arithmetic or rounding half up would differ on some of these values
    assert not np.array_equal(expected, np.around(sweep.astype(np.float64) * 255).astype(np.uint8))
    assert not np.array_equal(expected, np.floor(sweep * np.float32(255) + np.float32(0.5)).astype(np.uint8))


def test_maps_below_half_a_level_everywhere_give_all_zero_frames(ct_series, make_classification):
    """Every value rounds to level 0 without being 0: the SEG keeps every frame, all zero.

    (highdicom's own float path counts such planes as non-empty and then omits every frame of them;
    on highdicom 0.28 that ends in an IndexError.)
    """
    classification = make_classification(ct_series)
    for relevance in classification.relevance_maps.values():
        relevance[:] = np.float32(0.4 / 255)
    (segmentation,) = build_relevance_segmentations(classification, ALGORITHM)
    assert segmentation.NumberOfFrames == len(ct_series.frames) * len(classification.relevance_maps)
    assert not any(segmentation.PixelData)


def test_levels_need_eight_bit_maximum_fractional_value(cr_j2k_series):
    (group,) = seg_module.group_frames(cr_j2k_series.frames, "SEG")
    relevance = np.zeros((1, 1955, 1841), np.float32)  # RG1_J2KR's matrix
    with pytest.raises(ValueError, match="max_fractional_value"):
        seg_module._fractional_levels([relevance], group, 256)


# --- shared helpers (operators/writers/common.py) ------------------------------------------------


def test_derived_uid_is_deterministic_valid_and_unambiguous():
    uid = derived_uid("1.2.3", "model", "v1", "seg", "1")
    assert uid == derived_uid("1.2.3", "model", "v1", "seg", "1")
    assert pydicom.uid.UID(uid).is_valid and len(uid) <= 64
    assert derived_uid("ab", "c") != derived_uid("a", "bc")
    assert derived_uid("1.2.3", "model", "v2", "seg", "1") != uid


def test_derived_uid_rejects_non_strings_and_nothing():
    with pytest.raises(TypeError, match="part 1"):
        derived_uid("seg", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one part"):
        derived_uid()


def test_prepare_sources_fixes_copies_only():
    _, cr = read_testdata("RG1_UNCI.dcm")
    _, deidentified = read_testdata("693_UNCI.dcm")
    assert "DeidentificationMethod" not in deidentified
    originals = [copy.deepcopy(cr), copy.deepcopy(deidentified)]
    fixed_cr, fixed_deidentified = prepare_sources([cr, deidentified])
    assert "PixelSpacing" not in fixed_cr and "PixelData" not in fixed_cr
    assert fixed_cr.SOPInstanceUID == cr.SOPInstanceUID and fixed_cr.Rows == cr.Rows
    assert fixed_deidentified.DeidentificationMethod
    assert [cr, deidentified] == originals


def test_prepare_sources_rejects_non_instances():
    with pytest.raises(TypeError, match=r"datasets\[0\]"):
        prepare_sources(["not a dataset"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="SOPInstanceUID"):
        prepare_sources([pydicom.Dataset()])


def test_image_frame_fixture_is_what_the_writers_expect(ct_series):
    # Guards the fixtures: one frame per slice, all of one series.
    assert all(isinstance(frame, ImageFrame) for frame in ct_series.frames)
    assert len({frame.dataset.SeriesInstanceUID for frame in ct_series.frames}) == 1


def test_highdicom_refusal_becomes_an_input_error_naming_the_source(
    ct_series, make_classification, monkeypatch
):
    def refuse(*args, **kwargs):
        raise ValueError("Source images must all be part of the same series")

    monkeypatch.setattr("medgemma_deploy.operators.writers.seg._FractionalLevelsSegmentation", refuse)
    with pytest.raises(InputError, match="same series") as raised:
        build_relevance_segmentations(make_classification(ct_series), ALGORITHM)
    assert raised.value.source == ct_series.frames[0].sop_instance_uid


@requires_pixelmed
def test_every_seg_passes_pixelmed(request, make_classification, tmp_path):
    """Every case's SEG(s) through PixelMed in one JVM."""
    paths = []
    for case, (fixture, _, _) in CASES.items():
        classification = make_classification(request.getfixturevalue(fixture))
        segmentations = build_relevance_segmentations(classification, ALGORITHM)
        for index, segmentation in enumerate(segmentations):
            paths.append(tmp_path / f"{case}-{index}.dcm")
            segmentation.save_as(paths[-1], enforce_file_format=True)
    assert_pixelmed_clean(paths)


def test_seg_names_the_model_as_processing_equipment(ct_series, make_classification, medsiglip_identity):
    (segmentation,) = build_relevance_segmentations(make_classification(ct_series), ALGORITHM)
    (equipment,) = [item for item in segmentation.ContributingEquipmentSequence if "DeviceUID" in item]
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert equipment.DeviceUID == derived_uid(
        "device observer", medsiglip_identity.name, medsiglip_identity.version
    )
    assert equipment.ManufacturerModelName == medsiglip_identity.name
    assert equipment.SoftwareVersions[0] == ALGORITHM.version
