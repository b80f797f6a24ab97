"""The persistent text-embedding cache through the real runner and the tiny model.

A fresh runner must read what an earlier one wrote without running the text tower, and get the
same probabilities; anything wrong with an entry (corrupt bytes, altered arrays, another key, other
weights under the same version) must be caught, logged and re-encoded, never trusted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from medgemma_deploy.operators.medsiglip.runner import MedSigLIPRunner, make_medsiglip_runner
from medgemma_deploy.operators.medsiglip.text_cache import TextEmbeddingCache, label_set_digest


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(3)
    return [rng.random((70, 50), dtype=np.float32), rng.random((40, 64), dtype=np.float32)]


def _runner(model_dir: Path, cache: Path | None, precision: str = "fp32") -> MedSigLIPRunner:
    return MedSigLIPRunner(model_dir, device="cpu", precision=precision, text_cache_dir=cache).load()


def _count_text_passes(runner: MedSigLIPRunner, monkeypatch) -> list[int]:
    """Record every label-prompt batch the text tower encodes from now on."""
    calls: list[int] = []
    original = runner._encode_text

    def counting(model, prompts):
        calls.append(len(prompts))
        return original(model, prompts)

    monkeypatch.setattr(runner, "_encode_text", counting)
    return calls


def _entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.npz"))


def test_a_fresh_runner_reads_the_entry_and_scores_identically(
    tiny_medsiglip_dir, tmp_path, chest, images, monkeypatch
):
    cache = tmp_path / "cache"
    with _runner(tiny_medsiglip_dir, cache) as first:
        expected = first.score(images, chest).probabilities
        reference = first.text_embeddings(chest)
    assert len(_entries(cache)) == 1

    second = _runner(tiny_medsiglip_dir, cache)
    calls = _count_text_passes(second, monkeypatch)
    cached = second.text_embeddings(chest)
    assert calls == [], "the text tower ran although a verified entry existed"
    np.testing.assert_array_equal(cached.positive.numpy(), reference.positive.numpy())
    np.testing.assert_array_equal(cached.negative.numpy(), reference.negative.numpy())
    assert cached.n_prompts == reference.n_prompts
    np.testing.assert_array_equal(second.score(images, chest).probabilities, expected)
    second.close()


def test_without_a_cache_directory_nothing_is_written(tiny_medsiglip_dir, tmp_path, chest, monkeypatch):
    runner = _runner(tiny_medsiglip_dir, None)
    calls = _count_text_passes(runner, monkeypatch)
    runner.text_embeddings(chest)
    assert sum(calls) == sum(len(f.positive_prompts) + len(f.negative_prompts) for f in chest.findings)
    assert not list(tmp_path.iterdir())
    runner.close()


def _corrupt_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\x00" * 64
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _alter_array(path: Path) -> None:
    """Change one value and keep the old checksum: what a bit flip in the array would do."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    arrays["positive"] = arrays["positive"].copy()
    arrays["positive"][0, 0] += 0.5
    with path.open("wb") as stream:
        np.savez(stream, **arrays)


