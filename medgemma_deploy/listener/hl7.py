"""HL7 v2.5.1 ORU^R01: a study's AI findings and triage priority for the site's interface engine.

Reading worklists live in the RIS/EHR and are driven by HL7 v2 results messages; this message is
how a suspected critical finding raises a study's priority there. It is built with ``hl7apy`` (no
hand-built segment strings: every value is assigned to its typed leaf, so the library escapes
``| ^ & ~ \\``) and validated strictly against v2.5.1 before it leaves.

The message profile (segment and field table) is ``docs/hl7-oru.md``. In short:

* MSH: sending/receiving application and facility from the settings, a control id derived from the
  study version (the same study version always gets the same control id, so a receiver can drop a
  duplicate after a crash between sending and recording the ACK), ``UNICODE UTF-8``.
* PID: patient id (with its issuer), name, birth date and sex from the DICOM header. This message
  is the one place patient identifiers leave, by design: the receiver files it to the patient.
* ORC/OBR: placer and filler order numbers when the study has them, else the Study Instance UID as
  the filler order number; Accession Number in OBR-18 (IHE Radiology convention); the priority in
  OBR-5 and TQ1-9 (HL7 Table 0485: S, A, R); result status P (preliminary).
* OBX: one per finding and series (NM probability, unit "1" UCUM, abnormal flag A when the finding
  is reported present), the Study Instance UID (DCM 110180) for a WADO link, and a TX statement
  that the results are AI-generated, unverified, for research use, with the model and its version.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.v2_5_1 import ST
from pydicom.dataset import Dataset

from medgemma_deploy.domain import SeriesClassification, TriagePriority
from medgemma_deploy.triage import StudyTriage

__all__ = ["HL7_VERSION", "Hl7Identity", "Hl7Message", "build_oru", "message_control_id"]

HL7_VERSION = "2.5.1"

#: What every message says of its results (OBX TX), whatever the site's settings.
DISCLAIMER = (
    "AI-generated findings, not verified by a clinician; research use only, not a diagnosis. "
    "Probabilities are uncalibrated zero-shot scores."
)

# Names of applications and facilities travel as HL7 IS/HD values: no delimiters, short.
_NAME = re.compile(r"^[A-Za-z0-9_.\- ]{1,20}$")
# Values we compose ourselves go into fields typed "varies" (OBX-5), which hl7apy cannot escape.
_DELIMITERS = re.compile(r"[|^&~\\\r\n]")
_MAX_OBX_TEXT = 199


@dataclass(frozen=True)
class Hl7Identity:
    """MSH-3..6: who sends (us) and who receives (the interface engine), and MSH-11."""

    sending_application: str = "MEDGEMMA_DEPLOY"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    processing_id: str = "P"

    def __post_init__(self) -> None:
        for name in (
            "sending_application",
            "sending_facility",
            "receiving_application",
            "receiving_facility",
        ):
            value = getattr(self, name)
            if value and not _NAME.match(value):
                raise ValueError(
                    f"HL7 {name.replace('_', ' ')} {value!r} must be 1-20 letters, digits, "
                    "space, '_', '.' or '-'"
                )
        if self.processing_id not in ("P", "T", "D"):
            raise ValueError(f"HL7 processing id {self.processing_id!r} must be P, T or D (HL7 Table 0103)")


@dataclass(frozen=True)
class Hl7Message:
    """An encoded message: its control id (MSH-10) and its ER7 text (segments end with CR)."""

    control_id: str
    er7: str


def message_control_id(study_instance_uid: str, study_version: int) -> str:
    """MSH-10 for a study version: stable across retries and restarts, 20 characters (ST max)."""
    digest = hashlib.sha256(f"{study_instance_uid}/{study_version}".encode()).hexdigest()
    return "MGD" + digest[:17].upper()


def build_oru(
    header: Dataset,
    triage: StudyTriage,
    classifications: Sequence[SeriesClassification],
    *,
    study_version: int,
    identity: Hl7Identity,
    created: datetime,
) -> Hl7Message:
    """Build and strictly validate one ORU^R01 for a study version.

    Parameters
    ----------
    header:
        Any source instance of the study: patient, order and study attributes are read from it.
    triage:
        The study's priority and reasons (:func:`medgemma_deploy.triage.triage_study`).
    classifications:
        The study's classified series: one OBX per finding and series.
    study_version:
        The listener's version of the study (a late instance makes version 2 with a new message).
    identity:
        MSH sending/receiving application and facility.
    created:
        MSH-7, the time the message was made.
    """
    study_uid = str(header.get("StudyInstanceUID", "") or "")
    if not study_uid:
        raise ValueError("the study header has no Study Instance UID")
    control_id = message_control_id(study_uid, study_version)
    message = Message("ORU_R01", version=HL7_VERSION, validation_level=VALIDATION_LEVEL.STRICT)
    _msh(message, identity, control_id, created)
    result = message.add_group("ORU_R01_PATIENT_RESULT")
    _pid(result.add_group("ORU_R01_PATIENT").pid, header)
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    placer, filler = _order_numbers(header)
    order.orc.orc_1 = "RE"
    if placer:
        _set(order.orc.orc_2.ei_1, placer)
        _set(order.obr.obr_2.ei_1, placer)
    _set(order.orc.orc_3.ei_1, filler or study_uid)
    order.obr.obr_1 = "1"
    _set(order.obr.obr_3.ei_1, filler or study_uid)
    _universal_service(order.obr, header)
    order.obr.obr_5 = triage.priority.hl7_code
    observed = _dicom_timestamp(header)
    if observed:
        order.obr.obr_7.ts_1 = observed
    accession = str(header.get("AccessionNumber", "") or "").strip()
    if accession:
        _set(order.obr.obr_18, accession)
    order.obr.obr_25 = "P"
    timing = order.add_group("ORU_R01_TIMING_QTY")
    timing.tq1.tq1_1 = "1"
    timing.tq1.tq1_9.cwe_1 = triage.priority.hl7_code
    timing.tq1.tq1_9.cwe_2 = triage.priority.hl7_text
    timing.tq1.tq1_9.cwe_3 = "HL70485"
    _observations(order, header, triage, classifications, study_uid)
    message.validate()
    return Hl7Message(control_id=control_id, er7=message.to_er7())


def _msh(message: Message, identity: Hl7Identity, control_id: str, created: datetime) -> None:
    msh = message.msh
    msh.msh_3.hd_1 = identity.sending_application
    if identity.sending_facility:
        msh.msh_4.hd_1 = identity.sending_facility
    if identity.receiving_application:
        msh.msh_5.hd_1 = identity.receiving_application
    if identity.receiving_facility:
        msh.msh_6.hd_1 = identity.receiving_facility
    msh.msh_7.ts_1 = created.strftime("%Y%m%d%H%M%S")
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = control_id
    msh.msh_11 = identity.processing_id
    msh.msh_12 = HL7_VERSION
    msh.msh_18 = "UNICODE UTF-8"


def _pid(pid: object, header: Dataset) -> None:
    patient_id = str(header.get("PatientID", "") or "").strip()
    # PID-3 is required: an anonymous study still gets a (stated) placeholder, never a made-up id.
    _set(pid.pid_3.cx_1, patient_id or "UNKNOWN")  # type: ignore[attr-defined]
    issuer = str(header.get("IssuerOfPatientID", "") or "").strip()
    if issuer:
        _set(pid.pid_3.cx_4.hd_1, issuer)  # type: ignore[attr-defined]
    pid.pid_3.cx_5 = "MR"  # type: ignore[attr-defined]
    # DICOM PN is family^given^middle^prefix^suffix; HL7 XPN is family^given^middle^suffix^prefix.
    name = str(header.get("PatientName", "") or "").split("=")[0]
    family, given, middle, prefix, suffix = ([*name.split("^"), "", "", "", "", ""])[:5]
    if family.strip():
        _set(pid.pid_5.xpn_1.fn_1, family.strip())  # type: ignore[attr-defined]
    else:
        pid.pid_5.xpn_7 = "U"  # type: ignore[attr-defined]  # HL7 Table 0200: unspecified
    for component, value in (("xpn_2", given), ("xpn_3", middle), ("xpn_4", suffix), ("xpn_5", prefix)):
        if value.strip():
            _set(getattr(pid.pid_5, component), value.strip())  # type: ignore[attr-defined]
    birth_date = str(header.get("PatientBirthDate", "") or "").strip()
    if re.fullmatch(r"\d{8}", birth_date):
        pid.pid_7.ts_1 = birth_date  # type: ignore[attr-defined]
    sex = str(header.get("PatientSex", "") or "").strip().upper()
    # DICOM M/F/O map onto HL7 Table 0001; anything else is U (unknown).
    pid.pid_8 = sex if sex in ("M", "F", "O") else "U"  # type: ignore[attr-defined]


def _order_numbers(header: Dataset) -> tuple[str, str]:
    """Placer and filler order numbers, from the study's request attributes or the top level."""
    sources = [header, *list(header.get("RequestAttributesSequence", []) or [])]
    placer = filler = ""
    for item in sources:
        placer = placer or str(item.get("PlacerOrderNumberImagingServiceRequest", "") or "").strip()
        filler = filler or str(item.get("FillerOrderNumberImagingServiceRequest", "") or "").strip()
    return placer, filler


