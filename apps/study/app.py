"""The study app: findings SR + relevance SEG + draft report SR for one study, in one MONAI Deploy app.

Every output references the same source images. Run it as::

    python -m medgemma_deploy.apps.study -i IN -o OUT -m MODELS [--with-findings]

``-m`` is a models root holding ``medsiglip/`` and ``medgemma/`` (``/opt/holoscan/models`` in a MAP).
"""

from __future__ import annotations

from collections.abc import Sequence

from holoscan.conditions import CountCondition

from medgemma_deploy.apps.holoscan_runtime import (
    ModelApplication,
    classify_options,
    run_app,
)
from medgemma_deploy.operators.dicom_input.operator import DicomStudyLoaderOperator
from medgemma_deploy.operators.medgemma.operator import MedGemmaReportOperator, ReportSRWriterOperator
from medgemma_deploy.operators.medsiglip.operator import MedSigLIPClassifierOperator
from medgemma_deploy.operators.writers.seg_operator import RelevanceSegWriterOperator
from medgemma_deploy.operators.writers.sr_operator import FindingsSRWriterOperator

__all__ = ["StudyApp", "main"]


class StudyApp(ModelApplication):
    """Loader → MedSigLIP → SEG writer → findings SR writer → MedGemma → report SR writer."""

    command = "study"

    def compose(self) -> None:
        engine, input_path, output_dir = self.open_models("study")
        options = classify_options(self.settings)

        loader = DicomStudyLoaderOperator(self, CountCondition(self, 1), input_path=input_path, name="loader")
        classifier = MedSigLIPClassifierOperator(
            self,
            scorer=engine.medsiglip,
            model=engine.medsiglip.identity,
            label_sets=engine.label_sets,
            options=options,
            command=self.command,
            name="medsiglip",
        )
        seg_writer = RelevanceSegWriterOperator(
            self, output_dir=output_dir, options=options, name="seg_writer"
        )
        sr_writer = FindingsSRWriterOperator(
            self, output_dir=output_dir, options=options, finalize=False, name="sr_writer"
        )
        reporter = MedGemmaReportOperator(
            self,
            generator=engine.medgemma,
            prompts=engine.prompts,
            options=engine.report_options,
            command=self.command,
            name="medgemma",
        )
        self.final_writer = ReportSRWriterOperator(
            self, output_dir=output_dir, options=engine.report_options, name="report_writer"
        )
        self.add_flow(loader, classifier, {(loader.OUTPUT_NAME, classifier.INPUT_NAME)})
        self.add_flow(classifier, seg_writer, {(classifier.OUTPUT_NAME, seg_writer.INPUT_NAME)})
        self.add_flow(seg_writer, sr_writer, {(seg_writer.OUTPUT_NAME, sr_writer.INPUT_NAME)})
        self.add_flow(sr_writer, reporter, {(sr_writer.OUTPUT_NAME, reporter.INPUT_NAME)})
        self.add_flow(reporter, self.final_writer, {(reporter.OUTPUT_NAME, self.final_writer.INPUT_NAME)})


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m medgemma_deploy.apps.study``; returns the exit code."""
    return run_app(StudyApp, "medgemma_deploy.apps.study", argv)
