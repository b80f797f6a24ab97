"""MedSigLIP findings of one series as a TID 1500 Measurement Report (Comprehensive 3D SR).

Document structure (PS3.16 TID 1500), all from highdicom templates and content items:

* observation context: the observer is a device, the model run by this software (TID 1004);
* procedure reported from CID 100 (CT/MR/PT/NM "unspecified body region", else SNOMED CT
  "Imaging procedure"; LOINC's "XR unspecified body region" is too recent for PixelMed's CID 100);
* image library (TID 1600) of every source image, built here without spacing items when the
  source has no valid spacing: highdicom's own library refuses a CR without Imager Pixel Spacing;
* one measurement group per finding: tracking identifier and UID (the same UID as the finding's
  SEG segment), finding type = the finding's code, TID 4019 algorithm identification, a
  qualitative evaluation Present/Absent (SNOMED CT 52101004 / 272519000) as decided by the
  classifier with the label set's threshold, and the probability as a numeric measurement
  (DCM 122157 "Probability", UCUM "1") whose source image is the frame where it peaked. Every
  group is a TID 1501 Measurement and Qualitative Evaluation Group: the findings are image- or
  series-level, and a relevance map is not the finding's region (TID 1411 would say the
  probability was measured inside it; PixelMed also picks one template for all the groups of the
  report, so TID 1411 and TID 1501 groups cannot be mixed). The finding's relevance maps are
  referenced from its group as CONTAINS IMAGE "Illustration of Finding" (DCM 125201; TID 1501
  row 10b): its SEG segment (with the Referenced Segment Number) and/or its Parametric Map;
* a "Qualitative Evaluations" container with the AI disclaimer as text (and the random-weights
  warning when the model has random weights) and, when the label set has triage rules, the study's
  triage level as a CODE item (99MEDGEMMA "AI triage priority" = ROUTINE/URGENT/STAT; no standard
  concept exists) followed by a TEXT item "AI triage reason" naming each rule that fired. The level
  is the study's (the highest any series reached), so every series' SR of a study says the same.

The document is VerificationFlag UNVERIFIED, CompletionFlag PARTIAL, PreliminaryFlag
PRELIMINARY, ContentQualification RESEARCH. Patient and study attributes come from the sources.
Contributing Equipment names the model as Processing Equipment, with the device observer's UID.
UIDs are derived from the sources, the model name and version, the label set, the referenced
SEGs and Parametric Maps and ``result_version``, so a re-run replaces its own result.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import highdicom.sr as hsr

# highdicom's own test of "the IOD of this SOP Class has Number of Frames" (PS3.3 tables), which
# it applies to frame references; not in its public API, so a highdicom upgrade is checked by
# test_sr_writer's two-frame Secondary Capture tests.
from highdicom._standard_utils import is_multiframe_image
from highdicom.pm import ParametricMap
from highdicom.seg import Segmentation
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code as PydicomCode

from medgemma_deploy.domain import AlgorithmInfo, FindingScore, SeriesClassification
from medgemma_deploy.operators.writers.common import (
    AI_DISCLAIMER,
    RANDOM_WEIGHTS_WARNING,
    DerivedSeries,
    algorithm_identification,
    check_numbering,
    declare_private_schemes,
    derived_series_uid,
    derived_uid,
    device_observer_context,
    finding_tracking_uid,
    prepare_sources,
    procedure_reported,
    refusal_is_input_error,
    to_coded_concept,
)
from medgemma_deploy.operators.writers.equipment import contributing_equipment
from medgemma_deploy.triage import (
    TRIAGE_PRIORITY_CODES,
    TRIAGE_PRIORITY_CONCEPT,
    TRIAGE_REASON_CONCEPT,
    StudyTriage,
)

__all__ = ["RELEVANCE_MAP_REFERENCE", "build_findings_sr"]

logger = logging.getLogger(__name__)


#: CID 29 "Acquisition Modality" by Modality value, for the image library.
_MODALITY_CODES: dict[str, PydicomCode] = {
    getattr(codes.cid29, name).value: getattr(codes.cid29, name) for name in codes.cid29.dir()
}

#: Concept name of the IMAGE items that reference a finding's relevance maps (TID 1501 row 10b).
RELEVANCE_MAP_REFERENCE = codes.DCM.IllustrationOfFinding

_PIXELS = hsr.CodedConcept(value="{pixels}", scheme_designator="UCUM", meaning="Pixels")
_ORIENTATION_UNIT = hsr.CodedConcept(value="{-1:1}", scheme_designator="UCUM", meaning="{-1:1}")
_ORIENTATION_NAMES = (
    codes.DCM.ImageOrientationPatientRowX,
    codes.DCM.ImageOrientationPatientRowY,
    codes.DCM.ImageOrientationPatientRowZ,
    codes.DCM.ImageOrientationPatientColumnX,
    codes.DCM.ImageOrientationPatientColumnY,
    codes.DCM.ImageOrientationPatientColumnZ,
)
_POSITION_NAMES = (
    codes.DCM.ImagePositionPatientX,
    codes.DCM.ImagePositionPatientY,
    codes.DCM.ImagePositionPatientZ,
)
_ACQ = hsr.RelationshipTypeValues.HAS_ACQ_CONTEXT


def build_findings_sr(
    classification: SeriesClassification,
    algorithm: AlgorithmInfo,
    *,
    segmentations: Sequence[Segmentation] = (),
    parametric_maps: Mapping[str, Sequence[ParametricMap]] | None = None,
    series_number: int = 9902,
    result_version: int = 1,
    triage: StudyTriage | None = None,
) -> hsr.Comprehensive3DSR:
    """Build the TID 1500 findings report of one classified series.

    Parameters
    ----------
    classification:
        MedSigLIP's result for one series: one ``FindingScore`` per finding.
    algorithm:
        TID 4019 identification of the model run (name, version, parameters).
    segmentations:
        The series' relevance SEGs (``build_relevance_segmentations``); a finding whose segment is
        in one of them references it (the SEG holding the finding's peak frame when several do).
    parametric_maps:
        The series' relevance Parametric Maps by finding key (``build_relevance_parametric_maps``);
        a finding references its map (the one holding its peak frame when several do).
    series_number:
        Series Number of the SR series.
    result_version:
        Bump it to write a new result for the same inputs and model instead of replacing the old.
    triage:
        The study's triage level and reasons (``triage_by_study``), written as a coded item with
        its reason; ``None`` when the label set has no triage rules.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        UNVERIFIED, PARTIAL, PRELIMINARY document.

    Raises
    ------
    TypeError
        ``classification``, ``algorithm``, a SEG, a Parametric Map or ``triage`` has the wrong type.
    ValueError
        No scores, a probability outside [0, 1], a peak frame index outside the series, a
        duplicate finding, a SEG or Parametric Map from another series or for an unknown finding,
        a bad series number or version.
    InputError
        highdicom refuses the sources' patient/study attributes; ``source`` is the first source's
        SOP Instance UID and the reason carries highdicom's message.
    """
    maps_by_key = dict(parametric_maps or {})
    _validate(classification, algorithm, segmentations, maps_by_key, series_number, result_version)
    if triage is not None and not isinstance(triage, StudyTriage):
        raise TypeError(f"triage must be a StudyTriage or None, got {type(triage).__name__}")
    series = classification.series
    model = classification.model
    label_set = classification.label_set
    sources = prepare_sources(series.datasets)
    by_uid = {str(source.SOPInstanceUID): source for source in sources}
    groups = []
    referenced: dict[str, Segmentation | ParametricMap] = {}
    for score in classification.scores:
        segment = _find_segment(score, classification, segmentations)
        if segment is not None:
            referenced[str(segment[0].SOPInstanceUID)] = segment[0]
        parametric_map = _peak_instance(score, classification, maps_by_key.get(score.finding.key, ()))
        if parametric_map is not None:
            referenced[str(parametric_map.SOPInstanceUID)] = parametric_map
        groups.append(_measurement_group(score, classification, algorithm, by_uid, segment, parametric_map))
    report = hsr.MeasurementReport(
        observation_context=hsr.ObservationContext(
            observer_device_context=device_observer_context(model, algorithm)
        ),
        procedure_reported=procedure_reported(series.modality),
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    root_items = report[0].ContentSequence
    measurements_index = next(
        index for index, item in enumerate(root_items) if item.name == codes.DCM.ImagingMeasurements
    )
    root_items.insert(measurements_index, _image_library(sources))
    root_items.append(_disclaimer(model.random_weights, triage))
    source_uids = list(by_uid)
    target = DerivedSeries(
        series_instance_uid=derived_series_uid("sr", series.series_instance_uid, model, result_version),
        series_number=series_number,
        series_description=_series_description(model.random_weights),
        equipment=contributing_equipment(model, algorithm),
    )
    sop_instance_uid = derived_uid(
        series.series_instance_uid,
        *source_uids,
        model.name,
        model.version,
        label_set.name,
        label_set.version,
        *sorted(referenced),
        "sr",
        str(result_version),
    )
    with refusal_is_input_error(
        source_uids[0],
        f"the findings SR of series {series.series_instance_uid} from its {len(source_uids)} source "
        "image(s), starting with this one",
    ):
        document = hsr.Comprehensive3DSR(
            evidence=[*sources, *referenced.values()],
            content=report[0],
            **target.unverified_sr_attributes(sop_instance_uid),
        )
    triage_codes = (
        [TRIAGE_PRIORITY_CONCEPT, TRIAGE_REASON_CONCEPT, TRIAGE_PRIORITY_CODES[triage.priority]]
        if triage is not None
        else []
    )
    declare_private_schemes(document, [score.finding.code for score in classification.scores] + triage_codes)
    logger.info(
        "series %s: findings SR with %d finding(s), %d relevance map reference(s)",
        series.series_instance_uid,
        len(groups),
        len(referenced),
    )
    return document


def _series_description(random_weights: bool) -> str:
    return "AI findings (UNVERIFIED, RANDOM WEIGHTS)" if random_weights else "AI findings (UNVERIFIED)"


def _validate(
    classification: SeriesClassification,
    algorithm: AlgorithmInfo,
    segmentations: Sequence[Segmentation],
    parametric_maps: Mapping[str, Sequence[ParametricMap]],
    series_number: int,
    result_version: int,
) -> None:
    if not isinstance(classification, SeriesClassification):
        raise TypeError(f"classification must be a SeriesClassification, got {type(classification).__name__}")
    if not isinstance(algorithm, AlgorithmInfo):
        raise TypeError(f"algorithm must be an AlgorithmInfo, got {type(algorithm).__name__}")
    check_numbering(series_number, result_version)
    n_frames = len(classification.series.frames)
    if n_frames == 0:
        raise ValueError("classification.series.frames is empty: there is no source image to report on")
    if not classification.scores:
        raise ValueError("classification.scores is empty: a TID 1500 report needs at least one finding")
    seen: set[str] = set()
    for index, score in enumerate(classification.scores):
        key = score.finding.key
        if key in seen:
            raise ValueError(f"classification.scores[{index}] repeats finding {key!r}")
        seen.add(key)
        if not math.isfinite(score.probability) or not 0.0 <= score.probability <= 1.0:
            raise ValueError(
                f"classification.scores[{index}] ({key!r}) probability must be in [0, 1], "
                f"got {score.probability!r}"
            )
        if not 0 <= score.peak_frame_index < n_frames:
            raise ValueError(
                f"classification.scores[{index}] ({key!r}) peak_frame_index {score.peak_frame_index} is "
                f"outside the series' {n_frames} frame(s)"
            )
    if isinstance(segmentations, (Segmentation, Dataset)):
        raise TypeError("segmentations must be a sequence of Segmentation objects, not a single one")
    series_uid = classification.series.series_instance_uid
    for index, segmentation in enumerate(segmentations):
        if not isinstance(segmentation, Segmentation):
            raise TypeError(
                f"segmentations[{index}] must be a highdicom Segmentation, got {type(segmentation).__name__}"
            )
        _check_derived_from(segmentation, f"segmentations[{index}]", series_uid)
    keys = {score.finding.key for score in classification.scores}
    for key, maps in parametric_maps.items():
        if key not in keys:
            raise ValueError(f"parametric_maps[{key!r}]: {key!r} is not a scored finding ({sorted(keys)})")
        if isinstance(maps, Dataset):
            raise TypeError(f"parametric_maps[{key!r}] must be a sequence of ParametricMap objects, not one")
        for index, parametric_map in enumerate(maps):
            if not isinstance(parametric_map, ParametricMap):
                raise TypeError(
                    f"parametric_maps[{key!r}][{index}] must be a highdicom ParametricMap, "
                    f"got {type(parametric_map).__name__}"
                )
            _check_derived_from(parametric_map, f"parametric_maps[{key!r}][{index}]", series_uid)


def _check_derived_from(derived: Dataset, name: str, series_uid: str) -> None:
    source_series = {str(item.SeriesInstanceUID) for item in derived.get("ReferencedSeriesSequence", [])}
    if series_uid not in source_series:
        raise ValueError(
            f"{name} ({derived.SOPInstanceUID}) was derived from series "
            f"{sorted(source_series)}, not from the classified series {series_uid}"
        )


def _find_segment(
    score: FindingScore, classification: SeriesClassification, segmentations: Sequence[Segmentation]
) -> tuple[Segmentation, int] | None:
    """The SEG and segment number of the finding's relevance map, preferring the SEG of its peak frame."""
    tracking_uid = finding_tracking_uid(
        classification.series.series_instance_uid, classification.label_set.name, score.finding.key
    )
    peak_uid = classification.series.frames[score.peak_frame_index].sop_instance_uid
    candidates = []
    for segmentation in segmentations:
        for segment in segmentation.SegmentSequence:
            if str(segment.get("TrackingUID", "")) == tracking_uid:
                candidates.append((segmentation, int(segment.SegmentNumber)))
    for segmentation, number in candidates:
        if peak_uid in _source_instance_uids(segmentation):
            return segmentation, number
    return candidates[0] if candidates else None


def _peak_instance(
    score: FindingScore, classification: SeriesClassification, maps: Sequence[ParametricMap]
) -> ParametricMap | None:
    """The finding's Parametric Map holding its peak frame (the first one if none does)."""
    peak_uid = classification.series.frames[score.peak_frame_index].sop_instance_uid
    for parametric_map in maps:
        if peak_uid in _source_instance_uids(parametric_map):
            return parametric_map
    return maps[0] if maps else None


def _is_maximum_over_frames(score: FindingScore) -> bool:
    """Whether the series probability is the maximum of several per-frame probabilities (CID 7464)."""
    frames = score.frame_probabilities
    return len(frames) > 1 and math.isclose(score.probability, max(frames), abs_tol=1e-6)


def _source_instance_uids(derived: Dataset) -> set[str]:
    return {
        str(instance.ReferencedSOPInstanceUID)
        for series in derived.get("ReferencedSeriesSequence", [])
        for instance in series.get("ReferencedInstanceSequence", [])
    }


def _measurement_group(
    score: FindingScore,
    classification: SeriesClassification,
    algorithm: AlgorithmInfo,
    sources: dict[str, Dataset],
    segment: tuple[Segmentation, int] | None,
    parametric_map: ParametricMap | None,
) -> hsr.MeasurementsAndQualitativeEvaluations:
    """The finding's TID 1501 group, with its relevance maps as CONTAINS IMAGE items (row 10b)."""
    series = classification.series
    finding = score.finding
    finding_code = to_coded_concept(finding.code)
    peak_frame = series.frames[score.peak_frame_index]
    peak_source = sources[peak_frame.sop_instance_uid]
    probability = hsr.Measurement(
        name=codes.DCM.Probability,
        value=float(score.probability),
        unit=codes.UCUM.NoUnits,
        derivation=codes.cid7464.Maximum if _is_maximum_over_frames(score) else None,
        referenced_images=[_source_image(peak_source, peak_frame.frame_number)],
    )
    group = hsr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hsr.TrackingIdentifier(
            uid=finding_tracking_uid(series.series_instance_uid, classification.label_set.name, finding.key),
            identifier=finding.display_name,
        ),
        finding_type=finding_code,
        algorithm_id=algorithm_identification(algorithm),
        measurements=[probability],
        qualitative_evaluations=[
            hsr.QualitativeEvaluation(
                name=finding_code, value=codes.SCT.Present if score.present else codes.SCT.Absent
            )
        ],
    )
    references: list[hsr.ImageContentItem] = []
    if segment is not None:
        segmentation, segment_number = segment
        references.append(
            hsr.ImageContentItem(
                name=RELEVANCE_MAP_REFERENCE,
                referenced_sop_class_uid=str(segmentation.SOPClassUID),
                referenced_sop_instance_uid=str(segmentation.SOPInstanceUID),
                referenced_segment_numbers=[segment_number],
                relationship_type=hsr.RelationshipTypeValues.CONTAINS,
            )
        )
    if parametric_map is not None:
        references.append(
            hsr.ImageContentItem(
                name=RELEVANCE_MAP_REFERENCE,
                referenced_sop_class_uid=str(parametric_map.SOPClassUID),
                referenced_sop_instance_uid=str(parametric_map.SOPInstanceUID),
                relationship_type=hsr.RelationshipTypeValues.CONTAINS,
            )
        )
    group[0].ContentSequence.extend(references)
    return group


