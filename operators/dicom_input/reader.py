"""A DICOM file or folder → :class:`StudyInput`: usable studies and series, plus every file not used and why.

Rules, in the order they are applied:

* **Discovery.** A file, or a folder searched recursively in sorted order; file names need no
  extension. Hidden files and folders (name starting with ``.``) and ``DICOMDIR`` are skipped with a
  reason. Symbolic links to folders are not followed.
* **Reading** (stage ``read``). ``dcmread`` without ``force``; a file without the ``DICM`` prefix is
  read only if it starts like a raw DICOM data set (group 0002 or 0008) and then has SOP Class and
  SOP Instance UIDs. A file that ends inside an element is rejected as truncated. Study, Series and
  SOP Instance UIDs are required (Type 1). A second copy of a SOP Instance UID is skipped; the first
  file in sorted order is kept.
* **SOP class** (stage ``sop-class``). Image storage classes are used; SR, PR, KO, SEG, RT Dose and
  every other known non-image class are skipped even when they carry pixel data. An unknown
  (private) SOP class, or a retired image class that highdicom cannot derive objects from, is
  skipped as unsupported: every output must name its source's SOP class and IOD.
* **Header** (stage ``header``), before any pixel is decoded: every element must parse (a byte
  flip can give an unknown VR); Study, Series, SOP Instance and Frame of Reference UIDs must be
  valid UIDs (PS3.5 9.1), because every output references them; Image Orientation (Patient) must
  be two non-zero, non-parallel direction vectors; and the Image Pixel module must fit the memory
  budget (:class:`~medgemma_deploy.operators.dicom_input.pixels.MemoryBudget`).
* **Pixels** (stage ``pixels``). :func:`~medgemma_deploy.operators.dicom_input.pixels.render_frames`; an image
  whose pixel data is missing, absurd or undecodable is rejected.
* **Series** (stage ``series``). Instances are grouped by Study then Series Instance UID. Within a
  series every instance must share Modality, Rows, Columns and grayscale/color. The largest group of
  instances that agree is kept (on a tie, the group of the first instance in series order); every
  other instance is rejected naming what differs.
* **Order.** CT, MR, PT and NM series whose instances all have Image Position and Orientation
  (Patient) are ordered along the slice normal; otherwise by Instance Number, then file name.
  Every frame of every instance becomes one :class:`ImageFrame` (a multi-image CR/DX series gives one
  frame per image).

Each rejection or skip is also logged on this module's logger at WARNING, one line each. An
unexpected exception while reading one file rejects that file (never the run), and the warnings
pydicom raises while reading go to this module's logger instead of stderr.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from pydicom import config, dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, UID_dictionary

from medgemma_deploy.domain import ImageFrame, Rejection, Series, Study, StudyInput
from medgemma_deploy.errors import InputError, UsageError, describe_exception, warnings_logged
from medgemma_deploy.operators.dicom_input.pixels import MemoryBudget, check_pixel_module, render_frames

__all__ = ["TOMOGRAPHIC_MODALITIES", "is_image_sop_class", "load_study_input"]

logger = logging.getLogger(__name__)

#: Modalities whose slices are ordered by their position along the slice normal.
TOMOGRAPHIC_MODALITIES = frozenset({"CT", "MR", "PT", "NM"})

_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
#: Image storage classes whose names do not say "Image Storage".
_OTHER_IMAGE_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.6.2"})  # Enhanced US Volume Storage
_NOT_DICOM = "not a DICOM file (no DICM preamble/prefix and not parseable as implicit VR)"
_UNDEFINED_LENGTH = 0xFFFFFFFF
_DICOMDIR = "DICOMDIR (media directory index, not an instance); skipped"


@dataclass
class _Instance:
    path: Path
    dataset: Dataset
    study_uid: str
    series_uid: str
    frames: list[ImageFrame]

    @property
    def geometry(self) -> tuple[str, int, int, str]:
        display = self.frames[0].display
        return (
            str(self.dataset.get("Modality", "")),
            int(display.shape[0]),
            int(display.shape[1]),
            "color" if display.ndim == 3 else "grayscale",
        )


def is_image_sop_class(sop_class_uid: str) -> bool:
    """Whether ``sop_class_uid`` is a known image storage SOP class (PS3.4 Annex B)."""
    uid = str(sop_class_uid)
    if uid in _OTHER_IMAGE_SOP_CLASSES:
        return True
    return uid in UID_dictionary and "Image Storage" in UID(uid).name


def load_study_input(
    path: str | Path,
    *,
    progress: Callable[[int, int], None] | None = None,
    budget: MemoryBudget | None = None,
) -> StudyInput:
    """Read every DICOM file under ``path`` into studies and series of display-ready frames.

    Parameters
    ----------
    path:
        A DICOM file, or a folder searched recursively (see the module docstring for the rules).
    progress:
        Called as ``progress(done, total)`` after each file is read and rendered.
    budget:
        Memory limits, checked from the headers before anything is decoded (default:
        :class:`~medgemma_deploy.operators.dicom_input.pixels.MemoryBudget`()).

    Returns
    -------
    StudyInput
        The usable studies (only series with at least one frame), the rejected image files and the
        skipped objects, each with a one-line reason and the stage that stopped it.

    Raises
    ------
    UsageError
        ``path`` does not exist.
    """
    root = Path(path)
    if not root.exists():
        raise UsageError(f"input path {root} does not exist")
    budget = budget or MemoryBudget()
    result = StudyInput(studies=[])
    files = _discover(root, result) if root.is_dir() else [root]
    first_copy: dict[str, Path] = {}
    # Pass 1: headers only, so that a series beyond the memory budget is refused before any decode.
    headers = [_read_header(file, result, first_copy, budget) for file in files]
    _check_series_budget([h for h in headers if h is not None], budget, result)
    instances: list[_Instance] = []
    for done, header in enumerate(headers, start=1):
        if header is not None and not header.refused:
            instance = _render_instance(header, result, budget)
            if instance is not None:
                instances.append(instance)
        if progress is not None:
            progress(done, len(files))
    result.studies = _group(instances, result)
    return result


@dataclass
class _Header:
    """A file whose header passed every check; its pixels are not decoded yet."""

    path: Path
    dataset: Dataset
    n_frames: int
    decoded_bytes: int
    refused: bool = False


def _read_header(
    path: Path, result: StudyInput, first_copy: dict[str, Path], budget: MemoryBudget
) -> _Header | None:
    """Read and check one file without decoding pixels; ``None`` when it is rejected or skipped."""
    dataset = None
    stage = "read"
    try:
        with warnings_logged(logger, path):
            dataset = _read_dataset(path)
            _check_usable(dataset, path, first_copy)
            stage = "header"
            _check_header(dataset, path)
            stage = "pixels"
            n_frames = check_pixel_module(dataset, path, budget)
    except InputError as exc:
        _record(result, "rejected", path, exc.reason, stage, dataset)
        return None
    except _NotUsedError as exc:
        _record(result, exc.kind, path, exc.reason, exc.stage, dataset)
        return None
    except Exception as exc:  # one damaged file must never stop the run: reject it, name the cause
        _record(result, "rejected", path, f"unexpected error: {describe_exception(exc)}", stage, dataset)
        return None
    rows, columns, samples = int(dataset.Rows), int(dataset.Columns), int(dataset.SamplesPerPixel)
    decoded = budget.decoded_bytes(rows, columns, samples, n_frames)
    return _Header(path=path, dataset=dataset, n_frames=n_frames, decoded_bytes=decoded)


def _check_series_budget(headers: list[_Header], budget: MemoryBudget, result: StudyInput) -> None:
    """Refuse every file of a series whose frames together exceed the budget, naming the limit."""
    by_series: dict[tuple[str, str], list[_Header]] = {}
    for header in headers:
        key = (_text(header.dataset, "StudyInstanceUID"), _text(header.dataset, "SeriesInstanceUID"))
        by_series.setdefault(key, []).append(header)
    for (_, series_uid), members in by_series.items():
        frames = sum(h.n_frames for h in members)
        decoded = sum(h.decoded_bytes for h in members)
        reason = None
        if frames > budget.max_series_frames:
            reason = (
                f"series {series_uid} has {frames} frames in {len(members)} file(s), beyond the memory "
                f"budget of {budget.max_series_frames} frames per series "
                "(setting max_series_frames, MEDGEMMA_DEPLOY_MAX_SERIES_FRAMES)"
            )
        elif decoded > budget.max_series_decoded_bytes:
            reason = (
                f"series {series_uid} takes {decoded / 2**20:.0f} MiB decoded in {len(members)} file(s), "
                f"beyond the memory budget of {budget.max_series_decoded_bytes / 2**20:.0f} MiB per series "
                "(setting max_series_decoded_mib, MEDGEMMA_DEPLOY_MAX_SERIES_DECODED_MIB)"
            )
        if reason is None:
            continue
        for header in members:
            header.refused = True
            _record(result, "rejected", header.path, reason, "pixels", header.dataset)


def _render_instance(header: _Header, result: StudyInput, budget: MemoryBudget) -> _Instance | None:
    path, dataset = header.path, header.dataset
    try:
        with warnings_logged(logger, path):
            frames = render_frames(dataset, path, budget)
    except InputError as exc:
        _record(result, "rejected", path, exc.reason, "pixels", dataset)
        return None
    except Exception as exc:  # a decoder or LUT failure of one file rejects that file only
        _record(result, "rejected", path, f"unexpected error: {describe_exception(exc)}", "pixels", dataset)
        return None
    return _Instance(
        path=path,
        dataset=dataset,
        study_uid=_text(dataset, "StudyInstanceUID"),
        series_uid=_text(dataset, "SeriesInstanceUID"),
        frames=frames,
    )


def _text(dataset: Dataset, keyword: str) -> str:
    return str(dataset.get(keyword, "") or "").strip()


def _record(
    result: StudyInput, kind: str, source: Path, reason: str, stage: str, dataset: Dataset | None = None
) -> None:
    uids = {}
    if dataset is not None:
        for field, keyword in (
            ("study_instance_uid", "StudyInstanceUID"),
            ("series_instance_uid", "SeriesInstanceUID"),
            ("sop_instance_uid", "SOPInstanceUID"),
        ):
            try:
                value = str(dataset.get(keyword, "") or "").strip()
            except Exception:  # a damaged element: the rejection names the file instead
                value = ""
            # Only a valid UID is worth repeating: an invalid one may be why the file was rejected.
            if value and UID(value, validation_mode=config.IGNORE).is_valid:
                uids[field] = value
    entry = Rejection(source=str(source), reason=" ".join(reason.split()), stage=stage, **uids)
    (result.rejected if kind == "rejected" else result.skipped).append(entry)
    logger.warning("%s %s: %s [%s]", kind, entry.source, entry.reason, stage)


class _NotUsedError(Exception):
    """Raised inside this module for an input that is rejected or skipped; always caught here."""

    def __init__(self, kind: str, reason: str, stage: str) -> None:
        super().__init__(reason)
        self.kind, self.reason, self.stage = kind, reason, stage


def _discover(root: Path, result: StudyInput) -> list[Path]:
    files: list[Path] = []
    pending = [root]
    while pending:
        folder = pending.pop()
        subfolders: list[Path] = []
        for entry in sorted(folder.iterdir(), key=lambda p: p.name):
            reason = None
            if entry.name.startswith("."):
                reason = f"hidden {'folder' if entry.is_dir() else 'file'}; skipped"
            elif entry.is_dir():
                if entry.is_symlink():
                    reason = "symbolic link to a folder is not followed; skipped"
                else:
                    subfolders.append(entry)
            elif entry.name.upper() == "DICOMDIR":
                reason = _DICOMDIR
            elif entry.is_file():
                files.append(entry)
            else:
                reason = "not a regular file; skipped"
            if reason is not None:
                _record(result, "skipped", entry, reason, "read")
        pending.extend(reversed(subfolders))
    return sorted(files, key=lambda p: p.parts)


def _check_usable(dataset: Dataset, path: Path, first_copy: dict[str, Path]) -> None:
    """SOP class, Type 1 UIDs and duplicates; records the first copy of each SOP Instance UID."""
    sop_class = str(dataset.get("SOPClassUID", "") or "").strip()
    if sop_class == _MEDIA_STORAGE_DIRECTORY:
        raise _NotUsedError("skipped", _DICOMDIR, "read")
    if not sop_class:
        raise _NotUsedError("rejected", "missing (0008,0016) 'SOP Class UID' (Type 1)", "read")
    if sop_class in UID_dictionary and not is_image_sop_class(sop_class):
        raise _NotUsedError(
            "skipped", f"{UID(sop_class).name} ({sop_class}) is not an image; skipped", "sop-class"
        )
    if sop_class not in _derivable_sop_classes():
        # highdicom needs the source's IOD to build a SEG or SR that references it.
        kind = "a retired image class" if sop_class in UID_dictionary else "an unknown or private SOP class"
        raise _NotUsedError(
            "skipped",
            f"(0008,0016) 'SOP Class UID' {sop_class[:64]!r} is {kind}: unsupported, since every output "
            "must reference a standard image SOP class; skipped",
            "sop-class",
        )
    for keyword, tag in (
        ("StudyInstanceUID", "(0020,000D) 'Study Instance UID'"),
        ("SeriesInstanceUID", "(0020,000E) 'Series Instance UID'"),
        ("SOPInstanceUID", "(0008,0018) 'SOP Instance UID'"),
    ):
        if not str(dataset.get(keyword, "") or "").strip():
            raise _NotUsedError("rejected", f"missing {tag} (Type 1): the instance cannot be grouped", "read")
    sop_uid = str(dataset.SOPInstanceUID).strip()
    if sop_uid in first_copy:
        reason = f"duplicate SOP Instance UID, the same instance was already read from {first_copy[sop_uid]}"
        raise _NotUsedError("skipped", f"{reason}; skipped", "read")
    first_copy[sop_uid] = path


_VALIDATED_UIDS = (
    ("StudyInstanceUID", "(0020,000D) 'Study Instance UID'"),
    ("SeriesInstanceUID", "(0020,000E) 'Series Instance UID'"),
    ("SOPInstanceUID", "(0008,0018) 'SOP Instance UID'"),
    ("FrameOfReferenceUID", "(0020,0052) 'Frame of Reference UID'"),
)
#: A direction cosine vector shorter than this, or two whose cross product is, is no direction.
_MIN_DIRECTION_NORM = 1e-3


@lru_cache(maxsize=1)
def _derivable_sop_classes() -> frozenset[str]:
    """Image SOP classes whose IOD highdicom knows, i.e. that a derived SEG or SR can reference."""
    # highdicom keeps the map private; it is the exact table its SEG/SR constructors look sources up in.
    from highdicom._standard_utils import get_sop_class_iod_map

    return frozenset(uid for uid in get_sop_class_iod_map() if is_image_sop_class(uid))


def _check_header(dataset: Dataset, path: Path) -> None:
    """UIDs every output references, and patient geometry; raises :class:`InputError` naming the tag."""
    for keyword, tag in _VALIDATED_UIDS:
        value = dataset.get(keyword)
        if value is None or (keyword == "FrameOfReferenceUID" and value == ""):
            continue
        uid = UID(str(value).strip(), validation_mode=config.IGNORE)
        if not uid.is_valid:
            raise InputError(
                path,
                f"a {tag} of {str(value)[:80]!r} is not a valid UID (PS3.5 9.1: digits and dots, no leading "
                "zeros, at most 64 characters); every output must reference it, so the instance is rejected",
            )
    orientations = [dataset]
    positions = [dataset]
    for group_keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for group in dataset.get(group_keyword) or ():
            orientations.extend(group.get("PlaneOrientationSequence") or ())
            positions.extend(group.get("PlanePositionSequence") or ())
    for holder in orientations:
        if holder.get("ImageOrientationPatient") not in (None, ""):
            _check_orientation(holder.ImageOrientationPatient, path)
    for holder in positions:
        if holder.get("ImagePositionPatient") not in (None, ""):
            _check_numbers(holder.ImagePositionPatient, 3, "(0020,0032) 'Image Position (Patient)'", path)


def _check_numbers(value: object, count: int, tag: str, path: Path) -> np.ndarray:
    try:
        numbers = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError) as exc:
        raise InputError(path, f"a {tag} value is not {count} numbers") from exc
    if numbers.shape != (count,) or not np.isfinite(numbers).all():
        raise InputError(path, f"a {tag} value must be {count} finite numbers, got {numbers.size} value(s)")
    return numbers


def _check_orientation(value: object, path: Path) -> None:
    tag = "(0020,0037) 'Image Orientation (Patient)'"
    cosines = _check_numbers(value, 6, tag, path)
    row, column = cosines[:3], cosines[3:]
    if min(np.linalg.norm(row), np.linalg.norm(column)) < _MIN_DIRECTION_NORM:
        raise InputError(path, f"a {tag} has a zero row or column direction: the geometry is damaged")
    scale = np.linalg.norm(row) * np.linalg.norm(column)
    if np.linalg.norm(np.cross(row, column)) < _MIN_DIRECTION_NORM * scale:
        raise InputError(path, f"a {tag} has parallel row and column directions: the geometry is damaged")


def _parse_all(dataset: Dataset) -> None:
    """Convert every element, nested ones too, so that a damaged one fails here and not in a writer.

    pydicom converts elements lazily; a byte flip that gives an unknown VR would otherwise raise
    ``NotImplementedError`` only when some later step touches that element.
    """
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value:
                _parse_all(item)


def _read_dataset(path: Path) -> Dataset:
    """``dcmread`` with truncation detection and a careful fallback for files without a preamble."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            dataset = dcmread(path)
        except InvalidDicomError:
            dataset = _read_without_preamble(path)
        except Exception as exc:  # a corrupt file can make the parser raise any type; all mean "unreadable"
            raise InputError(path, f"cannot be read as DICOM ({type(exc).__name__}: {exc})") from exc
    for warning in caught:
        message = " ".join(str(warning.message).split())
        if "End of file" in message:
            raise InputError(path, f"the file is truncated: {message.split(' in file ')[0]}")
        logger.debug("%s: pydicom: %s", path, message)
    _check_complete(dataset, path)
    try:
        _parse_all(dataset)
    except Exception as exc:  # the parser raises several types for damaged values; all mean "unreadable"
        raise InputError(path, f"an element cannot be parsed: {describe_exception(exc)}") from exc
    file_meta = getattr(dataset, "file_meta", None)
    if file_meta is None or not file_meta.get("TransferSyntaxUID"):
        _set_transfer_syntax_from_encoding(dataset, path)
    return dataset


