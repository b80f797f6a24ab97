"""Pipeline engines: load the models once, then turn one input path after another into results.

Triton-style lifecycle (``open`` → ``process`` many → ``close``), used by the CLI, the combined
study app and the DICOM listener. One engine class runs any mix of the two pipelines:

- classify: MedSigLIP findings → relevance SEG + TID 1500 SR;
- report: MedGemma draft → UNVERIFIED TID 2000 report SR, optionally grounded on MedSigLIP's
  findings for the same series (then MedSigLIP runs too, but its SR/SEG are only written when the
  classify pipeline is on).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from medgemma_deploy.errors import UsageError
from medgemma_deploy.model_dir import resolve_model_dir
from medgemma_deploy.operators.classify_pipeline import (
    ClassifyOptions,
    classify_study_input,
    record_input,
    write_findings_reports,
    write_parametric_maps,
    write_segmentations,
)
from medgemma_deploy.operators.dicom_common import AI_DISCLAIMER
from medgemma_deploy.operators.dicom_input import load_study_input
from medgemma_deploy.operators.domain import LabelSet, Series, SeriesClassification
from medgemma_deploy.operators.labels import load_label_sets
from medgemma_deploy.operators.pixels import MemoryBudget
from medgemma_deploy.operators.report_inputs import GenerationSettings, PromptBook
from medgemma_deploy.operators.report_pipeline import (
    ReportOptions,
    TokenSink,
    generate_reports,
    write_report_srs,
)
from medgemma_deploy.operators.results import RunResults
from medgemma_deploy.operators.triage import StudyTriage, triage_by_study, triage_study
from medgemma_deploy.settings import RunSettings

__all__ = [
    "EngineOptions",
    "PipelineEngine",
    "StudyFindings",
    "check_device",
    "check_input_path",
]

logger = logging.getLogger(__name__)


def check_device(device: str | None) -> str | None:
    """Refuse ``cuda`` up front, with one line, when this machine has no usable GPU."""
    if device is None or device == "cpu":
        return device
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {device}: no CUDA GPU is available on this machine (use cpu)")
    return device


def check_input_path(input_path: Path) -> Path:
    """The input file or folder, refused with one line when missing or without any file in it."""
    input_path = Path(input_path)
    if not input_path.exists():
        raise UsageError(f"input path {input_path} does not exist")
    if input_path.is_dir() and not any(p.is_file() for p in input_path.rglob("*")):
        raise UsageError(f"input folder {input_path} is empty: there are no files to process")
    return input_path


@dataclass(frozen=True)
class EngineOptions:
    """The keyword arguments every engine takes, made from the run settings in one place.

    The CLI, the MONAI Deploy apps, the listener's pipelines and the demo all build their engines
    with ``Engine(models_path, **EngineOptions.from_settings(settings).as_kwargs())``, so a setting
    added to :class:`~medgemma_deploy.settings.RunSettings` and mapped here reaches every one of
    them (a test sets each setting by environment variable and sees it through the listener).
    """

    backend: str = "local"
    label_files: tuple[Path, ...] = ()
    prompts_file: Path | None = None
    device: str | None = None
    precision: str = "auto"
    cache_dir: Path | None = None
    classify_options: ClassifyOptions = field(default_factory=ClassifyOptions)
    report_options: ReportOptions = field(default_factory=ReportOptions)

    @classmethod
    def from_settings(cls, settings: RunSettings) -> EngineOptions:
        """Every field of ``settings`` in the option that carries it.

        Raises
        ------
        UsageError
            The generation settings are refused (e.g. ``max_new_tokens`` out of range).
        """
        try:
            generation = GenerationSettings(max_new_tokens=settings.max_new_tokens)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        return cls(
            backend=settings.backend,
            label_files=tuple(settings.labels),
            prompts_file=settings.prompts,
            device=settings.device,
            precision=settings.precision,
            cache_dir=settings.cache_dir,
            classify_options=ClassifyOptions(
                relevance_top_k=settings.relevance_top_k,
                write_embeddings=settings.write_embeddings,
                relevance_format=settings.relevance_format,
                budget=MemoryBudget(
                    max_frame_megapixels=settings.max_frame_megapixels,
                    max_series_frames=settings.max_series_frames,
                    max_series_decoded_bytes=settings.max_series_decoded_mib * 2**20,
                ),
            ),
            report_options=ReportOptions(settings=generation, with_findings=settings.with_findings),
        )

    def as_kwargs(self) -> dict[str, Any]:
        """The engines' keyword arguments (every engine class accepts all of them)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class StudyFindings:
    """The classification stage alone (:meth:`PipelineEngine.triage`): findings and triage, no files.

    ``triage`` is ``None`` when no classified series' label set has triage rules.
    """

    classifications: tuple[SeriesClassification, ...]
    triage: StudyTriage | None