def _source_image(source: Dataset, frame_number: int) -> hsr.SourceImageForMeasurement:
    """The measurement's source image, naming the frame where the instance's SOP Class allows it.

    Referenced Frame Number is only allowed for a multi-frame SOP Class (dciodvfy: "Shall not be
    present for Referenced SOP Class that is not multi-frame"), whatever the instance's Number of
    Frames: a two-frame Secondary Capture (valid
    DICOM, single-frame class) is referenced as a whole. ``from_source_image`` raised "does not
    represent a multi-frame dataset" for such an instance when given a frame number.
    """
    n_frames = int(source.get("NumberOfFrames", 1) or 1)
    frames = [frame_number] if n_frames > 1 and is_multiframe_image(source) else None
    return hsr.SourceImageForMeasurement(
        referenced_sop_class_uid=str(source.SOPClassUID),
        referenced_sop_instance_uid=str(source.SOPInstanceUID),
        referenced_frame_numbers=frames,
    )


def _image_library(sources: Sequence[Dataset]) -> hsr.ContainerContentItem:
    """TID 1600 Image Library: one group, one entry per source image with the descriptors it has."""
    entries = []
    for source in sources:
        entry = hsr.ImageContentItem(
            name=codes.SCT.Source,
            referenced_sop_class_uid=str(source.SOPClassUID),
            referenced_sop_instance_uid=str(source.SOPInstanceUID),
            relationship_type=hsr.RelationshipTypeValues.CONTAINS,
        )
        entry.ContentSequence = hsr.ContentSequence(_descriptors(source))
        entries.append(entry)
    group = hsr.ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup, relationship_type=hsr.RelationshipTypeValues.CONTAINS
    )
    group.ContentSequence = hsr.ContentSequence(entries)
    library = hsr.ContainerContentItem(
        name=codes.DCM.ImageLibrary, relationship_type=hsr.RelationshipTypeValues.CONTAINS
    )
    library.ContentSequence = hsr.ContentSequence([group])
    return library


