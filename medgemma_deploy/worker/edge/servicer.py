"""The gRPC servicer: protobuf ↔ core types, one exception → status table, nothing else.

All model work happens in :class:`~medgemma_deploy.worker.engine.image_service.ImageService` and
:class:`~medgemma_deploy.worker.engine.report_service.ReportService`; the worker lifecycle (loading,
draining) in :mod:`medgemma_deploy.worker.edge.server`. Each RPC here validates its fields (naming the
field in INVALID_ARGUMENT), queues the work with the call's deadline, frees the work when the
client goes away (``context.add_callback``), and converts the result.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from typing import Any, Protocol, TypeVar

import grpc
import jinja2
import numpy as np
import torch

from medgemma_deploy import __version__
from medgemma_deploy._proto import worker_pb2 as pb
from medgemma_deploy._proto import worker_pb2_grpc
from medgemma_deploy.backends import chat_wire, wire
from medgemma_deploy.domain import ModelIdentity, ReportRequest
from medgemma_deploy.errors import InputError
from medgemma_deploy.worker.edge.metrics import WorkerMetrics
from medgemma_deploy.worker.engine.batcher import BatchedRequest
from medgemma_deploy.worker.engine.errors import (
    BadRequestError,
    DeadlineExpiredError,
    ModelNotAvailableError,
    NotReadyError,
    QueueFullError,
    RequestCancelledError,
)
from medgemma_deploy.worker.engine.events import Admitted
from medgemma_deploy.worker.engine.image_service import (
    ClassifyWork,
    EmbedWork,
    ImageService,
    ImageWork,
    TextEmbedWork,
)
from medgemma_deploy.worker.engine.report_service import ReportDelta, ReportDone, ReportService

__all__ = [
    "API_VERSION",
    "MAX_LABEL_FINDINGS",
    "MAX_LABEL_TEXT_CHARS",
    "MAX_PROMPTS_PER_FINDING",
    "MAX_STATUS_MESSAGE_CHARS",
    "QUEUE_FULL_PUSHBACK_MS",
    "RETRY_PUSHBACK_KEY",
    "STATUS_TABLE",
    "WorkerCore",
    "WorkerServicer",
    "check_image_shape",
    "check_label_set_size",
    "check_texts",
    "status_for",
]

logger = logging.getLogger(__name__)

#: The proto package, reported by ModelInfo.
API_VERSION = pb.DESCRIPTOR.package

#: Exception class → gRPC status, first match wins (subclasses before their bases). A chat
#: template error is the request's (the messages do not fit the model's chat format).
STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (BadRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (InputError, grpc.StatusCode.INVALID_ARGUMENT),
    (jinja2.TemplateError, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (torch.cuda.OutOfMemoryError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotReadyError, grpc.StatusCode.UNAVAILABLE),
    (ModelNotAvailableError, grpc.StatusCode.FAILED_PRECONDITION),
    (DeadlineExpiredError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (RequestCancelledError, grpc.StatusCode.CANCELLED),
)

#: Trailing metadata of gRPC's retry policy: how long to wait before retrying (queue full).
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
QUEUE_FULL_PUSHBACK_MS = 250

#: A call that ends this close to its deadline ended because of it.
_DEADLINE_SLACK_S = 0.1

#: How often a waiting handler checks that its client is still there.
_POLL_S = 0.25


#: Embed's or EmbedText's response: the same three fields.
_EmbeddingsResponse = TypeVar("_EmbeddingsResponse", pb.EmbedResponse, pb.EmbedTextResponse)

#: Longest status message (and log line) an error gives: a message quoting a 10 MB field must not
#: become a 10 MB log line or trailer.
MAX_STATUS_MESSAGE_CHARS = 500

#: Most label-set text one Classify request may carry: findings, prompts per finding, characters
#: per prompt (SigLIP reads 64 tokens of a prompt; longer text is never used).
MAX_LABEL_FINDINGS = 256
MAX_PROMPTS_PER_FINDING = 64
MAX_LABEL_TEXT_CHARS = 2048


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and one-line message for an exception (INTERNAL when not in the table).

    The message is cut to :data:`MAX_STATUS_MESSAGE_CHARS`, saying how long it was.
    """
    for error_type, code in STATUS_TABLE:
        if isinstance(error, error_type):
            return code, _truncated(str(error))
    return grpc.StatusCode.INTERNAL, _truncated(f"{type(error).__name__}: {' '.join(str(error).split())}")


def _truncated(message: str) -> str:
    if len(message) <= MAX_STATUS_MESSAGE_CHARS:
        return message
    return f"{message[:MAX_STATUS_MESSAGE_CHARS]}… ({len(message)} characters in all)"


