"""``medgemma-deploy demo``: a synthetic study through the whole pipeline on tiny random models.

It proves the plumbing (DICOM in, models, SR/SEG out) on any machine without downloads. Because
the weights are random, every finding it prints is meaningless, and it says so loudly: here, in
``results.json`` and inside every SR it writes.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

__all__ = ["RANDOM_WEIGHTS_BANNER", "run_demo"]

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS_BANNER = """\
*****************************************************************************************
*  DEMO WITH RANDOM WEIGHTS: the models below are tiny and randomly initialised.         *
*  Every finding, probability and map is MEANINGLESS. This shows the plumbing only.      *
*  Real use: point -m at local copies of google/medsiglip-448 and google/medgemma-4b-it. *
*****************************************************************************************"""


def run_demo(output: Path, *, device: str | None = None) -> int:
    """Build the demo study and models under ``output``, run the pipeline, print what it wrote."""
    from medgemma_deploy.dev.synthetic import write_demo_study
    from medgemma_deploy.dev.testmodels import make_test_models
    from medgemma_deploy.engine import PipelineEngine
    from medgemma_deploy.settings import resolve_settings

    print(RANDOM_WEIGHTS_BANNER, flush=True)
    for stale in ("input", "output"):
        shutil.rmtree(output / stale, ignore_errors=True)
    input_dir = output / "input"
    models_dir = output / "models"
    results_dir = output / "output"
    files = write_demo_study(input_dir)
    print(f"demo study: {len(files)} DICOM files in {input_dir} (a MONOCHROME1 chest CR and a CT series)")
    make_test_models(models_dir)
    print(f"tiny random models: {models_dir}")
    # The study pipeline: MedSigLIP findings (SR + SEG), then MedGemma drafts grounded on them.
    # The demo's own choices go in as flags would; every other setting (environment, YAML) applies.
    settings = resolve_settings(
        {"backend": "local", "device": device, "max_new_tokens": 48, "with_findings": True}
    )
    with PipelineEngine.from_settings("study", models_dir, settings) as engine:
        results = engine.process(input_dir, results_dir)
    print()
    print("findings and draft reports (RANDOM WEIGHTS, meaningless):")
    for series in results.series:
        top = sorted(series.get("findings", []), key=lambda f: f["probability"], reverse=True)[:3]
        listed = ", ".join(f"{f['name']} {f['probability']:.2f}" for f in top)
        print(f"  {series['modality']} series ({series['n_frames']} frames): {listed}")
        if "report" in series:
            print(
                f"    draft report ({series['report']['n_generated_tokens']} tokens): "
                f"{series['report']['text'][:80]!r}"
            )
    print()
    print(f"outputs in {results_dir}:")
    for written in results.outputs:
        print(f"  {written.kind:<10} {written.path}")
    print(f"  results    {results_dir / 'results.json'}")
    print()
    print(RANDOM_WEIGHTS_BANNER)
    return results.exit_code