def _other_key(path: Path) -> None:
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    meta = json.loads(str(arrays.pop("meta")))
    meta["key"]["model_version"] = "another-version"
    with path.open("wb") as stream:
        np.savez(stream, meta=np.array(json.dumps(meta)), **arrays)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_corrupt_bytes, "cannot be read"),
        (_truncate, "cannot be read"),
        (_alter_array, "SHA-256"),
        (_other_key, "key differs"),
    ],
    ids=["corrupt-bytes", "truncated", "altered-array", "another-key"],
)
def test_a_damaged_entry_is_detected_logged_and_rebuilt(
    tiny_medsiglip_dir, tmp_path, chest, monkeypatch, caplog, damage, reason
):
    cache = tmp_path / "cache"
    with _runner(tiny_medsiglip_dir, cache) as first:
        reference = first.text_embeddings(chest).positive.numpy()
    (entry,) = _entries(cache)
    damage(entry)

    runner = _runner(tiny_medsiglip_dir, cache)
    calls = _count_text_passes(runner, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="medgemma_deploy.operators.medsiglip.text_cache"):
        rebuilt = runner.text_embeddings(chest)
    assert calls, "a damaged entry was trusted"
    assert any(reason in r.getMessage() and str(entry) in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(rebuilt.positive.numpy(), reference, atol=1e-6)
    runner.close()

    # The entry was rewritten: the next process reads it without encoding.
    third = _runner(tiny_medsiglip_dir, cache)
    calls = _count_text_passes(third, monkeypatch)
    third.text_embeddings(chest)
    assert calls == []
    third.close()


def test_other_weights_under_the_same_version_fail_the_probe(tmp_path, chest, monkeypatch, caplog):
    """Two tiny models that claim the same name, version and config: only the probe tells them apart."""
    from medgemma_deploy.dev.testmodels.siglip import make_test_medsiglip

    first_dir = make_test_medsiglip(tmp_path / "a", seed=0)
    second_dir = make_test_medsiglip(tmp_path / "b", seed=1)
    shutil.copy(first_dir / "medgemma_deploy_model.json", second_dir / "medgemma_deploy_model.json")
    assert (first_dir / "config.json").read_bytes() == (second_dir / "config.json").read_bytes()
    cache = tmp_path / "cache"
    with _runner(first_dir, cache) as first:
        first.text_embeddings(chest)

    second = _runner(second_dir, cache)
    calls = _count_text_passes(second, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="medgemma_deploy.operators.medsiglip.text_cache"):
        embeddings = second.text_embeddings(chest)
    assert calls, "embeddings of other weights were served from the cache"
    assert any("probe" in r.getMessage() for r in caplog.records)
    fresh = _runner(second_dir, None).text_embeddings(chest)
    np.testing.assert_allclose(embeddings.positive.numpy(), fresh.positive.numpy(), atol=1e-6)
    second.close()


def test_an_edited_label_set_and_another_precision_get_their_own_entries(tiny_medsiglip_dir, tmp_path, chest):
    cache = tmp_path / "cache"
    edited_finding = dataclasses.replace(
        chest.findings[0], positive_prompts=(*chest.findings[0].positive_prompts, "an extra prompt")
    )
    edited = dataclasses.replace(chest, findings=(edited_finding, *chest.findings[1:]))
    assert label_set_digest(edited) != label_set_digest(chest)
    with _runner(tiny_medsiglip_dir, cache) as runner:
        original = runner.text_embeddings(chest)
        changed = runner.text_embeddings(edited)
    assert len(_entries(cache)) == 2, "an edited label set (same name and version) reused the entry"
    assert not np.allclose(original.positive[0].numpy(), changed.positive[0].numpy())
    with _runner(tiny_medsiglip_dir, cache, precision="bf16") as runner:
        runner.text_embeddings(chest)
    assert len(_entries(cache)) == 3, "a bf16 run reused the fp32 entry"


def test_an_unwritable_directory_is_reported_once_and_the_run_goes_on(
    tiny_medsiglip_dir, tmp_path, chest, images, caplog
):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory should be")
    with (
        caplog.at_level(logging.WARNING, logger="medgemma_deploy.operators.medsiglip.text_cache"),
        _runner(tiny_medsiglip_dir, blocker / "cache") as runner,
    ):
        runner.score(images, chest)
        runner.text_embeddings(dataclasses.replace(chest, version="2"))
    warnings = [r for r in caplog.records if "cannot be written" in r.getMessage()]
    assert len(warnings) == 1


def test_the_factory_puts_entries_under_the_cache_setting(tiny_medsiglip_dir, tmp_path, chest):
    with make_medsiglip_runner(tiny_medsiglip_dir, device="cpu", cache_dir=tmp_path) as runner:
        runner.text_embeddings(chest)
    assert len(_entries(tmp_path / "text-embeddings")) == 1


def test_the_cache_refuses_an_entry_whose_shape_does_not_fit(tiny_medsiglip_dir, tmp_path, chest):
    cache = tmp_path / "cache"
    with _runner(tiny_medsiglip_dir, cache) as runner:
        runner.text_embeddings(chest)
        key = runner._text_cache_key(chest)
        probe = runner._probe
    assert probe is not None
    store = TextEmbeddingCache(cache)
    assert store.load(key, probe, len(chest.findings)) is not None
    assert store.load(key, probe, len(chest.findings) + 1) is None
