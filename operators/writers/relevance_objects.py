"""What the relevance-map writers (SEG, Parametric Map) share: checking the maps, grouping frames.

Both writers put one series' relevance maps into multi-frame objects derived from its images, and
highdicom takes either several single-frame images sharing one geometry, or exactly one
multi-frame image, or a single frame without a frame of reference. :func:`group_frames` splits a
series into such groups (:class:`FrameGroup`), one derived instance each:

* single-frame images in patient coordinates (CT, MR…: Frame of Reference, Image Position and
  Orientation, Pixel Spacing) share **one instance per geometry** (frame of reference, matrix size,
  orientation; normally one per series);
* projection images (CR/DX without a frame of reference) get **one instance per source image**;
* a multi-frame image gets **one instance for that image**; it needs a frame of reference;
* a cross-sectional image (CT, MR, PT, NM) without a Frame of Reference UID is refused with an
  :class:`InputError` naming its SOP Instance UID: its IOD requires one, and inventing a frame of
  reference would claim a spatial relationship that nobody measured.

:func:`check_relevance_request` validates a writer's arguments before anything is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from highdicom.spatial import get_image_coordinate_system
from pydicom.dataset import Dataset

from medgemma_deploy.domain import (
    AlgorithmInfo,
    FindingDefinition,
    ImageFrame,
    SeriesClassification,
)
from medgemma_deploy.errors import InputError
from medgemma_deploy.operators.writers.common import check_numbering, prepare_sources

__all__ = ["FrameGroup", "check_relevance_request", "group_frames"]

#: Modalities whose image IODs require a Frame of Reference (PS3.3 A.3, A.4, A.21, A.5).
_CROSS_SECTIONAL_MODALITIES = frozenset({"CT", "MR", "PT", "NM"})

#: What a single-frame image in patient coordinates must have for a derived object's plane
#: geometry (Pixel Measures and Plane Orientation functional groups, PS3.3 C.7.6.16.2.1/2.4).
_PLANE_ATTRIBUTES = (
    ("PixelSpacing", "(0028,0030) Pixel Spacing"),
    ("SliceThickness", "(0018,0050) Slice Thickness"),
    ("ImageOrientationPatient", "(0020,0037) Image Orientation (Patient)"),
)

_LO_MAX = 64


@dataclass
class FrameGroup:
    """The source instances and series frames that go into one derived instance."""

    sources: list[Dataset]
    #: (index into the series' frames, 0-based frame index within the derived pixel array)
    frames: list[tuple[int, int]] = field(default_factory=list)
    n_planes: int = 0
    #: Whether the sources are in patient coordinates (frame of reference and plane geometry).
    has_coordinates: bool = False


def check_relevance_request(
    classification: SeriesClassification,
    algorithm: AlgorithmInfo,
    finding_keys: Sequence[str] | None,
    series_number: int,
    result_version: int,
    object_name: str,
) -> tuple[list[str], dict[str, FindingDefinition]]:
    """Check a relevance writer's arguments; return the finding keys to write and the findings by key.

    ``object_name`` ("SEG", "Parametric Map") names the object in messages.

    Raises
    ------
    TypeError
        ``classification`` or ``algorithm`` has the wrong type, or ``finding_keys`` is a string.
    ValueError
        An unknown or duplicate finding key, a map whose shape does not match the series' frames
        or whose values are outside [0, 1], an algorithm name/version that is not an LO, a bad
        series number or version.
    """
    if not isinstance(classification, SeriesClassification):
        raise TypeError(f"classification must be a SeriesClassification, got {type(classification).__name__}")
    if not isinstance(algorithm, AlgorithmInfo):
        raise TypeError(f"algorithm must be an AlgorithmInfo, got {type(algorithm).__name__}")
    for name, value in (("algorithm.name", algorithm.name), ("algorithm.version", algorithm.version)):
        if not value or len(value) > _LO_MAX:
            raise ValueError(f"{name} must be 1 to {_LO_MAX} characters (LO), got {value!r}")
    check_numbering(series_number, result_version)
    frames = classification.series.frames
    if not frames:
        raise ValueError("classification.series.frames is empty: there is no source image to derive from")
    findings = {finding.key: finding for finding in classification.label_set.findings}
    maps = classification.relevance_maps
    unknown = sorted(set(maps) - set(findings))
    if unknown:
        raise ValueError(
            f"classification.relevance_maps has keys {unknown} that are not findings of label set "
            f"{classification.label_set.name!r} ({sorted(findings)})"
        )
    if finding_keys is None:
        keys = [finding.key for finding in classification.label_set.findings if finding.key in maps]
        if not keys:
            raise ValueError("classification.relevance_maps is empty: there is no map to write")
    else:
        if isinstance(finding_keys, str):
            raise TypeError(f"finding_keys must be a sequence of keys, not the string {finding_keys!r}")
        keys = list(finding_keys)
        if not keys:
            raise ValueError(f"finding_keys is empty: a {object_name} needs at least one map")
        duplicates = sorted({key for key in keys if keys.count(key) > 1})
        if duplicates:
            raise ValueError(f"finding_keys has duplicates {duplicates}")
        missing = [key for key in keys if key not in maps]
        if missing:
            raise ValueError(f"finding_keys {missing} have no relevance map; maps exist for {sorted(maps)}")
    expected = (len(frames), int(frames[0].dataset.Rows), int(frames[0].dataset.Columns))
    for index, frame in enumerate(frames):
        shape = (int(frame.dataset.Rows), int(frame.dataset.Columns))
        if shape != expected[1:]:
            raise ValueError(
                f"classification.series.frames[{index}] is {shape[0]}x{shape[1]} but frame 0 is "
                f"{expected[1]}x{expected[2]}; one series' relevance maps need one matrix size"
            )
    for key in keys:
        _check_map(key, maps[key], expected)
    return keys, findings


def _check_map(key: str, relevance: object, expected: tuple[int, int, int]) -> None:
    if not isinstance(relevance, np.ndarray):
        raise ValueError(f"relevance_maps[{key!r}] must be a numpy array, got {type(relevance).__name__}")
    if relevance.shape != expected:
        raise ValueError(
            f"relevance_maps[{key!r}] has shape {relevance.shape}, expected {expected} "
            "(n_frames, rows, columns) of the series' source frames"
        )
    if not np.issubdtype(relevance.dtype, np.floating):
        raise ValueError(
            f"relevance_maps[{key!r}] must be floating point in [0, 1], got dtype {relevance.dtype}"
        )
    # Two passes over a full-resolution map, not three: the minimum or the maximum is NaN or
    # infinite exactly when some value is.
    low, high = float(relevance.min()), float(relevance.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(f"relevance_maps[{key!r}] has NaN or infinite values")
    if low < 0.0 or high > 1.0:
        raise ValueError(f"relevance_maps[{key!r}] values must be in [0, 1], found min {low:g} max {high:g}")


def group_frames(frames: Sequence[ImageFrame], object_name: str) -> list[FrameGroup]:
    """Split a series' frames into derived instances (see the module docstring), in first-seen order.

    Raises
    ------
    InputError
        A source cannot carry a derived ``object_name`` (see :func:`_check_geometry`).
    """
    uids = list(dict.fromkeys(frame.sop_instance_uid for frame in frames))
    originals = {frame.sop_instance_uid: frame.dataset for frame in frames}
    prepared = dict(zip(uids, prepare_sources([originals[uid] for uid in uids]), strict=True))
    groups: dict[tuple, FrameGroup] = {}
    for frame_index, frame in enumerate(frames):
        uid = frame.sop_instance_uid
        source = prepared[uid]
        has_coordinates = _check_geometry(source, object_name)
        if "NumberOfFrames" in source:
            key: tuple = ("instance", uid)
            group = groups.setdefault(
                key,
                FrameGroup([source], n_planes=int(source.NumberOfFrames), has_coordinates=has_coordinates),
            )
            if not 1 <= frame.frame_number <= group.n_planes:
                raise InputError(uid, f"frame_number {frame.frame_number} is outside 1..{group.n_planes}")
            group.frames.append((frame_index, frame.frame_number - 1))
            continue
        if has_coordinates:
            orientation = tuple(round(float(v), 4) for v in source.ImageOrientationPatient)
            key = ("volume", str(source.FrameOfReferenceUID), source.Rows, source.Columns, orientation)
        else:
            key = ("projection", uid)
        group = groups.setdefault(key, FrameGroup([], has_coordinates=has_coordinates))
        if all(str(existing.SOPInstanceUID) != uid for existing in group.sources):
            group.sources.append(source)
            group.n_planes += 1
        plane = [str(existing.SOPInstanceUID) for existing in group.sources].index(uid)
        group.frames.append((frame_index, plane))
    return list(groups.values())


def _check_geometry(source: Dataset, object_name: str) -> bool:
    """Whether ``source`` is in patient coordinates; raise InputError if it cannot carry ``object_name``."""
    uid = str(source.SOPInstanceUID)
    modality = str(source.get("Modality", ""))
    has_frame_of_reference = bool(source.get("FrameOfReferenceUID"))
    if not has_frame_of_reference and modality in _CROSS_SECTIONAL_MODALITIES:
        raise InputError(
            uid,
            f"(0020,0052) Frame of Reference UID is missing on a {modality} image; its IOD requires it and "
            f"a {object_name} cannot be placed without it (a new frame of reference is not invented). "
            "Likely cause: the image was de-identified or converted by a tool that dropped it",
        )
    has_coordinates = has_frame_of_reference and get_image_coordinate_system(source) is not None
    n_frames = int(source.get("NumberOfFrames", 1) or 1)
    if n_frames > 1 and not has_coordinates:
        raise InputError(
            uid,
            f"a multi-frame image ({n_frames} frames) without a Frame of Reference and plane positions "
            f"cannot carry a {object_name}; only single-frame projection images can",
        )
    if has_coordinates and "NumberOfFrames" not in source:
        missing = [
            description
            for keyword, description in _PLANE_ATTRIBUTES
            if keyword not in source or source[keyword].value in (None, "")
        ]
        if missing:
            raise InputError(
                uid,
                f"{', '.join(missing)} missing or empty (a zero Pixel Spacing is dropped as invalid) on "
                f"a {modality or 'image'} in patient coordinates; the {object_name}'s plane geometry "
                "needs them",
            )
    return has_coordinates
