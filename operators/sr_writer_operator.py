"""MONAI Deploy operator: findings of a ``ClassificationOutcome`` → TID 1500 SR files + results.json."""

from __future__ import annotations

from pathlib import Path

from monai.deploy.core import Fragment, Operator, OperatorSpec

from medgemma_deploy.operators.classify_pipeline import (
    ClassificationOutcome,
    ClassifyOptions,
    write_findings_reports,
)
from medgemma_deploy.operators.ports import receive_typed
from medgemma_deploy.operators.results import RunResults

__all__ = ["FindingsSRWriterOperator"]


class FindingsSRWriterOperator(Operator):
    """Receives ``segmented`` (a ClassificationOutcome with its SEGs); writes SRs and ``results.json``.

    It is the last operator of the classify app, so it also writes the run's ``results.json``.
    """

    INPUT_NAME = "segmented"

    def __init__(
        self, fragment: Fragment, *args: object, output_dir: Path, options: ClassifyOptions, **kwargs: object
    ) -> None:
        self.output_dir = Path(output_dir)
        self.options = options
        #: The results of the last run, for the app's exit code.
        self.last_results: RunResults | None = None
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input(self.INPUT_NAME)

    def compute(self, op_input: object, op_output: object, context: object) -> None:
        outcome = receive_typed(op_input, self.INPUT_NAME, ClassificationOutcome)
        write_findings_reports(
            outcome.classifications, outcome.segmentations, self.output_dir, self.options, outcome.results
        )
        outcome.results.write(self.output_dir)
        self.last_results = outcome.results
