"""What the search index holds and returns: one row per indexed frame, filters, hits.

A row carries the frame's MedSigLIP image embedding, the model that made it, the DICOM UIDs that
locate the frame in the PACS (Study/Series/SOP Instance UID and frame number, enough for a WADO-RS
``.../studies/{study}/series/{series}/instances/{sop}/frames/{frame}`` link), the attributes the
filters need (modality, body part, study date) and the frame's findings probabilities. It never
holds a patient name, patient ID or accession number: the UIDs link back to the PACS, which keeps
those behind its own access control.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "HIT_COLUMNS",
    "RECORD_COLUMNS",
    "FindingFilter",
    "IndexRecord",
    "SearchFilters",
    "SearchHit",
    "SearchQuery",
    "parse_finding_filter",
]

_DATE = re.compile(r"^\d{8}$")
_FINDING_FILTER = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9]*\.?[0-9]+)\s*$")


#: The columns of a stored record, in :meth:`IndexRecord.row_values` order (both stores).
RECORD_COLUMNS = (
    "model_name", "model_version", "study_instance_uid", "series_instance_uid", "sop_instance_uid",
    "frame_number", "modality", "body_part", "study_date", "findings", "embedding", "thumbnail",
    "overlay", "overlay_finding",
)  # fmt: skip

#: The columns a :class:`SearchHit` is read from, in :meth:`SearchHit.from_row` order.
HIT_COLUMNS = (
    "row_id", "study_instance_uid", "series_instance_uid", "sop_instance_uid", "frame_number", "modality",
    "body_part", "study_date", "findings", "overlay IS NOT NULL", "overlay_finding",
)  # fmt: skip


@dataclass(frozen=True)
class IndexRecord:
    """One indexed frame (see the module docstring for what is, and is not, stored).

    Attributes
    ----------
    embedding:
        float32 ``(dim,)``, L2-normalised (MedSigLIP's pooled image embedding).
    study_date:
        DICOM DA ``YYYYMMDD`` or None when the instance has none.
    findings:
        Finding key → this frame's probability, from the label set the series was classified with.
    thumbnail, overlay:
        Small PNGs for the results page: the frame as the model saw it, and the same frame with the
        relevance map of ``overlay_finding`` blended over it (None when the series had no map).
    """

    embedding: np.ndarray
    model_name: str
    model_version: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    frame_number: int
    modality: str
    body_part: str | None = None
    study_date: str | None = None
    findings: dict[str, float] = field(default_factory=dict)
    thumbnail: bytes | None = None
    overlay: bytes | None = None
    overlay_finding: str | None = None

    def row_values(self, encode_embedding: Callable[[np.ndarray], Any]) -> tuple[Any, ...]:
        """The record as a store row, in :data:`RECORD_COLUMNS` order; each store encodes the vector
        its own way (sqlite-vec: float32 bytes; pgvector: a vector literal)."""
        return (
            self.model_name,
            self.model_version,
            self.study_instance_uid,
            self.series_instance_uid,
            self.sop_instance_uid,
            self.frame_number,
            self.modality,
            self.body_part,
            self.study_date,
            json.dumps(self.findings, sort_keys=True),
            encode_embedding(self.embedding),
            self.thumbnail,
            self.overlay,
            self.overlay_finding,
        )

    def __post_init__(self) -> None:
        embedding = np.asarray(self.embedding, dtype=np.float32)
        if embedding.ndim != 1 or embedding.size == 0:
            raise ValueError(
                f"embedding of {self.sop_instance_uid} must be a non-empty vector, got {embedding.shape}"
            )
        if not np.all(np.isfinite(embedding)):
            raise ValueError(f"embedding of {self.sop_instance_uid} holds NaN or infinite values")
        object.__setattr__(self, "embedding", embedding)
        if self.frame_number < 1:
            raise ValueError(
                f"frame_number of {self.sop_instance_uid} must be 1 or more, got {self.frame_number}"
            )
        if self.study_date is not None and not _DATE.match(self.study_date):
            raise ValueError(
                f"study_date of {self.sop_instance_uid} must be YYYYMMDD, got {self.study_date!r}"
            )


@dataclass(frozen=True)
class FindingFilter:
    """Keep frames whose probability of ``key`` is at least ``minimum``."""

    key: str
    minimum: float


def parse_finding_filter(text: str) -> FindingFilter:
    """``"pneumothorax>=0.5"`` → :class:`FindingFilter`; ValueError names the expected form."""
    match = _FINDING_FILTER.match(text)
    if match is None:
        raise ValueError(f"finding filter {text!r} must look like KEY>=PROBABILITY, e.g. pneumothorax>=0.5")
    minimum = float(match.group(2))
    if not 0.0 <= minimum <= 1.0:
        raise ValueError(f"finding filter {text!r}: the probability must be in [0, 1]")
    return FindingFilter(match.group(1), minimum)


@dataclass(frozen=True)
class SearchFilters:
    """Restrictions applied before ranking. ``date_from``/``date_to`` are inclusive ``YYYYMMDD``."""

    modality: str | None = None
    body_part: str | None = None
    date_from: str | None = None
    date_to: str | None = None
    findings: tuple[FindingFilter, ...] = ()

    def __post_init__(self) -> None:
        for name in ("date_from", "date_to"):
            value = getattr(self, name)
            if value is not None and not _DATE.match(value):
                raise ValueError(f"{name} must be a DICOM date YYYYMMDD, got {value!r}")


@dataclass(frozen=True)
class SearchQuery:
    """One search: the ``top`` rows of one model, filtered, most similar to ``vector`` (cosine)."""

    vector: np.ndarray
    model_name: str
    model_version: str
    filters: SearchFilters = field(default_factory=SearchFilters)
    top: int = 20

    def __post_init__(self) -> None:
        object.__setattr__(self, "vector", np.asarray(self.vector, dtype=np.float32))
        object.__setattr__(self, "top", int(self.top))


@dataclass(frozen=True)
class SearchHit:
    """One result: where the frame is, how similar it is (cosine similarity in [-1, 1])."""

    row_id: int
    score: float
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    frame_number: int
    modality: str
    body_part: str | None
    study_date: str | None
    findings: dict[str, float]
    has_overlay: bool
    overlay_finding: str | None

    @classmethod
    def from_row(cls, score: float, row: Sequence[Any]) -> SearchHit:
        """A hit from a row of :data:`HIT_COLUMNS` (findings as JSON text or an already parsed mapping)."""
        findings = row[8] if isinstance(row[8], Mapping) else json.loads(row[8])
        return cls(
            row_id=int(row[0]),
            score=score,
            study_instance_uid=row[1],
            series_instance_uid=row[2],
            sop_instance_uid=row[3],
            frame_number=int(row[4]),
            modality=row[5],
            body_part=row[6],
            study_date=row[7],
            findings={key: float(value) for key, value in findings.items()},
            has_overlay=bool(row[9]),
            overlay_finding=row[10],
        )

    @classmethod
    def from_distance_row(cls, row: Sequence[Any]) -> SearchHit:
        """A hit from a row of cosine distance followed by :data:`HIT_COLUMNS` (a nearest-rows query)."""
        return cls.from_row(1.0 - float(row[0]), row[1:])

    def to_json(self) -> dict[str, Any]:
        return {
            "row_id": self.row_id,
            "score": round(self.score, 6),
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "sop_instance_uid": self.sop_instance_uid,
            "frame_number": self.frame_number,
            "modality": self.modality,
            "body_part": self.body_part,
            "study_date": self.study_date,
            "findings": {key: round(value, 6) for key, value in self.findings.items()},
            "overlay_finding": self.overlay_finding if self.has_overlay else None,
        }
