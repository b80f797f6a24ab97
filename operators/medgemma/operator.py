"""MONAI Deploy operators: MedGemma draft reports, and their UNVERIFIED report SR files."""

from __future__ import annotations

from monai.deploy.core import ExecutionContext, Fragment, InputContext, OutputContext

from medgemma_deploy.domain import ReportModel, StudyInput
from medgemma_deploy.operators.medgemma.prompts import PromptBook
from medgemma_deploy.operators.operator import PortOperator, WriterOperator
from medgemma_deploy.operators.ports import receive_typed
from medgemma_deploy.operators.writers.common import AI_DISCLAIMER
from medgemma_deploy.results import RunResults
from medgemma_deploy.steps.classify import ClassificationOutcome, record_input
from medgemma_deploy.steps.report import (
    ReportOptions,
    ReportOutcome,
    generate_reports,
    write_report_srs,
)

__all__ = ["MedGemmaReportOperator", "ReportSRWriterOperator"]


class MedGemmaReportOperator(PortOperator):
    """Receives ``study`` and emits ``reports`` (a ReportOutcome).

    ``study`` is a ``StudyInput`` (report app), or the ``ClassificationOutcome`` of the MedSigLIP
    operators (study app, or the report app grounded on findings): its results are continued and its
    findings can ground the drafts. The generator (a loaded ``MedGemmaRunner`` or a remote client) is
    given at construction: loaded once per application.
    """

    INPUT_NAME = "study"
    OUTPUT_NAME = "reports"

    def __init__(
        self,
        fragment: Fragment,
        *args: object,
        generator: ReportModel,
        prompts: PromptBook,
        options: ReportOptions,
        command: str = "report",
        **kwargs: object,
    ) -> None:
        self.generator = generator
        self.prompts = prompts
        self.options = options
        self.command = command
        super().__init__(fragment, *args, **kwargs)

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        received = receive_typed(op_input, self.INPUT_NAME, (StudyInput, ClassificationOutcome))
        if isinstance(received, ClassificationOutcome):
            results, study_input = received.results, received.study_input
            classifications = {c.series.series_instance_uid: c for c in received.classifications}
        else:
            results = RunResults(command=self.command, disclaimer=AI_DISCLAIMER)
            study_input, classifications = received, {}
            record_input(study_input, results)
        if self.generator.identity not in results.models:
            results.models.append(self.generator.identity)
        reports = generate_reports(
            study_input, self.generator, self.prompts, self.options, results, classifications=classifications
        )
        op_output.emit(ReportOutcome(results, reports), self.OUTPUT_NAME)


class ReportSRWriterOperator(WriterOperator):
    """Receives ``reports`` (a ReportOutcome); writes the report SRs and the run's ``results.json``."""

    INPUT_NAME = "reports"
    options: ReportOptions
    #: The results of the last run, for the app's exit code.
    last_results: RunResults | None = None

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        outcome = receive_typed(op_input, self.INPUT_NAME, ReportOutcome)
        write_report_srs(outcome.reports, self.output_dir, self.options, outcome.results)
        outcome.results.write(self.output_dir)
        self.last_results = outcome.results
