"""The classify app: DICOM study → MedSigLIP findings → relevance SEG + TID 1500 SR + results.json.

Run it as a MONAI Deploy app::

    python -m medgemma_deploy.apps.classify -i IN -o OUT -m MODELS

or with ``HOLOSCAN_INPUT_PATH``, ``HOLOSCAN_OUTPUT_PATH`` and ``HOLOSCAN_MODEL_PATH`` set, as a MAP
does. ``-m`` is the MedSigLIP directory or a models root holding ``medsiglip/``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from holoscan.conditions import CountCondition
from monai.deploy.core import Application

from medgemma_deploy.apps.holoscan_runtime import add_run_arguments, ensure_stack_size, split_app_arguments
from medgemma_deploy.errors import UsageError
from medgemma_deploy.model_dir import resolve_model_dir
from medgemma_deploy.operators.classify_pipeline import ClassifyOptions
from medgemma_deploy.operators.labels import load_label_sets
from medgemma_deploy.operators.medsiglip import MedSigLIPRunner
from medgemma_deploy.operators.medsiglip_operator import MedSigLIPClassifierOperator
from medgemma_deploy.operators.results import EXIT_USAGE
from medgemma_deploy.operators.seg_writer_operator import RelevanceSegWriterOperator
from medgemma_deploy.operators.sr_writer_operator import FindingsSRWriterOperator
from medgemma_deploy.operators.study_loader_operator import DicomStudyLoaderOperator
from medgemma_deploy.settings import RunSettings, resolve_settings

__all__ = ["ClassifyApp", "main"]

logger = logging.getLogger(__name__)


class ClassifyApp(Application):
    """Loader → MedSigLIP → SEG writer → SR writer; the model is loaded once, in ``compose``."""

    def __init__(self, *args: object, settings: RunSettings | None = None, **kwargs: object) -> None:
        self.settings = settings or RunSettings()
        self.runner: MedSigLIPRunner | None = None
        self.sr_writer: FindingsSRWriterOperator | None = None
        super().__init__(*args, **kwargs)

    def compose(self) -> None:
        app_context = Application.init_app_context(self.argv)
        input_path = Path(app_context.input_path)
        output_dir = Path(app_context.output_path)
        if not input_path.exists():
            raise UsageError(f"input path {input_path} does not exist")
        options = ClassifyOptions(
            relevance_top_k=self.settings.relevance_top_k, write_embeddings=self.settings.write_embeddings
        )
        try:
            label_sets = load_label_sets(list(self.settings.labels) or None)
        except (OSError, ValueError) as exc:
            raise UsageError(f"label sets: {exc}") from exc
        self.runner = MedSigLIPRunner(
            resolve_model_dir(app_context.model_path, "medsiglip"), device=self.settings.device
        )
        self.runner.load()

        loader = DicomStudyLoaderOperator(self, CountCondition(self, 1), input_path=input_path, name="loader")
        classifier = MedSigLIPClassifierOperator(
            self,
            scorer=self.runner,
            model=self.runner.identity,
            label_sets=label_sets,
            options=options,
            name="medsiglip",
        )
        seg_writer = RelevanceSegWriterOperator(
            self, output_dir=output_dir, options=options, name="seg_writer"
        )
        self.sr_writer = FindingsSRWriterOperator(
            self, output_dir=output_dir, options=options, name="sr_writer"
        )
        self.add_flow(loader, classifier, {(loader.OUTPUT_NAME, classifier.INPUT_NAME)})
        self.add_flow(classifier, seg_writer, {(classifier.OUTPUT_NAME, seg_writer.INPUT_NAME)})
        self.add_flow(seg_writer, self.sr_writer, {(seg_writer.OUTPUT_NAME, self.sr_writer.INPUT_NAME)})


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m medgemma_deploy.apps.classify``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ensure_stack_size("medgemma_deploy.apps.classify", argv)
    parser = argparse.ArgumentParser(prog="medgemma_deploy.apps.classify", add_help=False)
    add_run_arguments(parser)
    ours, rest = split_app_arguments(argv, parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    app: ClassifyApp | None = None
    try:
        settings = resolve_settings(vars(ours))
        app = ClassifyApp([sys.executable, "medgemma_deploy.apps.classify", *rest], settings=settings)
        app.run()
    except UsageError as exc:
        print(f"medgemma_deploy.apps.classify: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if app is not None and app.runner is not None:
            app.runner.close()
    results = app.sr_writer.last_results if app.sr_writer is not None else None
    if results is None:
        print("medgemma_deploy.apps.classify: error: the pipeline produced no results", file=sys.stderr)
        return 1
    return results.exit_code
