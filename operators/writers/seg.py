"""MedSigLIP relevance maps as FRACTIONAL (PROBABILITY) DICOM Segmentations (PS3.3 A.51).

One segment per finding: the map says where the model looked when it scored that finding, not
where the finding is, and each segment's description says so. Values are the maps' [0, 1]
relevance scaled to 0…255 (Maximum Fractional Value 255).

How a series becomes SEG instances (highdicom takes either several single-frame images sharing
one geometry, or exactly one multi-frame image, or a single frame without a frame of reference):

* single-frame images in patient coordinates (CT, MR…: Frame of Reference, Image Position and
  Orientation, Pixel Spacing) go into **one SEG per geometry** (frame of reference, matrix size,
  orientation; normally one per series), with plane positions copied from the source slices;
* projection images (CR/DX without a frame of reference) get **one SEG per source image**: highdicom
  cannot put several projection images in one SEG, and they share no geometry anyway. A zero or
  missing Pixel Spacing is left out, never invented (``prepare_sources``);
* a multi-frame image gets **one SEG for that instance**; it needs a frame of reference;
* a cross-sectional image (CT, MR, PT, NM) without a Frame of Reference UID is refused with an
  :class:`InputError` naming its SOP Instance UID: its IOD requires one, and inventing a frame of
  reference would claim a spatial relationship that nobody measured. The caller reports the
  series as rejected for SEG; its SR is still written, without segment references.

Pixels: each map is quantised here exactly as highdicom quantises a float FRACTIONAL array
(``numpy.around(float32 value * 255)`` cast to uint8, :func:`_fractional_levels`), and highdicom
gets those levels through :class:`_FractionalLevelsSegmentation`. highdicom itself accepts an
integer array for FRACTIONAL only when it is binary (it multiplies 0/1 by Maximum Fractional
Value), and for a float array it sorts every value (``numpy.unique``) to check the [0, 1] range
that :func:`check_relevance_request` has already checked with one minimum and one maximum: 0.7 s
of a 1.4 s SEG of a 1,955 x 1,841 chest CR with 11 segments. The Pixel Data written is
byte-identical to highdicom's float path (``tests/test_seg_writer.py`` checks it on a real CR).

Every SEG says what it is: Series Description "AI relevance maps (UNVERIFIED)" (plus "RANDOM
WEIGHTS" for a random-weights model), Content Qualification RESEARCH, and the AI disclaimer in
Image Comments. UIDs are derived (``derived_uid``) from the source SOP Instance UIDs, the model
name and version, the label set, the finding keys and ``result_version``, so a re-run replaces
its own result. Contributing Equipment names the model as Processing Equipment (``equipment``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom
import numpy as np
from highdicom.seg import Segmentation, SegmentDescription, SegmentsOverlapValues
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from medgemma_deploy.domain import AlgorithmInfo, FindingDefinition, SeriesClassification
from medgemma_deploy.operators.writers.common import (
    AI_DISCLAIMER,
    MANUFACTURER,
    RANDOM_WEIGHTS_WARNING,
    DerivedSeries,
    declare_private_schemes,
    derived_series_uid,
    derived_uid,
    finding_tracking_uid,
    refusal_is_input_error,
    to_coded_concept,
    to_lo,
)
from medgemma_deploy.operators.writers.equipment import contributing_equipment
from medgemma_deploy.operators.writers.relevance_objects import (
    FrameGroup,
    check_relevance_request,
    group_frames,
)

__all__ = [
    "SEGMENT_DESCRIPTION",
    "SEGMENT_PROPERTY_CATEGORY",
    "build_relevance_segmentations",
    "segment_label",
]

logger = logging.getLogger(__name__)

#: Segment Description (LO) of every relevance segment.
SEGMENT_DESCRIPTION = "AI relevance map (where the model looked), not a delineation"

#: Segmented Property Category (CID 7150) of every relevance segment; the type is the finding's code.
SEGMENT_PROPERTY_CATEGORY = codes.cid7150.MorphologicallyAbnormalStructure

#: Maximum Fractional Value (0062,000E): the relevance [0, 1] is stored as 0…255.
MAX_FRACTIONAL_VALUE = 255


def segment_label(finding: FindingDefinition) -> str:
    """Segment Label (LO, at most 64 characters) of a finding's relevance segment."""
    return to_lo(f"{finding.display_name} relevance")


