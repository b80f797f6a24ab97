"""MONAI Deploy operator: relevance maps of a ``ClassificationOutcome`` → SEG and/or Parametric Map files."""

from __future__ import annotations

from monai.deploy.core import ExecutionContext, InputContext, OutputContext

from medgemma_deploy.operators.operator import WriterOperator
from medgemma_deploy.operators.ports import receive_typed
from medgemma_deploy.steps.classify import (
    ClassificationOutcome,
    ClassifyOptions,
    write_parametric_maps,
    write_segmentations,
)

__all__ = ["RelevanceSegWriterOperator"]


class RelevanceSegWriterOperator(WriterOperator):
    """Receives and emits a ``ClassificationOutcome``; fills in the SEGs and Parametric Maps it wrote.

    Which of the two it writes is ``options.relevance_format`` (seg, pmap or both).
    """

    INPUT_NAME = "classifications"
    OUTPUT_NAME = "segmented"
    options: ClassifyOptions

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        outcome = receive_typed(op_input, self.INPUT_NAME, ClassificationOutcome)
        outcome.segmentations = write_segmentations(
            outcome.classifications, self.output_dir, self.options, outcome.results
        )
        outcome.parametric_maps = write_parametric_maps(
            outcome.classifications, self.output_dir, self.options, outcome.results
        )
        op_output.emit(outcome, self.OUTPUT_NAME)
