"""Classification runs from paths: what ``medgemma-deploy classify`` and the listener execute.

:class:`ClassifyEngine` loads the model once (Triton-style lifecycle: open → process many → close)
and runs the pipeline steps of :mod:`medgemma_deploy.operators.classify_pipeline` for each input,
writing SEG, SR and ``results.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

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
from medgemma_deploy.operators.domain import LabelSet, Series
from medgemma_deploy.operators.labels import load_label_sets
from medgemma_deploy.operators.medsiglip import MedSigLIPRunner
from medgemma_deploy.operators.results import RunResults

__all__ = ["ClassifyEngine", "check_device", "run_classify"]

logger = logging.getLogger(__name__)


def check_device(device: str | None) -> str | None:
    """Refuse ``cuda`` up front, with one line, when this machine has no usable GPU."""
    if device is None or device == "cpu":
        return device
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {device}: no CUDA GPU is available on this machine (use cpu)")
    return device


class ClassifyEngine:
    """A loaded MedSigLIP plus label sets, processing one input path after another.

    Raises
    ------
    UsageError
        From :meth:`open`: the model directory does not load or a label file is bad.
    """

    def __init__(
        self,
        models_path: Path,
        *,
        label_files: Sequence[Path] | None = None,
        device: str | None = None,
        options: ClassifyOptions | None = None,
    ) -> None:
        self.models_path = Path(models_path)
        self.label_files = list(label_files) if label_files else None
        self.device = device
        self.options = options or ClassifyOptions()
        self.label_sets: list[LabelSet] = []
        self.runner: MedSigLIPRunner | None = None

    def open(self) -> ClassifyEngine:
        try:
            self.label_sets = load_label_sets(self.label_files)
        except (OSError, ValueError) as exc:
            raise UsageError(f"label sets: {exc}") from exc
        runner = MedSigLIPRunner(
            resolve_model_dir(self.models_path, "medsiglip"), device=check_device(self.device)
        )
        runner.load()
        self.runner = runner
        return self

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None

    def __enter__(self) -> ClassifyEngine:
        return self.open()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def process(self, input_path: Path, output_dir: Path, *, result_version: int | None = None) -> RunResults:
        """Classify every series under ``input_path``; write SEG, SR and ``results.json`` to ``output_dir``.

        ``result_version`` (default: the engine's options) enters the derived SOP Instance UIDs, so
        a new version of a study's results never collides with the previous one.
        """
        if self.runner is None:
            raise RuntimeError("ClassifyEngine.process called before open()")
        if not Path(input_path).exists():
            raise UsageError(f"input path {input_path} does not exist")
        options = self.options
        if result_version is not None:
            options = dataclasses.replace(options, result_version=result_version)
        results = RunResults(command="classify", disclaimer=AI_DISCLAIMER, models=[self.runner.identity])
        started = time.perf_counter()
        study_input = load_study_input(Path(input_path), progress=_file_progress)
        record_input(study_input, results)
        classifications = classify_study_input(
            study_input,
            self.runner,
            self.runner.identity,
            self.label_sets,
            options,
            results,
            progress=_series_progress,
        )
        segmentations = write_segmentations(classifications, Path(output_dir), options, results)
        write_findings_reports(classifications, segmentations, Path(output_dir), options, results)
        results.write(Path(output_dir))
        logger.info(
            "classified %d series in %.1f s: %d objects written, %d rejected, %d skipped",
            len(classifications),
            time.perf_counter() - started,
            len(results.outputs),
            len(results.rejected),
            len(results.skipped),
        )
        return results


def run_classify(
    input_path: Path,
    output_dir: Path,
    models_path: Path,
    *,
    label_files: Sequence[Path] | None = None,
    device: str | None = None,
    options: ClassifyOptions | None = None,
) -> RunResults:
    """One-shot :class:`ClassifyEngine`: load, process ``input_path``, unload."""
    if not Path(input_path).exists():
        raise UsageError(f"input path {input_path} does not exist")
    with ClassifyEngine(models_path, label_files=label_files, device=device, options=options) as engine:
        return engine.process(input_path, output_dir)


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
