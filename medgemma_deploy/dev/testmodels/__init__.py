"""Tiny randomly initialised models of the real classes, for tests and the demo (no downloads).

They are real ``SiglipModel`` / ``Gemma3ForConditionalGeneration`` directories with locally built
tokenizers and processors, loadable with ``from_pretrained`` exactly like the Hub downloads, and each
carries a marker (``medgemma_deploy_model.json``) that says its weights are random, so every output
made with them says so too.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["make_test_models"]


def make_test_models(out: Path, *, seed: int = 0) -> dict[str, Path]:
    """Write ``out/medsiglip`` and ``out/medgemma`` (a models root, as ``-m`` takes it)."""
    from medgemma_deploy.dev.testmodels.gemma import make_test_medgemma
    from medgemma_deploy.dev.testmodels.siglip import make_test_medsiglip

    out = Path(out)
    return {
        "medsiglip": make_test_medsiglip(out / "medsiglip", seed=seed),
        "medgemma": make_test_medgemma(out / "medgemma", seed=seed),
    }
