"""Typed domain objects passed between the cores: studies in, findings out.

Every core (DICOM input, MedSigLIP, SR and SEG writers, MedGemma) speaks these types, so the MONAI
Deploy operators, the CLI and the gRPC worker only move them around.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import numpy as np
from pydicom.dataset import Dataset

__all__ = [
    "AlgorithmInfo",
    "Code",
    "FindingDefinition",
    "FindingScore",
    "FinishReason",
    "GenerationSettings",
    "ImageFrame",
    "ImageModel",
    "ImageScores",
    "LabelSet",
    "ModelIdentity",
    "ModelLifecycle",
    "Rejection",
    "ReportModel",
    "ReportRequest",
    "ReportResult",
    "Series",
    "SeriesClassification",
    "Study",
    "StudyInput",
    "TriagePriority",
    "TriageRule",
    "is_int",
    "is_number",
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


# -- model outputs and the one protocol per model ------------------------------------------


@dataclass
class ImageScores:
    """Zero-shot scores of a batch of images against one label set, one row per image in order.

    Attributes
    ----------
    probabilities:
        ``(n_images, n_findings)`` float32 in [0, 1], columns in ``label_set.findings`` order.
    embeddings:
        ``(n_images, embedding_dim)`` float32, each row L2-normalised (MedSigLIP's image embedding).
    """

    probabilities: np.ndarray
    embeddings: np.ndarray


_SAMPLING_ONLY = ("temperature", "top_p", "top_k", "seed")


@dataclass(frozen=True)
class GenerationSettings:
    """How the report text is decoded; every field is recorded with the result and in the SR.

    Parameters
    ----------
    max_new_tokens:
        Most tokens to generate (a report cut there is flagged).
    do_sample:
        False (default): greedy decoding, deterministic. True: sample with the settings below.
    temperature, top_p, top_k:
        Sampling settings (only with ``do_sample``); None keeps the checkpoint's defaults.
    repetition_penalty:
        Applied in both modes when given (> 0; 1.0 means none).
    seed:
        Seed of a sampled generation, so that it can be reproduced (only with ``do_sample``).

    Raises
    ------
    ValueError
        A value is out of range, or a sampling setting is given with ``do_sample=False``.
    """

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be a bool, got {self.do_sample!r}")
        for name in ("temperature", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None and not (is_number(value) and value > 0):
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        if self.top_p is not None and not (is_number(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and not (is_int(self.top_k) and self.top_k >= 1):
            raise ValueError(f"top_k must be an int >= 1, got {self.top_k!r}")
        if self.seed is not None and not (is_int(self.seed) and self.seed >= 0):
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        ignored = [name for name in _SAMPLING_ONLY if getattr(self, name) is not None]
        if ignored and not self.do_sample:
            raise ValueError(f"{', '.join(ignored)} only apply with do_sample=True, not with greedy decoding")

    def as_parameters(self) -> tuple[tuple[str, str], ...]:
        """The settings as ``(key, value)`` strings, the set ones only (TID 4019 parameters)."""
        pairs = [
            ("decoding", "sampling" if self.do_sample else "greedy"),
            ("max_new_tokens", str(self.max_new_tokens)),
        ]
        for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
            value = getattr(self, name)
            if value is not None:
                pairs.append((name, str(value)))
        return tuple(pairs)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ReportRequest:
    """Everything MedGemma needs to draft one series' report.

    Attributes
    ----------
    source:
        What the request is about, for errors: the Series Instance UID.
    messages:
        Chat messages in the processor's format: a ``system`` turn, then one ``user`` turn whose
        ``content`` lists ``{"type": "text", "text": …}`` and ``{"type": "image", "image": PIL}``.
    prompt_id, prompt_version:
        The prompt-book family used (recorded in results and the SR).
    settings:
        How to decode.
    frames:
        The frames whose images are in ``messages``, in prompt order (the SR's evidence).
    modality:
        Modality of the series.
    findings_context:
        ``(finding, probability)`` pairs the instruction was grounded on; empty when not grounded.
    notes:
        What was done to build the prompt (slice sampling, rendering), for the results.
    warnings:
        What the caller should report (e.g. no dedicated prompt for the modality).
    """

    source: str
    messages: list[dict[str, Any]]
    prompt_id: str
    prompt_version: str
    settings: GenerationSettings
    frames: list[ImageFrame]
    modality: str
    findings_context: tuple[tuple[str, float], ...] = ()
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def for_chat(
        cls, messages: list[dict[str, Any]], settings: GenerationSettings, *, source: str, prompt_id: str = ""
    ) -> ReportRequest:
        """A request of chat messages alone, with no series behind them (a worker's GenerateReport,
        a warm-up, a benchmark prompt)."""
        return cls(
            source=source,
            messages=messages,
            prompt_id=prompt_id,
            prompt_version="",
            settings=settings,
            frames=[],
            modality="",
        )

    @property
    def findings_grounded(self) -> bool:
        """Whether the instruction carries automated screening findings."""
        return bool(self.findings_context)

    @property
    def n_images(self) -> int:
        return sum(
            1
            for message in self.messages
            if isinstance(message.get("content"), list)
            for item in message["content"]
            if item.get("type") == "image"
        )


#: Why a generation ended: a stop token (``"stop"``) or ``max_new_tokens`` (``"length"``).
FinishReason = Literal["stop", "length"]


@dataclass
class ReportResult:
    """MedGemma's output for one request, with what it cost and how it ended.

    ``text`` is the decoded generated text (special tokens dropped, otherwise as generated);
    ``token_ids`` are the generated ids, the stop token included when ``finish_reason`` is
    ``"stop"``. ``seconds`` times ``generate`` only (prefill + decode); ``preprocess_seconds``
    the chat template and image processing. ``engine_parameters`` name what ran the model (engine,
    precision, and for GGUF weights their SHA-256), which the SR records with the generation
    settings; ``first_token_seconds`` is prefill time where the engine measures it (else 0).
    """

    text: str
    token_ids: list[int]
    n_prompt_tokens: int
    n_generated_tokens: int
    finish_reason: FinishReason
    seconds: float
    tokens_per_second: float
    settings: GenerationSettings
    prompt_id: str
    prompt_version: str = ""
    preprocess_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    engine_parameters: tuple[tuple[str, str], ...] = ()
    first_token_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary (no token ids), for results.json."""
        return {
            "text": self.text,
            "n_prompt_tokens": self.n_prompt_tokens,
            "n_generated_tokens": self.n_generated_tokens,
            "finish_reason": self.finish_reason,
            "seconds": round(self.seconds, 3),
            "preprocess_seconds": round(self.preprocess_seconds, 3),
            "tokens_per_second": round(self.tokens_per_second, 2),
            "settings": self.settings.to_json(),
            "prompt_id": self.prompt_id,
            "prompt_version": self.prompt_version,
            "warnings": list(self.warnings),
        }


_Model = TypeVar("_Model", bound="ModelLifecycle")


class ModelLifecycle:
    """The ``with`` block of a model's lifecycle, load → run → close (Triton's initialize/finalize).

    Entering loads the model and gives it; leaving closes it, also when the block raised. The
    runners, the in-process MedGemma client and the worker's remote twins inherit it, and each
    defines :meth:`load` (returning itself) and :meth:`close`.
    """

    def load(self: _Model) -> _Model:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _Model) -> _Model:
        return self.load()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@runtime_checkable
class ImageModel(Protocol):
    """MedSigLIP as every caller sees it: the in-process runner or a worker over gRPC.

    The classify step needs :meth:`score` and :meth:`relevance_maps`; the engine also opens and
    closes the model, and the search index embeds images.
    """

    @property
    def identity(self) -> ModelIdentity:
        """Name, version and where the weights came from (recorded in every output)."""
        ...

    def load(self) -> Any: ...

    def close(self) -> None: ...

    def score(self, images: Sequence[np.ndarray], label_set: LabelSet) -> ImageScores:
        """Probabilities and embeddings of display images in [0, 1] (grey or RGB), in order."""
        ...

    def relevance_maps(
        self, images: Sequence[np.ndarray], label_set: LabelSet, finding_keys: Sequence[str]
    ) -> list[np.ndarray]:
        """Per image, ``(len(finding_keys), rows, columns)`` float32 maps in [0, 1] on its own pixels."""
        ...

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """``(n_images, embedding_dim)`` L2-normalised image embeddings, in order."""
        ...


@runtime_checkable
class ReportModel(Protocol):
    """MedGemma as every caller sees it: an in-process engine (transformers or llama.cpp) or a worker."""

    @property
    def identity(self) -> ModelIdentity:
        """Name, version and where the weights came from (recorded in every report)."""
        ...

    def load(self) -> Any: ...

    def close(self) -> None: ...

    def generate(
        self, request: ReportRequest, *, on_token: Callable[[str], None] | None = None
    ) -> ReportResult:
        """Draft one report; ``on_token`` receives each new piece of text as it is decoded."""
        ...


# -- value checks shared by the configuration files ------------------------------------------


def is_int(value: object) -> bool:
    """An ``int`` and not a ``bool`` (YAML and JSON ``true`` must not pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite ``int`` or ``float``, not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
