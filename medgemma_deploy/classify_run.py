"""One classification run from paths: what ``medgemma-deploy classify`` does after parsing.

Loads the model once, reads the input, runs the pipeline steps of
:mod:`medgemma_deploy.operators.classify_pipeline`, and writes ``results.json``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from medgemma_deploy.errors import UsageError
from medgemma_deploy.model_dir import resolve_model_dir
from medgemma_deploy.operators.classify_pipeline import (
    ClassifyOptions,
    classify_study_input,
    record_input,
    write_findings_reports,
    write_segmentations,
)
from medgemma_deploy.operators.dicom_common import AI_DISCLAIMER
from medgemma_deploy.operators.dicom_input import load_study_input
from medgemma_deploy.operators.domain import Series
from medgemma_deploy.operators.labels import load_label_sets
from medgemma_deploy.operators.medsiglip import MedSigLIPRunner
from medgemma_deploy.operators.results import RunResults

__all__ = ["check_device", "run_classify"]

logger = logging.getLogger(__name__)


def check_device(device: str | None) -> str | None:
    """Refuse ``cuda`` up front, with one line, when this machine has no usable GPU."""
    if device is None or device == "cpu":
        return device
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA GPU is available on this machine (use --device cpu)")
    return device


def run_classify(
    input_path: Path,
    output_dir: Path,
    models_path: Path,
    *,
    label_files: Sequence[Path] | None = None,
    device: str | None = None,
    options: ClassifyOptions | None = None,
) -> RunResults:
    """Classify every series under ``input_path`` and write SEG, SR and ``results.json``.

    Raises
    ------
    UsageError
        The input path does not exist, the model directory does not load, or a label file is bad.
    """
    options = options or ClassifyOptions()
    if not input_path.exists():
        raise UsageError(f"input path {input_path} does not exist")
    try:
        label_sets = load_label_sets(list(label_files) if label_files else None)
    except (OSError, ValueError) as exc:
        raise UsageError(f"label sets: {exc}") from exc
    model_dir = resolve_model_dir(models_path, "medsiglip")
    runner = MedSigLIPRunner(model_dir, device=check_device(device))
    runner.load()
    try:
        results = RunResults(command="classify", disclaimer=AI_DISCLAIMER, models=[runner.identity])
        started = time.perf_counter()
        study_input = load_study_input(input_path, progress=_file_progress)
        record_input(study_input, results)
        classifications = classify_study_input(
            study_input, runner, runner.identity, label_sets, options, results, progress=_series_progress
        )
        segmentations = write_segmentations(classifications, output_dir, options, results)
        write_findings_reports(classifications, segmentations, output_dir, options, results)
        results.write(output_dir)
        logger.info(
            "classified %d series in %.1f s: %d objects written, %d rejected, %d skipped",
            len(classifications),
            time.perf_counter() - started,
            len(results.outputs),
            len(results.rejected),
            len(results.skipped),
        )
        return results
    finally:
        runner.close()


def _file_progress(done: int, total: int) -> None:
    if total >= 50 and (done % 50 == 0 or done == total):
        logger.info("read %d/%d files", done, total)


def _series_progress(index: int, total: int, series: Series) -> None:
    logger.info(
        "[%d/%d] classifying %s series %s (%d frames)",
        index + 1,
        total,
        series.modality,
        series.series_instance_uid,
        len(series.frames),
    )
