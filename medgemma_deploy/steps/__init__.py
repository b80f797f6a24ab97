"""The steps of the classify and report pipelines, shared by the engine and the MONAI Deploy operators.

:mod:`.classify` (classify a study input; write SEG, Parametric Map and findings SR),
:mod:`.report` (draft reports; write report SRs).
"""

from medgemma_deploy.exports import public_names

#: public name → the module that defines it
_HOMES = {
    "RELEVANCE_FORMATS": "classify",
    "ClassificationOutcome": "classify",
    "ClassifyOptions": "classify",
    "algorithm_for": "classify",
    "classify_study_input": "classify",
    "record_input": "classify",
    "write_findings_reports": "classify",
    "write_parametric_maps": "classify",
    "write_segmentations": "classify",
    "ReportOptions": "report",
    "ReportOutcome": "report",
    "SeriesReport": "report",
    "findings_context_for": "report",
    "generate_reports": "report",
    "write_report_srs": "report",
}

__all__ = sorted(_HOMES)
__getattr__, __dir__ = public_names(__name__, _HOMES)
