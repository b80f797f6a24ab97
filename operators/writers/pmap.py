"""MedSigLIP relevance maps as DICOM Parametric Maps (PS3.3 A.75), the form AI viewers display.

One Parametric Map per finding and per geometry group of the series (``relevance_objects``):
the map says where the model looked when it scored that finding, not where the finding is. Pixels
are the maps' [0, 1] relevance as 32-bit floats (Float Pixel Data), with an identity Real World
Value Mapping (slope 1, intercept 0, UCUM unit "1") labelled ``RELEVANCE``, and a VOI window over
[0, 1] so that viewers show the whole range.

Only images in patient coordinates can carry a Parametric Map: its IOD makes the Frame of
Reference module and the Plane Position / Plane Orientation (Patient) functional groups mandatory.
A projection radiograph (CR/DX without a frame of reference) is refused with an
:class:`InputError` naming its SOP Instance UID; the caller records the series as rejected for
the Parametric Map with that reason, and the SEG (which needs no patient geometry) still carries
its maps when asked for.

Every map says what it is (Series Description, Content Description, Image Comments with the AI
disclaimer, Content Qualification RESEARCH), names the model as Contributing Equipment
(``equipment``), and has UIDs derived from its sources, the model, the label set, the finding and
``result_version``, so a re-run replaces its own result.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom
import numpy as np
from highdicom.pm import ParametricMap, RealWorldValueMapping
from pydicom.sr.codedict import codes

from medgemma_deploy.domain import AlgorithmInfo, FindingDefinition, SeriesClassification
from medgemma_deploy.errors import InputError
from medgemma_deploy.operators.writers.common import (
    AI_DISCLAIMER,
    RANDOM_WEIGHTS_WARNING,
    DerivedSeries,
    derived_series_uid,
    derived_uid,
    refusal_is_input_error,
    to_lo,
)
from medgemma_deploy.operators.writers.equipment import contributing_equipment
from medgemma_deploy.operators.writers.relevance_objects import (
    FrameGroup,
    check_relevance_request,
    group_frames,
)

__all__ = ["RELEVANCE_LUT_LABEL", "NoPatientGeometryError", "build_relevance_parametric_maps"]

logger = logging.getLogger(__name__)

#: LUT Label of the Real World Value Mapping (SH, 16 characters) and Content Label (CS) of every map.
RELEVANCE_LUT_LABEL = "RELEVANCE"


class NoPatientGeometryError(InputError):
    """The source images are not in patient coordinates, so no Parametric Map can be derived.

    Not a defect of the input: a projection radiograph has no frame of reference by nature. Callers
    that also write the SEG (which carries the maps of such images) record it as skipped.
    """


def build_relevance_parametric_maps(
    classification: SeriesClassification,
    algorithm: AlgorithmInfo,
    *,
    finding_keys: Sequence[str] | None = None,
    series_number: int = 9904,
    result_version: int = 1,
) -> dict[str, list[ParametricMap]]:
    """Build the Parametric Map instance(s) holding a series' relevance maps.

    Parameters
    ----------
    classification:
        MedSigLIP's result for one series; ``relevance_maps[key]`` is float32 in [0, 1] with shape
        (n_frames, rows, columns), one map per frame of ``classification.series``.
    algorithm:
        TID 4019 identification of the model run (its name and version identify the equipment).
    finding_keys:
        Findings to write, one map each; default: every finding that has a map, in label-set order.
    series_number:
        Series Number of the Parametric Map series (all maps of one source series share it).
    result_version:
        Bump it to write a new result for the same inputs and model instead of replacing the old.

    Returns
    -------
    dict[str, list[highdicom.pm.ParametricMap]]
        By finding key, one map per geometry group (normally one per series), in finding order.

    Raises
    ------
    TypeError
        ``classification`` or ``algorithm`` has the wrong type.
    ValueError
        An argument is invalid (see ``check_relevance_request``).
    NoPatientGeometryError
        A source image has no frame of reference or plane geometry (a projection radiograph);
        ``source`` is its SOP Instance UID.
    InputError
        A cross-sectional source cannot carry a Parametric Map (see ``group_frames``), or highdicom
        refuses the sources for another reason (its message is in the reason). ``source`` is the
        (first) source's SOP Instance UID.
    """
    keys, findings = check_relevance_request(
        classification, algorithm, finding_keys, series_number, result_version, "Parametric Map"
    )
    series = classification.series
    model = classification.model
    groups = group_frames(series.frames, "Parametric Map")
    for group in groups:
        if not group.has_coordinates:
            first = group.sources[0]
            raise NoPatientGeometryError(
                str(first.SOPInstanceUID),
                f"a {first.get('Modality', 'image')} without a Frame of Reference and plane positions "
                "cannot carry a Parametric Map: its IOD requires the Frame of Reference module and the "
                "Plane Position/Orientation (Patient) functional groups (PS3.3 A.75), and none is invented",
            )
    target = DerivedSeries(
        series_instance_uid=derived_series_uid("pmap", series.series_instance_uid, model, result_version),
        series_number=series_number,
        series_description=to_lo(f"AI relevance maps ({_qualifier(model.random_weights)})"),
        equipment=contributing_equipment(model, algorithm),
    )
    maps: dict[str, list[ParametricMap]] = {key: [] for key in keys}
    instance_number = 0
    for key in keys:
        for group in groups:
            instance_number += 1
            maps[key].append(
                _build_one(classification, findings[key], group, target, instance_number, result_version)
            )
    logger.info(
        "series %s: %d relevance Parametric Map(s) for %d finding(s)",
        series.series_instance_uid,
        instance_number,
        len(keys),
    )
    return maps


def _build_one(
    classification: SeriesClassification,
    finding: FindingDefinition,
    group: FrameGroup,
    target: DerivedSeries,
    instance_number: int,
    result_version: int,
) -> ParametricMap:
    model = classification.model
    label_set = classification.label_set
    first = group.sources[0]
    pixel_array = np.zeros((group.n_planes, first.Rows, first.Columns), dtype=np.float32)
    relevance = classification.relevance_maps[finding.key]
    for frame_index, plane in group.frames:
        pixel_array[plane] = relevance[frame_index]
    source_uids = [str(source.SOPInstanceUID) for source in group.sources]
    mapping = RealWorldValueMapping(
        lut_label=RELEVANCE_LUT_LABEL,
        lut_explanation=to_lo(f"{finding.display_name}: where the model looked (0-1)"),
        unit=codes.UCUM.NoUnits,
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
    )
    sop_instance_uid = derived_uid(
        *source_uids,
        model.name,
        model.version,
        label_set.name,
        label_set.version,
        finding.key,
        "pmap",
        str(result_version),
    )
    with refusal_is_input_error(
        source_uids[0],
        f"a Parametric Map from {len(source_uids)} source image(s) starting with this one",
        (ValueError, TypeError, AttributeError, RuntimeError),
    ):
        parametric_map = ParametricMap(
            source_images=group.sources,
            pixel_array=pixel_array,
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping],
            voi_lut_transformations=[highdicom.VOILUTTransformation(window_center=0.5, window_width=1.0)],
            content_label=RELEVANCE_LUT_LABEL,
            content_description=to_lo(
                f"{finding.display_name} relevance; {_qualifier(model.random_weights)}"
            ),
            **target.instance_attributes(sop_instance_uid, instance_number),
        )
    # General Series Type 2C, required where Image Laterality is absent (the Parametric Map Image
    # module has none); empty means unknown, which is all a relevance map can say.
    parametric_map.Laterality = first.get("Laterality") or None
    parametric_map.ImageComments = (
        f"{RANDOM_WEIGHTS_WARNING} {AI_DISCLAIMER}" if model.random_weights else AI_DISCLAIMER
    )
    return parametric_map


def _qualifier(random_weights: bool) -> str:
    return "UNVERIFIED, RANDOM WEIGHTS" if random_weights else "UNVERIFIED"
