"""MONAI Deploy operator: findings of a ``ClassificationOutcome`` → TID 1500 SR files + results.json."""

from __future__ import annotations

from monai.deploy.core import ExecutionContext, Fragment, InputContext, OutputContext

from medgemma_deploy.operators.operator import WriterOperator
from medgemma_deploy.operators.ports import receive_typed
from medgemma_deploy.results import RunResults
from medgemma_deploy.steps.classify import (
    ClassificationOutcome,
    ClassifyOptions,
    write_findings_reports,
)

__all__ = ["FindingsSRWriterOperator"]


class FindingsSRWriterOperator(WriterOperator):
    """Receives ``segmented`` (a ClassificationOutcome with its SEGs) and writes the findings SRs.

    As the last operator of an app (``finalize=True``, the classify app) it also writes the run's
    ``results.json``; otherwise it passes the outcome on through ``findings`` (the study app, whose
    report operator comes next).
    """

    INPUT_NAME = "segmented"
    OUTPUT_NAME = "findings"
    options: ClassifyOptions
    #: The results of the last run, for the app's exit code (set when ``finalize``).
    last_results: RunResults | None = None

    def __init__(self, fragment: Fragment, *args: object, finalize: bool = True, **kwargs: object) -> None:
        self.finalize = finalize
        super().__init__(fragment, *args, **kwargs)

    def emits(self) -> bool:
        return not self.finalize

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        outcome = receive_typed(op_input, self.INPUT_NAME, ClassificationOutcome)
        write_findings_reports(
            outcome.classifications,
            outcome.segmentations,
            self.output_dir,
            self.options,
            outcome.results,
            outcome.parametric_maps,
        )
        if self.finalize:
            outcome.results.write(self.output_dir)
            self.last_results = outcome.results
        else:
            op_output.emit(outcome, self.OUTPUT_NAME)
