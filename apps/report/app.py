"""The report app: DICOM study → MedGemma draft per series → UNVERIFIED report SR + results.json.

Run it as a MONAI Deploy app::

    python -m medgemma_deploy.apps.report -i IN -o OUT -m MODELS [--with-findings]

or with the ``HOLOSCAN_*_PATH`` variables, as a MAP does. ``-m`` is the MedGemma directory or a
models root holding ``medgemma/`` (and ``medsiglip/`` for ``--with-findings``).
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

__all__ = ["ReportApp", "main"]


class ReportApp(ModelApplication):
    """Loader → [MedSigLIP, for grounding] → MedGemma → report SR writer; models loaded once."""

    command = "report"

    def compose(self) -> None:
        engine, input_path, output_dir = self.open_models("report")

        loader = DicomStudyLoaderOperator(self, CountCondition(self, 1), input_path=input_path, name="loader")
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
        if engine.medsiglip is not None:  # grounded on findings: classify first, write nothing of it
            classifier = MedSigLIPClassifierOperator(
                self,
                scorer=engine.medsiglip,
                model=engine.medsiglip.identity,
                label_sets=engine.label_sets,
                options=classify_options(self.settings),
                command=self.command,
                name="medsiglip",
            )
            self.add_flow(loader, classifier, {(loader.OUTPUT_NAME, classifier.INPUT_NAME)})
            self.add_flow(classifier, reporter, {(classifier.OUTPUT_NAME, reporter.INPUT_NAME)})
        else:
            self.add_flow(loader, reporter, {(loader.OUTPUT_NAME, reporter.INPUT_NAME)})
        self.add_flow(reporter, self.final_writer, {(reporter.OUTPUT_NAME, self.final_writer.INPUT_NAME)})


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m medgemma_deploy.apps.report``; returns the exit code."""
    return run_app(ReportApp, "medgemma_deploy.apps.report", argv)
