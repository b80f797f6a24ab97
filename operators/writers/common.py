"""What every DICOM writer of medgemma-deploy shares: disclaimers, UIDs, sources, identification.

The SEG, findings-SR and report-SR writers all derive objects from the same source images and
identify the same software, so the rules live here once:

* every object says it is AI-generated and unverified (:data:`AI_DISCLAIMER`), and loudly when the
  model has random weights (:data:`RANDOM_WEIGHTS_WARNING`);
* UIDs are derived from the inputs, the model version and a result version (:func:`derived_uid`),
  so a retry overwrites its own earlier result in a PACS instead of adding a duplicate;
* source images are copied and fixed for derivation (:func:`prepare_sources`) following the
  validator fixes measured and tabulated in ``docs/dicom-conformance.md`` (section 12, "Source
  fixes before derivation"), never modified in place;
* the algorithm (TID 4019) and the device observer (TID 1002/1004) are described one way;
* every object states the same things about itself (research content, UTF-8, the model as
  Contributing Equipment, this software as manufacturer) through :class:`DerivedSeries`, and a
  source that highdicom refuses becomes that source's :class:`InputError`
  (:func:`refusal_is_input_error`).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import highdicom.sr
from highdicom import ContentQualificationValues
from highdicom.base_content import ContributingEquipment
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code as PydicomCode
from pydicom.tag import Tag
from pydicom.uid import generate_uid
from pydicom.valuerep import validate_value

from medgemma_deploy.domain import AlgorithmInfo, Code, ModelIdentity
from medgemma_deploy.errors import InputError

__all__ = [
    "AI_DISCLAIMER",
    "MANUFACTURER",
    "RANDOM_WEIGHTS_WARNING",
    "SPECIFIC_CHARACTER_SET",
    "DerivedSeries",
    "algorithm_identification",
    "check_numbering",
    "declare_private_schemes",
    "derived_series_uid",
    "derived_uid",
    "device_observer_context",
    "finding_tracking_uid",
    "manufacturer_attributes",
    "prepare_sources",
    "procedure_reported",
    "refusal_is_input_error",
    "to_coded_concept",
    "to_lo",
]

logger = logging.getLogger(__name__)

#: Written into every derived object (SR text items, results.json, SEG descriptions point to it).
AI_DISCLAIMER = (
    "AI-GENERATED RESULT: produced automatically by a research model, which is not a medical device. "
    "It has not been verified by a clinician and must not be used for diagnosis or treatment "
    "without review by a qualified clinician."
)

#: Added next to :data:`AI_DISCLAIMER` when ``ModelIdentity.random_weights`` is True.
RANDOM_WEIGHTS_WARNING = "THE MODEL HAS RANDOM WEIGHTS (test/demo model); these findings are meaningless."

#: Manufacturer of every derived object and of the device observer.
MANUFACTURER = "medgemma-deploy"

#: Character set of every derived object: UTF-8, so finding names and report text in any language
#: and patient names decoded from any source character set are written without loss.
SPECIFIC_CHARACTER_SET = "ISO_IR 192"

#: Namespace mixed into every derived UID, so our UIDs never collide with another tool's
#: that hashes the same parts.
_UID_NAMESPACE = "medgemma-deploy derived object"

#: Pixel data of any kind; derivation needs the metadata only, and copying pixels costs memory.
_PIXEL_DATA_TAGS = frozenset(
    Tag(keyword) for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
)

#: Spacing attributes that must be two positive numbers or absent (PS3.3 C.7.6.3, C.8.11.4).
_SPACING_KEYWORDS = ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing")

_LO_MAX = 64
_MAX_SERIES_NUMBER = 2**31 - 1

#: Type 2 Patient / General Study attributes (PS3.3 C.7.1.1, C.7.2.1) that derived objects copy
#: from the first source: added empty when the source lacks them (empty means unknown).
_TYPE2_INHERITED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)

#: Patient's Sex enumerated values (PS3.3 C.7.1.1).
_PATIENT_SEX_VALUES = frozenset({"M", "F", "O"})

#: LO (64 characters) value for sources that say they are de-identified but not how.
_UNKNOWN_DEIDENTIFICATION = "Unknown: not recorded in the source images"


#: CID 100 "Quantitative Diagnostic Imaging Procedures" by modality. CR/DX get the generic
#: "Imaging procedure": LOINC 43468-8 "XR unspecified body region" is newer than the CID 100 that
#: PixelMed (IHE's validator) checks against, and it reports that code as an error.
_PROCEDURES: dict[str, PydicomCode] = {
    "CT": codes.cid100.CTUnspecifiedBodyRegion,
    "MR": codes.cid100.MRIUnspecifiedBodyRegion,
    "PT": codes.cid100.PETUnspecifiedBodyRegion,
    "NM": codes.cid100.NMUnspecifiedBodyRegion,
}


def derived_uid(*parts: str) -> str:
    """A deterministic UID for a derived object, from the parts that identify it.

    The same parts always give the same UID, so re-running on the same inputs with the same
    model version writes the same SOP Instance UIDs (a retry replaces, never duplicates). Each
    part is length-prefixed before hashing, so ``("ab", "c")`` and ``("a", "bc")`` differ.

    Parameters
    ----------
    *parts:
        Strings identifying the object, e.g. source SOP Instance UIDs, model name and version,
        the kind of object (``"seg"``, ``"sr"``) and the result version.

    Returns
    -------
    str
        A UID under pydicom's root (``1.2.826.0.1.3680043.8.498.``), at most 64 characters.

    Raises
    ------
    ValueError
        No parts were given.
    TypeError
        A part is not a ``str`` (pass ``str(result_version)``, not the int, so that the
        spelling of the UID input is explicit).
    """
    if not parts:
        raise ValueError("derived_uid() needs at least one part; got none")
    for index, part in enumerate(parts):
        if not isinstance(part, str):
            raise TypeError(f"derived_uid() part {index} must be a str, got {type(part).__name__} {part!r}")
    entropy = [_UID_NAMESPACE, *(f"{len(part)}:{part}" for part in parts)]
    return str(generate_uid(entropy_srcs=entropy))


def derived_series_uid(kind: str, source_series_uid: str, model: ModelIdentity, result_version: int) -> str:
    """Series Instance UID of the ``kind`` objects (``"seg"``, ``"sr"``…) one model derives from one series.

    All objects of one kind that one model version derives from one source series for one
    ``result_version`` share this series, whatever their instances (see :func:`derived_uid`).
    """
    return derived_uid(f"{kind} series", source_series_uid, model.name, model.version, str(result_version))


def prepare_sources(datasets: Sequence[Dataset]) -> list[Dataset]:
    """In-memory copies of source images, fixed so that derived objects are validator-clean.

    The caller's datasets are never modified. Each copy:

    * has no pixel data (derivation needs only the metadata);
    * has no control characters in any string value (a NUL in Patient's Name, say), and an
      inherited Type 2 Patient/Study value that breaks its VR's rules is emptied (unknown);
    * drops ``PixelSpacing``/``ImagerPixelSpacing``/``NominalScannedPixelSpacing`` when the value
      is not two positive numbers (e.g. ``0\\0`` on a CR): highdicom would copy the zeros into
      the SEG's pixel measures, and a spacing is never invented;
    * has every Type 2 Patient/Study attribute that derived objects inherit (absent ones added
      empty, i.e. unknown), and a Patient's Sex outside M/F/O emptied (``m`` becomes ``M``);
    * gets ``DeidentificationMethod`` when ``PatientIdentityRemoved`` is ``YES`` but neither
      ``DeidentificationMethod`` nor its code sequence is present (PS3.3 C.7.1.1, Type 1C), so
      the defect is not passed on to every derived object.

    Parameters
    ----------
    datasets:
        Source image instances (pixel data may or may not be loaded).

    Returns
    -------
    list[pydicom.Dataset]
        One fixed copy per input, in the same order.

    Raises
    ------
    TypeError
        An item is not a ``pydicom.Dataset``.
    ValueError
        An item lacks a SOP Class/Instance UID or Study/Series Instance UID (not a DICOM image).
    """
    prepared: list[Dataset] = []
    for index, dataset in enumerate(datasets):
        if not isinstance(dataset, Dataset):
            raise TypeError(f"datasets[{index}] must be a pydicom Dataset, got {type(dataset).__name__}")
        for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if not dataset.get(keyword):
                raise ValueError(f"datasets[{index}] has no {keyword}; it is not a DICOM instance")
        prepared.append(_fixed_copy(dataset))
    return prepared


def algorithm_identification(info: AlgorithmInfo) -> highdicom.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification of ``info`` (PS3.16 TID 4019).

    Name and version are the model's; each parameter becomes one "Algorithm Parameters" item
    written ``key=value``, followed by ``software=<software> <version>`` (the program that ran it).

    Raises
    ------
    ValueError
        ``info.name`` or ``info.version`` is empty.
    """
    _check_algorithm_info(info)
    parameters = [f"{key}={value}" for key, value in info.parameters]
    parameters.append(f"software={info.software} {info.software_version}")
    return highdicom.sr.AlgorithmIdentification(name=info.name, version=info.version, parameters=parameters)


def device_observer_context(model: ModelIdentity, info: AlgorithmInfo) -> highdicom.sr.ObserverContext:
    """TID 1002 Observer Context whose observer is a device (TID 1004): the model run by this software.

    The Device Observer UID is derived from the model's name and version, so every result of one
    model version names the same device, and another version names another.

    Raises
    ------
    ValueError
        The model's name or version is empty.
    """
    if not model.name or not model.version:
        raise ValueError(
            f"model must have a name and a version, got name={model.name!r} version={model.version!r}"
        )
    attributes = highdicom.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid("device observer", model.name, model.version),
        name=f"{info.software} {info.software_version}",
        manufacturer_name=MANUFACTURER,
        model_name=model.name,
    )
    return highdicom.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=attributes,
    )


