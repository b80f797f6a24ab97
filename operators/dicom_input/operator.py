"""MONAI Deploy operator: a DICOM file or folder → :class:`StudyInput` (studies, rejected, skipped).

Replaces the SDK's loader + series selector + volume operator for our needs: the SDK's volume
operator crashes on multi-image CR/DX series, and we need every rejected file with its reason.
"""

from __future__ import annotations

import logging
from pathlib import Path

from monai.deploy.core import ExecutionContext, Fragment, InputContext, OutputContext

from medgemma_deploy.operators.dicom_input.reader import load_study_input
from medgemma_deploy.operators.operator import PortOperator

__all__ = ["DicomStudyLoaderOperator"]

logger = logging.getLogger(__name__)


class DicomStudyLoaderOperator(PortOperator):
    """Reads every DICOM file under ``input_path`` and emits one ``StudyInput`` on ``study_input``."""

    OUTPUT_NAME = "study_input"

    def __init__(self, fragment: Fragment, *args: object, input_path: Path, **kwargs: object) -> None:
        self.input_path = Path(input_path)
        # The SDK's rule: the base class constructor comes last.
        super().__init__(fragment, *args, **kwargs)

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        study_input = load_study_input(self.input_path)
        logger.info(
            "loaded %d studies (%d rejected, %d skipped) from %s",
            len(study_input.studies),
            len(study_input.rejected),
            len(study_input.skipped),
            self.input_path,
        )
        op_output.emit(study_input, self.OUTPUT_NAME)
