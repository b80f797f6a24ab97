"""MedSigLIPRunner on the tiny random model against a plain transformers reference.

The reference is what a reader of the model card would write: ``SiglipModel`` +
``AutoProcessor`` (``SiglipImageProcessor``'s PIL backend and the SentencePiece tokenizer, prompts
padded to 64 tokens), ``logits_per_image``, and the label set's aggregation in numpy.

Tolerances on probabilities:

- same pixel values into both: 1e-5 (float32 arithmetic in a different order only);
- end to end (each side preprocesses): 5e-3. The pixels differ by up to 2/255 in normalised
  units (PIL's 8-bit rounding, see test_preprocess.py); on these images that moves probabilities by
  less than 1e-3. 5e-3 leaves room for BLAS differences and is still ten times smaller than the
  gap between the two scoring rules, which the test checks so it cannot pass vacuously.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, AutoTokenizer, SiglipModel

from medgemma_deploy.dev.testmodels.siglip import TEST_MEDSIGLIP_NAME, make_test_medsiglip
from medgemma_deploy.domain import ImageModel
from medgemma_deploy.errors import ModelLoadError
from medgemma_deploy.model_dir import MODEL_MARKER
from medgemma_deploy.operators.medsiglip.labels import load_label_sets
from medgemma_deploy.operators.medsiglip.preprocess import PadGeometry
from medgemma_deploy.operators.medsiglip.relevance import patch_embeddings
from medgemma_deploy.operators.medsiglip.runner import MedSigLIPRunner, RunnerNotLoadedError

SAME_PIXELS_TOLERANCE = 1e-5
END_TO_END_TOLERANCE = 5e-3


@pytest.fixture(scope="module")
def runner(tiny_medsiglip_dir):
    with MedSigLIPRunner(tiny_medsiglip_dir, device="cpu") as loaded:
        yield loaded


@pytest.fixture(scope="module")
def chest():
    return next(s for s in load_label_sets() if s.name == "chest-xray")


@pytest.fixture(scope="module")
def reference(tiny_medsiglip_dir):
    model = SiglipModel.from_pretrained(tiny_medsiglip_dir).eval()
    return model, AutoProcessor.from_pretrained(tiny_medsiglip_dir)


def _image(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """8-bit-exact display image (k/255), so the reference sees the same values through PIL."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0 : shape[0], 0 : shape[1]]
    grey = np.clip(
        0.5 + 0.3 * np.sin(rows / 7) * np.cos(columns / 5) + 0.1 * rng.standard_normal(shape[:2]), 0, 1
    )
    image = np.stack([grey, grey**2, 1 - grey], axis=-1) if len(shape) == 3 else grey
    return (np.round(image * 255) / 255).astype(np.float32)


IMAGES = [_image(shape, seed) for seed, shape in enumerate([(120, 90), (70, 100, 3), (64, 64), (300, 200)])]


def _reference_logits(reference, images, label_set, pixel_values=None):
    """logits_per_image of plain transformers, and each prompt's (finding, polarity)."""
    model, processor = reference
    prompts, owners = [], []
    for index, finding in enumerate(label_set.findings):
        for polarity, texts in ((0, finding.positive_prompts), (1, finding.negative_prompts)):
            prompts += list(texts)
            owners += [(index, polarity)] * len(texts)
    padded = []
    for image in images:
        geometry = PadGeometry.for_shape(*image.shape[:2])
        u8 = np.round(image * 255).astype(np.uint8)
        u8 = np.stack([u8] * 3, axis=-1) if u8.ndim == 2 else u8
        padded.append(np.pad(u8, [(geometry.top, geometry.bottom), (geometry.left, geometry.right), (0, 0)]))
    inputs = processor(text=prompts, images=padded, padding="max_length", max_length=64, return_tensors="pt")
    with torch.no_grad():
        output = model(
            input_ids=inputs["input_ids"],
            pixel_values=inputs["pixel_values"] if pixel_values is None else pixel_values,
        )
    return output, np.array(owners)


def _aggregate(logits: np.ndarray, owners: np.ndarray, label_set) -> tuple[np.ndarray, np.ndarray]:
    columns = range(len(label_set.findings))
    positive = np.stack([logits[:, (owners[:, 0] == k) & (owners[:, 1] == 0)].mean(1) for k in columns], 1)
    negative = np.stack([logits[:, (owners[:, 0] == k) & (owners[:, 1] == 1)].mean(1) for k in columns], 1)
    return positive, negative


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


# ---- parity ---------------------------------------------------------------------------------