def to_coded_concept(code: Code) -> highdicom.sr.CodedConcept:
    """The highdicom ``CodedConcept`` of a domain ``Code``.

    Raises
    ------
    ValueError
        The value, scheme designator or meaning is empty.
    """
    if not code.value or not code.scheme_designator or not code.meaning:
        raise ValueError(f"code must have a value, scheme designator and meaning, got {code!r}")
    return highdicom.sr.CodedConcept(
        value=code.value,
        scheme_designator=code.scheme_designator,
        meaning=code.meaning,
        scheme_version=code.scheme_version,
    )


def manufacturer_attributes() -> dict[str, Any]:
    """General/Enhanced General Equipment attributes of every object this software writes.

    The keys are the highdicom constructor arguments for the DICOM attributes Manufacturer,
    ManufacturerModelName, SoftwareVersions and DeviceSerialNumber, so a writer passes them on
    with ``Segmentation(..., **manufacturer_attributes())`` or ``Comprehensive3DSR(..., **...)``.
    Software has no serial number; the Type 1 DeviceSerialNumber of a SEG says so.
    """
    from medgemma_deploy import __version__

    return {
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": MANUFACTURER,
        "software_versions": __version__,
        "device_serial_number": "none (software)",
    }


@dataclass(frozen=True)
class DerivedSeries:
    """The series a writer puts its derived objects in, and what each of its instances says about itself.

    Every instance is research content (Content Qualification RESEARCH), in UTF-8
    (:data:`SPECIFIC_CHARACTER_SET`), names the model as Contributing Equipment (IHE AIR) and this
    software as its manufacturer (:func:`manufacturer_attributes`).
    """

    series_instance_uid: str
    series_number: int
    #: Says what the objects are and that they are unverified (and, loudly, from random weights).
    series_description: str
    #: The model as Processing Equipment (``equipment.contributing_equipment``).
    equipment: ContributingEquipment

    def instance_attributes(self, sop_instance_uid: str, instance_number: int) -> dict[str, Any]:
        """highdicom constructor arguments of one instance of the series (SEG, Parametric Map, SR)."""
        return {
            "series_instance_uid": self.series_instance_uid,
            "series_number": self.series_number,
            "sop_instance_uid": sop_instance_uid,
            "instance_number": instance_number,
            "series_description": self.series_description,
            "content_qualification": ContentQualificationValues.RESEARCH,
            "specific_character_set": SPECIFIC_CHARACTER_SET,
            "contributing_equipment": [self.equipment],
            **manufacturer_attributes(),
        }

    def unverified_sr_attributes(self, sop_instance_uid: str) -> dict[str, Any]:
        """highdicom SR constructor arguments of the series' one document: UNVERIFIED, PARTIAL, PRELIMINARY.

        No clinician has verified an AI result, and nothing says the model's output is complete or
        final (PS3.3 C.17.2: Verification Flag, Completion Flag, Preliminary Flag).
        """
        return {
            **self.instance_attributes(sop_instance_uid, 1),
            "is_complete": False,
            "is_final": False,
            "is_verified": False,
        }


