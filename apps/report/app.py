"""The report app: DICOM study → MedGemma draft per series → UNVERIFIED report SR + results.json.

Run it as a MONAI Deploy app::

    python -m medgemma_deploy.apps.report -i IN -o OUT -m MODELS [--with-findings]

or with the ``HOLOSCAN_*_PATH`` variables, as a MAP does. ``-m`` is the MedGemma directory or a
models root holding ``medgemma/`` (and ``medsiglip/`` for ``--with-findings``).
"""

from __future__ import annotations

from collections.abc import Sequence

from medgemma_deploy.apps.chains import add_classifier, add_report
from medgemma_deploy.apps.holoscan_runtime import ModelApplication, run_app

__all__ = ["ReportApp", "main"]


class ReportApp(ModelApplication):
    """Loader → [MedSigLIP, for grounding] → MedGemma → report SR writer; models loaded once."""

    def compose(self) -> None:
        engine, loader, output_dir = self.open_study("report")
        # Grounded on findings (--with-findings): classify first, write nothing of it.
        source = loader if engine.medsiglip is None else add_classifier(self, engine, loader)
        self.final_writer = add_report(self, engine, source, output_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m medgemma_deploy.apps.report``; returns the exit code."""
    return run_app(ReportApp, "medgemma_deploy.apps.report", argv)
