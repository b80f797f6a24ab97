"""Classified series → index rows, and the hook that indexes what a pipeline run classified.

A study is indexed only when every one of its series was classified: a half-indexed study would
make "no similar prior in this study" look like a finding. When a series fails, none of the study's
frames go in, and each of its series entries in ``results.json`` says why under ``index``.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence

import numpy as np
from PIL import Image

from medgemma_deploy.domain import SeriesClassification
from medgemma_deploy.results import RunResults
from medgemma_deploy.search.records import IndexRecord
from medgemma_deploy.search.store import VectorStore, redact_url

__all__ = ["THUMBNAIL_SIZE", "SearchIndexer", "overlay_png", "records_from_classification", "thumbnail_png"]

logger = logging.getLogger(__name__)

#: Longest side of the stored thumbnails, in pixels: enough to recognise a view, small in the index.
THUMBNAIL_SIZE = 128


def thumbnail_png(display: np.ndarray, size: int = THUMBNAIL_SIZE) -> bytes:
    """A frame's display image (float in [0, 1], grey or RGB) as an 8-bit PNG of at most ``size`` px."""
    image = _to_image(display)
    image.thumbnail((size, size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def overlay_png(display: np.ndarray, relevance: np.ndarray, size: int = THUMBNAIL_SIZE) -> bytes:
    """The thumbnail with a relevance map (float in [0, 1], same rows/columns) blended over it in red."""
    base = _to_image(display).convert("RGB")
    base.thumbnail((size, size), Image.Resampling.BILINEAR)
    heat = Image.fromarray(np.uint8(np.clip(relevance, 0.0, 1.0) * 255)).resize(
        base.size, Image.Resampling.BILINEAR
    )
    alpha = np.asarray(heat, np.float32)[..., None] / 255.0 * 0.6
    red = np.zeros((base.size[1], base.size[0], 3), np.float32)
    red[..., 0] = 255.0
    blended = np.asarray(base, np.float32) * (1.0 - alpha) + red * alpha
    buffer = io.BytesIO()
    Image.fromarray(np.uint8(np.clip(blended, 0, 255))).save(buffer, format="PNG")
    return buffer.getvalue()


def records_from_classification(
    classification: SeriesClassification, *, with_thumbnails: bool = True
) -> list[IndexRecord]:
    """One :class:`IndexRecord` per frame of a classified series (needs its embeddings).

    Raises
    ------
    ValueError
        The classification was made without embeddings, or with a different number of rows than
        frames.
    """
    series = classification.series
    embeddings = classification.embeddings
    if embeddings is None:
        raise ValueError(f"series {series.series_instance_uid} was classified without embeddings")
    if len(embeddings) != len(series.frames):
        raise ValueError(
            f"series {series.series_instance_uid}: {len(embeddings)} embeddings "
            f"for {len(series.frames)} frames"
        )
    records = []
    for index, frame in enumerate(series.frames):
        findings = {
            score.finding.key: float(score.frame_probabilities[index]) for score in classification.scores
        }
        overlay = overlay_finding = None
        if with_thumbnails and classification.relevance_maps:
            # The frame's most probable finding among those that have maps: what a reader asks about first.
            mapped = [key for key in classification.relevance_maps if key in findings]
            if mapped:
                overlay_finding = max(mapped, key=lambda key: findings[key])
                overlay = overlay_png(frame.display, classification.relevance_maps[overlay_finding][index])
        study_date = str(frame.dataset.get("StudyDate", "") or "").strip() or None
        records.append(
            IndexRecord(
                embedding=embeddings[index],
                model_name=classification.model.name,
                model_version=classification.model.version,
                study_instance_uid=series.study_instance_uid,
                series_instance_uid=series.series_instance_uid,
                sop_instance_uid=frame.sop_instance_uid,
                frame_number=frame.frame_number,
                modality=series.modality,
                body_part=series.body_part_examined or None,
                study_date=study_date if _is_da(study_date) else None,
                findings=findings,
                thumbnail=thumbnail_png(frame.display) if with_thumbnails else None,
                overlay=overlay,
                overlay_finding=overlay_finding if overlay is not None else None,
            )
        )
    return records


class SearchIndexer:
    """Indexes each run's classifications into ``store``; a pipeline engine calls it after classifying.

    Parameters
    ----------
    store:
        The open index (the caller closes it).
    with_thumbnails:
        Keep small PNG thumbnails (and relevance overlays) for the results page.
    """

    def __init__(self, store: VectorStore, *, with_thumbnails: bool = True) -> None:
        self.store = store
        self.with_thumbnails = with_thumbnails

    @classmethod
    def open(cls, store_url: str) -> SearchIndexer:
        """An indexer over the store at ``store_url`` (StoreError if it cannot be opened)."""
        from medgemma_deploy.search.store import open_store

        return cls(open_store(store_url))

    def close(self) -> None:
        self.store.close()

    def __call__(self, classifications: Sequence[SeriesClassification], results: RunResults) -> int:
        """Index every fully classified study; record the outcome per series in ``results``.

        Returns the number of rows written.
        """
        failed: dict[str, list[str]] = {}
        for rejection in results.rejected:
            if rejection.stage == "classify" and rejection.study_instance_uid:
                failed.setdefault(rejection.study_instance_uid, []).append(
                    rejection.series_instance_uid or rejection.source
                )
        store_name = redact_url(self.store.url)
        written = 0
        by_study: dict[str, list[SeriesClassification]] = {}
        for classification in classifications:
            by_study.setdefault(classification.series.study_instance_uid, []).append(classification)
        for study_uid, study_classifications in by_study.items():
            if study_uid in failed:
                reason = f"not indexed: classification failed for series {', '.join(failed[study_uid])}"
                logger.warning("study %s %s", study_uid, reason)
                for classification in study_classifications:
                    results.series_entry(classification.series)["index"] = {
                        "store": store_name,
                        "indexed": False,
                        "reason": reason,
                    }
                continue
            for classification in study_classifications:
                records = records_from_classification(classification, with_thumbnails=self.with_thumbnails)
                written += self.store.add(records)
                results.series_entry(classification.series)["index"] = {
                    "store": store_name,
                    "indexed": True,
                    "rows": len(records),
                }
        for study_uid in failed.keys() - by_study.keys():
            logger.warning("study %s not indexed: no series of it could be classified", study_uid)
        if written:
            logger.info("indexed %d frames into %s", written, store_name)
        return written


def _is_da(value: str | None) -> bool:
    """A usable DICOM DA value (YYYYMMDD); anything else is not filtered on."""
    return bool(value) and len(value) == 8 and value.isdigit()


def _to_image(display: np.ndarray) -> Image.Image:
    pixels = np.uint8(np.clip(np.nan_to_num(display), 0.0, 1.0) * 255 + 0.5)
    return Image.fromarray(pixels, mode="RGB" if pixels.ndim == 3 else "L")
