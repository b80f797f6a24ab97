"""MedGemma's draft report of one series as a TID 2000 Basic Diagnostic Imaging Report (Enhanced SR).

highdicom has no TID 2000 class, so the tree is built here from highdicom content items and
coded concepts (PS3.16 TID 2000, TID 2002 Report Narrative):

* root CONTAINER "Diagnostic Imaging Report" (LOINC 18748-4, CID 7000), TID 2000 identified;
* HAS CONCEPT MOD: language of the content (TID 1204);
* HAS OBS CONTEXT: the observer is a device, the model run by this software (TID 1002/1004);
* HAS CONCEPT MOD: procedure reported (DCM 121058, CID 100);
* HAS CONCEPT MOD: TID 4019 algorithm identification: model name and revision, and as
  parameters the prompt id and version, every generation setting and whether the draft was
  grounded on automated screening findings;
* CONTAINS CONTAINER "Findings" (LOINC 59776-5) with a TEXT "Finding" (DCM 121071), and
  CONTAINER "Impressions" (LOINC 19005-8) with a TEXT "Impression" (DCM 121073), each when the
  model wrote that section (without headings, the whole text is Findings);
* CONTAINS TEXT "Comment" (DCM 121106): the AI disclaimer, that the draft needs review by a
  qualified clinician, and the random-weights warning when the model has random weights; further
  comments record the screening findings the draft was grounded on and how the prompt was built.

Every source image given to the model is referenced in the Current Requested Procedure Evidence
Sequence. The document is VerificationFlag UNVERIFIED, CompletionFlag PARTIAL, PreliminaryFlag
PRELIMINARY, ContentQualification RESEARCH, SpecificCharacterSet ISO_IR 192 (UTF-8, so text in
any language survives). Contributing Equipment names the model as Processing Equipment, with the
device observer's UID (IHE AI Results). UIDs derive from the series, the images sent, the model,
the prompt, the settings and ``result_version``, so a re-run replaces its own earlier draft.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import highdicom.sr as hsr
from pydicom.sr.codedict import codes

from medgemma_deploy.domain import AlgorithmInfo, Code, ModelIdentity, ReportRequest, ReportResult, Series
from medgemma_deploy.operators.medgemma.text import split_report
from medgemma_deploy.operators.writers.common import (
    AI_DISCLAIMER,
    RANDOM_WEIGHTS_WARNING,
    DerivedSeries,
    algorithm_identification,
    check_numbering,
    derived_series_uid,
    derived_uid,
    device_observer_context,
    prepare_sources,
    procedure_reported,
    refusal_is_input_error,
    to_coded_concept,
)
from medgemma_deploy.operators.writers.equipment import contributing_equipment

__all__ = ["DRAFT_REVIEW_NOTE", "ENGLISH", "build_report_sr"]

logger = logging.getLogger(__name__)

#: Language of the report text (TID 1204); the packaged prompts ask for English reports.
ENGLISH = Code("en-US", "RFC5646", "English (United States)")

#: Said next to :data:`AI_DISCLAIMER` in every report.
DRAFT_REVIEW_NOTE = "This is a DRAFT report: it needs review by a qualified clinician before any use."

_CONTAINS = hsr.RelationshipTypeValues.CONTAINS
_CONCEPT_MOD = hsr.RelationshipTypeValues.HAS_CONCEPT_MOD
#: DCM 121106 "Comment": not in CID 7002, which TID 2002 uses as a defined (extensible) group.
_COMMENT = codes.DCM.Comment


def build_report_sr(
    series: Series,
    result: ReportResult,
    request: ReportRequest,
    model: ModelIdentity,
    algorithm: AlgorithmInfo,
    *,
    series_number: int = 9903,
    result_version: int = 1,
    language: Code = ENGLISH,
) -> hsr.EnhancedSR:
    """Build the draft-report SR of one series.

    Parameters
    ----------
    series:
        The reported series.
    result:
        MedGemma's output for ``request``.
    request:
        The request the result answers (prompt, settings, images sent, grounding findings).
    model:
        The model that generated the text (observer device; random weights are announced).
    algorithm:
        TID 4019 identification of the model; the prompt, settings and grounding are added to
        its parameters.
    series_number:
        Series Number of the SR series.
    result_version:
        Bump it to write a new draft for the same inputs and model instead of replacing the old.
    language:
        Language of the report text (TID 1204, RFC 5646 code).

    Returns
    -------
    highdicom.sr.EnhancedSR
        UNVERIFIED, PARTIAL, PRELIMINARY document.

    Raises
    ------
    TypeError
        An argument is not of its domain type (``Series``, ``ReportResult``…), or the result's text
        is not a string.
    ValueError
        The request is not about ``series`` or uses frames of another series, the result does
        not answer the request (other prompt), the request sent no image, the model wrote no
        text, or a bad series number or version.
    InputError
        highdicom refuses the sources' patient/study attributes; ``source`` is the first source's
        SOP Instance UID and the reason carries highdicom's message.
    """
    _validate(series, result, request, model, algorithm, language)
    check_numbering(series_number, result_version)
    sections = split_report(result.text)
    if sections.is_empty:
        raise ValueError(
            f"result.text has no report text for series {series.series_instance_uid} "
            f"({result.n_generated_tokens} tokens generated): there is nothing to write"
        )
    sources = prepare_sources(_distinct_datasets(request))
    source_uids = [str(source.SOPInstanceUID) for source in sources]
    info = replace(algorithm, parameters=(*algorithm.parameters, *_generation_parameters(request, result)))

    root = hsr.ContainerContentItem(name=codes.cid7000.DiagnosticImagingReport, template_id="2000")
    items: list[hsr.ContentItem] = [
        *hsr.LanguageOfContentItemAndDescendants(to_coded_concept(language)),
        *device_observer_context(model, info),
        hsr.CodeContentItem(
            name=codes.DCM.ProcedureReported,
            value=procedure_reported(series.modality),
            relationship_type=_CONCEPT_MOD,
        ),
        *algorithm_identification(info),
    ]
    if sections.findings:
        items.append(_section(codes.cid7001.Findings, codes.cid7002.Finding, sections.findings))
    if sections.impression:
        items.append(_section(codes.cid7001.Impressions, codes.cid7002.Impression, sections.impression))
    items.extend(_text(_COMMENT, comment) for comment in _comments(request, result, model))
    root.ContentSequence = hsr.ContentSequence(items)

    uid_parts = (
        series.series_instance_uid,
        *source_uids,
        model.name,
        model.version,
        request.prompt_id,
        request.prompt_version,
        *(f"{key}={value}" for key, value in info.parameters),
        "report-sr",
        str(result_version),
    )
    target = DerivedSeries(
        series_instance_uid=derived_series_uid(
            "report sr", series.series_instance_uid, model, result_version
        ),
        series_number=series_number,
        series_description=_series_description(model.random_weights),
        equipment=contributing_equipment(model, algorithm),
    )
    with refusal_is_input_error(
        source_uids[0],
        f"the report SR of series {series.series_instance_uid} from its {len(source_uids)} source "
        "image(s), starting with this one",
    ):
        document = hsr.EnhancedSR(
            evidence=sources, content=root, **target.unverified_sr_attributes(derived_uid(*uid_parts))
        )
    logger.info(
        "series %s: report SR (%s, findings %d chars, impression %d chars, %d source images)",
        series.series_instance_uid,
        request.prompt_id,
        len(sections.findings),
        len(sections.impression or ""),
        len(sources),
    )
    return document


def _section(title: hsr.CodedConcept, item_name: hsr.CodedConcept, text: str) -> hsr.ContainerContentItem:
    """A CID 7001 section holding one TID 2002 narrative TEXT item."""
    container = hsr.ContainerContentItem(name=title, relationship_type=_CONTAINS)
    container.ContentSequence = hsr.ContentSequence([_text(item_name, text)])
    return container


def _text(name: hsr.CodedConcept, value: str) -> hsr.TextContentItem:
    return hsr.TextContentItem(name=name, value=value, relationship_type=_CONTAINS)


def _comments(request: ReportRequest, result: ReportResult, model: ModelIdentity) -> list[str]:
    disclaimer = f"{AI_DISCLAIMER} {DRAFT_REVIEW_NOTE}"
    if model.random_weights:
        disclaimer += f" {RANDOM_WEIGHTS_WARNING}"
    comments = [disclaimer]
    if request.findings_grounded:
        listed = "; ".join(f"{name} (p={probability:.2f})" for name, probability in request.findings_context)
        comments.append(
            "The draft was grounded on automated screening findings (unverified), given to the model "
            f"as context: {listed}."
        )
    notes = [*request.notes, *result.warnings]
    if notes:
        comments.append("How the draft was produced: " + "; ".join(notes) + ".")
    return comments


def _generation_parameters(request: ReportRequest, result: ReportResult) -> tuple[tuple[str, str], ...]:
    return (
        ("prompt_id", request.prompt_id),
        ("prompt_version", request.prompt_version),
        *result.settings.as_parameters(),
        ("findings_grounded", "yes" if request.findings_grounded else "no"),
        *result.engine_parameters,
    )


def _distinct_datasets(request: ReportRequest) -> list:
    seen: dict[str, object] = {}
    for frame in request.frames:
        seen.setdefault(frame.sop_instance_uid, frame.dataset)
    return list(seen.values())


def _series_description(random_weights: bool) -> str:
    suffix = "UNVERIFIED, RANDOM WEIGHTS" if random_weights else "UNVERIFIED"
    return f"AI draft report ({suffix})"


def _validate(
    series: Series,
    result: ReportResult,
    request: ReportRequest,
    model: ModelIdentity,
    algorithm: AlgorithmInfo,
    language: Code,
) -> None:
    expected = (
        ("series", series, Series),
        ("result", result, ReportResult),
        ("request", request, ReportRequest),
        ("model", model, ModelIdentity),
        ("algorithm", algorithm, AlgorithmInfo),
        ("language", language, Code),
    )
    for name, value, kind in expected:
        if not isinstance(value, kind):
            raise TypeError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
    series_uid = series.series_instance_uid
    if request.source != series_uid:
        raise ValueError(f"request is about {request.source}, not about series {series_uid}")
    if not request.frames:
        raise ValueError(f"request sent no image of series {series_uid}: there is no evidence to reference")
    for index, frame in enumerate(request.frames):
        frame_series = str(frame.dataset.get("SeriesInstanceUID", ""))
        if frame_series != series_uid:
            raise ValueError(
                f"request.frames[{index}] ({frame.sop_instance_uid}) is from series {frame_series!r}, "
                f"not {series_uid}"
            )
    if result.prompt_id != request.prompt_id:
        raise ValueError(
            f"result was generated with prompt {result.prompt_id!r}, the request has {request.prompt_id!r}: "
            "they do not belong together"
        )
    if not isinstance(result.text, str):
        raise TypeError(f"result.text must be a str, got {type(result.text).__name__}")
