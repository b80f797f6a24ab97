"""MONAI Deploy operator: MedSigLIP zero-shot findings for every series of a ``StudyInput``."""

from __future__ import annotations

from collections.abc import Sequence

from monai.deploy.core import ExecutionContext, Fragment, InputContext, OutputContext

from medgemma_deploy.domain import ImageModel, LabelSet, ModelIdentity, StudyInput
from medgemma_deploy.operators.operator import PortOperator
from medgemma_deploy.operators.ports import receive_typed
from medgemma_deploy.operators.writers.common import AI_DISCLAIMER
from medgemma_deploy.results import RunResults
from medgemma_deploy.steps.classify import (
    ClassificationOutcome,
    ClassifyOptions,
    classify_study_input,
    record_input,
)

__all__ = ["MedSigLIPClassifierOperator"]


class MedSigLIPClassifierOperator(PortOperator):
    """Receives ``study_input`` (StudyInput), emits ``classifications`` (ClassificationOutcome).

    The scorer (a loaded ``MedSigLIPRunner``, or a remote client with the same methods) is given at
    construction: the model is loaded once per application, never per ``compute``.
    """

    INPUT_NAME = "study_input"
    OUTPUT_NAME = "classifications"

    def __init__(
        self,
        fragment: Fragment,
        *args: object,
        scorer: ImageModel,
        model: ModelIdentity,
        label_sets: Sequence[LabelSet],
        options: ClassifyOptions,
        command: str = "classify",
        **kwargs: object,
    ) -> None:
        self.scorer = scorer
        self.model = model
        self.label_sets = list(label_sets)
        self.options = options
        self.command = command
        super().__init__(fragment, *args, **kwargs)

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        study_input = receive_typed(op_input, self.INPUT_NAME, StudyInput)
        results = RunResults(command=self.command, disclaimer=AI_DISCLAIMER, models=[self.model])
        record_input(study_input, results)
        classifications = classify_study_input(
            study_input, self.scorer, self.model, self.label_sets, self.options, results
        )
        op_output.emit(ClassificationOutcome(results, study_input, classifications), self.OUTPUT_NAME)
