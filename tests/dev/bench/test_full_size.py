"""The full-size helper builds models that classify and report end to end (issue 11).

``--full-size`` once kept the tiny model's 32-dimensional text projection beside a 1152-dimensional
vision tower, so classify failed on the real shapes; nothing ran it. These tests run it, on the CPU,
on a real CR: MedSigLIP-448 at its real shapes, and MedGemma-4B at its real widths and vocabulary
with 2 layers instead of 34 (the full 4B does not fit beside three other test runs).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from medgemma_deploy.dev.bench.full_size import GEMMA_SHAPES, MEDSIGLIP_448_SHAPE, make_full_size_models
from medgemma_deploy.domain import GenerationSettings
from medgemma_deploy.engine import EngineOptions, PipelineEngine
from medgemma_deploy.steps.report import ReportOptions
from tests.support.real_size import write_real_cr

pytestmark = pytest.mark.slow


def test_full_size_medsiglip_classifies_a_real_cr_on_cpu(tmp_path):
    models = make_full_size_models(tmp_path / "models", device="cpu", kinds=("medsiglip",))
    config = json.loads((models["medsiglip"] / "config.json").read_text())
    width = MEDSIGLIP_448_SHAPE["hidden_size"]
    assert config["text_config"]["projection_size"] == config["vision_config"]["hidden_size"] == width
    assert config["vision_config"]["num_hidden_layers"] == MEDSIGLIP_448_SHAPE["num_hidden_layers"]
    write_real_cr(tmp_path / "input")
    with PipelineEngine("classify", tmp_path / "models", EngineOptions(device="cpu")) as engine:
        results = engine.process(tmp_path / "input", tmp_path / "out")
    assert results.exit_code == 0, results.rejected
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    [series] = saved["series"]
    probabilities = [finding["probability"] for finding in series["findings"]]
    assert len(probabilities) == 13 and np.isfinite(probabilities).all()
    assert {output.kind for output in results.outputs} >= {"SR", "SEG"}


def test_full_size_medgemma_with_two_layers_drafts_a_report_on_a_real_cr(tmp_path):
    models = make_full_size_models(tmp_path / "models", device="cpu", kinds=("medgemma",), medgemma_layers=2)
    config = json.loads((models["medgemma"] / "config.json").read_text())
    text = config["text_config"]
    assert text["hidden_size"] == GEMMA_SHAPES["4b"]["hidden_size"] and text["num_hidden_layers"] == 2
    assert text["vocab_size"] == 262208
    write_real_cr(tmp_path / "input")
    # With random tied embeddings the prompt's last token ("\n") outscores every other id by ~50
    # logits, so greedy decoding (and sampling at temperature 1) only repeats it: whitespace, no
    # draft. A seeded sample at temperature 20 draws from the whole 262,208-id vocabulary.
    sampled = GenerationSettings(max_new_tokens=6, do_sample=True, temperature=20.0, seed=0)
    options = ReportOptions(settings=sampled)
    engine_options = EngineOptions(device="cpu", report_options=options)
    with PipelineEngine("report", tmp_path / "models", engine_options) as engine:
        tokenizer = engine.medgemma.runner.processor.tokenizer
        # Every id of the real-size vocabulary decodes to text (the widened tokenizer).
        assert len(tokenizer) == 262208
        assert all(tokenizer.decode([token_id]).strip() for token_id in (700, 100_000, 262_207))
        results = engine.process(tmp_path / "input", tmp_path / "out")
    assert results.exit_code == 0, results.rejected
    [series] = json.loads((tmp_path / "out" / "results.json").read_text())["series"]
    report = series["report"]
    assert report["n_generated_tokens"] == 6 and report["text"].strip()
    assert "tok" in report["text"], "ids beyond the tiny tokenizer's decode to the filler pieces"
    assert "REPORT-SR" in {output.kind for output in results.outputs}
