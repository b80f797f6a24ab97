"""The classify app: DICOM study → MedSigLIP findings → relevance SEG + TID 1500 SR + results.json.

Run it as a MONAI Deploy app::

    python -m medgemma_deploy.apps.classify -i IN -o OUT -m MODELS

or with ``HOLOSCAN_INPUT_PATH``, ``HOLOSCAN_OUTPUT_PATH`` and ``HOLOSCAN_MODEL_PATH`` set, as a MAP
does. ``-m`` is the MedSigLIP directory or a models root holding ``medsiglip/``.
"""

from __future__ import annotations

from collections.abc import Sequence

from medgemma_deploy.apps.chains import add_findings
from medgemma_deploy.apps.holoscan_runtime import ModelApplication, run_app

__all__ = ["ClassifyApp", "main"]


class ClassifyApp(ModelApplication):
    """Loader → MedSigLIP → SEG writer → SR writer; the model is loaded once, in ``compose``."""

    def compose(self) -> None:
        engine, loader, output_dir = self.open_study("classify")
        self.final_writer = add_findings(self, engine, loader, output_dir, finalize=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m medgemma_deploy.apps.classify``; returns the exit code."""
    return run_app(ClassifyApp, "medgemma_deploy.apps.classify", argv)
