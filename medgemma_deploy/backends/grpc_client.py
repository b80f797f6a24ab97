"""The transport of the worker's clients: one channel, retries with backoff, errors as exceptions.

:class:`WorkerClient` is shared by :mod:`medgemma_deploy.backends.remote` (the runners'
remote twins) and the benchmark. UNAVAILABLE (worker starting, draining, restarting, unreachable)
is retried with exponential backoff and jitter; RESOURCE_EXHAUSTED carrying gRPC's
``grpc-retry-pushback-ms`` trailer (a full queue) is retried after the pushback; a report stream is
retried only until its first event. Final failures become :class:`WorkerRequestError` (a
``ValueError``: the request itself was refused) or :class:`WorkerError` (a ``RuntimeError``).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from medgemma_deploy._proto import worker_pb2 as pb
from medgemma_deploy._proto import worker_pb2_grpc
from medgemma_deploy.backends.tls import ClientTLS
from medgemma_deploy.errors import ModelLoadError, ServiceError, UsageError

__all__ = [
    "RetryPolicy",
    "WorkerClient",
    "WorkerError",
    "WorkerRequestError",
    "WorkerUnavailableError",
    "parse_target",
]

logger = logging.getLogger(__name__)

_MIB = 1024 * 1024
#: Headroom under the worker's message limit for protobuf framing and the non-pixel fields.
_MESSAGE_FILL = 0.9


class WorkerError(ServiceError):
    """The worker could not do the work (not a problem of the request): retry later."""

    def __init__(self, code: grpc.StatusCode, details: str, target: str) -> None:
        self.code = code
        self.details = details
        super().__init__(f"worker {target}: {code.name}: {details}")


class WorkerUnavailableError(WorkerError):
    """The worker stayed unreachable, loading or draining through every retry."""


class WorkerRequestError(ValueError):
    """The worker refused the request itself (INVALID_ARGUMENT, or a message over its size limit)."""

    def __init__(self, code: grpc.StatusCode, details: str, target: str) -> None:
        self.code = code
        self.details = details
        super().__init__(f"worker {target}: {code.name}: {details}")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for UNAVAILABLE: 0.2, 0.4, 0.8 … s (±20 %), at most ``max_backoff``."""

    max_attempts: int = 8
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2


def parse_target(spec: str) -> tuple[str, bool]:
    """``grpc://HOST:PORT`` / ``grpcs://HOST:PORT`` → (``HOST:PORT``, secure).

    Raises
    ------
    UsageError
        Another scheme, or no port.
    """
    for scheme, secure in (("grpc://", False), ("grpcs://", True)):
        if spec.startswith(scheme):
            target = spec[len(scheme) :].rstrip("/")
            host, _, port = target.rpartition(":")
            if not host or not port.isdigit():
                raise UsageError(f"backend {spec!r}: expected {scheme}HOST:PORT")
            return target, secure
    raise UsageError(f"backend {spec!r}: expected local, grpc://HOST:PORT or grpcs://HOST:PORT")


