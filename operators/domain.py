"""Typed domain objects passed between the cores: studies in, findings out.

Every core (DICOM input, MedSigLIP, SR and SEG writers, MedGemma) speaks these types, so the MONAI
Deploy operators, the CLI and the gRPC worker only move them around.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydicom.dataset import Dataset

__all__ = [
    "AlgorithmInfo",
    "Code",
    "FindingDefinition",
    "FindingScore",
    "ImageFrame",
    "LabelSet",
    "ModelIdentity",
    "Rejection",
    "Series",
    "SeriesClassification",
    "Study",
    "StudyInput",
    "TriagePriority",
    "TriageRule",
]


@dataclass(frozen=True)
class Rejection:
    """An input that was not used, and why (one line, no patient values).

    ``stage`` says where it was stopped: ``read`` (not DICOM, truncated, unparseable),
    ``sop-class`` (not an image: SR, PR, KO…, or an unsupported class), ``header`` (invalid UIDs or
    geometry), ``pixels`` (missing/undecodable/absurd pixel data, beyond the memory budget),
    ``series`` (inconsistent series), or a later stage (``classify``, ``seg``, ``sr``, ``report``).
    """

    source: str
    reason: str
    stage: str
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    #: Every file the rejection covers when it is about more than one (a series failing at a
    #: later stage); ``source`` is then the first of them.
    files: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if v is not None and k != "files"}
        if self.files:
            data["files"] = list(self.files)
        return data


@dataclass
class ImageFrame:
    """One 2-D image as the models see it: a single frame of one DICOM instance.

    Attributes
    ----------
    path:
        The file the instance came from.
    dataset:
        The source instance (pixel data included); derived objects reference it.
    frame_number:
        1-based frame number within the instance (always 1 for single-frame images).
    values:
        float32 pixel values after the Modality LUT (CT: Hounsfield units), shape (rows, columns)
        or (rows, columns, 3) for RGB.
    display:
        float32 in [0, 1] after the VOI LUT / window (MONOCHROME1 already inverted so that higher
        is brighter), same shape as ``values``. This is what the image models get.
    window_source:
        How ``display`` was derived, e.g. ``"instance VOI LUT"``, ``"instance window 40/400"``,
        ``"CT default soft tissue 40/400"``, ``"min-max"``, ``"RGB"``; recorded in results.
    """

    path: Path
    dataset: Dataset
    frame_number: int
    values: np.ndarray
    display: np.ndarray
    window_source: str

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)

    @property
    def is_rgb(self) -> bool:
        return self.display.ndim == 3


@dataclass
class Series:
    """The usable frames of one series, in acquisition/slice order."""

    study_instance_uid: str
    series_instance_uid: str
    modality: str
    body_part_examined: str | None
    frames: list[ImageFrame]

    @property
    def datasets(self) -> list[Dataset]:
        """The distinct source instances, in frame order."""
        seen: dict[str, Dataset] = {}
        for frame in self.frames:
            seen.setdefault(frame.sop_instance_uid, frame.dataset)
        return list(seen.values())


@dataclass
class Study:
    study_instance_uid: str
    series: list[Series]


@dataclass
class StudyInput:
    """Everything read from an input path: usable studies, rejected files, skipped objects."""

    studies: list[Study]
    rejected: list[Rejection] = field(default_factory=list)
    skipped: list[Rejection] = field(default_factory=list)


@dataclass(frozen=True)
class Code:
    """A coded concept as plain data (converted to highdicom ``CodedConcept`` by the writers)."""

    value: str
    scheme_designator: str
    meaning: str
    scheme_version: str | None = None


@dataclass(frozen=True)
class FindingDefinition:
    """One finding of a label set: its code and its prompt ensembles."""

    key: str
    display_name: str
    code: Code
    positive_prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]


class TriagePriority(IntEnum):
    """How soon a study should be read, ordered so that ``max()`` is the most urgent.

    The HL7 v2 code of each level is the one of HL7 Table 0485 (Extended Priority Codes) that
    TQ1-9 and OBR-5 carry: ``S`` stat, ``A`` as soon as possible, ``R`` routine.
    """

    ROUTINE = 0
    URGENT = 1
    STAT = 2

    @property
    def hl7_code(self) -> str:
        return {TriagePriority.ROUTINE: "R", TriagePriority.URGENT: "A", TriagePriority.STAT: "S"}[self]

    @property
    def hl7_text(self) -> str:
        return {
            TriagePriority.ROUTINE: "Routine",
            TriagePriority.URGENT: "ASAP",
            TriagePriority.STAT: "Stat",
        }[self]


@dataclass(frozen=True)
class TriageRule:
    """A site's rule: a finding at or above ``threshold`` raises the study to ``priority``."""

    finding_key: str
    threshold: float
    priority: TriagePriority


@dataclass(frozen=True)
class LabelSet:
    """A zero-shot label set for one modality/body part, read from YAML.

    ``triage_rules`` are optional and uncalibrated by default: thresholds are a site decision.
    """

    name: str
    version: str
    modalities: tuple[str, ...]
    body_parts: tuple[str, ...]
    scoring: Literal["softmax", "sigmoid"]
    threshold: float
    findings: tuple[FindingDefinition, ...]
    # Not part of equality: triage acts on the probabilities and never changes one, so a worker
    # that knows a set without (or with other) rules scores it the same (README "Triage rules").
    triage_rules: tuple[TriageRule, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class ModelIdentity:
    """What model produced a result: name, version (revision) and where it was loaded from."""

    name: str
    version: str
    path: Path
    random_weights: bool = False


@dataclass(frozen=True)
class AlgorithmInfo:
    """TID 4019 Algorithm Identification: the model and the software that ran it."""

    name: str
    version: str
    parameters: tuple[tuple[str, str], ...] = ()
    software: str = "medgemma-deploy"
    software_version: str = "0.1.0"


@dataclass
class FindingScore:
    """A finding's probability for a series (max over frames) and where it peaked."""

    finding: FindingDefinition
    probability: float
    present: bool
    frame_probabilities: list[float]
    peak_frame_index: int


@dataclass
class SeriesClassification:
    """MedSigLIP's result for one series.

    ``relevance_maps`` maps a finding key to float32 maps in [0, 1] with shape
    (n_frames, rows, columns) in the source image geometry (one map per frame of the series).
    ``embeddings`` is (n_frames, embedding_dim) float32 (1152-d for MedSigLIP-448).
    """

    series: Series
    label_set: LabelSet
    model: ModelIdentity
    scores: list[FindingScore]
    embeddings: np.ndarray | None = None
    relevance_maps: dict[str, np.ndarray] = field(default_factory=dict)