def _read_without_preamble(path: Path) -> Dataset:
    with path.open("rb") as handle:
        head = handle.read(8)
    groups = (
        {int.from_bytes(head[:2], "little"), int.from_bytes(head[:2], "big")} if len(head) == 8 else set()
    )
    if not groups & {0x0002, 0x0008}:
        raise InputError(path, _NOT_DICOM)
    try:
        dataset = dcmread(path, force=True)
        sop_class = str(dataset.get("SOPClassUID", "") or "")
        sop_instance = str(dataset.get("SOPInstanceUID", "") or "")
    except Exception as exc:  # force=True on a non-DICOM file can raise any type
        raise InputError(path, f"{_NOT_DICOM}: {type(exc).__name__}: {exc}") from exc
    if not (sop_class and sop_instance):
        raise InputError(path, _NOT_DICOM)
    return dataset


def _check_complete(dataset: Dataset, path: Path) -> None:
    """Reject files that stop part-way, which ``dcmread`` reads without complaint."""
    tags = list(dataset.keys())
    if not tags:
        raise InputError(
            path, "no data elements after the file meta information: the file is truncated or empty"
        )
    last = dataset.get_item(tags[-1])
    if not isinstance(last, RawDataElement) or last.length == _UNDEFINED_LENGTH or last.value is None:
        return
    if len(last.value) < last.length:
        raise InputError(
            path,
            f"the file is truncated: element ({last.tag.group:04X},{last.tag.element:04X}) declares "
            f"{last.length} bytes but only {len(last.value)} remain",
        )
    meta = getattr(dataset, "file_meta", None)
    deflated = meta is not None and meta.get("TransferSyntaxUID") == "1.2.840.10008.1.2.1.99"
    leftover = path.stat().st_size - (last.value_tell + last.length)
    if not deflated and 0 < leftover < 8:
        raise InputError(
            path, f"the file is truncated: it ends with {leftover} bytes of an incomplete element"
        )