def test_probabilities_match_plain_transformers(runner, chest, reference):
    output, owners = _reference_logits(reference, IMAGES, chest)
    positive, negative = _aggregate(output.logits_per_image.numpy(), owners, chest)
    sigmoid_set = dataclasses.replace(chest, scoring="sigmoid")

    softmax = runner.score(IMAGES, chest).probabilities
    sigmoid = runner.score(IMAGES, sigmoid_set).probabilities

    assert softmax.shape == sigmoid.shape == (len(IMAGES), len(chest.findings))
    np.testing.assert_allclose(softmax, _sigmoid(positive - negative), atol=END_TO_END_TOLERANCE)
    np.testing.assert_allclose(sigmoid, _sigmoid(positive), atol=END_TO_END_TOLERANCE)
    assert np.abs(softmax - sigmoid).max() > 10 * END_TO_END_TOLERANCE


def test_same_pixels_give_the_same_probabilities_and_embeddings(runner, chest, reference):
    pixel_values = runner._preprocessor(IMAGES).pixel_values
    output, owners = _reference_logits(reference, IMAGES, chest, pixel_values=pixel_values)
    positive, negative = _aggregate(output.logits_per_image.numpy(), owners, chest)
    scores = runner.score(IMAGES, chest)
    np.testing.assert_allclose(
        scores.probabilities, _sigmoid(positive - negative), atol=SAME_PIXELS_TOLERANCE
    )
    np.testing.assert_allclose(scores.embeddings, output.image_embeds.numpy(), atol=SAME_PIXELS_TOLERANCE)


