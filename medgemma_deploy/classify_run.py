"""``medgemma-deploy classify``: MedSigLIP findings → relevance SEG + TID 1500 SR + results.json."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medgemma_deploy.engine import EngineOptions, PipelineEngine, check_device, check_input_path
from medgemma_deploy.operators.classify_pipeline import ClassifyOptions
from medgemma_deploy.operators.report_pipeline import ReportOptions
from medgemma_deploy.operators.results import RunResults

__all__ = ["ClassifyEngine", "check_device", "run_classify"]


class ClassifyEngine(PipelineEngine):
    """The classify pipeline alone: loads MedSigLIP once, processes many inputs.

    Takes :class:`~medgemma_deploy.engine.EngineOptions`' keywords, like every engine (the prompts
    and report options are not used).
    """

    command = "classify"

    def __init__(
        self,
        models_path: Path | None,
        *,
        backend: str = "local",
        label_files: Sequence[Path] | None = None,
        prompts_file: Path | None = None,
        device: str | None = None,
        precision: str = "auto",
        cache_dir: Path | None = None,
        classify_options: ClassifyOptions | None = None,
        report_options: ReportOptions | None = None,
    ) -> None:
        super().__init__(
            models_path,
            backend=backend,
            classify=True,
            report=False,
            label_files=label_files,
            prompts_file=prompts_file,
            device=device,
            precision=precision,
            cache_dir=cache_dir,
            classify_options=classify_options,
            report_options=report_options,
        )


def run_classify(
    input_path: Path, output_dir: Path, models_path: Path, *, options: EngineOptions | None = None
) -> RunResults:
    """One-shot :class:`ClassifyEngine`: load, process ``input_path``, unload."""
    check_input_path(input_path)
    with ClassifyEngine(models_path, **(options or EngineOptions()).as_kwargs()) as engine:
        return engine.process(input_path, output_dir)