class PipelineEngine:
    """Loaded models plus configuration, processing one input path after another.

    Parameters
    ----------
    models_path:
        A model directory or a models root holding ``medsiglip/`` and ``medgemma/``.
    classify, report:
        Which pipelines write outputs.
    backend:
        ``local`` (models in this process, from ``models_path``) or ``grpc://HOST:PORT`` /
        ``grpcs://HOST:PORT`` (a shared GPU worker; ``models_path`` is not used).
    precision:
        ``auto``, ``fp32``, ``bf16``, ``int8`` or ``int4`` for the local models (the worker has its own).
    cache_dir:
        The ``cache_dir`` setting: where MedSigLIP keeps label sets' prompt embeddings.
    medsiglip_path:
        The MedSigLIP directory when ``models_path`` is the MedGemma directory itself.
    """

    command = "run"

    def __init__(
        self,
        models_path: Path | None,
        *,
        classify: bool,
        report: bool,
        backend: str = "local",
        label_files: Sequence[Path] | None = None,
        prompts_file: Path | None = None,
        device: str | None = None,
        precision: str = "auto",
        cache_dir: Path | None = None,
        classify_options: ClassifyOptions | None = None,
        report_options: ReportOptions | None = None,
        medsiglip_path: Path | None = None,
    ) -> None:
        if not (classify or report):
            raise ValueError("an engine must run the classify or the report pipeline, or both")
        self.backend = (backend or "local").strip()
        if self.backend == "local" and models_path is None:
            raise UsageError("the local backend needs the models path (-m/--models or HOLOSCAN_MODEL_PATH)")
        self.models_path = Path(models_path) if models_path is not None else None
        self.medsiglip_path = Path(medsiglip_path) if medsiglip_path else self.models_path
        self.write_findings = classify
        self.report = report
        self.classify_options = classify_options or ClassifyOptions()
        self.report_options = report_options or ReportOptions()
        self.needs_medsiglip = classify or (report and self.report_options.with_findings)
        self.label_files = list(label_files) if label_files else None
        self.prompts_file = prompts_file
        self.device = device
        self.precision = precision
        self.cache_dir = cache_dir
        self.label_sets: list[LabelSet] = []
        self.prompts: PromptBook | None = None
        self.medsiglip = None
        self.medgemma = None
        self._remote = None
        #: Called with each run's classifications and results before results.json is written
        #: (the search index hooks in here); the frames' embeddings are kept for it.
        self.on_classified: Callable[[list[SeriesClassification], RunResults], object] | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def open(self) -> PipelineEngine:
        """Read the configuration and load each model once (raises UsageError on any problem)."""
        device = check_device(self.device)
        try:
            if self.needs_medsiglip:
                self.label_sets = load_label_sets(self.label_files)
            if self.report:
                self.prompts = PromptBook.load(self.prompts_file)
        except (OSError, ValueError) as exc:
            raise UsageError(f"configuration: {exc}") from exc
        if self.backend != "local":
            return self._open_remote()
        try:
            if self.needs_medsiglip:
                from medgemma_deploy.operators.medsiglip import make_medsiglip_runner

                self.medsiglip = make_medsiglip_runner(
                    resolve_model_dir(self.medsiglip_path, "medsiglip"),
                    device=device,
                    precision=self.precision,
                    cache_dir=self.cache_dir,
                )
                self.medsiglip.load()
            if self.report:
                from medgemma_deploy.operators.medgemma_runners import make_medgemma_runner

                self.medgemma = make_medgemma_runner(
                    resolve_model_dir(self.models_path, "medgemma"), device=device, precision=self.precision
                )
                self.medgemma.load()
        except BaseException:
            self.close()
            raise
        return self

    def _open_remote(self) -> PipelineEngine:
        """Models on a shared worker: the same calls, over gRPC (retrying while it starts)."""
        from medgemma_deploy.operators.backends import make_backend

        self._remote = make_backend(self.backend, None, None)
        try:
            if self.needs_medsiglip:
                self.medsiglip = self._remote.medsiglip
                self.medsiglip.load()
            if self.report:
                self.medgemma = self._remote.medgemma
                self.medgemma.load()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for runner in (self.medsiglip, self.medgemma):
            if runner is not None:
                runner.close()
        self.medsiglip = self.medgemma = None
        if self._remote is not None:
            self._remote.close()
            self._remote = None

    def __enter__(self) -> PipelineEngine:
        return self.open()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- work --------------------------------------------------------------------------------
    @property
    def classifies_first(self) -> bool:
        """Whether classification is a cheap stage ahead of an expensive one (MedGemma reports) that
        can raise a study's priority (a loaded label set has triage rules)."""
        return self.report and self.needs_medsiglip and any(ls.triage_rules for ls in self.label_sets)

    def triage(self, input_path: Path) -> StudyFindings:
        """Classify ``input_path`` and triage it, writing nothing (the listener's first stage).

        Radiology triage needs the findings before the expensive report: the listener runs this on
        every queued study first, so a study with a suspected critical finding is found, notified
        and reported ahead of routine work. A series that cannot be classified is left out (the
        full run rejects it with its reason).
        """
        if self.medsiglip is None:
            raise RuntimeError(f"{type(self).__name__}.triage needs MedSigLIP (classify or with_findings)")
        input_path = check_input_path(input_path)
        # Scores only: the maps are made (and written) by the full run.
        options = dataclasses.replace(self.classify_options, relevance_maps=False, keep_embeddings=False)
        scratch = RunResults(command=self.command, disclaimer=AI_DISCLAIMER)
        study_input = load_study_input(input_path, budget=options.budget)
        classifications = classify_study_input(
            study_input, self.medsiglip, self.medsiglip.identity, self.label_sets, options, scratch
        )
        with_rules = any(c.label_set.triage_rules for c in classifications)
        return StudyFindings(
            classifications=tuple(classifications),
            triage=triage_study(classifications) if with_rules else None,
        )

    def process(
        self,
        input_path: Path,
        output_dir: Path,
        *,
        result_version: int | None = None,
        on_token: TokenSink | None = None,
    ) -> RunResults:
        """Run the pipelines on every series under ``input_path``; write outputs and ``results.json``.

        ``result_version`` enters the derived SOP Instance UIDs, so a new version of a study's
        results never collides with the previous one while a retry reproduces the same UIDs.
        """
        if (self.needs_medsiglip and self.medsiglip is None) or (self.report and self.medgemma is None):
            raise RuntimeError(f"{type(self).__name__}.process called before open()")
        input_path, output_dir = check_input_path(input_path), Path(output_dir)
        classify_options, report_options = self.classify_options, self.report_options
        if result_version is not None:
            classify_options = dataclasses.replace(classify_options, result_version=result_version)
            report_options = dataclasses.replace(report_options, result_version=result_version)
        if self.on_classified is not None:
            classify_options = dataclasses.replace(classify_options, keep_embeddings=True)
        models = [runner.identity for runner in (self.medsiglip, self.medgemma) if runner is not None]
        results = RunResults(command=self.command, disclaimer=AI_DISCLAIMER, models=models)
        started = time.perf_counter()
        study_input = load_study_input(input_path, progress=_file_progress, budget=classify_options.budget)
        record_input(study_input, results)
        classifications = []
        if self.medsiglip is not None:
            classifications = classify_study_input(
                study_input,
                self.medsiglip,
                self.medsiglip.identity,
                self.label_sets,
                classify_options,
                results,
                progress=_progress("classifying"),
            )
            if self.on_classified is not None:
                self.on_classified(classifications, results)
            results.classifications = list(classifications)
            results.triage = triage_by_study(classifications)
        if self.write_findings:
            segmentations = write_segmentations(classifications, output_dir, classify_options, results)
            parametric_maps = write_parametric_maps(classifications, output_dir, classify_options, results)
            write_findings_reports(
                classifications,
                segmentations,
                output_dir,
                classify_options,
                results,
                parametric_maps,
                triage=results.triage,
            )
        if self.medgemma is not None and self.prompts is not None:
            reports = generate_reports(
                study_input,
                self.medgemma,
                self.prompts,
                report_options,
                results,
                classifications={c.series.series_instance_uid: c for c in classifications},
                on_token=on_token,
                progress=_progress("drafting report for"),
            )
            write_report_srs(reports, output_dir, report_options, results)
        results.write(output_dir)
        logger.info(
            "%s: %d series in %.1f s: %d objects written, %d rejected, %d skipped",
            self.command,
            len(results.series),
            time.perf_counter() - started,
            len(results.outputs),
            len(results.rejected),
            len(results.skipped),
        )
        return results


def _file_progress(done: int, total: int) -> None:
    if total >= 50 and (done % 50 == 0 or done == total):
        logger.info("read %d/%d files", done, total)


def _progress(verb: str) -> Callable[[int, int, Series], None]:
    def report(index: int, total: int, series: Series) -> None:
        logger.info(
            "[%d/%d] %s %s series %s (%d frames)",
            index + 1,
            total,
            verb,
            series.modality,
            series.series_instance_uid,
            len(series.frames),
        )

    return report
