"""The classify app: DICOM study → MedSigLIP findings → relevance SEG + TID 1500 SR + results.json.

Run it as a MONAI Deploy app::

    python -m medgemma_deploy.apps.classify -i IN -o OUT -m MODELS

or with ``HOLOSCAN_INPUT_PATH``, ``HOLOSCAN_OUTPUT_PATH`` and ``HOLOSCAN_MODEL_PATH`` set, as a MAP
does. ``-m`` is the MedSigLIP directory or a models root holding ``medsiglip/``.
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
from medgemma_deploy.operators.medsiglip.operator import MedSigLIPClassifierOperator
from medgemma_deploy.operators.writers.seg_operator import RelevanceSegWriterOperator
from medgemma_deploy.operators.writers.sr_operator import FindingsSRWriterOperator

__all__ = ["ClassifyApp", "main"]


class ClassifyApp(ModelApplication):
    """Loader → MedSigLIP → SEG writer → SR writer; the model is loaded once, in ``compose``."""

    def compose(self) -> None:
        engine, input_path, output_dir = self.open_models("classify")
        options = classify_options(self.settings)

        loader = DicomStudyLoaderOperator(self, CountCondition(self, 1), input_path=input_path, name="loader")
        classifier = MedSigLIPClassifierOperator(
            self,
            scorer=engine.medsiglip,
            model=engine.medsiglip.identity,
            label_sets=engine.label_sets,
            options=options,
            name="medsiglip",
        )
        seg_writer = RelevanceSegWriterOperator(
            self, output_dir=output_dir, options=options, name="seg_writer"
        )
        self.final_writer = FindingsSRWriterOperator(
            self, output_dir=output_dir, options=options, name="sr_writer"
        )
        self.add_flow(loader, classifier, {(loader.OUTPUT_NAME, classifier.INPUT_NAME)})
        self.add_flow(classifier, seg_writer, {(classifier.OUTPUT_NAME, seg_writer.INPUT_NAME)})
        self.add_flow(seg_writer, self.final_writer, {(seg_writer.OUTPUT_NAME, self.final_writer.INPUT_NAME)})


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m medgemma_deploy.apps.classify``; returns the exit code."""
    return run_app(ClassifyApp, "medgemma_deploy.apps.classify", argv)