def check_label_set_size(message: pb.LabelSet, field: str = "label_set") -> None:
    """Refuse a label set with more findings, prompts or text than any real one needs, before use.

    Raises
    ------
    BadRequestError
        Names the field and the limit (:data:`MAX_LABEL_FINDINGS`, :data:`MAX_PROMPTS_PER_FINDING`,
        :data:`MAX_LABEL_TEXT_CHARS`).
    """
    if len(message.findings) > MAX_LABEL_FINDINGS:
        raise BadRequestError(
            f"{field}.findings", f"{len(message.findings)} findings exceed the limit of {MAX_LABEL_FINDINGS}"
        )
    texts = [(f"{field}.name", message.name), (f"{field}.version", message.version)]
    for index, finding in enumerate(message.findings):
        path = f"{field}.findings[{index}]"
        texts += [(f"{path}.key", finding.key), (f"{path}.display_name", finding.display_name)]
        for kind in ("positive_prompts", "negative_prompts"):
            prompts = getattr(finding, kind)
            if len(prompts) > MAX_PROMPTS_PER_FINDING:
                raise BadRequestError(
                    f"{path}.{kind}", f"{len(prompts)} prompts exceed the limit of {MAX_PROMPTS_PER_FINDING}"
                )
            texts += [(f"{path}.{kind}[{n}]", prompt) for n, prompt in enumerate(prompts)]
    for path, text in texts:
        if len(text) > MAX_LABEL_TEXT_CHARS:
            raise BadRequestError(path, f"{len(text)} characters exceed the limit of {MAX_LABEL_TEXT_CHARS}")


def check_image_shape(message: pb.Array, field: str, max_pixels: int) -> None:
    """Refuse an image whose zero-padded square exceeds ``max_pixels``, before any pixel is touched.

    MedSigLIP sees every image padded to a square of its longer side, so a 1 × 100000 image costs
    100000² pixels (40 GB of float32), not 100000: the square is what must fit the limit.

    Raises
    ------
    BadRequestError
        The longer side squared exceeds ``max_pixels``.
    """
    shape = list(message.shape)
    if len(shape) >= 2 and max(shape[0], shape[1]) ** 2 > max_pixels:
        side = max(shape[0], shape[1])
        raise BadRequestError(
            f"{field}.shape",
            f"{shape[:2]} is padded to a {side} × {side} square for the model ({side**2} pixels), beyond "
            f"the worker's limit of {max_pixels} pixels",
        )


def check_texts(texts: list[str]) -> list[str]:
    """EmbedText's texts: 1 to ``wire.MAX_TEXTS_PER_REQUEST``, each non-blank and at most
    :data:`MAX_LABEL_TEXT_CHARS` characters (the bound on label prompts), before any work.

    Raises
    ------
    BadRequestError
        No texts, too many, a blank one or a too long one (named by index).
    """
    if not texts:
        raise BadRequestError("texts", "is empty")
    if len(texts) > wire.MAX_TEXTS_PER_REQUEST:
        raise BadRequestError("texts", f"{len(texts)} texts exceed the limit of {wire.MAX_TEXTS_PER_REQUEST}")
    for index, text in enumerate(texts):
        if not text.strip():
            raise BadRequestError(f"texts[{index}]", "is blank")
        if len(text) > MAX_LABEL_TEXT_CHARS:
            raise BadRequestError(
                f"texts[{index}]", f"{len(text)} characters exceed the limit of {MAX_LABEL_TEXT_CHARS}"
            )
    return texts


