"""Contributing Equipment (PS3.3 C.7.5.2) of every object this software writes: the IHE AIR device identity.

The IHE Radiology AI Results profile asks every AI result (SR, SEG, Parametric Map) to name the
algorithm that produced it in the Contributing Equipment Sequence (0018,A001), with Purpose of
Reference (109102, DCM, "Processing Equipment"), and with the same identity as the SR's TID 1004
device observer and TID 4019 algorithm identification. So the values are not restated here: they
are read from :func:`~medgemma_deploy.operators.writers.common.device_observer_context` and the
:class:`AlgorithmInfo` the writers already use, and the two can never drift apart:

=============================  ==========================================================
Contributing Equipment         comes from
=============================  ==========================================================
Manufacturer                   TID 1004 Device Observer Manufacturer (121014)
Manufacturer's Model Name      TID 1004 Device Observer Model Name (121015), the model's name,
                               which the pipelines also write as TID 4019 Algorithm Name (111001)
Software Versions              TID 4019 Algorithm Version (111003), then the software that ran it
Device UID                     TID 1004 Device Observer UID (121012)
Contribution Description       what the contribution was (AI inference, unverified)
=============================  ==========================================================
"""

from __future__ import annotations

from highdicom.base_content import ContributingEquipment
from pydicom.sr.codedict import codes

from medgemma_deploy.domain import AlgorithmInfo, ModelIdentity
from medgemma_deploy.operators.writers.common import device_observer_context, to_lo

__all__ = ["PROCESSING_EQUIPMENT", "contributing_equipment", "device_identity"]

#: Purpose of Reference of our Contributing Equipment item (CID 7005).
PROCESSING_EQUIPMENT = codes.DCM.ProcessingEquipment

#: TID 1004 concept names, by the Contributing Equipment attribute each one feeds.
_DEVICE_OBSERVER_ITEMS = {
    "DeviceUID": "121012",
    "Manufacturer": "121014",
    "ManufacturerModelName": "121015",
}


def device_identity(model: ModelIdentity, algorithm: AlgorithmInfo) -> dict[str, str]:
    """The TID 1004 device observer's UID, manufacturer and model name, keyed by DICOM keyword.

    Raises
    ------
    ValueError
        The model's name or version is empty (from ``device_observer_context``).
    """
    context = device_observer_context(model, algorithm)
    by_code = {str(item.ConceptNameCodeSequence[0].CodeValue): item for item in context}
    identity = {}
    for keyword, code_value in _DEVICE_OBSERVER_ITEMS.items():
        item = by_code[code_value]
        identity[keyword] = str(item.UID if "UID" in item else item.TextValue)
    return identity


def contributing_equipment(model: ModelIdentity, algorithm: AlgorithmInfo) -> ContributingEquipment:
    """The Contributing Equipment item of an object derived by ``algorithm`` run as ``model``.

    Parameters
    ----------
    model:
        The model that produced the object (its device observer identity).
    algorithm:
        Its TID 4019 identification (the Software Versions start with its version).

    Raises
    ------
    TypeError
        An argument has the wrong type.
    ValueError
        The model's name or version is empty.
    """
    if not isinstance(model, ModelIdentity):
        raise TypeError(f"model must be a ModelIdentity, got {type(model).__name__}")
    if not isinstance(algorithm, AlgorithmInfo):
        raise TypeError(f"algorithm must be an AlgorithmInfo, got {type(algorithm).__name__}")
    identity = device_identity(model, algorithm)
    equipment = ContributingEquipment(
        manufacturer=identity["Manufacturer"],
        purpose_of_reference=PROCESSING_EQUIPMENT,
        manufacturer_model_name=to_lo(identity["ManufacturerModelName"]),
        software_versions=[
            to_lo(algorithm.version),
            to_lo(f"{algorithm.software} {algorithm.software_version}"),
        ],
        contribution_description="AI inference (research model, unverified by a clinician)",
    )
    # (0018,1002) Device UID: highdicom has no argument for it.
    equipment.DeviceUID = identity["DeviceUID"]
    return equipment