def build_relevance_segmentations(
    classification: SeriesClassification,
    algorithm: AlgorithmInfo,
    *,
    finding_keys: Sequence[str] | None = None,
    series_number: int = 9901,
    result_version: int = 1,
) -> list[Segmentation]:
    """Build the FRACTIONAL SEG instance(s) holding a series' relevance maps.

    Parameters
    ----------
    classification:
        MedSigLIP's result for one series; ``relevance_maps[key]`` is float32 in [0, 1] with shape
        (n_frames, rows, columns), one map per frame of ``classification.series``.
    algorithm:
        TID 4019 identification of the model run (written as each segment's algorithm).
    finding_keys:
        Findings to write, one segment each, in this order; default: every finding that has a
        map, in label-set order.
    series_number:
        Series Number of the SEG series (all SEGs of one source series share one SEG series).
    result_version:
        Bump it to write a new result for the same inputs and model instead of replacing the old.

    Returns
    -------
    list[highdicom.seg.Segmentation]
        One SEG per geometry group (see the module docstring), each with the same segments.

    Raises
    ------
    TypeError
        ``classification`` or ``algorithm`` has the wrong type.
    ValueError
        An argument is invalid: unknown or duplicate finding key, a map whose shape does not match
        the series' frames or whose values are outside [0, 1], a bad series number or version.
    InputError
        A source image cannot carry a SEG: cross-sectional without Frame of Reference UID,
        multi-frame without one, or in patient coordinates without a usable Pixel Spacing, Slice
        Thickness or Image Orientation; or highdicom refuses the sources for another reason
        (its message is in the reason). ``source`` is the (first) source's SOP Instance UID.
    """
    keys, findings = check_relevance_request(
        classification, algorithm, finding_keys, series_number, result_version, "SEG"
    )
    series = classification.series
    model = classification.model
    groups = group_frames(series.frames, "SEG")
    target = DerivedSeries(
        series_instance_uid=derived_series_uid("seg", series.series_instance_uid, model, result_version),
        series_number=series_number,
        series_description=_series_description(model.random_weights),
        equipment=contributing_equipment(model, algorithm),
    )
    segmentations = [
        _build_one(classification, algorithm, group, keys, findings, target, number, result_version)
        for number, group in enumerate(groups, start=1)
    ]
    for segmentation in segmentations:
        declare_private_schemes(segmentation, [findings[key].code for key in keys])
    logger.info(
        "series %s: %d relevance SEG(s), %d segment(s) each",
        series.series_instance_uid,
        len(segmentations),
        len(keys),
    )
    return segmentations


def _build_one(
    classification: SeriesClassification,
    algorithm: AlgorithmInfo,
    group: FrameGroup,
    keys: Sequence[str],
    findings: dict[str, FindingDefinition],
    target: DerivedSeries,
    instance_number: int,
    result_version: int,
) -> Segmentation:
    model = classification.model
    label_set = classification.label_set
    # Built per SEG: highdicom puts the descriptions' datasets into the SEG as they are.
    segment_descriptions = [
        _segment_description(number, findings[key], classification, algorithm)
        for number, key in enumerate(keys, start=1)
    ]
    pixel_array = _fractional_levels(
        [classification.relevance_maps[key] for key in keys], group, MAX_FRACTIONAL_VALUE
    )
    source_uids = [str(source.SOPInstanceUID) for source in group.sources]
    sop_instance_uid = derived_uid(
        *source_uids,
        model.name,
        model.version,
        label_set.name,
        label_set.version,
        *keys,
        "seg",
        str(result_version),
    )
    with refusal_is_input_error(
        source_uids[0], f"a SEG from {len(source_uids)} source image(s) starting with this one"
    ):
        segmentation = _FractionalLevelsSegmentation(
            source_images=group.sources,
            pixel_array=pixel_array,
            segmentation_type=highdicom.seg.SegmentationTypeValues.FRACTIONAL,
            fractional_type=highdicom.seg.SegmentationFractionalTypeValues.PROBABILITY,
            max_fractional_value=MAX_FRACTIONAL_VALUE,
            segment_descriptions=segment_descriptions,
            content_label="RELEVANCE",
            content_description=_content_description(model.random_weights),
            **target.instance_attributes(sop_instance_uid, instance_number),
        )
    _finish(segmentation, group, model.random_weights)
    return segmentation


