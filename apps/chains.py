"""The operator chains our MONAI Deploy apps are built of: each app's ``compose()`` strings them together.

Each ``add_*`` function builds the operators of one step, connects them after ``source`` with explicit
port pairs (:meth:`ModelApplication.chain`) and returns the last of them, the next step's source. The
operators' ``command`` (``results.json``'s) is the engine's pipeline:

- classify: the study loader → :func:`add_findings` (MedSigLIP, SEG writer, findings SR writer)
- report: the study loader → [:func:`add_classifier`, for grounding] → :func:`add_report`
- study: the study loader → :func:`add_findings`, not ending the app → :func:`add_report`

The study loader, every app's first operator, comes with the engine
(:meth:`ModelApplication.open_study`).
"""

from __future__ import annotations

from pathlib import Path

from medgemma_deploy.apps.holoscan_runtime import ModelApplication
from medgemma_deploy.engine import PipelineEngine
from medgemma_deploy.operators.medgemma.operator import MedGemmaReportOperator, ReportSRWriterOperator
from medgemma_deploy.operators.medsiglip.operator import MedSigLIPClassifierOperator
from medgemma_deploy.operators.operator import PortOperator
from medgemma_deploy.operators.writers.seg_operator import RelevanceSegWriterOperator
from medgemma_deploy.operators.writers.sr_operator import FindingsSRWriterOperator

__all__ = ["add_classifier", "add_findings", "add_report"]


def add_classifier(
    app: ModelApplication, engine: PipelineEngine, source: PortOperator
) -> MedSigLIPClassifierOperator:
    """MedSigLIP after ``source`` (the study loader): findings for every series, and the run's results."""
    classifier = MedSigLIPClassifierOperator(
        app,
        name="medsiglip",
        scorer=engine.medsiglip,
        model=engine.medsiglip.identity,
        label_sets=engine.label_sets,
        options=engine.classify_options,
        command=engine.command,
    )
    app.chain(source, classifier)
    return classifier


def add_findings(
    app: ModelApplication, engine: PipelineEngine, source: PortOperator, output_dir: Path, *, finalize: bool
) -> FindingsSRWriterOperator:
    """MedSigLIP → SEG writer → findings SR writer after ``source`` (the study loader).

    Returns the SR writer. With ``finalize`` it ends the app and writes ``results.json``; without, it
    passes the outcome on to whatever is chained after it.
    """
    classifier = add_classifier(app, engine, source)
    options = engine.classify_options
    seg_writer = RelevanceSegWriterOperator(app, name="seg_writer", output_dir=output_dir, options=options)
    sr_writer = FindingsSRWriterOperator(
        app, name="sr_writer", output_dir=output_dir, options=options, finalize=finalize
    )
    app.chain(classifier, seg_writer, sr_writer)
    return sr_writer


def add_report(
    app: ModelApplication, engine: PipelineEngine, source: PortOperator, output_dir: Path
) -> ReportSRWriterOperator:
    """MedGemma → report SR writer after ``source``; returns the writer, which writes ``results.json``.

    ``source`` emits the study (the loader) or its findings (the classifier, or the findings
    writers), which ground the drafts.
    """
    reporter = MedGemmaReportOperator(
        app,
        name="medgemma",
        generator=engine.medgemma,
        prompts=engine.prompts,
        options=engine.report_options,
        command=engine.command,
    )
    writer = ReportSRWriterOperator(
        app, name="report_writer", output_dir=output_dir, options=engine.report_options
    )
    app.chain(source, reporter, writer)
    return writer