def test_embeddings_are_unit_vectors_of_the_model_width(runner, chest):
    scores = runner.score(IMAGES, chest)
    assert scores.embeddings.shape == (len(IMAGES), runner.embedding_dim) == (len(IMAGES), 32)
    assert scores.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(scores.embeddings, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(runner.embed_images(IMAGES), scores.embeddings, atol=1e-6)
    assert np.all((scores.probabilities > 0) & (scores.probabilities < 1))


def test_batching_does_not_change_results(tiny_medsiglip_dir, chest):
    images = [*IMAGES, _image((33, 77, 3), 9)]
    with MedSigLIPRunner(tiny_medsiglip_dir, device="cpu", max_batch_size=2) as batched:
        together = batched.score(images, chest)
        maps_together = batched.relevance_maps(images, chest, ["edema"])
    with MedSigLIPRunner(
        tiny_medsiglip_dir, device="cpu", max_batch_size=1, relevance_cache_size=0
    ) as single:
        one_by_one = [single.score([image], chest) for image in images]
        maps_one_by_one = [single.relevance_maps([image], chest, ["edema"])[0] for image in images]
    np.testing.assert_allclose(
        together.probabilities, np.concatenate([s.probabilities for s in one_by_one]), atol=1e-5
    )
    np.testing.assert_allclose(
        together.embeddings, np.concatenate([s.embeddings for s in one_by_one]), atol=1e-5
    )
    for a, b in zip(maps_together, maps_one_by_one, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_text_embeddings_are_encoded_once_per_label_set(runner, chest, monkeypatch):
    runner._text_cache.clear()
    calls = []
    original = runner._encode_text
    monkeypatch.setattr(
        runner, "_encode_text", lambda model, prompts: calls.append(len(prompts)) or original(model, prompts)
    )
    first = runner.text_embeddings(chest)
    assert sum(calls) == sum(len(f.positive_prompts) + len(f.negative_prompts) for f in chest.findings)
    assert first.n_prompts == sum(calls)
    assert first.finding_keys == tuple(f.key for f in chest.findings)
    assert first.positive.shape == first.negative.shape == (len(chest.findings), 32)

    calls.clear()
    assert runner.text_embeddings(chest) is first
    runner.score(IMAGES[:1], chest)
    assert calls == []

    bumped = dataclasses.replace(chest, version="2")
    assert runner.text_embeddings(bumped) is not first and calls
    edited = dataclasses.replace(chest, findings=chest.findings[:3])  # same name and version, new findings
    assert runner.text_embeddings(edited).finding_keys == first.finding_keys[:3]


def test_prompt_means_match_the_per_prompt_embeddings(runner, chest, reference):
    model, processor = reference
    finding = chest.findings[0]
    tokens = processor.tokenizer(
        list(finding.positive_prompts), padding="max_length", max_length=64, return_tensors="pt"
    )
    with torch.no_grad():
        embeds = model.get_text_features(input_ids=tokens["input_ids"])
    embeds = getattr(embeds, "pooler_output", embeds)
    expected = torch.nn.functional.normalize(embeds, dim=-1).mean(0)
    torch.testing.assert_close(runner.text_embeddings(chest).positive[0], expected, atol=1e-5, rtol=0)


# ---- relevance maps --------------------------------------------------------------------------


def test_patch_embeddings_are_the_head_attending_to_one_patch(runner):
    model = runner._model
    pixel_values = runner._preprocessor(IMAGES[:2]).pixel_values
    with torch.no_grad():
        tokens = model.vision_model(pixel_values=pixel_values).last_hidden_state
        ours = patch_embeddings(model.vision_model.head, tokens)
        for j in (0, 7, tokens.shape[1] - 1):
            torch.testing.assert_close(
                ours[:, j], model.vision_model.head(tokens[:, j : j + 1]), atol=1e-5, rtol=1e-5
            )


def test_relevance_maps_shape_range_and_finding_dependence(runner, chest):
    keys = ["pneumothorax", "cardiomegaly", "edema"]
    maps = runner.relevance_maps(IMAGES, chest, keys)
    assert len(maps) == len(IMAGES)
    for image, frame_maps in zip(IMAGES, maps, strict=True):
        assert frame_maps.shape == (len(keys), *image.shape[:2])
        assert frame_maps.dtype == np.float32
        assert frame_maps.min() >= 0.0 and frame_maps.max() <= 1.0
        # Divided by its peak on the patch grid: a map reaches ~1 (bilinear resizing may shave the
        # peak), or is all zero when no patch alone favours the finding over its negation.
        peaks = frame_maps.max(axis=(1, 2))
        assert ((peaks > 0.5) | (peaks == 0)).all() and peaks.max() > 0.5
        assert not np.allclose(frame_maps[0], frame_maps[1], atol=1e-3)
    assert runner.relevance_maps(IMAGES[:1], chest, [])[0].shape == (0, *IMAGES[0].shape[:2])


def test_relevance_maps_are_deterministic_and_the_cache_is_exact(tiny_medsiglip_dir, chest):
    with MedSigLIPRunner(tiny_medsiglip_dir, device="cpu", relevance_cache_size=0) as uncached:
        fresh = uncached.relevance_maps(IMAGES, chest, ["atelectasis"])
        again = uncached.relevance_maps(IMAGES, chest, ["atelectasis"])
    with MedSigLIPRunner(tiny_medsiglip_dir, device="cpu") as cached:
        cached.score(IMAGES, chest)
        assert len(cached._grid_cache) == len(IMAGES)
        from_cache = cached.relevance_maps(IMAGES, chest, ["atelectasis"])
    for a, b, c in zip(fresh, again, from_cache, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, atol=1e-6)


def test_relevance_maps_follow_the_image_geometry(runner, chest):
    # A wide image: the map's rows come from the middle of the padded square only.
    image = _image((40, 160), 3)
    frame_maps = runner.relevance_maps([image], chest, ["fracture"])[0]
    assert frame_maps.shape == (1, 40, 160)


def test_unknown_finding_key(runner, chest):
    with pytest.raises(ValueError, match=r"\['no_such_finding'\] are not in label set 'chest-xray'"):
        runner.relevance_maps(IMAGES[:1], chest, ["edema", "no_such_finding"])


# ---- inputs, lifecycle and identity ----------------------------------------------------------


def test_empty_input(runner, chest):
    scores = runner.score([], chest)
    assert scores.probabilities.shape == (0, len(chest.findings))
    assert scores.embeddings.shape == (0, 32)
    assert runner.relevance_maps([], chest, ["edema"]) == []


def test_bad_image_is_named_by_its_index_across_batches(tiny_medsiglip_dir, chest):
    images = [IMAGES[0], IMAGES[2], np.full((8, 8), 3.0, np.float32)]
    small = MedSigLIPRunner(tiny_medsiglip_dir, device="cpu", max_batch_size=2)
    with small, pytest.raises(ValueError, match=r"images\[2\] has values in \[3, 3\]"):
        small.score(images, chest)


def test_bad_image_index_is_right_when_only_some_images_miss_the_cache(tiny_medsiglip_dir, chest):
    with MedSigLIPRunner(tiny_medsiglip_dir, device="cpu") as runner:
        runner.score([IMAGES[0]], chest)  # cached; the next call computes images 0 and 2 only
        bad = np.full((8, 8), np.inf, np.float32)
        with pytest.raises(ValueError, match=r"images\[2\] holds NaN or infinite"):
            runner.relevance_maps([IMAGES[3], IMAGES[0], bad], chest, ["edema"])


def test_identity_and_protocol(runner, tiny_medsiglip_dir):
    identity = runner.identity
    assert identity.name == TEST_MEDSIGLIP_NAME
    assert identity.version == json.loads((tiny_medsiglip_dir / MODEL_MARKER).read_text())["version"]
    assert identity.random_weights is True
    assert runner.image_size == (64, 64)
    assert isinstance(runner, ImageModel)


def test_use_before_load_and_after_close(tiny_medsiglip_dir, chest):
    runner = MedSigLIPRunner(tiny_medsiglip_dir, device="cpu")
    assert runner.identity.name == TEST_MEDSIGLIP_NAME  # readable before loading
    with pytest.raises(RunnerNotLoadedError, match="not loaded"):
        runner.score(IMAGES[:1], chest)
    runner.load()
    assert runner.is_loaded
    runner.close()
    runner.close()
    assert not runner.is_loaded
    with pytest.raises(RunnerNotLoadedError):
        runner.relevance_maps(IMAGES[:1], chest, ["edema"])


def test_models_root_is_accepted(tiny_medsiglip_dir):
    # -m may name a models root holding medsiglip/.
    runner = MedSigLIPRunner(tiny_medsiglip_dir.parent, device="cpu").load()
    try:
        assert runner.model_dir == tiny_medsiglip_dir
    finally:
        runner.close()


def _broken_copy(source, target, breakage):
    shutil.copytree(source, target)
    breakage(target)
    return target


def _truncate_weights(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def _wrong_size(folder):
    config = json.loads((folder / "preprocessor_config.json").read_text())
    config["size"] = {"height": 448, "width": 448}
    (folder / "preprocessor_config.json").write_text(json.dumps(config))


BREAKAGES = [
    ("no-weights", lambda folder: (folder / "model.safetensors").unlink(), "cannot load MedSigLIP (OSError"),
    ("truncated-weights", _truncate_weights, "cannot load MedSigLIP (SafetensorError"),
    ("no-tokenizer", lambda folder: (folder / "spiece.model").unlink(), "cannot load MedSigLIP"),
    (
        "no-preprocessor",
        lambda folder: (folder / "preprocessor_config.json").unlink(),
        "preprocessor_config.json",
    ),
    ("size-mismatch", _wrong_size, "size (448, 448) does not match the model's image_size 64"),
]


@pytest.mark.parametrize(("breakage", "message"), [b[1:] for b in BREAKAGES], ids=[b[0] for b in BREAKAGES])
def test_broken_model_directory(tiny_medsiglip_dir, tmp_path, breakage, message):
    folder = _broken_copy(tiny_medsiglip_dir, tmp_path / "medsiglip", breakage)
    with pytest.raises(ModelLoadError) as caught:
        MedSigLIPRunner(folder, device="cpu").load()
    assert str(folder) in str(caught.value)
    assert message in str(caught.value)


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        MedSigLIPRunner(tmp_path / "nowhere", device="cpu").load()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_requested_without_a_gpu(tiny_medsiglip_dir):
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        MedSigLIPRunner(tiny_medsiglip_dir, device="cuda").load()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"max_batch_size": 0}, "max_batch_size"), ({"relevance_cache_size": -1}, "relevance_cache_size")],
)
def test_bad_settings(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        MedSigLIPRunner(tmp_path, **kwargs)


# ---- the tiny model itself -------------------------------------------------------------------


def _digests(folder):
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def test_test_model_is_deterministic_per_seed(tiny_medsiglip_dir, tmp_path):
    same = make_test_medsiglip(tmp_path / "same", seed=0)
    other = make_test_medsiglip(tmp_path / "other", seed=1)
    assert _digests(same) == _digests(tiny_medsiglip_dir)
    assert _digests(other)["model.safetensors"] != _digests(same)["model.safetensors"]
    versions = [json.loads((folder / MODEL_MARKER).read_text())["version"] for folder in (same, other)]
    assert versions[0].startswith("random-seed0-") and versions[1].startswith("random-seed1-")


def test_test_model_loads_like_the_real_download(tiny_medsiglip_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_medsiglip_dir)
    processor = AutoProcessor.from_pretrained(tiny_medsiglip_dir)
    config = json.loads((tiny_medsiglip_dir / "preprocessor_config.json").read_text())
    assert type(tokenizer).__name__ == "SiglipTokenizer"
    assert config["resample"] == 2 and config["image_mean"] == config["image_std"] == [0.5] * 3
    assert processor.image_processor.size["height"] == 64
    ids = tokenizer(["a chest x-ray showing a pneumothorax"], padding="max_length", max_length=64)[
        "input_ids"
    ][0]
    assert len(ids) == 64 and ids[-1] == tokenizer.pad_token_id
    assert SiglipModel.from_pretrained(tiny_medsiglip_dir).config.text_config.max_position_embeddings == 64