def _set_transfer_syntax_from_encoding(dataset: Dataset, path: Path) -> None:
    implicit, little = getattr(dataset, "original_encoding", (None, None))
    if implicit is None or little is None:
        return
    explicit = "1.2.840.10008.1.2.1" if little else "1.2.840.10008.1.2.2"
    uid = "1.2.840.10008.1.2" if implicit else explicit
    dataset.ensure_file_meta()
    dataset.file_meta.TransferSyntaxUID = uid
    logger.info("%s: no (0002,0010) Transfer Syntax UID; read as %s", path, UID(uid).name)


def _group(instances: list[_Instance], result: StudyInput) -> list[Study]:
    by_study: dict[str, dict[str, list[_Instance]]] = {}
    for instance in instances:
        by_study.setdefault(instance.study_uid, {}).setdefault(instance.series_uid, []).append(instance)
    studies: list[Study] = []
    for study_uid, by_series in by_study.items():
        series_list: list[Series] = []
        for series_uid, members in by_series.items():
            kept = _consistent(_ordered(members), series_uid, result)
            first = kept[0].dataset
            body_part = str(first.get("BodyPartExamined", "") or "").strip() or None
            series_list.append(
                Series(
                    study_instance_uid=study_uid,
                    series_instance_uid=series_uid,
                    modality=str(first.get("Modality", "") or ""),
                    body_part_examined=body_part,
                    frames=[frame for instance in kept for frame in instance.frames],
                )
            )
        series_list.sort(key=lambda s: _series_number(s.frames[0].dataset))
        studies.append(Study(study_instance_uid=study_uid, series=series_list))
    return studies


