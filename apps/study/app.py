"""The study app: findings SR + relevance SEG + draft report SR for one study, in one MONAI Deploy app.

Every output references the same source images. Run it as::

    python -m medgemma_deploy.apps.study -i IN -o OUT -m MODELS [--with-findings]

``-m`` is a models root holding ``medsiglip/`` and ``medgemma/`` (``/opt/holoscan/models`` in a MAP).
"""

from __future__ import annotations

from collections.abc import Sequence

from medgemma_deploy.apps.chains import add_findings, add_report
from medgemma_deploy.apps.holoscan_runtime import ModelApplication, run_app

__all__ = ["StudyApp", "main"]


class StudyApp(ModelApplication):
    """Loader → MedSigLIP → SEG writer → findings SR writer → MedGemma → report SR writer."""

    def compose(self) -> None:
        engine, loader, output_dir = self.open_study("study")
        findings = add_findings(self, engine, loader, output_dir, finalize=False)
        self.final_writer = add_report(self, engine, findings, output_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m medgemma_deploy.apps.study``; returns the exit code."""
    return run_app(StudyApp, "medgemma_deploy.apps.study", argv)
