"""The gRPC client of the shared GPU worker: MedSigLIP and MedGemma as if they were local runners.

:class:`RemoteMedSigLIP` implements the ``ImageScorer`` protocol (``score``, ``relevance_maps``)
plus ``embed_images``; :class:`RemoteMedGemma` implements the ``ReportModel`` protocol as
``InprocMedGemma`` does (the same decode core, in the worker), ``on_token`` streaming included.
Both have the runners' ``load``/``close``/``identity``, so the pipeline cannot tell them from
in-process models, and both share one :class:`WorkerClient`:

The transport (:mod:`medgemma_deploy.backends.grpc_client`):

* ``grpc://HOST:PORT`` is plaintext; ``grpcs://HOST:PORT`` is TLS with :class:`ClientTLS`
  (mutual TLS when a client certificate is given);
* UNAVAILABLE (worker starting, draining, restarting, unreachable) is retried with exponential
  backoff and jitter; RESOURCE_EXHAUSTED with gRPC's ``grpc-retry-pushback-ms`` trailer (queue
  full) is retried after the pushback; a report stream is retried only before its first event;
* requests are split to fit the worker's message-size and image-count limits (from ModelInfo);
* statuses become the exceptions a local runner raises: a bad request is a ``ValueError``
  (:class:`WorkerRequestError`; for reports an ``InputError``, as ``InprocMedGemma`` raises),
  anything else a ``RuntimeError`` (:class:`WorkerError`).

What travels (sizes: protos/README.md): when the worker publishes its model's input size, images go
at that size, padded and resized here by the model's own recipe
(``MedSigLIPPreprocessor.to_model_input``, the code the in-process runner runs), as float32;
relevance maps come back on the patch grid and
:func:`~medgemma_deploy.operators.medsiglip.relevance.grid_to_source` puts them on the source
pixels, as in process. So a 4,280 x 3,520 DX costs 0.8 MB each way instead of 60 MB, and results
equal the local ones. An older worker gets full-size display images.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import ClassVar, TypeVar

import grpc
import numpy as np

from medgemma_deploy._proto import worker_pb2 as pb
from medgemma_deploy.backends import chat_wire, wire
from medgemma_deploy.backends.grpc_client import (
    WorkerClient,
    WorkerError,
    WorkerRequestError,
)
from medgemma_deploy.domain import (
    ImageScores,
    LabelSet,
    ModelIdentity,
    ModelLifecycle,
    ReportRequest,
    ReportResult,
)
from medgemma_deploy.errors import InputError
from medgemma_deploy.operators.medsiglip.preprocess import MedSigLIPPreprocessor
from medgemma_deploy.operators.medsiglip.relevance import grid_to_source
from medgemma_deploy.worker.engine.events import STREAM_MISMATCH_WARNING

__all__ = ["RemoteMedGemma", "RemoteMedSigLIP"]

logger = logging.getLogger(__name__)


_Remote = TypeVar("_Remote", bound="_RemoteModel")


class _RemoteModel(ModelLifecycle):
    """A model the worker serves: loading it is reading its description (ModelInfo), waiting while
    the worker loads; closing it closes the client the backend's models share."""

    #: The worker's name of the model (``ModelDescription.kind``) and the one logged.
    kind: ClassVar[str]
    model_name: ClassVar[str]

    def __init__(self, client: WorkerClient) -> None:
        self.client = client
        self._description: pb.ModelDescription | None = None

    def load(self: _Remote) -> _Remote:
        """Check that the worker serves this model (waiting while it loads)."""
        self._description = self.client.model(self.kind)
        logger.info(
            "%s %s (%s) on worker %s",
            self.model_name,
            self.identity.name,
            self.identity.version,
            self.client.target,
        )
        return self

    def close(self) -> None:
        self.client.close()

    @property
    def identity(self) -> ModelIdentity:
        return wire.identity_from_proto(self._loaded().model)

    def _loaded(self) -> pb.ModelDescription:
        if self._description is None:
            self.load()
        assert self._description is not None
        return self._description


