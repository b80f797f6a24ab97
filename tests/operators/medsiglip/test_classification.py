"""classify_series: aggregation over frames, presence, which findings get maps, scorer checks."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from medgemma_deploy.domain import (
    Code,
    FindingDefinition,
    ImageFrame,
    ImageModel,
    ImageScores,
    LabelSet,
    ModelIdentity,
    Series,
)
from medgemma_deploy.operators.medsiglip.classification import classify_series, relevance_keys
from medgemma_deploy.operators.medsiglip.labels import load_label_sets
from medgemma_deploy.operators.medsiglip.runner import MedSigLIPRunner

MODEL = ModelIdentity(name="fake", version="1", path=Path("/models/fake"))


def _label_set(n_findings: int = 4, threshold: float = 0.5) -> LabelSet:
    findings = tuple(
        FindingDefinition(
            f"f{index}",
            f"Finding {index}",
            Code(f"MGD9{index:03d}", "99MEDGEMMA", f"F{index}"),
            ("p",),
            ("n",),
        )
        for index in range(n_findings)
    )
    return LabelSet("fake-set", "1", ("CT",), (), "softmax", threshold, findings)


def _series(shapes: Sequence[tuple[int, ...]], seed: int = 0) -> Series:
    rng = np.random.default_rng(seed)
    frames = [
        ImageFrame(
            path=Path(f"/in/{index}.dcm"),
            dataset=None,  # classify_series reads only the display pixels
            frame_number=1,
            values=np.zeros(shape, np.float32),
            display=rng.random(shape, dtype=np.float32),
            window_source="test",
        )
        for index, shape in enumerate(shapes)
    ]
    return Series("1.2.3", "1.2.3.4", "CT", None, frames)


class FakeScorer:
    """Returns fixed probabilities; maps are constant per key so the test can tell them apart."""

    identity = MODEL

    def __init__(self, probabilities: np.ndarray, embedding_dim: int = 8) -> None:
        self.probabilities = np.asarray(probabilities, np.float32)
        self.embedding_dim = embedding_dim
        self.map_calls: list[list[str]] = []

    def load(self) -> FakeScorer:
        return self

    def close(self) -> None:
        pass

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return np.eye(len(images), self.embedding_dim, dtype=np.float32)

    def score(self, images: Sequence[np.ndarray], label_set: LabelSet) -> ImageScores:
        return ImageScores(probabilities=self.probabilities, embeddings=self.embed_images(images))

    def relevance_maps(
        self, images: Sequence[np.ndarray], label_set: LabelSet, finding_keys: Sequence[str]
    ) -> list[np.ndarray]:
        self.map_calls.append(list(finding_keys))
        columns = [int(key[1:]) for key in finding_keys]
        return [
            np.stack([np.full(image.shape[:2], (c + 1) / 10 + frame / 100, np.float32) for c in columns])
            if columns
            else np.zeros((0, *image.shape[:2]), np.float32)
            for frame, image in enumerate(images)
        ]


# Three frames x four findings: f0 peaks on frame 2, f1 is exactly at the threshold, f2 is the
# highest absent finding, f3 the lowest.
PROBABILITIES = np.array(
    [
        [0.10, 0.50, 0.20, 0.01],
        [0.30, 0.40, 0.45, 0.02],
        [0.90, 0.10, 0.30, 0.03],
    ]
)


def test_series_probability_is_the_maximum_over_frames_with_its_peak():
    result = classify_series(FakeScorer(PROBABILITIES), _series([(6, 5)] * 3), _label_set(), model=MODEL)
    by_key = {score.finding.key: score for score in result.scores}
    assert [score.finding.key for score in result.scores] == ["f0", "f1", "f2", "f3"]
    for column, key in enumerate(["f0", "f1", "f2", "f3"]):
        assert by_key[key].probability == pytest.approx(PROBABILITIES[:, column].max())
        assert by_key[key].peak_frame_index == int(np.argmax(PROBABILITIES[:, column]))
        assert by_key[key].frame_probabilities == pytest.approx(list(PROBABILITIES[:, column]))
    assert by_key["f0"].peak_frame_index == 2


def test_present_means_at_or_above_the_threshold():
    result = classify_series(FakeScorer(PROBABILITIES), _series([(6, 5)] * 3), _label_set(), model=MODEL)
    assert [score.present for score in result.scores] == [True, True, False, False]
    stricter = classify_series(
        FakeScorer(PROBABILITIES), _series([(6, 5)] * 3), _label_set(threshold=0.95), model=MODEL
    )
    assert not any(score.present for score in stricter.scores)


def test_maps_for_present_findings_plus_top_k_for_every_frame():
    scorer = FakeScorer(PROBABILITIES)
    series = _series([(6, 5)] * 3)
    result = classify_series(scorer, series, _label_set(), relevance_top_k=1, model=MODEL)
    assert scorer.map_calls == [["f0", "f1"]]  # both present; the top-1 (f0) is among them
    assert set(result.relevance_maps) == {"f0", "f1"}
    assert result.relevance_maps["f0"].shape == (3, 6, 5)
    np.testing.assert_allclose(result.relevance_maps["f1"][2], 0.2 + 0.02)  # key f1, frame 2

    wider = classify_series(FakeScorer(PROBABILITIES), series, _label_set(), relevance_top_k=3, model=MODEL)
    assert list(wider.relevance_maps) == ["f0", "f1", "f2"]  # most probable first


def test_no_maps_when_nothing_is_present_and_top_k_is_zero():
    scorer = FakeScorer(PROBABILITIES * 0.1)
    result = classify_series(scorer, _series([(6, 5)] * 3), _label_set(), relevance_top_k=0, model=MODEL)
    assert result.relevance_maps == {} and scorer.map_calls == []


def test_embeddings_only_when_asked():
    series = _series([(6, 5)] * 3)
    without = classify_series(FakeScorer(PROBABILITIES), series, _label_set(), model=MODEL)
    with_them = classify_series(
        FakeScorer(PROBABILITIES), series, _label_set(), with_embeddings=True, model=MODEL
    )
    assert without.embeddings is None
    assert with_them.embeddings.shape == (3, 8) and with_them.embeddings.dtype == np.float32
    assert with_them.model is MODEL and with_them.series is series


def test_frames_of_different_sizes_get_scores_but_no_maps(caplog):
    scorer = FakeScorer(PROBABILITIES)
    with caplog.at_level(logging.WARNING):
        result = classify_series(scorer, _series([(6, 5), (6, 5), (7, 5)]), _label_set(), model=MODEL)
    assert result.scores and result.relevance_maps == {} and scorer.map_calls == []
    assert "different sizes" in caplog.text


def test_relevance_keys_order_and_union():
    result = classify_series(
        FakeScorer(PROBABILITIES), _series([(6, 5)] * 3), _label_set(), relevance_top_k=0, model=MODEL
    )
    assert relevance_keys(result.scores, 0) == ["f0", "f1"]
    assert relevance_keys(result.scores, 4) == ["f0", "f1", "f2", "f3"]


class _Broken(FakeScorer):
    def __init__(self, probabilities, maps_shape=None, map_value=None) -> None:
        super().__init__(probabilities)
        self.maps_shape = maps_shape
        self.map_value = map_value

    def relevance_maps(self, images, label_set, finding_keys):
        maps = super().relevance_maps(images, label_set, finding_keys)
        if self.maps_shape is not None:
            return [np.zeros(self.maps_shape, np.float32) for _ in maps]
        if self.map_value is not None:
            return [np.full_like(m, self.map_value) for m in maps]
        return maps[:-1]


@pytest.mark.parametrize(
    ("scorer", "message"),
    [
        (FakeScorer(PROBABILITIES[:2]), r"probabilities of shape \(2, 4\), expected \(3, 4\)"),
        (FakeScorer(PROBABILITIES * 2), r"probabilities in \[0.02, 1.8\], outside \[0, 1\]"),
        (FakeScorer(np.where(PROBABILITIES > 0.8, np.nan, PROBABILITIES)), "NaN"),
        (_Broken(PROBABILITIES), "relevance maps for 2 frames, expected 3"),
        (
            _Broken(PROBABILITIES, maps_shape=(2, 5, 6)),
            r"shape \(2, 5, 6\) for frame 0, expected \(2, 6, 5\)",
        ),
        (_Broken(PROBABILITIES, map_value=1.5), r"relevance maps in \[1.5, 1.5\]"),
    ],
    ids=["shape", "range", "nan", "map-count", "map-shape", "map-range"],
)
def test_bad_scorer_output_is_refused(scorer, message):
    with pytest.raises(ValueError, match=message):
        classify_series(scorer, _series([(6, 5)] * 3), _label_set(), relevance_top_k=0, model=MODEL)


def test_bad_arguments():
    scorer = FakeScorer(PROBABILITIES)
    with pytest.raises(ValueError, match="has no frames"):
        classify_series(scorer, _series([]), _label_set(), model=MODEL)
    with pytest.raises(ValueError, match="relevance_top_k must be 0 or more"):
        classify_series(scorer, _series([(6, 5)] * 3), _label_set(), relevance_top_k=-1, model=MODEL)


def test_fake_and_runner_satisfy_the_protocol(tiny_medsiglip_dir):
    assert isinstance(FakeScorer(PROBABILITIES), ImageModel)
    assert isinstance(MedSigLIPRunner(tiny_medsiglip_dir), ImageModel)


def test_with_the_tiny_model_end_to_end(tiny_medsiglip_dir):
    ct = next(s for s in load_label_sets() if s.name == "ct")
    series = _series([(48, 40)] * 3, seed=5)
    with MedSigLIPRunner(tiny_medsiglip_dir, device="cpu") as runner:
        result = classify_series(
            runner, series, ct, relevance_top_k=2, with_embeddings=True, model=runner.identity
        )
        direct = runner.score([frame.display for frame in series.frames], ct).probabilities
    assert [score.probability for score in result.scores] == pytest.approx(list(direct.max(axis=0)))
    assert len(result.relevance_maps) >= 2
    for relevance in result.relevance_maps.values():
        assert relevance.shape == (3, 48, 40) and relevance.min() >= 0.0 and relevance.max() <= 1.0
    assert result.embeddings.shape == (3, 32)
    assert result.model.random_weights