@contextmanager
def refusal_is_input_error(
    source_uid: str,
    derived: str,
    refusals: tuple[type[Exception], ...] = (ValueError, TypeError, AttributeError),
) -> Iterator[None]:
    """Raise what highdicom refuses while deriving an object as the :class:`InputError` of its sources.

    Writers check their own arguments before building, so what highdicom still refuses is in the
    sources (the patient and study attributes it copies, their geometry); an ``InputError`` names
    the source, so that the series is rejected with the reason and the rest of the study goes on.

    Parameters
    ----------
    source_uid:
        SOP Instance UID of the (first) source image.
    derived:
        What was being derived, from what: completes "highdicom cannot derive …".
    refusals:
        The exception types that mean a refusal.
    """
    try:
        yield
    except refusals as exc:
        raise InputError(
            source_uid, f"highdicom cannot derive {derived}: {type(exc).__name__}: {exc}"
        ) from exc


def check_numbering(series_number: int, result_version: int) -> None:
    """Check a writer's ``series_number`` (IS, 1…2³¹−1) and ``result_version`` (int ≥ 1).

    Raises
    ------
    ValueError
        Either is not an int (``bool`` included) or is out of range; the message names it.
    """
    if isinstance(series_number, bool) or not isinstance(series_number, int):
        raise ValueError(f"series_number must be an int, got {series_number!r}")
    if not 1 <= series_number <= _MAX_SERIES_NUMBER:
        raise ValueError(f"series_number must be in 1..{_MAX_SERIES_NUMBER}, got {series_number}")
    if isinstance(result_version, bool) or not isinstance(result_version, int) or result_version < 1:
        raise ValueError(f"result_version must be an int >= 1, got {result_version!r}")


