"""MedSigLIP behind one dynamic-batching queue: Classify and Embed requests share the GPU batches.

:class:`ImageService` owns a loaded MedSigLIP runner (the same runner class the in-process
pipeline uses, so results are the same), a :class:`MicroBatcher` and the registry of label sets
the worker knows. Requests with the same label set and outputs are coalesced into one
``runner.score`` / ``runner.relevance_maps`` call; results are split back per request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from medgemma_deploy.domain import LabelSet
from medgemma_deploy.worker.engine.batcher import BatchedRequest, MicroBatcher
from medgemma_deploy.worker.engine.errors import BadRequestError
from medgemma_deploy.worker.engine.model_service import ModelService
from medgemma_deploy.worker.engine.queue_thread import QueueObserver

if TYPE_CHECKING:  # the runner module imports torch; the service only calls it
    from medgemma_deploy.operators.medsiglip.runner import MedSigLIPRunner

__all__ = [
    "ClassifyOutcome",
    "ClassifyWork",
    "EmbedWork",
    "ImageService",
    "ImageWork",
    "TextEmbedWork",
]

logger = logging.getLogger(__name__)

#: Distinct label sets a worker keeps (each keeps cached text embeddings in the runner).
MAX_LABEL_SETS = 256


@dataclass(frozen=True)
class ClassifyWork:
    """One Classify request after validation."""

    images: list[np.ndarray]
    label_set: LabelSet
    return_embeddings: bool = False
    relevance_keys: tuple[str, ...] = ()
    omit_probabilities: bool = False
    #: The images are at the model's input (padded and resized by the client); maps come back
    #: as patch grids in ``relevance_grids`` instead of full-size ``relevance_maps``.
    at_model_input: bool = False


@dataclass(frozen=True)
class EmbedWork:
    """One Embed request after validation."""

    images: list[np.ndarray]
    at_model_input: bool = False


@dataclass(frozen=True)
class TextEmbedWork:
    """One EmbedText request after validation: texts through the text tower (search queries)."""

    texts: list[str]


#: What :meth:`ImageService.submit` queues.
ImageWork = ClassifyWork | EmbedWork | TextEmbedWork


@dataclass
class ClassifyOutcome:
    probabilities: np.ndarray | None
    embeddings: np.ndarray | None
    relevance_maps: list[np.ndarray] = field(default_factory=list)
    relevance_grids: list[np.ndarray] = field(default_factory=list)


class ImageService(ModelService):
    """MedSigLIP with dynamic batching and a label-set registry.

    Parameters
    ----------
    runner:
        A loaded MedSigLIP runner; only the batcher thread calls it.
    label_sets:
        Label sets clients may name (``--labels`` files or the packaged ones).
    max_batch_size, max_queue_delay, max_queued_images:
        See :class:`~medgemma_deploy.worker.engine.batcher.MicroBatcher`.
    """

    runner: MedSigLIPRunner

    def __init__(
        self,
        runner: MedSigLIPRunner,
        *,
        label_sets: Sequence[LabelSet] = (),
        max_batch_size: int = 32,
        max_queue_delay: float = 0.005,
        max_queued_images: int = 1024,
        observer: QueueObserver | None = None,
    ) -> None:
        self.batcher = MicroBatcher(
            "medsiglip",
            self._run_group,
            max_batch_size=max_batch_size,
            max_queue_delay=max_queue_delay,
            max_queued=max_queued_images,
            observer=observer,
        )
        super().__init__(runner, self.batcher)
        self._label_sets: dict[tuple[str, str], LabelSet] = {}
        self._lock = threading.Lock()
        for label_set in label_sets:
            self.register_label_set(label_set)

    @property
    def preprocessor(self) -> Any:
        """The runner's ``MedSigLIPPreprocessor`` (None for a runner without one, e.g. a test stub)."""
        return getattr(self.runner, "preprocessor", None)

    @property
    def label_sets(self) -> list[LabelSet]:
        with self._lock:
            return list(self._label_sets.values())

    def warm_up(self) -> None:
        """One small image through the runner, so the first client does not pay for lazy setup."""
        started = time.monotonic()
        image = np.linspace(0.0, 1.0, 64 * 48, dtype=np.float32).reshape(64, 48)
        self.runner.embed_images([image, np.stack([image] * 3, axis=-1)])
        logger.info("MedSigLIP warm-up took %.2f s", time.monotonic() - started)

    def register_label_set(self, label_set: LabelSet) -> LabelSet:
        """Know ``label_set`` by (name, version); return the registered one.

        Raises
        ------
        BadRequestError
            A different definition is registered under the same name and version (the runner's
            text-embedding cache is keyed by them), or the registry is full.
        """
        key = (label_set.name, label_set.version)
        with self._lock:
            known = self._label_sets.get(key)
            if known is not None:
                if known != label_set:
                    raise BadRequestError(
                        "label_set",
                        f"{label_set.name} version {label_set.version} is already registered with a "
                        "different definition; give the changed label set a new version",
                    )
                return known
            if len(self._label_sets) >= MAX_LABEL_SETS:
                raise BadRequestError("label_set", f"the worker already holds {MAX_LABEL_SETS} label sets")
            self._label_sets[key] = label_set
            return label_set

    def find_label_set(self, reference: str) -> LabelSet:
        """A registered label set by ``name`` (newest version wins) or ``name@version``.

        Raises
        ------
        BadRequestError
            No such label set (the message lists the known ones).
        """
        name, _, version = reference.partition("@")
        with self._lock:
            matches = [
                ls for (n, v), ls in self._label_sets.items() if n == name and (not version or v == version)
            ]
            known = sorted(f"{n}@{v}" for n, v in self._label_sets)
        if not matches:
            raise BadRequestError(
                "label_set_name",
                f"{reference!r} is not known to this worker; known: {', '.join(known) or 'none'}",
            )
        return sorted(matches, key=lambda ls: _version_key(ls.version))[-1]

    def submit(
        self,
        work: ImageWork,
        *,
        deadline: float | None = None,
        is_cancelled: Callable[[], bool] = lambda: False,
    ) -> BatchedRequest:
        """Queue a Classify, Embed or EmbedText request.

        Its future resolves to a :class:`ClassifyOutcome` (Classify) or an ``(n, dim)`` float array
        (Embed, EmbedText). Texts go through the batcher like images: only its thread calls the
        runner.
        """
        cost = len(work.texts) if isinstance(work, TextEmbedWork) else len(work.images)
        return self.batcher.submit(
            work, cost=cost, group_key=_group_key(work), deadline=deadline, is_cancelled=is_cancelled
        )

    def _run_group(self, requests: Sequence[BatchedRequest]) -> list[Any]:
        first = requests[0].payload
        if isinstance(first, TextEmbedWork):
            texts = [text for request in requests for text in request.payload.texts]
            bounds = np.cumsum([0, *(len(request.payload.texts) for request in requests)])
            embeddings = np.asarray(self.runner.embed_texts(texts))
            return [embeddings[bounds[i] : bounds[i + 1]] for i in range(len(requests))]
        counts = [len(_images_of(request.payload)) for request in requests]
        images = [image for request in requests for image in _images_of(request.payload)]
        bounds = np.cumsum([0, *counts])
        first = requests[0].payload
        if isinstance(first, EmbedWork):
            embeddings = np.asarray(self.runner.embed_images(images, at_model_input=first.at_model_input))
            return [embeddings[bounds[i] : bounds[i + 1]] for i in range(len(requests))]
        work: ClassifyWork = first
        needs_scores = not work.omit_probabilities or any(r.payload.return_embeddings for r in requests)
        scores = (
            self.runner.score(images, work.label_set, at_model_input=work.at_model_input)
            if needs_scores
            else None
        )
        maps: list[np.ndarray] = []
        grids: list[np.ndarray] = []
        keys = list(work.relevance_keys)
        if keys and work.at_model_input:
            grids = list(self.runner.relevance_grids(images, work.label_set, keys, at_model_input=True))
        elif keys:
            maps = list(self.runner.relevance_maps(images, work.label_set, keys))
        outcomes = []
        for index, request in enumerate(requests):
            start, stop = int(bounds[index]), int(bounds[index + 1])
            wants_embeddings = request.payload.return_embeddings
            outcomes.append(
                ClassifyOutcome(
                    probabilities=None
                    if scores is None or work.omit_probabilities
                    else np.asarray(scores.probabilities)[start:stop],
                    embeddings=np.asarray(scores.embeddings)[start:stop]
                    if scores is not None and wants_embeddings
                    else None,
                    relevance_maps=maps[start:stop],
                    relevance_grids=grids[start:stop],
                )
            )
        return outcomes


def _group_key(work: ImageWork) -> Hashable:
    """Requests with equal keys run as one model call: the same kind, label set and outputs."""
    if isinstance(work, TextEmbedWork):
        return ("embed-text",)
    if isinstance(work, EmbedWork):
        return ("embed", work.at_model_input)
    return (
        "classify",
        work.label_set.name,
        work.label_set.version,
        work.relevance_keys,
        work.omit_probabilities,
        work.at_model_input,
    )


def _images_of(payload: ClassifyWork | EmbedWork) -> list[np.ndarray]:
    return payload.images


def _version_key(version: str) -> tuple:
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in version.replace("-", ".").split(".")
    )
