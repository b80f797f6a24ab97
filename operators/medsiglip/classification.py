"""Series classification from per-image zero-shot scores: aggregation, presence, relevance maps.

The scorer is anything with MedSigLIP's two methods (:class:`ImageModel`): the in-process
:class:`~medgemma_deploy.operators.medsiglip.runner.MedSigLIPRunner`, or a client of the gRPC worker.
This module needs neither torch nor a model.

Aggregation over a series (recorded in every result as ``series_aggregation: max over frames``):

- a finding's series probability is the **maximum over the frames** of the frame probabilities,
  because a finding seen on one slice of a CT (or one view of a radiograph study) is present in
  the series; the frame where the maximum is reached is the peak frame. The maximum of many
  uncalibrated frame scores drifts upwards with the number of frames, so thresholds tuned on single
  images are optimistic for long series;
- ``present`` is ``probability >= label_set.threshold``;
- relevance maps are made for every finding that is present plus the ``relevance_top_k`` most
  probable findings (present or not), for every frame of the series.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from medgemma_deploy.domain import (
    FindingScore,
    ImageModel,
    ImageScores,
    LabelSet,
    ModelIdentity,
    Series,
    SeriesClassification,
)

__all__ = ["classify_series", "relevance_keys"]

logger = logging.getLogger(__name__)

# Scores and maps from a remote scorer may carry float rounding just outside [0, 1].
_RANGE_TOLERANCE = 1e-4


def classify_series(
    scorer: ImageModel,
    series: Series,
    label_set: LabelSet,
    *,
    relevance_top_k: int = 3,
    with_embeddings: bool = False,
    model: ModelIdentity,
    with_relevance_maps: bool = True,
) -> SeriesClassification:
    """Score every frame of ``series`` and aggregate to series findings (module docstring).

    Parameters
    ----------
    scorer:
        The model (:class:`ImageModel`).
    series:
        Its frames' ``display`` images are scored, in frame order.
    label_set:
        The findings, scoring and threshold (see
        :func:`~medgemma_deploy.operators.medsiglip.labels.select_label_set`).
    relevance_top_k:
        How many of the most probable findings get relevance maps besides the present ones; 0 maps
        only present findings.
    with_embeddings:
        Keep the frames' image embeddings in the result.
    model:
        The identity of the model behind ``scorer``, recorded in the result.
    with_relevance_maps:
        False skips the maps (their extra pass through the model): the listener's triage stage
        needs the scores only.

    Returns
    -------
    SeriesClassification
        Scores in label-set order; maps keyed by finding key, each ``(n_frames, rows, columns)``.
        A series whose frames differ in size gets no maps (a warning is logged), because one map
        array per finding must cover all frames.

    Raises
    ------
    ValueError
        The series has no frames, ``relevance_top_k`` is negative, or the scorer returned arrays of
        the wrong shape or range (the message names the scorer's output).
    """
    if not series.frames:
        raise ValueError(f"series {series.series_instance_uid} has no frames to classify")
    if relevance_top_k < 0:
        raise ValueError(f"relevance_top_k must be 0 or more, got {relevance_top_k}")
    images = [frame.display for frame in series.frames]
    scores = scorer.score(images, label_set)
    probabilities = _checked_probabilities(scores, len(images), label_set)

    finding_scores = []
    for column, finding in enumerate(label_set.findings):
        per_frame = probabilities[:, column]
        peak = int(np.argmax(per_frame))
        probability = float(per_frame[peak])
        finding_scores.append(
            FindingScore(
                finding=finding,
                probability=probability,
                present=probability >= label_set.threshold,
                frame_probabilities=[float(p) for p in per_frame],
                peak_frame_index=peak,
            )
        )

    embeddings = None
    if with_embeddings:
        embeddings = _checked_embeddings(scores, len(images))

    keys = relevance_keys(finding_scores, relevance_top_k) if with_relevance_maps else []
    maps: dict[str, np.ndarray] = {}
    shapes = {image.shape[:2] for image in images}
    if keys and len(shapes) > 1:
        logger.warning(
            "series %s: frames have different sizes %s, so no relevance maps are made for it",
            series.series_instance_uid,
            sorted(shapes),
        )
    elif keys:
        per_frame_maps = scorer.relevance_maps(images, label_set, keys)
        maps = _stack_maps(per_frame_maps, keys, images)

    return SeriesClassification(
        series=series,
        label_set=label_set,
        model=model,
        scores=finding_scores,
        embeddings=embeddings,
        relevance_maps=maps,
    )


def relevance_keys(scores: Sequence[FindingScore], top_k: int) -> list[str]:
    """Keys that get maps: present findings, then the ``top_k`` most probable; most probable first."""
    ranked = sorted(scores, key=lambda score: score.probability, reverse=True)
    chosen = {score.finding.key for score in ranked if score.present}
    chosen.update(score.finding.key for score in ranked[:top_k])
    return [score.finding.key for score in ranked if score.finding.key in chosen]


def _checked_probabilities(scores: ImageScores, n_images: int, label_set: LabelSet) -> np.ndarray:
    probabilities = np.asarray(scores.probabilities, dtype=np.float32)
    expected = (n_images, len(label_set.findings))
    if probabilities.shape != expected:
        raise ValueError(
            f"scorer returned probabilities of shape {probabilities.shape}, expected {expected} "
            f"({n_images} frames x {len(label_set.findings)} findings of {label_set.name!r})"
        )
    if not np.isfinite(probabilities).all():
        raise ValueError("scorer returned NaN or infinite probabilities")
    low, high = float(probabilities.min()), float(probabilities.max())
    if low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
        raise ValueError(f"scorer returned probabilities in [{low:g}, {high:g}], outside [0, 1]")
    return np.clip(probabilities, 0.0, 1.0)


def _checked_embeddings(scores: ImageScores, n_images: int) -> np.ndarray:
    embeddings = np.asarray(scores.embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[0] != n_images:
        raise ValueError(
            f"scorer returned embeddings of shape {embeddings.shape}, expected ({n_images}, dim)"
        )
    return embeddings


def _stack_maps(
    per_frame: Sequence[np.ndarray], keys: Sequence[str], images: Sequence[np.ndarray]
) -> dict[str, np.ndarray]:
    if len(per_frame) != len(images):
        raise ValueError(
            f"scorer returned relevance maps for {len(per_frame)} frames, expected {len(images)}"
        )
    for index, (frame_maps, image) in enumerate(zip(per_frame, images, strict=True)):
        expected = (len(keys), *image.shape[:2])
        if np.shape(frame_maps) != expected:
            raise ValueError(
                f"scorer returned relevance maps of shape {np.shape(frame_maps)} for frame {index}, "
                f"expected {expected} (one map per finding on the frame's pixels)"
            )
    if len(per_frame) == 1:
        # One frame (every radiograph): its (keys, r, c) array seen as (keys, 1, r, c), not copied.
        stacked = np.asarray(per_frame[0], dtype=np.float32)[:, np.newaxis]
    else:
        # (keys, frames, rows, columns)
        stacked = np.stack([np.asarray(m, dtype=np.float32) for m in per_frame], axis=1)
    # Two passes over full-resolution maps, not four: min and max are NaN or infinite exactly when
    # a value is, and values already in [0, 1] (every in-process map) need no clipping.
    low, high = float(stacked.min()), float(stacked.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError("scorer returned relevance maps with NaN or infinite values")
    if low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
        raise ValueError(f"scorer returned relevance maps in [{low:g}, {high:g}], outside [0, 1]")
    if low < 0.0 or high > 1.0:
        # A new array: the scorer's own (possibly a view of it, above) is left as it was.
        stacked = np.clip(stacked, 0.0, 1.0)
    return {key: stacked[index] for index, key in enumerate(keys)}
