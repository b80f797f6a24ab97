"""``medgemma-deploy report``: MedGemma drafts → UNVERIFIED report SR + results.json."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medgemma_deploy.engine import PipelineEngine
from medgemma_deploy.operators.report_pipeline import ReportOptions

__all__ = ["ReportEngine"]


class ReportEngine(PipelineEngine):
    """The report pipeline: MedGemma (and MedSigLIP when grounding on findings), loaded once."""

    command = "report"

    def __init__(
        self,
        models_path: Path | None,
        *,
        backend: str = "local",
        prompts_file: Path | None = None,
        label_files: Sequence[Path] | None = None,
        device: str | None = None,
        options: ReportOptions | None = None,
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
            report_options=options,
            medsiglip_path=medsiglip_path,
        )
