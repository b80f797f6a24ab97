"""``medgemma-deploy report``: MedGemma drafts → UNVERIFIED report SR + results.json."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medgemma_deploy.engine import PipelineEngine
from medgemma_deploy.operators.classify_pipeline import ClassifyOptions
from medgemma_deploy.operators.report_pipeline import ReportOptions

__all__ = ["ReportEngine"]


class ReportEngine(PipelineEngine):
    """The report pipeline: MedGemma (and MedSigLIP when grounding on findings), loaded once.

    Takes :class:`~medgemma_deploy.engine.EngineOptions`' keywords, like every engine, and
    ``medsiglip_path`` when ``models_path`` is the MedGemma directory itself.
    """

    command = "report"

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
        medsiglip_path: Path | None = None,
    ) -> None:
        super().__init__(
            models_path,
            backend=backend,
            classify=False,
            report=True,
            label_files=label_files,
            prompts_file=prompts_file,
            device=device,
            precision=precision,
            cache_dir=cache_dir,
            classify_options=classify_options,
            report_options=report_options,
            medsiglip_path=medsiglip_path,
        )