class RemoteMedSigLIP(_RemoteModel):
    """MedSigLIP on a worker, with ``MedSigLIPRunner``'s interface (``ImageScorer`` and more)."""

    kind = "medsiglip"
    model_name = "MedSigLIP"

    def __init__(self, client: WorkerClient) -> None:
        super().__init__(client)
        self._resize: MedSigLIPPreprocessor | None = None

    def load(self) -> RemoteMedSigLIP:
        """Check that the worker serves MedSigLIP (waiting while it loads); where it publishes its
        model's input size, images are sent at that size."""
        super().load()
        description = self._loaded()
        if description.input_rows and description.input_columns and description.patch_grid:
            self._resize = MedSigLIPPreprocessor.from_resize(
                (description.input_rows, description.input_columns),
                description.resample,
                description.antialias,
            )
        return self

    @property
    def embedding_dim(self) -> int:
        return int(self._loaded().embedding_dim)

    def score(self, images: Sequence[np.ndarray], label_set: LabelSet) -> ImageScores:
        """Probabilities and embeddings, as ``MedSigLIPRunner.score``."""
        probabilities, embeddings = [], []
        for response in self._classify(images, label_set, return_embeddings=True):
            probabilities.append(wire.array_from_proto(response.probabilities, "probabilities"))
            embeddings.append(wire.array_from_proto(response.embeddings, "embeddings"))
        if not probabilities:
            return ImageScores(
                np.zeros((0, len(label_set.findings)), np.float32),
                np.zeros((0, self.embedding_dim), np.float32),
            )
        return ImageScores(np.concatenate(probabilities), np.concatenate(embeddings))

    def relevance_maps(
        self, images: Sequence[np.ndarray], label_set: LabelSet, finding_keys: Sequence[str]
    ) -> list[np.ndarray]:
        """Per image ``(len(finding_keys), rows, columns)`` maps, as ``MedSigLIPRunner.relevance_maps``."""
        if not finding_keys:
            return [np.zeros((0, *np.shape(image)[:2]), np.float32) for image in images]
        maps: list[np.ndarray] = []
        for response in self._classify(images, label_set, keys=finding_keys):
            maps.extend(wire.array_from_proto(m, "relevance_maps") for m in response.relevance_maps)
            maps.extend(wire.array_from_proto(g, "relevance_grids") for g in response.relevance_grids)
        if self._resize is None:
            return maps
        return [grid_to_source(grid, *np.shape(image)[:2]) for image, grid in zip(images, maps, strict=True)]

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        self._loaded()
        arrays = self._wire_images(images)
        rows = []
        for run in self.client.chunks([len(w.data) for w in arrays]):
            request = pb.EmbedRequest(images=arrays[run], images_at_model_input=self._resize is not None)
            response = self.client.call("Embed", request)
            rows.append(wire.array_from_proto(response.embeddings, "embeddings"))
        return np.concatenate(rows) if rows else np.zeros((0, self.embedding_dim), np.float32)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Text embeddings from the worker's text tower (archive search queries)."""
        self._loaded()
        rows = []
        for start in range(0, len(texts), wire.MAX_TEXTS_PER_REQUEST):
            request = pb.EmbedTextRequest(texts=list(texts[start : start + wire.MAX_TEXTS_PER_REQUEST]))
            response = self.client.call("EmbedText", request)
            rows.append(wire.array_from_proto(response.embeddings, "embeddings"))
        return np.concatenate(rows) if rows else np.zeros((0, self.embedding_dim), np.float32)

    def _wire_images(self, images: Sequence[np.ndarray]) -> list[pb.Array]:
        """Images as sent: at the model's input when the worker publishes it, else as they are."""
        if self._resize is None:
            return [wire.image_to_proto(image, self.client.image_dtype) for image in images]
        resized = (self._resize.to_model_input(image, index=index)[0] for index, image in enumerate(images))
        return [wire.image_to_proto(image, self.client.image_dtype) for image in resized]

    def _classify(
        self,
        images: Sequence[np.ndarray],
        label_set: LabelSet,
        *,
        return_embeddings: bool = False,
        keys: Sequence[str] = (),
    ) -> Iterator[pb.ClassifyResponse]:
        self._loaded()
        arrays = self._wire_images(images)
        definition = wire.label_set_to_proto(label_set)
        # A request must fit, and so must its answer: full-size maps are float32 per pixel and key,
        # grids (images at the model input) are float32 per patch and key.
        grid = self._loaded().patch_grid
        answer_pixels = [
            grid * grid if self._resize is not None else int(np.prod(np.shape(i)[:2])) for i in images
        ]
        sizes = [
            max(len(w.data), pixels * 4 * len(keys)) for w, pixels in zip(arrays, answer_pixels, strict=True)
        ]
        for run in self.client.chunks(sizes):
            request = pb.ClassifyRequest(
                images=arrays[run],
                label_set=definition,
                return_embeddings=return_embeddings,
                relevance_finding_keys=list(keys),
                omit_probabilities=bool(keys) and not return_embeddings,
                images_at_model_input=self._resize is not None,
            )
            yield self.client.call("Classify", request)