def _series_number(dataset: Dataset) -> float:
    try:
        return float(dataset.get("SeriesNumber"))
    except (TypeError, ValueError):
        return float("inf")


def _instance_number(instance: _Instance) -> float:
    try:
        return float(instance.dataset.get("InstanceNumber"))
    except (TypeError, ValueError):
        return float("inf")


def _ordered(members: list[_Instance]) -> list[_Instance]:
    """Slice-normal order for tomographic series with full geometry, else Instance Number, then file name."""
    by_number = sorted(members, key=lambda m: (_instance_number(m), m.path.name, str(m.path)))
    modality = str(by_number[0].dataset.get("Modality", "")).upper()
    if modality not in TOMOGRAPHIC_MODALITIES:
        return by_number
    positions = [_position_along_normal(m.dataset, by_number[0].dataset) for m in by_number]
    if any(p is None for p in positions):
        return by_number
    order = sorted(range(len(by_number)), key=lambda i: positions[i])  # stable: ties keep number order
    return [by_number[i] for i in order]


def _position_along_normal(dataset: Dataset, reference: Dataset) -> float | None:
    try:
        orientation = np.asarray([float(v) for v in reference.ImageOrientationPatient], dtype=np.float64)
        position = np.asarray([float(v) for v in dataset.ImagePositionPatient], dtype=np.float64)
    except (AttributeError, TypeError, ValueError):
        return None
    if orientation.shape != (6,) or position.shape != (3,):
        return None
    normal = np.cross(orientation[:3], orientation[3:])
    return float(position @ normal)