def to_lo(text: str) -> str:
    """A valid LO (Long String) value: no backslash or control characters, at most 64 characters."""
    cleaned = " ".join(text.replace("\\", "/").split())
    return cleaned if len(cleaned) <= _LO_MAX else cleaned[: _LO_MAX - 3] + "..."


def _fixed_copy(dataset: Dataset) -> Dataset:
    fixed = Dataset()
    for element in dataset:
        if element.tag in _PIXEL_DATA_TAGS:
            continue
        fixed.add(copy.deepcopy(element))
    file_meta = getattr(dataset, "file_meta", None)
    if file_meta is not None:
        fixed.file_meta = copy.deepcopy(file_meta)
    sop_instance_uid = str(dataset.SOPInstanceUID)
    for keyword in _SPACING_KEYWORDS:
        if keyword in fixed and not _is_positive_pair(fixed[keyword].value):
            logger.debug(
                "%s: dropping %s %r from the derivation copy", sop_instance_uid, keyword, fixed[keyword].value
            )
            del fixed[keyword]
    _strip_control_characters(fixed, sop_instance_uid)
    for keyword in _TYPE2_INHERITED:
        if keyword not in fixed:
            setattr(fixed, keyword, None)
        elif not _is_valid_value(fixed[keyword]):
            # A value the source got wrong (a date "20241301", a 70-character Accession Number) would
            # make every derived object fail validation; Type 2 allows empty, which means unknown.
            logger.debug("%s: invalid %s emptied for derivation", sop_instance_uid, keyword)
            setattr(fixed, keyword, None)
    raw_sex = str(fixed.PatientSex or "")
    sex = raw_sex.strip().upper()
    sex = sex if sex in _PATIENT_SEX_VALUES else ""
    if sex != raw_sex:
        # No patient values in logs: say only what was done.
        logger.debug(
            "%s: Patient's Sex normalized for derivation (%s)",
            sop_instance_uid,
            "upper-cased" if sex else "not M/F/O, left empty",
        )
        fixed.PatientSex = sex or None
    if (
        str(fixed.get("PatientIdentityRemoved", "")).upper() == "YES"
        and not fixed.get("DeidentificationMethod")
        and not fixed.get("DeidentificationMethodCodeSequence")
    ):
        fixed.DeidentificationMethod = _UNKNOWN_DEIDENTIFICATION
    return fixed