def _universal_service(obr: object, header: Dataset) -> None:
    """OBR-4: the requested procedure's code when the study carries one, else its description."""
    for keyword in ("RequestedProcedureCodeSequence", "ProcedureCodeSequence"):
        sequence = header.get(keyword)
        if sequence:
            item = sequence[0]
            value = str(item.get("CodeValue", "") or "").strip()
            meaning = str(item.get("CodeMeaning", "") or "").strip()
            scheme = str(item.get("CodingSchemeDesignator", "") or "").strip()
            if value and scheme:
                _set(obr.obr_4.ce_1, value)  # type: ignore[attr-defined]
                if meaning:
                    _set(obr.obr_4.ce_2, meaning)  # type: ignore[attr-defined]
                obr.obr_4.ce_3 = _plain(scheme)  # type: ignore[attr-defined]  # ID: no escaping
                return
    description = str(header.get("StudyDescription", "") or "").strip()
    modality = str(header.get("Modality", "") or "").strip()
    _set(obr.obr_4.ce_2, description or f"{modality or 'Imaging'} study")  # type: ignore[attr-defined]


def _observations(
    order: object,
    header: Dataset,
    triage: StudyTriage,
    classifications: Sequence[SeriesClassification],
    study_uid: str,
) -> None:
    set_id = 0

    def add(value_type: str) -> object:
        nonlocal set_id
        set_id += 1
        observation = order.add_group("ORU_R01_OBSERVATION").obx  # type: ignore[attr-defined]
        observation.obx_1 = str(set_id)
        observation.obx_2 = value_type
        observation.obx_11 = "P"
        return observation

    models: list[str] = []
    for series_index, classification in enumerate(classifications, start=1):
        model = f"{classification.model.name} {classification.model.version}"
        if model not in models:
            models.append(model)
        for score in classification.scores:
            obx = add("NM")
            code = score.finding.code
            _set(obx.obx_3.ce_1, code.value)  # type: ignore[attr-defined]
            _set(obx.obx_3.ce_2, code.meaning)  # type: ignore[attr-defined]
            obx.obx_3.ce_3 = _plain(code.scheme_designator)  # type: ignore[attr-defined]  # ID: no escaping
            obx.obx_4 = str(series_index)  # type: ignore[attr-defined]
            obx.obx_5 = f"{score.probability:.4f}"  # type: ignore[attr-defined]
            obx.obx_6.ce_1 = "1"  # type: ignore[attr-defined]
            obx.obx_6.ce_3 = "UCUM"  # type: ignore[attr-defined]
            obx.obx_8 = "A" if score.present else "N"  # type: ignore[attr-defined]
    uid_obx = add("ST")
    uid_obx.obx_3.ce_1 = "110180"  # type: ignore[attr-defined]
    uid_obx.obx_3.ce_2 = "Study Instance UID"  # type: ignore[attr-defined]
    uid_obx.obx_3.ce_3 = "DCM"  # type: ignore[attr-defined]
    uid_obx.obx_5 = study_uid  # type: ignore[attr-defined]  # a UID holds only digits and dots
    sentences = [DISCLAIMER, f"Models: {'; '.join(models) or 'none'}.", f"Triage: {triage.priority.name}."]
    sentences += [
        f"{r.finding.display_name} {r.probability:.2f} >= {r.threshold:g} gives {r.priority.name}."
        for r in triage.reasons
    ]
    for line in _lines(sentences):
        statement = add("TX")
        statement.obx_3.ce_2 = "AI result statement"  # type: ignore[attr-defined]
        statement.obx_5 = line  # type: ignore[attr-defined]