def _consistent(ordered: list[_Instance], series_uid: str, result: StudyInput) -> list[_Instance]:
    """Keep the largest group of instances with one geometry; reject the rest naming what differs."""
    groups: dict[tuple[str, int, int, str], list[_Instance]] = {}
    for instance in ordered:
        groups.setdefault(instance.geometry, []).append(instance)
    if len(groups) == 1:
        return ordered
    # dicts keep insertion order, so on a tie max() picks the group of the earliest instance.
    majority = max(groups, key=lambda key: len(groups[key]))
    kept = groups[majority]
    for key, odd in groups.items():
        if key == majority:
            continue
        reason = (
            f"{_describe_difference(key, majority)} of the {len(kept)} other instance(s) of series "
            f"{series_uid}; one series must have one modality and image size, the majority is kept"
        )
        for instance in odd:
            _record(result, "rejected", instance.path, reason, "series", instance.dataset)
    return [instance for instance in ordered if instance.geometry == majority]


def _describe_difference(odd: tuple[str, int, int, str], majority: tuple[str, int, int, str]) -> str:
    parts = []
    if odd[0] != majority[0]:
        parts.append(f"(0008,0060) Modality '{odd[0]}' differs from '{majority[0]}'")
    if odd[1:3] != majority[1:3]:
        parts.append(f"Rows × Columns {odd[1]} × {odd[2]} differ from {majority[1]} × {majority[2]}")
    if odd[3] != majority[3]:
        parts.append(f"{odd[3]} pixels differ from the {majority[3]} pixels")
    return "; ".join(parts)
