"""HL7 v2.5.1 ORU^R01 (built with hl7apy, parsed back in strict validation) and MLLP delivery to a
real hl7apy MLLP server on 127.0.0.1: one that accepts (AA), one that answers AE, one that drops
the connection, and one that acknowledges another message."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.mllp import MLLPServer
from hl7apy.parser import parse_message
from pydicom.dataset import Dataset

from medgemma_deploy.domain import TriagePriority
from medgemma_deploy.listener.hl7 import Hl7Identity, build_oru, message_control_id
from medgemma_deploy.listener.mllp import Hl7DeliveryError, Hl7Endpoint, send_message
from medgemma_deploy.triage import triage_study
from tests.support.triage import classification, running_mllp_receiver

CREATED = datetime(2026, 12, 3, 10, 0, 0)
IDENTITY = Hl7Identity(sending_facility="RADIOLOGY", receiving_application="RIS", receiving_facility="HOSP")


#: The study header an ORU is built from: patient, study and order attributes.
HEADER = {
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.1",
    "PatientID": "MRN|42^7",
    "IssuerOfPatientID": "HOSP",
    "PatientName": "Müller^Anna&Lena^^Dr^PhD",
    "PatientBirthDate": "19700102",
    "PatientSex": "F",
    "StudyDate": "20261203",
    "StudyTime": "101112.123",
    "Modality": "CR",
    "AccessionNumber": "ACC-0001",
    "PlacerOrderNumberImagingServiceRequest": "PLACER-7",
    "FillerOrderNumberImagingServiceRequest": "FILLER-9",
}


def header(**overrides: str | None) -> Dataset:
    """:data:`HEADER` with ``overrides``; an override of None leaves the attribute out."""
    ds = Dataset()
    for keyword, value in {**HEADER, **overrides}.items():
        if value is not None:
            setattr(ds, keyword, value)
    return ds


def parsed(er7: str) -> Message:
    message = parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT)
    message.validate()
    return message


def test_stat_study_message_validates_strictly_and_carries_every_field():
    stat = classification({"pneumothorax": 0.83, "consolidation": 0.2})
    message = build_oru(
        header(), triage_study([stat]), [stat], study_version=1, identity=IDENTITY, created=CREATED
    )
    oru = parsed(message.er7)
    assert oru.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    assert oru.msh.msh_10.to_er7() == message.control_id == message_control_id(header().StudyInstanceUID, 1)
    assert oru.msh.msh_12.to_er7() == "2.5.1"
    assert oru.msh.msh_18.to_er7() == "UNICODE UTF-8"
    assert (oru.msh.msh_4.to_er7(), oru.msh.msh_5.to_er7(), oru.msh.msh_6.to_er7()) == (
        "RADIOLOGY",
        "RIS",
        "HOSP",
    )
    result = oru.oru_r01_patient_result
    pid = result.oru_r01_patient.pid
    # Delimiters inside patient values are escaped, never taken as structure.
    assert pid.pid_3.to_er7() == "MRN\\F\\42\\S\\7^^^HOSP^MR"
    assert pid.pid_5.to_er7() == "Müller^Anna\\T\\Lena^^PhD^Dr"
    assert (pid.pid_7.to_er7(), pid.pid_8.to_er7()) == ("19700102", "F")
    order = result.oru_r01_order_observation
    assert order.orc.orc_1.to_er7() == "RE"
    assert (order.orc.orc_2.to_er7(), order.orc.orc_3.to_er7()) == ("PLACER-7", "FILLER-9")
    assert (order.obr.obr_2.to_er7(), order.obr.obr_3.to_er7()) == ("PLACER-7", "FILLER-9")
    assert order.obr.obr_5.to_er7() == "S"
    assert order.obr.obr_7.to_er7() == "20261203101112"
    assert order.obr.obr_18.to_er7() == "ACC-0001"
    assert order.obr.obr_25.to_er7() == "P"
    assert order.oru_r01_timing_qty.tq1.tq1_9.to_er7() == "S^Stat^HL70485"
    observations = [group.obx for group in order.children if group.name == "ORU_R01_OBSERVATION"]
    numeric = [obx for obx in observations if obx.obx_2.to_er7() == "NM"]
    assert [obx.obx_3.to_er7() for obx in numeric] == [
        "36118008^Pneumothorax^SCT",
        "95436008^Consolidation^SCT",
        "125605004^Fracture of bone^SCT",
    ]
    assert [(obx.obx_5.to_er7(), obx.obx_8.to_er7()) for obx in numeric][:2] == [
        ("0.8300", "A"),
        ("0.2000", "N"),
    ]
    assert all(obx.obx_6.to_er7() == "1^^UCUM" and obx.obx_11.to_er7() == "P" for obx in numeric)
    uid = [obx for obx in observations if obx.obx_3.to_er7().startswith("110180^")]
    assert [obx.obx_5.to_er7() for obx in uid] == [header().StudyInstanceUID]
    statement = " ".join(obx.obx_5.to_er7() for obx in observations if obx.obx_2.to_er7() == "TX")
    assert "AI-generated" in statement and "not verified" in statement and "research use only" in statement
    assert "medsiglip v1" in statement
    assert "Pneumothorax 0.83 >= 0.6 gives STAT" in statement


def test_routine_study_says_routine():
    quiet = classification({"pneumothorax": 0.1})
    message = build_oru(
        header(), triage_study([quiet]), [quiet], study_version=1, identity=IDENTITY, created=CREATED
    )
    order = parsed(message.er7).oru_r01_patient_result.oru_r01_order_observation
    assert order.obr.obr_5.to_er7() == TriagePriority.ROUTINE.hl7_code == "R"
    assert order.oru_r01_timing_qty.tq1.tq1_9.to_er7() == "R^Routine^HL70485"


def test_without_accession_or_order_numbers_the_study_uid_identifies_the_order():
    bare = header(
        AccessionNumber=None,
        PlacerOrderNumberImagingServiceRequest=None,
        FillerOrderNumberImagingServiceRequest=None,
        PatientName=None,
        IssuerOfPatientID=None,
        PatientSex="X",
    )
    stat = classification({"pneumothorax": 0.9})
    oru = parsed(
        build_oru(bare, triage_study([stat]), [stat], study_version=1, identity=IDENTITY, created=CREATED).er7
    )
    order = oru.oru_r01_patient_result.oru_r01_order_observation
    assert order.obr.obr_3.to_er7() == order.orc.orc_3.to_er7() == bare.StudyInstanceUID
    assert order.obr.obr_2.to_er7() == "" and order.obr.obr_18.to_er7() == ""
    pid = oru.oru_r01_patient_result.oru_r01_patient.pid
    assert pid.pid_8.to_er7() == "U"
    assert pid.pid_5.to_er7().endswith("^U")


def test_control_id_is_stable_per_study_version_and_fits_msh10():
    first = message_control_id("1.2.3", 1)
    assert first == message_control_id("1.2.3", 1)
    assert first != message_control_id("1.2.3", 2) != message_control_id("1.2.4", 1)
    assert len(first) == 20


def test_identity_names_with_delimiters_are_refused():
    with pytest.raises(ValueError, match="sending application"):
        Hl7Identity(sending_application="A|B")
    with pytest.raises(ValueError, match="processing id"):
        Hl7Identity(processing_id="X")


@pytest.fixture
def receiver() -> Iterator[MLLPServer]:
    with running_mllp_receiver() as server:
        yield server


def _message() -> tuple[str, str]:
    stat = classification({"pneumothorax": 0.9})
    built = build_oru(
        header(), triage_study([stat]), [stat], study_version=3, identity=IDENTITY, created=CREATED
    )
    return built.er7, built.control_id


def test_mllp_delivery_is_accepted_and_received_intact(receiver):
    er7, control_id = _message()
    ack = send_message(Hl7Endpoint("127.0.0.1", receiver.server_address[1], timeout_s=5), er7, control_id)
    assert (ack.code, ack.control_id) == ("AA", control_id)
    assert len(receiver.received) == 1
    received = receiver.received[0]
    assert received.to_er7() == er7
    assert received.oru_r01_patient_result.oru_r01_patient.pid.pid_5.to_er7().startswith("Müller^")


@pytest.mark.parametrize(
    ("script", "acknowledge", "reason"),
    [
        (["AE"], None, "AE acknowledgement: patient not found"),
        (["AR"], None, "AR acknowledgement"),
        (["DROP"], None, "closed without an acknowledgement"),
        (["AA"], "SOMEONE-ELSE", "is for message 'SOMEONE-ELSE'"),
    ],
    ids=["application-error", "reject", "dropped", "wrong-control-id"],
)
def test_mllp_failures_raise_with_the_endpoint_and_reason(receiver, script, acknowledge, reason):
    receiver.codes, receiver.acknowledge = list(script), acknowledge
    er7, control_id = _message()
    endpoint = Hl7Endpoint("127.0.0.1", receiver.server_address[1], timeout_s=5)
    with pytest.raises(Hl7DeliveryError) as caught:
        send_message(endpoint, er7, control_id)
    assert str(caught.value).startswith(f"mllp://127.0.0.1:{receiver.server_address[1]}: ")
    assert reason in str(caught.value)
    assert "Müller" not in str(caught.value)


def test_unreachable_endpoint_raises_naming_it(unused_port):
    er7, control_id = _message()
    with pytest.raises(Hl7DeliveryError, match=f"mllp://127.0.0.1:{unused_port}: "):
        send_message(Hl7Endpoint("127.0.0.1", unused_port, timeout_s=2), er7, control_id)


@pytest.mark.parametrize("text", ["host", "host:0", "host:70000", ":2575", "host:abc"])
def test_bad_endpoint_text_is_refused(text):
    with pytest.raises(ValueError, match="HOST:PORT"):
        Hl7Endpoint.parse(text)


def test_endpoint_text_parses_ipv4_and_ipv6():
    assert (Hl7Endpoint.parse("ris.example:2575").host, Hl7Endpoint.parse("ris.example:2575").port) == (
        "ris.example",
        2575,
    )
    assert Hl7Endpoint.parse("[::1]:2575").host == "::1"