@dataclass(eq=False, repr=False)
class WorkerClient:
    """One channel to a worker, with retries and the worker's limits.

    Parameters
    ----------
    target:
        ``HOST:PORT``.
    tls:
        TLS settings; None means plaintext (loopback or a trusted network only).
    timeout:
        Seconds per call, retries included (reports may take minutes under load).
    retry:
        Backoff for UNAVAILABLE.
    image_dtype:
        Wire type of MedSigLIP images: ``float32`` (lossless, default), ``uint16`` or ``uint8``.
    max_message_bytes:
        A message limit of this side; default: none, requests are sized to the worker's published
        limit alone (so its ``--max-message-mb`` is the one setting to raise).
    """

    target: str
    _: KW_ONLY
    tls: ClientTLS | None = None
    timeout: float = 600.0
    retry: RetryPolicy = RetryPolicy()
    image_dtype: str = "float32"
    max_message_bytes: int | None = None
    _channel: grpc.Channel | None = field(default=None, init=False)
    _stub: worker_pb2_grpc.WorkerStub | None = field(default=None, init=False)
    _info: pb.ModelInfoResponse | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __repr__(self) -> str:
        return f"WorkerClient({'grpcs' if self.tls else 'grpc'}://{self.target})"

    @property
    def stub(self) -> worker_pb2_grpc.WorkerStub:
        with self._lock:
            if self._stub is None:
                # -1: no limit of gRPC's own on this side; requests are sized to the worker's limit.
                limit = self.max_message_bytes or -1
                options = [
                    ("grpc.max_receive_message_length", limit),
                    ("grpc.max_send_message_length", limit),
                ]
                if self.tls is not None:
                    options += self.tls.channel_options()
                    self._channel = grpc.secure_channel(self.target, self.tls.credentials(), options=options)
                else:
                    self._channel = grpc.insecure_channel(self.target, options=options)
                self._stub = worker_pb2_grpc.WorkerStub(self._channel)
            return self._stub

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel = self._stub = None
            self._info = None

    def health(self, service: str = "", timeout: float = 5.0) -> str:
        """The worker's ``grpc.health.v1`` status name (SERVING, NOT_SERVING…)."""
        self.stub  # noqa: B018  # opens the channel
        assert self._channel is not None
        response = health_pb2_grpc.HealthStub(self._channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def model_info(self, *, refresh: bool = False) -> pb.ModelInfoResponse:
        """What the worker serves and its limits (cached; retried while it loads)."""
        if self._info is None or refresh:
            info = self.call("ModelInfo", pb.ModelInfoRequest())
            if info.state == "loading":
                raise WorkerUnavailableError(grpc.StatusCode.UNAVAILABLE, "still loading", self.target)
            self._info = info
        return self._info

    def model(self, kind: str) -> pb.ModelDescription:
        """The worker's description of ``kind``, retrying while the worker loads.

        Raises
        ------
        ModelLoadError
            The worker does not serve ``kind`` or it failed to load there.
        """
        deadline = time.monotonic() + self.timeout
        delay = self.retry.initial_backoff
        while True:
            try:
                info = self.model_info(refresh=True)
                break
            except WorkerUnavailableError:
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * self.retry.multiplier, self.retry.max_backoff)
        for description in info.models:
            if description.kind == kind:
                if not description.loaded:
                    raise ModelLoadError(
                        f"worker {self.target}: {kind} at {description.model.path} did not load: "
                        f"{description.load_error}"
                    )
                return description
        raise ModelLoadError(f"worker {self.target} does not serve {kind} (started without --{kind})")

    def call(self, method: str, request: Any) -> Any:
        """A unary call with retries (see the module docstring)."""
        rpc = getattr(self.stub, method)
        return self._retrying(method, lambda remaining: rpc(request, timeout=remaining))

    def stream_report(self, request: pb.GenerateReportRequest) -> Iterator[pb.GenerateReportResponse]:
        """GenerateReport events; retried like a unary call until the first event arrives."""
        call_box: list[Any] = []

        def first(remaining: float) -> tuple[Any, pb.GenerateReportResponse]:
            call = self.stub.GenerateReport(request, timeout=remaining)
            call_box[:] = [call]
            return call, next(call)

        call, event = self._retrying("GenerateReport", first)
        try:
            yield event
            for event in call:
                yield event
        except grpc.RpcError as error:
            _raise_for(error, self.target)
        finally:
            call.cancel()  # a no-op once finished; frees the worker's row if we stopped early

    def _retrying(self, method: str, attempt: Callable[[float], Any]) -> Any:
        deadline = time.monotonic() + self.timeout
        delay = self.retry.initial_backoff
        for number in range(1, self.retry.max_attempts + 1):
            remaining = deadline - time.monotonic()
            try:
                return attempt(max(remaining, 0.001))
            except grpc.RpcError as error:
                pushback = _pushback_seconds(error)
                code = error.code()
                retryable = code == grpc.StatusCode.UNAVAILABLE or (
                    code == grpc.StatusCode.RESOURCE_EXHAUSTED and pushback is not None
                )
                wait = (
                    pushback
                    if pushback is not None
                    else delay * random.uniform(1 - self.retry.jitter, 1 + self.retry.jitter)
                )
                if not retryable or number == self.retry.max_attempts or time.monotonic() + wait > deadline:
                    _raise_for(error, self.target)
                logger.warning(
                    "worker %s: %s %s (%s); retry %d/%d in %.2f s",
                    self.target,
                    method,
                    code.name,
                    error.details(),
                    number,
                    self.retry.max_attempts - 1,
                    wait,
                )
                time.sleep(wait)
                delay = min(delay * self.retry.multiplier, self.retry.max_backoff)
        raise AssertionError("unreachable")

    def message_budget(self) -> int:
        """Bytes of payload one message may carry: the smaller of this client's and the worker's limit,
        less headroom for protobuf framing and the non-pixel fields."""
        limits = [self.max_message_bytes, self.model_info().limits.max_message_bytes]
        return int(min(limit for limit in limits if limit) * _MESSAGE_FILL)

    def check_fits(self, size: int, what: str) -> None:
        """Refuse, in one line naming the limit and the settings that raise it, what cannot fit one message.

        Raises
        ------
        WorkerRequestError
            ``size`` bytes exceed :meth:`message_budget`.
        """
        budget = self.message_budget()
        if size > budget:
            raise WorkerRequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{what} needs {size / _MIB:.1f} MiB in one message, over the {budget / _MIB:.1f} MiB "
                f"that fit the worker's message limit of "
                f"{self.model_info().limits.max_message_bytes / _MIB:g} MiB; raise it with "
                "`medgemma-deploy worker --max-message-mb`",
                self.target,
            )

    def chunks(self, sizes: Sequence[int]) -> list[slice]:
        """Split items of ``sizes`` bytes into runs that fit one message and the image-count limit.

        Raises
        ------
        WorkerRequestError
            One item alone does not fit (:meth:`check_fits`).
        """
        limits = self.model_info().limits
        budget = self.message_budget()
        for index, size in enumerate(sizes):
            self.check_fits(size, f"image {index}")
        most = max(1, limits.max_images_per_request or len(sizes))
        runs: list[slice] = []
        start, used = 0, 0
        for index, size in enumerate(sizes):
            if index > start and (used + size > budget or index - start >= most):
                runs.append(slice(start, index))
                start, used = index, 0
            used += size
        if sizes:
            runs.append(slice(start, len(sizes)))
        return runs


def _pushback_seconds(error: grpc.RpcError) -> float | None:
    try:
        metadata = error.trailing_metadata() or ()
    except AttributeError:
        return None
    for key, value in metadata:
        if key == "grpc-retry-pushback-ms":
            try:
                return max(0.0, int(value) / 1000.0)
            except ValueError:
                return None
    return None


def _raise_for(error: grpc.RpcError, target: str) -> NoReturn:
    code, details = error.code(), error.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT or (
        code == grpc.StatusCode.RESOURCE_EXHAUSTED and _pushback_seconds(error) is None
    ):
        raise WorkerRequestError(code, details, target) from None
    if code == grpc.StatusCode.UNAVAILABLE:
        raise WorkerUnavailableError(code, details, target) from None
    raise WorkerError(code, details, target) from None
