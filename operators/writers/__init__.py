"""DICOM writers: what leaves the plugin, each object validated before it is built.

:mod:`.common` (attributes every object shares, the AI disclaimer, UIDs), :mod:`.equipment`,
:mod:`.relevance_objects` (frame groups shared by SEG and Parametric Map), :mod:`.seg` (FRACTIONAL
SEG, PS3.3 A.51), :mod:`.pmap` (Parametric Map, PS3.3 A.75), :mod:`.findings_sr` (TID 1500),
:mod:`.report_sr` (TID 2000, UNVERIFIED), :mod:`.outputs` (saving), and the SEG and SR writer
operators.
"""

from medgemma_deploy.exports import public_names

#: public name → the module that defines it
_HOMES = {
    "AI_DISCLAIMER": "common",
    "MANUFACTURER": "common",
    "RANDOM_WEIGHTS_WARNING": "common",
    "SPECIFIC_CHARACTER_SET": "common",
    "algorithm_identification": "common",
    "check_numbering": "common",
    "declare_private_schemes": "common",
    "derived_uid": "common",
    "device_observer_context": "common",
    "manufacturer_attributes": "common",
    "prepare_sources": "common",
    "to_coded_concept": "common",
    "to_lo": "common",
    "PROCESSING_EQUIPMENT": "equipment",
    "contributing_equipment": "equipment",
    "device_identity": "equipment",
    "FrameGroup": "relevance_objects",
    "check_relevance_request": "relevance_objects",
    "group_frames": "relevance_objects",
    "SEGMENT_DESCRIPTION": "seg",
    "SEGMENT_PROPERTY_CATEGORY": "seg",
    "build_relevance_segmentations": "seg",
    "finding_tracking_uid": "common",
    "segment_label": "seg",
    "RELEVANCE_LUT_LABEL": "pmap",
    "NoPatientGeometryError": "pmap",
    "build_relevance_parametric_maps": "pmap",
    "RELEVANCE_MAP_REFERENCE": "findings_sr",
    "build_findings_sr": "findings_sr",
    "procedure_reported": "common",
    "DRAFT_REVIEW_NOTE": "report_sr",
    "ENGLISH": "report_sr",
    "build_report_sr": "report_sr",
    "save_dicom": "outputs",
}

__all__ = sorted(_HOMES)
__getattr__, __dir__ = public_names(__name__, _HOMES)