def _lines(sentences: Sequence[str]) -> list[str]:
    """Sentences packed into OBX-5 values of at most 199 characters (hl7apy's limit for ST)."""
    lines: list[str] = []
    for sentence in (_plain(s)[:_MAX_OBX_TEXT] for s in sentences):
        if lines and len(lines[-1]) + 1 + len(sentence) <= _MAX_OBX_TEXT:
            lines[-1] += " " + sentence
        else:
            lines.append(sentence)
    return lines


def _set(element: object, value: str) -> None:
    """Assign a text value to a typed leaf, so that hl7apy escapes the delimiters in it."""
    element.value = ST(value)  # type: ignore[attr-defined]


def _plain(value: str) -> str:
    """Text for leaves hl7apy does not escape (ID codes, "varies" OBX-5): delimiters become spaces."""
    return _DELIMITERS.sub(" ", value)


def _dicom_timestamp(header: Dataset) -> str:
    date = str(header.get("StudyDate", "") or "").strip()
    if not re.fullmatch(r"\d{8}", date):
        return ""
    time = re.sub(r"[^0-9]", "", str(header.get("StudyTime", "") or "").split(".")[0])[:6]
    return date + (time if len(time) in (2, 4, 6) else "")


#: Priorities at or above which a study is sent by default (``--hl7-all`` sends every study).
DEFAULT_MINIMUM_PRIORITY = TriagePriority.URGENT
