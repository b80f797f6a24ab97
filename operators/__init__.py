"""MONAI Deploy operators over plain-Python cores, one package per capability.

Packages: :mod:`.dicom_input` (reader, pixels, VOI, study loader operator), :mod:`.medsiglip`
(preprocessing, runner, relevance maps, label sets, classification, classifier operator),
:mod:`.medgemma` (prompts, requests, the transformers and llama.cpp runners, report text, report
operators) and :mod:`.writers` (common DICOM attributes, SEG, Parametric Map, findings SR, report SR
and their operators). Only the ``operator`` modules import MONAI Deploy / Holoscan; the six operator
classes are listed here and imported on first use.
"""

from medgemma_deploy.exports import public_names

#: public name → the module that defines it
_HOMES = {
    "DicomStudyLoaderOperator": "dicom_input.operator",
    "MedSigLIPClassifierOperator": "medsiglip.operator",
    "RelevanceSegWriterOperator": "writers.seg_operator",
    "FindingsSRWriterOperator": "writers.sr_operator",
    "MedGemmaReportOperator": "medgemma.operator",
    "ReportSRWriterOperator": "medgemma.operator",
}

__all__ = sorted(_HOMES)
__getattr__, __dir__ = public_names(__name__, _HOMES)
