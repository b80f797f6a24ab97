"""MONAI Deploy operator: a DICOM file or folder → :class:`StudyInput` (studies, rejected, skipped).

Replaces the SDK's loader + series selector + volume operator for our needs: the SDK's volume
operator crashes on multi-image CR/DX series, and we need every rejected file with its reason.
"""

from __future__ import annotations

import logging
from pathlib import Path

from monai.deploy.core import Fragment, Operator, OperatorSpec

from medgemma_deploy.operators.dicom_input.reader import load_study_input

__all__ = ["DicomStudyLoaderOperator"]

logger = logging.getLogger(__name__)


class DicomStudyLoaderOperator(Operator):
    """Reads every DICOM file under ``input_path`` and emits one ``StudyInput`` on ``study_input``."""

    OUTPUT_NAME = "study_input"

    def __init__(self, fragment: Fragment, *args: object, input_path: Path, **kwargs: object) -> None:
        self.input_path = Path(input_path)
        # The SDK's rule: the base class constructor comes last.
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output(self.OUTPUT_NAME)

    def compute(self, op_input: object, op_output: object, context: object) -> None:
        study_input = load_study_input(self.input_path)
        logger.info(
            "loaded %d studies (%d rejected, %d skipped) from %s",
            len(study_input.studies),
            len(study_input.rejected),
            len(study_input.skipped),
            self.input_path,
        )
        op_output.emit(study_input, self.OUTPUT_NAME)