def _strip_control_characters(dataset: Dataset, sop_instance_uid: str) -> None:
    """Remove control characters (NUL, BEL…) from every string value, nested ones included.

    PS3.5 6.1.3 allows only ESC (character set switching) in short strings, plus CR, LF, FF and TAB
    in texts (LT, ST, UT); a NUL in Patient's Name would be copied into every derived object and
    fail validation. Only the derivation copy is changed; patient values are never logged.
    """
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value:
                _strip_control_characters(item, sop_instance_uid)
            continue
        allowed = _TEXT_CONTROL_CHARACTERS if element.VR in ("LT", "ST", "UT") else _ESCAPE
        if element.VR not in _STRING_VRS or element.value is None:
            continue
        values = element.value if element.VM > 1 else [element.value]
        cleaned = [_without_controls(str(value), allowed) for value in values]
        if cleaned != [str(value) for value in values]:
            logger.debug("%s: control characters removed from %s", sop_instance_uid, element.tag)
            element.value = cleaned if element.VM > 1 else cleaned[0]


_STRING_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UT"}
)
_ESCAPE = frozenset("\x1b")
_TEXT_CONTROL_CHARACTERS = frozenset("\x1b\r\n\f\t")


def _without_controls(text: str, allowed: frozenset[str]) -> str:
    return "".join(ch for ch in text if ch in allowed or not (ord(ch) < 0x20 or ord(ch) == 0x7F))


def _is_valid_value(element: DataElement) -> bool:
    """Whether pydicom's value rules for the element's VR (length, characters, format) accept it."""
    if element.value in (None, ""):
        return True
    values = element.value if element.VM > 1 else [element.value]
    try:
        for value in values:
            validate_value(element.VR, value, config.RAISE)
    except (ValueError, TypeError):
        return False
    return True


def _is_positive_pair(value: object) -> bool:
    if value is None or isinstance(value, (str, bytes)):
        return False
    try:
        numbers = [float(item) for item in value]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return False
    return len(numbers) == 2 and all(0 < number < math.inf for number in numbers)


def _check_algorithm_info(info: AlgorithmInfo) -> None:
    if not isinstance(info, AlgorithmInfo):
        raise TypeError(f"info must be an AlgorithmInfo, got {type(info).__name__}")
    if not info.name or not info.version:
        raise ValueError(
            f"algorithm must have a name and a version, got name={info.name!r} version={info.version!r}"
        )


#: Private coding schemes our label sets may use (PS3.16 8.2: designators starting with "99").
PRIVATE_CODING_SCHEMES: dict[str, tuple[str, str]] = {
    "99MEDGEMMA": ("medgemma-deploy findings", "medgemma-deploy project"),
}


def declare_private_schemes(dataset: Dataset, codes: Sequence[Code]) -> None:
    """Add a Coding Scheme Identification item (PS3.3 C.12.1) for each private scheme in ``codes``.

    Receivers can only interpret a private code when the object names its scheme; standard schemes
    (SCT, DCM, LN, RADLEX…) are known from PS3.16 and need no entry.
    """
    designators = sorted({c.scheme_designator for c in codes if c.scheme_designator.startswith("99")})
    if not designators:
        return
    sequence = list(dataset.get("CodingSchemeIdentificationSequence", []))
    present = {str(item.CodingSchemeDesignator) for item in sequence}
    for designator in designators:
        if designator in present:
            continue
        name, organization = PRIVATE_CODING_SCHEMES.get(designator, (designator, "unknown (site-defined)"))
        item = Dataset()
        item.CodingSchemeDesignator = designator
        item.CodingSchemeName = name
        item.CodingSchemeResponsibleOrganization = organization
        sequence.append(item)
    dataset.CodingSchemeIdentificationSequence = sequence


def finding_tracking_uid(series_instance_uid: str, label_set_name: str, finding_key: str) -> str:
    """Tracking UID of one finding in one series (SEG Tracking UID = SR TID 4108 Tracking UID).

    The same finding of the same series always gets the same UID, whatever model version scored
    it, so viewers can follow it across results and link a SEG segment to its SR measurement group.
    """
    return derived_uid("tracking", series_instance_uid, label_set_name, finding_key)


def procedure_reported(modality: str) -> PydicomCode:
    """The CID 100 procedure code for a ``modality`` series (SNOMED CT "Imaging procedure" if none fits)."""
    return _PROCEDURES.get(modality.upper(), codes.cid100.ImagingProcedure)