def _fractional_levels(
    maps: Sequence[np.ndarray], group: FrameGroup, max_fractional_value: int
) -> np.ndarray:
    """A group's maps as the FRACTIONAL levels highdicom stores: (planes, rows, columns, segments) uint8.

    Each value is ``numpy.around(float32(value) * max_fractional_value)``, exactly what highdicom's
    ``Segmentation`` computes from a float32 array (``_get_segment_pixel_array``), so the stored
    bytes are the same. Planes of the group that no frame fills stay 0, as in a zero-filled float
    array. The array is segment-major in memory (a transposed view), so each segment's plane, the
    unit highdicom encodes as one frame, is contiguous.

    Parameters
    ----------
    maps:
        One ``(n_frames, rows, columns)`` floating-point map per segment, in segment order, values
        in [0, 1] (checked by :func:`check_relevance_request`).
    group:
        The frames going into this SEG (:func:`group_frames`).
    max_fractional_value:
        Maximum Fractional Value, at most 255.
    """
    if not 1 <= max_fractional_value <= 255:
        raise ValueError(
            f"max_fractional_value must be 1 to 255 for 8-bit levels, got {max_fractional_value}"
        )
    first = group.sources[0]
    rows, columns = int(first.Rows), int(first.Columns)
    levels = np.zeros((len(maps), group.n_planes, rows, columns), dtype=np.uint8)
    scaled = np.empty((rows, columns), dtype=np.float32)
    scale = np.float32(max_fractional_value)
    for segment_index, relevance in enumerate(maps):
        for frame_index, plane in group.frames:
            # float32 first, as highdicom's float32 pixel array holds it, then scale and round there.
            np.multiply(np.asarray(relevance[frame_index], dtype=np.float32), scale, out=scaled)
            np.around(scaled, out=scaled)
            levels[segment_index, plane] = scaled
    return np.moveaxis(levels, 0, -1)