def _descriptors(source: Dataset) -> list[hsr.ContentItem]:
    """TID 1602 (+1603/1604) descriptors, each only when the source has a valid value for it."""
    items: list[hsr.ContentItem] = []
    modality = _MODALITY_CODES.get(str(source.get("Modality", "")))
    if modality is not None:
        items.append(hsr.CodeContentItem(name=codes.DCM.Modality, value=modality, relationship_type=_ACQ))
    if source.get("FrameOfReferenceUID"):
        items.append(
            hsr.UIDRefContentItem(
                name=codes.DCM.FrameOfReferenceUID,
                value=str(source.FrameOfReferenceUID),
                relationship_type=_ACQ,
            )
        )
    items.append(_num(codes.DCM.PixelDataRows, source.Rows, _PIXELS))
    items.append(_num(codes.DCM.PixelDataColumns, source.Columns, _PIXELS))
    orientation = _values(source, "PatientOrientation", 2)
    if orientation is not None and all(orientation):
        items.append(
            hsr.TextContentItem(
                name=codes.DCM.PatientOrientationRow, value=str(orientation[0]), relationship_type=_ACQ
            )
        )
        items.append(
            hsr.TextContentItem(
                name=codes.DCM.PatientOrientationColumn, value=str(orientation[1]), relationship_type=_ACQ
            )
        )
    # prepare_sources dropped zero spacings, so whatever is left is real.
    spacing = _values(source, "PixelSpacing", 2) or _values(source, "ImagerPixelSpacing", 2)
    if spacing is not None:
        items.append(_num(codes.DCM.HorizontalPixelSpacing, spacing[1], codes.UCUM.Millimeter))
        items.append(_num(codes.DCM.VerticalPixelSpacing, spacing[0], codes.UCUM.Millimeter))
    thickness = source.get("SliceThickness")
    if thickness not in (None, ""):
        items.append(_num(codes.DCM.SliceThickness, thickness, codes.UCUM.Millimeter))
    position = _values(source, "ImagePositionPatient", 3)
    if position is not None:
        items.extend(
            _num(name, value, codes.UCUM.Millimeter)
            for name, value in zip(_POSITION_NAMES, position, strict=True)
        )
    direction = _values(source, "ImageOrientationPatient", 6)
    if direction is not None:
        items.extend(
            _num(name, value, _ORIENTATION_UNIT)
            for name, value in zip(_ORIENTATION_NAMES, direction, strict=True)
        )
    return items


