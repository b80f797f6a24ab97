"""The report pipeline as plain steps: study input → MedGemma drafts → UNVERIFIED report SR files.

Like :mod:`classify_pipeline`, each step is one function over the domain types, shared by the
MONAI Deploy operators, the CLI, the combined study app and the listener. A series whose report
cannot be drafted (no usable prompt, prompt longer than the context, empty generation) is rejected
with the reason, and the other series go on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from medgemma_deploy.domain import (
    AlgorithmInfo,
    GenerationSettings,
    ModelIdentity,
    ReportModel,
    ReportRequest,
    ReportResult,
    Series,
    SeriesClassification,
    StudyInput,
)
from medgemma_deploy.operators.medgemma.prompts import PromptBook
from medgemma_deploy.operators.medgemma.request import build_report_request
from medgemma_deploy.operators.writers.outputs import save_dicom
from medgemma_deploy.operators.writers.report_sr import build_report_sr
from medgemma_deploy.results import RunResults, WrittenObject, series_rejection

__all__ = [
    "ReportOptions",
    "ReportOutcome",
    "SeriesReport",
    "findings_context_for",
    "generate_reports",
    "write_report_srs",
]

logger = logging.getLogger(__name__)

#: Called with (series, text piece) for each piece of text as it is generated.
TokenSink = Callable[[Series, str], None]


@dataclass(frozen=True)
class ReportOptions:
    """Settings of the report pipeline (resolved from CLI/env/YAML by the caller)."""

    settings: GenerationSettings = field(default_factory=GenerationSettings)
    #: Give MedGemma MedSigLIP's top findings as context (needs a classification of the series).
    with_findings: bool = False
    #: How many of the most probable findings go into the context.
    findings_top_k: int = 3
    result_version: int = 1


@dataclass
class SeriesReport:
    """One series' drafted report: what was asked and what came back."""

    series: Series
    request: ReportRequest
    result: ReportResult
    model: ModelIdentity


@dataclass
class ReportOutcome:
    """What travels between the report app's operators."""

    results: RunResults
    reports: list[SeriesReport]


def findings_context_for(classification: SeriesClassification, top_k: int) -> list[tuple[str, float]]:
    """MedSigLIP's ``top_k`` most probable findings as ``(name, probability)``, most probable first."""
    ranked = sorted(classification.scores, key=lambda score: score.probability, reverse=True)
    return [(score.finding.display_name, float(score.probability)) for score in ranked[:top_k]]


def generate_reports(
    study_input: StudyInput,
    generator: ReportModel,
    prompts: PromptBook,
    options: ReportOptions,
    results: RunResults,
    *,
    classifications: Mapping[str, SeriesClassification] | None = None,
    on_token: TokenSink | None = None,
    progress: Callable[[int, int, Series], None] | None = None,
) -> list[SeriesReport]:
    """Draft a report for every series; ``classifications`` (by Series Instance UID) ground them.

    With ``options.with_findings`` a series without a classification is still reported, ungrounded,
    and the results say so.
    """
    all_series = [series for study in study_input.studies for series in study.series]
    reports: list[SeriesReport] = []
    for index, series in enumerate(all_series):
        if progress is not None:
            progress(index, len(all_series), series)
        entry = results.series_entry(series)
        context = None
        if options.with_findings:
            classification = (classifications or {}).get(series.series_instance_uid)
            if classification is None:
                entry.setdefault("warnings", []).append(
                    "findings grounding asked for, but the series has no MedSigLIP classification"
                )
            else:
                context = findings_context_for(classification, options.findings_top_k)
        sink = (lambda piece, s=series: on_token(s, piece)) if on_token is not None else None
        drafted = results.isolated(
            series, "report", partial(_draft, series, prompts, options, context, generator, sink)
        )
        if drafted is None:
            continue
        request, result = drafted
        for warning in _warnings(request, result):
            logger.warning("series %s: %s", series.series_instance_uid, warning)
        if not result.text.strip():
            results.reject(
                series_rejection(
                    series,
                    "report",
                    ValueError(
                        f"MedGemma generated no report text ({result.n_generated_tokens} tokens, "
                        f"finish reason {result.finish_reason}); no report SR written"
                    ),
                )
            )
            continue
        reports.append(SeriesReport(series, request, result, generator.identity))
    return reports


def write_report_srs(
    reports: Sequence[SeriesReport], out_dir: Path, options: ReportOptions, results: RunResults
) -> None:
    """Write each drafted report as an UNVERIFIED TID 2000 SR and record it in the results."""
    for report in reports:
        series, request, result, model = report.series, report.request, report.result, report.model
        algorithm = AlgorithmInfo(name=model.name, version=model.version, software_version=_version())
        entry = {
            **result.to_json(),
            "model": {"name": model.name, "version": model.version},
            "findings_grounded": request.findings_grounded,
            "findings_context": [
                {"finding": name, "probability": round(p, 6)} for name, p in request.findings_context
            ],
            "images_sent": request.n_images,
            "notes": list(request.notes),
            "warnings": _warnings(request, result),
        }
        written = results.isolated(
            series, "report", partial(_write_report_sr, report, algorithm, options, out_dir)
        )
        if written is None:
            results.add_report(series, entry)
            continue
        results.outputs.append(written)
        entry["sr_sop_instance_uid"] = written.sop_instance_uid
        results.add_report(series, entry)


def _draft(
    series: Series,
    prompts: PromptBook,
    options: ReportOptions,
    context: list[tuple[str, float]] | None,
    generator: ReportModel,
    sink: Callable[[str], None] | None,
) -> tuple[ReportRequest, ReportResult]:
    request = build_report_request(series, prompts, settings=options.settings, findings_context=context)
    return request, generator.generate(request, on_token=sink)


def _write_report_sr(
    report: SeriesReport, algorithm: AlgorithmInfo, options: ReportOptions, out_dir: Path
) -> WrittenObject:
    document = build_report_sr(
        report.series,
        report.result,
        report.request,
        report.model,
        algorithm,
        result_version=options.result_version,
    )
    return save_dicom(document, out_dir, "REPORT-SR", report.series.series_instance_uid)


def _warnings(request: ReportRequest, result: ReportResult) -> list[str]:
    """The request's and the result's warnings, each once (a result repeats its request's)."""
    return list(dict.fromkeys([*request.warnings, *result.warnings]))


def _version() -> str:
    from medgemma_deploy import __version__

    return __version__
