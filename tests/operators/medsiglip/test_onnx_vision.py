"""``--precision int8`` for MedSigLIP (ONNX Runtime vision tower) on the tiny model of the real classes.

Parity with plain transformers in float32: every probability within 0.02 and every image embedding
at cosine ≥ 0.99 (the targets of issue 17); the quantised tower is built once and reused by a later
process, a damaged build is rebuilt, and the refusals (GPU, int4, missing extra) are one line each.
"""

from __future__ import annotations

import builtins
import importlib.util
import logging

import numpy as np
import pytest
import torch
from transformers import SiglipModel

from medgemma_deploy.errors import ModelLoadError
from medgemma_deploy.operators.medsiglip import onnx_vision
from medgemma_deploy.operators.medsiglip.runner import MedSigLIPRunner, make_medsiglip_runner

requires_onnxruntime = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
    reason="onnxruntime/onnx missing: pip install 'medgemma-deploy[cpu-int8]'",
)

#: The issue's acceptance limits for a lower precision.
PROBABILITY_TOLERANCE = 0.02
MIN_COSINE = 0.99


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(7)
    rows, columns = np.mgrid[0:90, 0:120]
    smooth = 0.5 + 0.3 * np.sin(rows / 9.0) * np.cos(columns / 6.0)
    return [
        np.clip(smooth + 0.1 * rng.standard_normal(smooth.shape), 0, 1).astype(np.float32),
        rng.random((64, 48), dtype=np.float32),
        np.clip(1 - smooth, 0, 1).astype(np.float32),
    ]


@pytest.fixture(scope="module")
def int8_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("int8")


@pytest.fixture(scope="module")
def int8_runner(tiny_medsiglip_dir, int8_cache):
    with MedSigLIPRunner(
        tiny_medsiglip_dir, device="cpu", precision="int8", int8_cache_dir=int8_cache
    ) as runner:
        yield runner