def _values(source: Dataset, keyword: str, count: int) -> list | None:
    value = source.get(keyword)
    if value is None or isinstance(value, (str, bytes)):
        return None
    values = list(value) if hasattr(value, "__iter__") else [value]
    return values if len(values) == count else None


def _num(name: PydicomCode, value: object, unit: PydicomCode | hsr.CodedConcept) -> hsr.NumContentItem:
    number = int(value) if isinstance(value, int) else float(value)  # type: ignore[arg-type]
    return hsr.NumContentItem(name=name, value=number, unit=unit, relationship_type=_ACQ)


def _disclaimer(random_weights: bool, triage: StudyTriage | None = None) -> hsr.ContainerContentItem:
    """TID 1500 "Qualitative Evaluations" container: the disclaimer text item(s), then the triage.

    The triage level is a CODE item and its reason a TEXT item, both rows of TID 1500's qualitative
    evaluations (CONTAINS), so a receiver can select studies by the coded level and show why.
    """
    texts = [RANDOM_WEIGHTS_WARNING, AI_DISCLAIMER] if random_weights else [AI_DISCLAIMER]
    container = hsr.ContainerContentItem(
        name=hsr.CodedConcept(value="C0034375", scheme_designator="UMLS", meaning="Qualitative Evaluations"),
        relationship_type=hsr.RelationshipTypeValues.CONTAINS,
    )
    items: list[hsr.ContentItem] = [
        hsr.TextContentItem(
            name=codes.DCM.Comment, value=text, relationship_type=hsr.RelationshipTypeValues.CONTAINS
        )
        for text in texts
    ]
    if triage is not None:
        items.append(
            hsr.CodeContentItem(
                name=to_coded_concept(TRIAGE_PRIORITY_CONCEPT),
                value=to_coded_concept(TRIAGE_PRIORITY_CODES[triage.priority]),
                relationship_type=hsr.RelationshipTypeValues.CONTAINS,
            )
        )
        items.append(
            hsr.TextContentItem(
                name=to_coded_concept(TRIAGE_REASON_CONCEPT),
                value=triage.describe(),
                relationship_type=hsr.RelationshipTypeValues.CONTAINS,
            )
        )
    container.ContentSequence = hsr.ContentSequence(items)
    return container