class WorkerCore(Protocol):
    """What the servicer needs of the worker (implemented by ``WorkerServer``)."""

    metrics: WorkerMetrics

    def image_service(self) -> ImageService: ...

    def report_service(self) -> ReportService: ...

    def describe(self) -> pb.ModelInfoResponse: ...

    def limits(self) -> pb.Limits: ...

    def rpc_started(self) -> None: ...

    def rpc_finished(self) -> None: ...


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    """``medgemma_deploy.v1.Worker`` over a :class:`WorkerCore`."""

    def __init__(self, core: WorkerCore) -> None:
        self.core = core

    # Unary RPCs -----------------------------------------------------------------------------

    def Classify(self, request: pb.ClassifyRequest, context: grpc.ServicerContext) -> pb.ClassifyResponse:  # noqa: N802
        with self._rpc("Classify", context):
            service = self.core.image_service()
            limits = self.core.limits()
            images = self._images(request.images, limits, service, request.images_at_model_input)
            choice = request.WhichOneof("label_set_choice")
            if choice == "label_set":
                check_label_set_size(request.label_set)
                label_set = service.register_label_set(wire.label_set_from_proto(request.label_set))
            elif choice == "label_set_name":
                label_set = service.find_label_set(request.label_set_name)
            else:
                raise BadRequestError("label_set_choice", "give label_set (a definition) or label_set_name")
            keys = wire.check_finding_keys(
                request.relevance_finding_keys, label_set, "relevance_finding_keys"
            )
            if request.omit_probabilities and not keys and not request.return_embeddings:
                raise BadRequestError(
                    "omit_probabilities", "nothing left to compute: ask for embeddings or relevance maps"
                )
            self.core.metrics.images.labels("Classify").inc(len(images))
            work = ClassifyWork(
                images=images,
                label_set=label_set,
                return_embeddings=request.return_embeddings,
                relevance_keys=tuple(keys),
                omit_probabilities=request.omit_probabilities,
                at_model_input=request.images_at_model_input,
            )
            queued, outcome = self._run(service, work, context)
            response = pb.ClassifyResponse(
                model=wire.identity_to_proto(service.identity),
                label_set_name=label_set.name,
                label_set_version=label_set.version,
                finding_keys=wire.finding_keys(label_set),
                timing=_timing(queued),
            )
            if outcome.probabilities is not None:
                response.probabilities.CopyFrom(wire.array_to_proto(outcome.probabilities))
            if outcome.embeddings is not None:
                response.embeddings.CopyFrom(wire.array_to_proto(outcome.embeddings))
            response.relevance_maps.extend(wire.array_to_proto(np.asarray(m)) for m in outcome.relevance_maps)
            response.relevance_grids.extend(
                wire.array_to_proto(np.asarray(g, np.float32)) for g in outcome.relevance_grids
            )
            return response

    def Embed(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> pb.EmbedResponse:  # noqa: N802
        with self._rpc("Embed", context):
            service = self.core.image_service()
            at_model_input = request.images_at_model_input
            images = self._images(request.images, self.core.limits(), service, at_model_input)
            self.core.metrics.images.labels("Embed").inc(len(images))
            work = EmbedWork(images, at_model_input=at_model_input)
            return self._embeddings(pb.EmbedResponse, service, work, context)

    def EmbedText(self, request: pb.EmbedTextRequest, context: grpc.ServicerContext) -> pb.EmbedTextResponse:  # noqa: N802
        with self._rpc("EmbedText", context):
            service = self.core.image_service()
            work = TextEmbedWork(check_texts(list(request.texts)))
            return self._embeddings(pb.EmbedTextResponse, service, work, context)

    def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfoResponse:  # noqa: N802
        with self._rpc("ModelInfo", context):
            response = self.core.describe()
            response.api_version = API_VERSION
            response.server_version = __version__
            return response

    # Streaming RPC --------------------------------------------------------------------------

    def GenerateReport(  # noqa: N802
        self, request: pb.GenerateReportRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateReportResponse]:
        with self._rpc("GenerateReport", context):
            service = self.core.report_service()
            limits = self.core.limits()
            # An idle scheduler waits (briefly) for reports still in here, so a burst is one batch.
            with service.arriving():
                messages = chat_wire.chat_from_proto(request.messages, max_pixels=limits.max_image_pixels)
                n_images = sum(
                    1 for message in messages for part in message["content"] if part["type"] == "image"
                )
                if n_images > limits.max_images_per_request:
                    raise BadRequestError(
                        "messages", f"{n_images} images exceed the limit of {limits.max_images_per_request}"
                    )
                settings = chat_wire.sampling_from_proto(
                    request.settings, service.default_max_new_tokens, service.max_new_tokens
                )
                source = request.request_id or "grpc request"
                report = ReportRequest.for_chat(
                    messages, settings, source=source, prompt_id=request.prompt_id
                )
                prepared = service.prepare(report)
                stream = service.submit(prepared, deadline=_deadline(context))
            context.add_callback(stream.cancel)

            def check_client() -> None:
                if not context.is_active():
                    raise _gone(context)

            outputs = service.outputs(prepared, stream, coalesce=True, on_idle=check_client, poll_s=_POLL_S)
            with closing(outputs):
                for output in outputs:
                    if isinstance(output, Admitted):
                        yield pb.GenerateReportResponse(
                            admitted=pb.ReportAdmitted(
                                n_prompt_tokens=output.n_prompt_tokens,
                                queue_seconds=output.queue_seconds,
                                running=output.running,
                            )
                        )
                    elif isinstance(output, ReportDelta):
                        delta = pb.ReportDelta(text=output.text, token_ids=output.token_ids)
                        yield pb.GenerateReportResponse(delta=delta)
                    else:
                        yield pb.GenerateReportResponse(final=_report_final(output, service.identity))

    # Helpers --------------------------------------------------------------------------------

    @contextmanager
    def _rpc(self, method: str, context: grpc.ServicerContext) -> Iterator[None]:
        """Count the call, time it, and turn any exception into its status (one table)."""
        started = time.monotonic()
        code = grpc.StatusCode.OK
        self.core.rpc_started()
        try:
            yield
        except Exception as error:
            code, message = status_for(error)
            if isinstance(error, QueueFullError):
                # gRPC's retry pushback: a client may retry after this many milliseconds.
                context.set_trailing_metadata(((RETRY_PUSHBACK_KEY, str(QUEUE_FULL_PUSHBACK_MS)),))
            if code == grpc.StatusCode.INTERNAL:
                logger.exception("%s failed", method)
            else:
                logger.info("%s: %s: %s", method, code.name, message)
            context.abort(code, message)
        finally:
            if code == grpc.StatusCode.OK and not context.is_active():
                code = status_for(_gone(context))[0]  # a stream closed under us: deadline or cancel
            self.core.rpc_finished()
            self.core.metrics.request_done(method, code.name, time.monotonic() - started)

    def _images(
        self, messages: list, limits: pb.Limits, service: ImageService, at_model_input: bool
    ) -> list[np.ndarray]:
        if not messages:
            raise BadRequestError("images", "is empty")
        if len(messages) > limits.max_images_per_request:
            raise BadRequestError(
                "images", f"{len(messages)} images exceed the limit of {limits.max_images_per_request}"
            )
        for index, message in enumerate(messages):
            check_image_shape(message, f"images[{index}]", limits.max_image_pixels)
        images = [
            wire.display_image_from_proto(message, f"images[{index}]", max_pixels=limits.max_image_pixels)
            for index, message in enumerate(messages)
        ]
        if at_model_input:
            preprocessor = service.preprocessor
            if preprocessor is None:
                raise BadRequestError("images_at_model_input", "this worker's model publishes no input size")
            for index, image in enumerate(images):
                wire.check_model_input_shape(image, preprocessor.size, f"images[{index}]")
        return images

    def _embeddings(
        self,
        response_type: type[_EmbeddingsResponse],
        service: ImageService,
        work: EmbedWork | TextEmbedWork,
        context: grpc.ServicerContext,
    ) -> _EmbeddingsResponse:
        """Embed's and EmbedText's answer: the model, the embeddings and how long they took."""
        queued, embeddings = self._run(service, work, context)
        return response_type(
            model=wire.identity_to_proto(service.identity),
            embeddings=wire.array_to_proto(embeddings),
            timing=_timing(queued),
        )

    def _run(
        self, service: ImageService, work: ImageWork, context: grpc.ServicerContext
    ) -> tuple[BatchedRequest, Any]:
        """Queue ``work`` with the call's deadline and wait for its result, giving up when the client
        goes away or the deadline passes; returns the queued request (for its timing) and the result."""
        queued = service.submit(
            work, deadline=_deadline(context), is_cancelled=lambda: not context.is_active()
        )
        context.add_callback(queued.cancel)
        while True:
            try:
                return queued, queued.future.result(timeout=_POLL_S)
            except concurrent.futures.TimeoutError:
                if not context.is_active():
                    queued.cancel()
                    raise _gone(context) from None
                if queued.deadline is not None and time.monotonic() > queued.deadline + 1.0:
                    queued.cancel()
                    raise DeadlineExpiredError("the deadline passed while the request was running") from None


def _gone(context: grpc.ServicerContext) -> Exception:
    """Why an RPC stopped being active: its deadline passed, or the client cancelled."""
    remaining = context.time_remaining()
    # The client cancels at its own deadline, which precedes ours by the transit time.
    if remaining is not None and remaining <= _DEADLINE_SLACK_S:
        return DeadlineExpiredError("the call's deadline passed; its work was dropped")
    return RequestCancelledError("the client went away; its work was dropped")


def _deadline(context: grpc.ServicerContext) -> float | None:
    """The call's deadline on this process's monotonic clock (None without a deadline)."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e8:
        return None
    return time.monotonic() + max(0.0, remaining)


#: The ``ReportResult`` fields a ``ReportFinal`` carries under the same names.
_REPORT_FINAL_FIELDS = (
    "text",
    "token_ids",
    "n_prompt_tokens",
    "n_generated_tokens",
    "finish_reason",
    "seconds",
    "tokens_per_second",
    "warnings",
)


def _report_final(done: ReportDone, model: ModelIdentity) -> pb.ReportFinal:
    result = done.result
    return pb.ReportFinal(
        **{name: getattr(result, name) for name in _REPORT_FINAL_FIELDS},
        model=wire.identity_to_proto(model),
        timing=pb.Timing(
            queue_seconds=done.queue_seconds,
            compute_seconds=result.seconds,
            batch_size=round(done.mean_batch_size),
        ),
        engine_parameters=[
            pb.EngineParameter(name=name, value=value) for name, value in result.engine_parameters
        ],
    )


def _timing(queued: BatchedRequest) -> pb.Timing:
    started = queued.started_at or queued.enqueued_at
    return pb.Timing(
        queue_seconds=started - queued.enqueued_at,
        compute_seconds=queued.compute_seconds,
        batch_size=queued.batch_size,
    )