def _reference(tiny_medsiglip_dir, pixel_values: torch.Tensor, chest) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and embeddings of plain transformers (float32) on the same pixel values."""
    model = SiglipModel.from_pretrained(tiny_medsiglip_dir, dtype=torch.float32).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_medsiglip_dir)
    prompts, owners = [], []
    for index, finding in enumerate(chest.findings):
        for polarity, texts in ((0, finding.positive_prompts), (1, finding.negative_prompts)):
            prompts += list(texts)
            owners += [(index, polarity)] * len(texts)
    ids = tokenizer(prompts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    with torch.no_grad():
        output = model(input_ids=ids["input_ids"], pixel_values=pixel_values)
    logits = output.logits_per_image.numpy()
    owner = np.array(owners)
    columns = range(len(chest.findings))
    positive = np.stack([logits[:, (owner[:, 0] == k) & (owner[:, 1] == 0)].mean(1) for k in columns], 1)
    negative = np.stack([logits[:, (owner[:, 0] == k) & (owner[:, 1] == 1)].mean(1) for k in columns], 1)
    embeddings = torch.nn.functional.normalize(output.image_embeds, dim=-1).numpy()
    return 1 / (1 + np.exp(-(positive - negative))), embeddings


@requires_onnxruntime
def test_int8_probabilities_and_embeddings_match_plain_transformers(
    int8_runner, tiny_medsiglip_dir, chest, images
):
    pixel_values = int8_runner.preprocessor(images).pixel_values
    expected_probabilities, expected_embeddings = _reference(tiny_medsiglip_dir, pixel_values, chest)
    scores = int8_runner.score(images, chest)
    difference = np.abs(scores.probabilities - expected_probabilities).max()
    assert difference <= PROBABILITY_TOLERANCE, f"int8 moved a probability by {difference:.3f}"
    cosines = np.sum(scores.embeddings * expected_embeddings, axis=1)
    assert cosines.min() >= MIN_COSINE, f"int8 embeddings at cosine {cosines.min():.4f} of float32"
    # And the int8 path really ran: its output is not bit-identical to float32.
    assert not np.array_equal(scores.embeddings, expected_embeddings)
    assert int8_runner._onnx_vision is not None


@requires_onnxruntime
def test_int8_relevance_maps_stay_close_to_float32(int8_runner, tiny_medsiglip_dir, chest, images):
    keys = [finding.key for finding in chest.findings[:3]]
    with MedSigLIPRunner(tiny_medsiglip_dir, device="cpu", precision="fp32") as reference:
        expected = reference.relevance_grids(images, chest, keys)
    maps = int8_runner.relevance_grids(images, chest, keys)
    for got, want in zip(maps, expected, strict=True):
        assert got.shape == want.shape
        assert np.abs(got - want).mean() < 0.05


@requires_onnxruntime
def test_a_later_runner_reuses_the_build_and_a_damaged_one_is_rebuilt(
    int8_runner, tiny_medsiglip_dir, int8_cache, chest, images, monkeypatch, caplog
):
    expected = int8_runner.score(images, chest).probabilities
    (built,) = int8_cache.glob("vision-*.onnx")

    def no_export(*args, **kwargs):
        raise AssertionError("the int8 tower was exported again although a verified build existed")

    with monkeypatch.context() as patch:
        patch.setattr(onnx_vision, "_build", no_export)
        with MedSigLIPRunner(
            tiny_medsiglip_dir, device="cpu", precision="int8", int8_cache_dir=int8_cache
        ) as again:
            np.testing.assert_allclose(again.score(images, chest).probabilities, expected, atol=1e-6)

    data = bytearray(built.read_bytes())
    data[len(data) // 2] ^= 0xFF
    built.write_bytes(bytes(data))
    with (
        caplog.at_level(logging.WARNING, logger="medgemma_deploy.operators.medsiglip.onnx_vision"),
        MedSigLIPRunner(
            tiny_medsiglip_dir, device="cpu", precision="int8", int8_cache_dir=int8_cache
        ) as rebuilt,
    ):
        np.testing.assert_allclose(rebuilt.score(images, chest).probabilities, expected, atol=1e-6)
    assert any("SHA-256" in r.getMessage() and str(built) in r.getMessage() for r in caplog.records)


@requires_onnxruntime
def test_the_factory_keeps_the_build_under_the_cache_setting(tiny_medsiglip_dir, tmp_path):
    with make_medsiglip_runner(tiny_medsiglip_dir, device="cpu", precision="int8", cache_dir=tmp_path):
        pass
    assert len(list((tmp_path / "vision-int8").glob("vision-*.onnx"))) == 1
    assert len(list((tmp_path / "vision-int8").glob("vision-*.json"))) == 1


def test_int8_without_the_extra_names_it_in_one_line(tiny_medsiglip_dir, monkeypatch):
    real_import = builtins.__import__

    def without_onnxruntime(name, *args, **kwargs):
        if name.split(".")[0] == "onnxruntime":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_onnxruntime)
    runner = MedSigLIPRunner(tiny_medsiglip_dir, device="cpu", precision="int8")
    with pytest.raises(ModelLoadError, match=r"pip install 'medgemma-deploy\[cpu-int8\]'") as refused:
        runner.load()
    assert "\n" not in str(refused.value)
    assert not runner.is_loaded


def test_int8_on_a_gpu_and_int4_are_refused_in_one_line(tiny_medsiglip_dir):
    with pytest.raises(ModelLoadError, match="int8 is offered for MedSigLIP on the CPU only"):
        MedSigLIPRunner(tiny_medsiglip_dir, device="cuda", precision="int8")
    with pytest.raises(ModelLoadError, match="precision int4 is not offered for MedSigLIP"):
        MedSigLIPRunner(tiny_medsiglip_dir, device="cpu", precision="int4")


def test_the_factory_runs_medsiglip_at_int8_when_int4_is_asked_for_medgemma(tiny_medsiglip_dir, tmp_path):
    from medgemma_deploy.operators.medsiglip.runner import make_medsiglip_runner

    runner = make_medsiglip_runner(tiny_medsiglip_dir, device="cpu", precision="int4", cache_dir=tmp_path)
    assert runner.precision == "int8"
    assert runner.int8_cache_dir == tmp_path / "vision-int8"