class RemoteMedGemma(_RemoteModel):
    """MedGemma on a worker: the ``ReportModel`` protocol, with ``InprocMedGemma``'s results."""

    kind = "medgemma"
    model_name = "MedGemma"

    def generate(
        self, request: ReportRequest, *, on_token: Callable[[str], None] | None = None
    ) -> ReportResult:
        """Draft the report on the worker; ``on_token`` gets text pieces as they stream in.

        Raises
        ------
        InputError
            The worker refused the request (e.g. the prompt is longer than the model's context).
        WorkerError
            The worker failed, or stayed unavailable through every retry.
        """
        if not isinstance(request, ReportRequest):
            raise TypeError(f"request must be a ReportRequest, got {type(request).__name__}")
        self.identity  # noqa: B018  # checks the worker serves MedGemma
        message = pb.GenerateReportRequest(
            messages=chat_wire.chat_to_proto(request.messages),
            settings=chat_wire.settings_to_proto(request.settings),
            prompt_id=request.prompt_id,
            request_id=request.source,
        )
        try:
            # Prompt images are the 8-bit renderings the local processor gets: a 4,280 x 3,520 DX is
            # 45 MB, under the default 64 MiB; a bigger prompt is refused here in one line.
            self.client.check_fits(message.ByteSize(), "the report prompt (its images)")
            for event in self.client.stream_report(message):
                kind = event.WhichOneof("event")
                if kind == "delta" and event.delta.text and on_token is not None:
                    on_token(event.delta.text)
                elif kind == "final":
                    return self._result(request, event.final, streamed=on_token is not None)
        except WorkerRequestError as error:
            raise InputError(request.source, error.details) from error
        raise WorkerError(
            grpc.StatusCode.INTERNAL, "the report stream ended without a final event", self.client.target
        )

    def _result(self, request: ReportRequest, final: pb.ReportFinal, streamed: bool) -> ReportResult:
        warnings = [*request.warnings, *final.warnings]
        if not streamed:
            # The worker always streams; a report warns about its stream only when there is one.
            warnings = [w for w in warnings if w != STREAM_MISMATCH_WARNING]
        return ReportResult(
            text=final.text,
            token_ids=list(final.token_ids),
            n_prompt_tokens=final.n_prompt_tokens,
            n_generated_tokens=final.n_generated_tokens,
            finish_reason="stop" if final.finish_reason == "stop" else "length",
            seconds=final.seconds,
            tokens_per_second=final.tokens_per_second,
            settings=request.settings,
            prompt_id=request.prompt_id,
            prompt_version=request.prompt_version,
            preprocess_seconds=0.0,
            warnings=warnings,
            engine_parameters=tuple(
                (parameter.name, parameter.value) for parameter in final.engine_parameters
            ),
        )