class _FractionalLevelsSegmentation(Segmentation):
    """highdicom's ``Segmentation``, given FRACTIONAL values already quantised (:func:`_fractional_levels`).

    The constructor is highdicom's own; only its two pixel hooks change (both exist with these
    signatures in highdicom 0.26 to 0.28; ``tests/test_seg_writer.py`` compares the Pixel Data with
    highdicom's float path, so a highdicom upgrade that changes them fails there):

    * ``_check_and_cast_pixel_array`` accepts the uint8 levels (highdicom accepts only binary
      integers) without sorting them; Segments Overlap is what highdicom gives a float array,
      UNDEFINED for several fractional segments and NO for one;
    * ``_get_segment_pixel_array`` hands each segment's plane over as it is, where highdicom
      would scale and round floats.

    Everything else (functional groups, empty-frame omission, encoding) is highdicom's. Emptiness is
    judged on the stored levels, so a plane whose values all round to level 0 is empty, as an
    all-zero plane is; highdicom's float path would count it as non-empty and then omit each of
    its frames (on highdicom 0.28 an IndexError when that leaves no frame at all).
    """

    @classmethod
    def _check_and_cast_pixel_array(
        cls,
        pixel_array: np.ndarray,
        segment_numbers: np.ndarray,
        segmentation_type: highdicom.seg.SegmentationTypeValues,
        dtype: type,
    ) -> tuple[np.ndarray, SegmentsOverlapValues]:
        if segmentation_type != highdicom.seg.SegmentationTypeValues.FRACTIONAL:
            raise ValueError(f"quantised levels are FRACTIONAL values, not {segmentation_type.value}")
        if not isinstance(pixel_array, np.ndarray) or pixel_array.dtype != np.uint8 or pixel_array.ndim != 4:
            raise TypeError("quantised levels must be a (planes, rows, columns, segments) uint8 numpy array")
        if pixel_array.shape[-1] != len(segment_numbers):
            raise ValueError(
                f"the levels have {pixel_array.shape[-1]} segments but {len(segment_numbers)} are described"
            )
        if pixel_array.shape[-1] == 1:
            return pixel_array, SegmentsOverlapValues.NO
        return pixel_array, SegmentsOverlapValues.UNDEFINED

    @staticmethod
    def _get_segment_pixel_array(
        pixel_array: np.ndarray,
        segment_number: int,
        described_segment_numbers: np.ndarray,
        segmentation_type: highdicom.seg.SegmentationTypeValues,
        max_fractional_value: int,
        dtype: type,
    ) -> np.ndarray:
        return pixel_array[:, :, segment_number - 1]


def _segment_description(
    number: int, finding: FindingDefinition, classification: SeriesClassification, algorithm: AlgorithmInfo
) -> SegmentDescription:
    parameters = {key: value for key, value in algorithm.parameters}
    parameters["software"] = f"{algorithm.software} {algorithm.software_version}"
    description = SegmentDescription(
        segment_number=number,
        segment_label=segment_label(finding),
        segmented_property_category=SEGMENT_PROPERTY_CATEGORY,
        segmented_property_type=to_coded_concept(finding.code),
        algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=highdicom.AlgorithmIdentificationSequence(
            name=algorithm.name,
            family=codes.cid7162.ArtificialIntelligence,
            version=algorithm.version,
            source=MANUFACTURER,
            parameters=parameters,
        ),
        tracking_uid=finding_tracking_uid(
            classification.series.series_instance_uid, classification.label_set.name, finding.key
        ),
        tracking_id=to_lo(finding.display_name),
    )
    # (0062,0006) Segment Description: highdicom has no argument for it.
    description.SegmentDescription = SEGMENT_DESCRIPTION
    return description


def _finish(segmentation: Segmentation, group: FrameGroup, random_weights: bool) -> None:
    """Disclaimer, and the post-construction fixes of docs/dicom-conformance.md (section 12)."""
    segmentation.ImageComments = (
        f"{RANDOM_WEIGHTS_WARNING} {AI_DISCLAIMER}" if random_weights else AI_DISCLAIMER
    )
    if not group.has_coordinates:
        # General Image Type 2C: required (may be empty) without plane orientation; highdicom
        # omits it, and the source's value trips a multiplicity rule in PixelMed.
        segmentation.PatientOrientation = ""
    # The validators disagree on Laterality; ImageLaterality alone satisfies both.
    if "Laterality" in segmentation:
        del segmentation.Laterality
    segmentation.ImageLaterality = _image_laterality(group.sources[0])


def _image_laterality(source: Dataset) -> str:
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(source.get(keyword, "") or "").upper()
        if value in {"L", "R", "B", "U"}:
            return value
    return "U"


def _series_description(random_weights: bool) -> str:
    if random_weights:
        return "AI relevance maps (UNVERIFIED, RANDOM WEIGHTS)"
    return "AI relevance maps (UNVERIFIED)"


def _content_description(random_weights: bool) -> str:
    if random_weights:
        return "RANDOM WEIGHTS (test/demo model): these maps are meaningless"
    return "Research model output, not a device; unverified by a clinician"
