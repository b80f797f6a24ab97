"""The engine: load the models once, then turn one input path after another into results.

Triton-style lifecycle (``open`` → ``process`` many → ``close``). The CLI, the MONAI Deploy apps,
the DICOM listener and the demo all build it the same way, ``PipelineEngine.from_settings(pipeline,
models_path, settings)``, and its models come from one :class:`~medgemma_deploy.backends.local.Backend`
(in this process or on a shared worker). It runs one of three pipelines (:data:`PIPELINES`):

- classify: MedSigLIP findings → relevance SEG + TID 1500 SR;
- report: MedGemma draft → UNVERIFIED TID 2000 report SR, optionally grounded on MedSigLIP's
  findings for the same series (then MedSigLIP runs too, but its SR/SEG are not written);
- study: both.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from medgemma_deploy.backends.local import Backend, make_backend
from medgemma_deploy.domain import (
    GenerationSettings,
    ImageModel,
    LabelSet,
    ReportModel,
    Series,
    SeriesClassification,
)
from medgemma_deploy.errors import UsageError
from medgemma_deploy.operators.dicom_input.pixels import MemoryBudget
from medgemma_deploy.operators.dicom_input.reader import load_study_input
from medgemma_deploy.operators.medgemma.prompts import PromptBook
from medgemma_deploy.operators.medsiglip.labels import load_label_sets
from medgemma_deploy.operators.writers.common import AI_DISCLAIMER
from medgemma_deploy.results import RunResults
from medgemma_deploy.settings import RunSettings
from medgemma_deploy.steps.classify import (
    ClassifyOptions,
    classify_study_input,
    record_input,
    write_findings_reports,
    write_parametric_maps,
    write_segmentations,
)
from medgemma_deploy.steps.report import (
    ReportOptions,
    TokenSink,
    generate_reports,
    write_report_srs,
)
from medgemma_deploy.triage import StudyTriage, triage_by_study, triage_study

__all__ = [
    "PIPELINES",
    "EngineOptions",
    "PipelineEngine",
    "PipelineWrites",
    "StudyFindings",
    "check_device",
    "check_input_path",
]

logger = logging.getLogger(__name__)


class PipelineWrites(NamedTuple):
    """What a pipeline writes: MedSigLIP's findings (SR and SEG), MedGemma's draft reports."""

    findings: bool
    reports: bool


#: The pipelines an engine runs, by name. The names are the CLI's commands, the listener's
#: ``--pipeline`` values and ``results.json``'s ``command``.
PIPELINES: dict[str, PipelineWrites] = {
    "classify": PipelineWrites(findings=True, reports=False),
    "report": PipelineWrites(findings=False, reports=True),
    "study": PipelineWrites(findings=True, reports=True),
}


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
    with :meth:`PipelineEngine.from_settings`, which maps the settings here, so a setting added to
    :class:`~medgemma_deploy.settings.RunSettings` and mapped here reaches every one of them (a test
    sets each setting by environment variable and sees it through the listener).
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
    pipeline:
        ``classify``, ``report`` or ``study`` (:data:`PIPELINES`).
    models_path:
        A model directory or a models root holding ``medsiglip/`` and ``medgemma/``; not used with
        a remote backend.
    options:
        The resolved settings (:meth:`EngineOptions.from_settings`); default: every default.
    medsiglip_path:
        The MedSigLIP directory when ``models_path`` is the MedGemma directory itself.
    """

    def __init__(
        self,
        pipeline: str,
        models_path: Path | None,
        options: EngineOptions | None = None,
        *,
        medsiglip_path: Path | None = None,
    ) -> None:
        if pipeline not in PIPELINES:
            raise ValueError(f"unknown pipeline {pipeline!r}: one of {', '.join(PIPELINES)}")
        options = options or EngineOptions()
        self.command = pipeline
        self.options = options
        self.backend = (options.backend or "local").strip()
        if self.backend == "local" and models_path is None:
            raise UsageError("the local backend needs the models path (-m/--models or HOLOSCAN_MODEL_PATH)")
        self.models_path = Path(models_path) if models_path is not None else None
        self.medsiglip_path = Path(medsiglip_path) if medsiglip_path else self.models_path
        self.write_findings, self.report = PIPELINES[pipeline]
        self.classify_options = options.classify_options
        self.report_options = options.report_options
        self.needs_medsiglip = self.write_findings or (self.report and self.report_options.with_findings)
        self.label_sets: list[LabelSet] = []
        self.prompts: PromptBook | None = None
        self.medsiglip: ImageModel | None = None
        self.medgemma: ReportModel | None = None
        self._backend: Backend | None = None
        #: Called with each run's classifications and results before results.json is written
        #: (the search index hooks in here); the frames' embeddings are kept for it.
        self.on_classified: Callable[[list[SeriesClassification], RunResults], object] | None = None

    @classmethod
    def from_settings(
        cls,
        pipeline: str,
        models_path: Path | None,
        settings: RunSettings,
        *,
        medsiglip_path: Path | None = None,
    ) -> PipelineEngine:
        """The engine every entry point builds: ``settings`` resolved once (flag > env > YAML > default)."""
        return cls(
            pipeline, models_path, EngineOptions.from_settings(settings), medsiglip_path=medsiglip_path
        )

    # -- lifecycle ---------------------------------------------------------------------------
    def open(self) -> PipelineEngine:
        """Read the configuration and load each model once (raises UsageError on any problem).

        The models come from the backend (:func:`~medgemma_deploy.backends.local.make_backend`, the
        one place runners are built): in this process, or a shared worker over gRPC that retries
        while it starts.
        """
        options = self.options
        device = check_device(options.device)
        try:
            if self.needs_medsiglip:
                self.label_sets = load_label_sets(list(options.label_files) or None)
            if self.report:
                self.prompts = PromptBook.load(options.prompts_file)
        except (OSError, ValueError) as exc:
            raise UsageError(f"configuration: {exc}") from exc
        local = self.backend == "local"
        self._backend = make_backend(
            self.backend,
            self.models_path if local else None,
            device if local else None,
            precision=options.precision,
            cache_dir=options.cache_dir,
            medsiglip_path=self.medsiglip_path if local else None,
        )
        try:
            if self.needs_medsiglip:
                self.medsiglip = self._backend.medsiglip
                self.medsiglip.load()
            if self.report:
                self.medgemma = self._backend.medgemma
                self.medgemma.load()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Unload the models (or close the worker channel); the engine can be opened again."""
        self.medsiglip = self.medgemma = None
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def __enter__(self) -> PipelineEngine:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
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
            raise RuntimeError(
                f"the {self.command} engine's triage needs MedSigLIP (classify or with_findings)"
            )
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
            raise RuntimeError(f"the {self.command} engine's process() was called before open()")
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
