"""The worker's lifecycle: bind → NOT_SERVING → load → warm up → SERVING → drain → unload.

:class:`WorkerServer` is a context manager (vLLM's ``build_async_engine_client`` shape: shutdown in
``finally``). It starts the gRPC server first, with the standard ``grpc.health.v1`` service saying
NOT_SERVING and model RPCs answering UNAVAILABLE, so orchestrators see a live but unready worker
while the models load. Each configured model loads and warms up on its own: one that fails is
recorded (ModelInfo shows the reason; its RPCs answer FAILED_PRECONDITION) while the other serves.
Health turns SERVING once loading is over and at least one model serves.

Shutdown drains: health NOT_SERVING at once, new model calls UNAVAILABLE (clients retry another
worker), queued and running work finishes (up to ``drain_timeout``), then the server stops and the
models are unloaded.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from medgemma_deploy._proto import worker_pb2 as pb
from medgemma_deploy._proto import worker_pb2_grpc
from medgemma_deploy.backends import wire
from medgemma_deploy.backends.local import make_backend
from medgemma_deploy.errors import UsageError
from medgemma_deploy.worker.config import WorkerConfig
from medgemma_deploy.worker.edge.metrics import WorkerMetrics
from medgemma_deploy.worker.edge.servicer import WorkerServicer
from medgemma_deploy.worker.engine.errors import ModelNotAvailableError, NotReadyError
from medgemma_deploy.worker.engine.image_service import ImageService
from medgemma_deploy.worker.engine.report_service import ReportService

__all__ = ["SERVICE_NAME", "WorkerServer"]

logger = logging.getLogger(__name__)

#: Full name of the worker service (also a health-check service name).
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Worker"].full_name


@dataclass
class _ModelSlot:
    kind: str
    path: Path | None
    service: ImageService | ReportService | None = None
    error: str | None = None
    runner: object | None = None
    device: str = ""
    dtype: str = ""


@dataclass
class _InFlight:
    count: int = 0
    condition: threading.Condition = field(default_factory=threading.Condition)


class WorkerServer:
    """A gRPC worker serving MedSigLIP and MedGemma (see the module docstring for the lifecycle).

    Parameters
    ----------
    config:
        What to serve and how; validated on construction.
    """

    def __init__(self, config: WorkerConfig) -> None:
        config.validate()
        self.config = config
        self.metrics = WorkerMetrics()
        self.state = "created"
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.Server | None = None
        self._health = health.HealthServicer(experimental_non_blocking=True)
        self._slots = {
            "medsiglip": _ModelSlot("medsiglip", config.medsiglip),
            "medgemma": _ModelSlot("medgemma", config.medgemma),
        }
        # The backend module builds every runner; this local backend is only the worker's source
        # of them (each slot loads, serves and closes its own).
        self._runners = make_backend(
            "local",
            config.medgemma,
            config.device,
            precision=config.precision,
            cache_dir=config.cache_dir,
            medsiglip_path=config.medsiglip,
        )
        self._in_flight = _InFlight()
        self._stopped = threading.Event()
        self._shutdown_lock = threading.Lock()

    # Context manager ------------------------------------------------------------------------

    def __enter__(self) -> WorkerServer:
        self.start()
        try:
            self.load()
        except BaseException:
            self.shutdown()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.shutdown()

    @property
    def address(self) -> str:
        """``host:port`` actually bound (the ephemeral port when ``--listen`` used port 0)."""
        host = self.config.listen.rpartition(":")[0]
        return f"{host}:{self.port}"

    # Lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind and start gRPC (health NOT_SERVING, reflection on) and the metrics endpoint.

        Raises
        ------
        UsageError
            The address cannot be bound, or a TLS file is unreadable.
        """
        config = self.config
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.max_concurrent_rpcs + 8, thread_name_prefix="rpc"),
            options=options,
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        )
        worker_pb2_grpc.add_WorkerServicer_to_server(WorkerServicer(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            if config.tls is not None:
                port = server.add_secure_port(config.listen, config.tls.credentials())
            else:
                port = server.add_insecure_port(config.listen)
        except RuntimeError as exc:
            raise UsageError(f"--listen {config.listen}: cannot bind ({exc})") from exc
        if not port:
            raise UsageError(f"--listen {config.listen}: cannot bind (address in use or not local)")
        server.start()
        self._server, self.port = server, port
        self._set_state("loading")
        logger.info("worker listening on %s (%s)", self.address, "TLS" if config.tls else "plaintext")
        if config.metrics_port is not None:
            host = config.metrics_host or config.listen.rpartition(":")[0].strip("[]")
            self.metrics_port = self.metrics.serve(config.metrics_port, host)

    def load(self) -> None:
        """Load and warm up every configured model, then report SERVING.

        Raises
        ------
        UsageError
            No configured model loaded (nothing to serve).
        """
        for slot in self._slots.values():
            if slot.path is not None:
                self._load_slot(slot)
        serving = [slot.kind for slot in self._slots.values() if slot.service is not None]
        if not serving:
            errors = "; ".join(f"{s.kind}: {s.error}" for s in self._slots.values() if s.error)
            raise UsageError(f"no model could be loaded: {errors}")
        self._set_state("serving")
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info("worker SERVING %s on %s", ", ".join(serving), self.address)

    def shutdown(self, drain_timeout: float | None = None) -> None:
        """Drain and stop (idempotent): NOT_SERVING, finish in-flight work, stop, unload."""
        with self._shutdown_lock:
            if self.state in ("stopped", "created"):
                self.state = "stopped"
                return
            timeout = self.config.drain_timeout if drain_timeout is None else drain_timeout
            deadline = time.monotonic() + timeout
            self._set_state("draining")
            self._health.enter_graceful_shutdown()
            logger.info("worker draining (up to %.0f s)", timeout)
            for slot in self._slots.values():
                if slot.service is not None:
                    slot.service.stop(max(0.0, deadline - time.monotonic()))
            with self._in_flight.condition:
                while self._in_flight.count and time.monotonic() < deadline:
                    self._in_flight.condition.wait(timeout=0.05)
            if self._server is not None:
                # Worker RPCs are done (or out of time); what is left are health watches and
                # reflection streams, which would otherwise hold the stop for the whole grace.
                self._server.stop(grace=min(1.0, max(0.0, deadline - time.monotonic()))).wait()
            for slot in self._slots.values():
                self._unload_slot(slot)
            self.metrics.close()
            self._set_state("stopped")
            self._stopped.set()
            logger.info("worker stopped")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`shutdown` finished; True if it did within ``timeout``."""
        return self._stopped.wait(timeout)

    # WorkerCore (used by the servicer) --------------------------------------------------------

    def image_service(self) -> ImageService:
        service = self._service("medsiglip")
        assert isinstance(service, ImageService)
        return service

    def report_service(self) -> ReportService:
        service = self._service("medgemma")
        assert isinstance(service, ReportService)
        return service

    def limits(self) -> pb.Limits:
        c = self.config
        return pb.Limits(
            max_message_bytes=c.max_message_bytes,
            max_images_per_request=c.max_images_per_request,
            max_image_pixels=c.max_image_pixels,
            default_max_new_tokens=c.default_max_new_tokens,
            max_new_tokens=c.max_new_tokens,
            classify_max_batch_size=c.classify_max_batch_size,
            classify_max_queue_delay_seconds=c.classify_max_queue_delay,
            classify_max_queued_images=c.classify_max_queued_images,
            report_max_running=c.report_max_running,
            report_max_waiting=c.report_max_waiting,
        )

    def describe(self) -> pb.ModelInfoResponse:
        response = pb.ModelInfoResponse(state=self.state, limits=self.limits())
        for slot in self._slots.values():
            if slot.path is None:
                continue
            description = pb.ModelDescription(
                kind=slot.kind,
                loaded=slot.service is not None,
                load_error=slot.error or "",
                device=slot.device,
                dtype=slot.dtype,
            )
            if slot.service is not None:
                description.model.CopyFrom(wire.identity_to_proto(slot.service.identity))
                if isinstance(slot.service, ImageService):
                    description.embedding_dim = int(getattr(slot.runner, "embedding_dim", 0) or 0)
                    preprocessor = slot.service.preprocessor
                    if preprocessor is not None:
                        # What a client needs to send images_at_model_input (protos/README.md).
                        description.input_rows, description.input_columns = preprocessor.size
                        description.resample = preprocessor.resample_mode
                        description.antialias = preprocessor.antialias
                        description.patch_grid = int(getattr(slot.runner, "patch_grid", 0) or 0)
                    for label_set in slot.service.label_sets:
                        response.label_sets.add(
                            name=label_set.name,
                            version=label_set.version,
                            finding_keys=wire.finding_keys(label_set),
                        )
                else:
                    description.max_context_tokens = slot.service.max_context_tokens
            else:
                description.model.path = str(slot.path)
            response.models.append(description)
        return response

    def rpc_started(self) -> None:
        with self._in_flight.condition:
            self._in_flight.count += 1

    def rpc_finished(self) -> None:
        with self._in_flight.condition:
            self._in_flight.count -= 1
            self._in_flight.condition.notify_all()

    # Internals ------------------------------------------------------------------------------

    def _service(self, kind: str) -> ImageService | ReportService:
        if self.state == "loading":
            raise NotReadyError("the worker is loading its models; retry shortly")
        if self.state in ("draining", "stopped"):
            raise NotReadyError("the worker is shutting down; retry another worker")
        slot = self._slots[kind]
        if slot.path is None:
            raise ModelNotAvailableError(kind, f"this worker was started without --{kind}")
        if slot.service is None:
            raise ModelNotAvailableError(kind, f"the model at {slot.path} did not load: {slot.error}")
        return slot.service

    def _load_slot(self, slot: _ModelSlot) -> None:
        started = time.monotonic()
        try:
            if slot.kind == "medsiglip":
                self._load_medsiglip(slot)
            else:
                self._load_medgemma(slot)
        except Exception as exc:  # a model that fails to load must not take the other one down
            reason = " ".join(str(exc).split()) or type(exc).__name__
            # Name the directory even when the loader's message does not (e.g. a safetensors error).
            slot.error = (
                reason if str(slot.path) in reason else f"{slot.path}: {type(exc).__name__}: {reason}"
            )
            logger.error("%s at %s did not load: %s", slot.kind, slot.path, slot.error)
            self._unload_slot(slot)
            return
        assert slot.service is not None
        identity = slot.service.identity
        self.metrics.model_info.labels(
            slot.kind, identity.name, identity.version, slot.device, slot.dtype
        ).set(1)
        logger.info(
            "%s %s (%s) ready on %s in %.1f s",
            slot.kind,
            identity.name,
            identity.version,
            slot.device,
            time.monotonic() - started,
        )

    def _load_medsiglip(self, slot: _ModelSlot) -> None:
        from medgemma_deploy.operators.medsiglip.labels import load_label_sets

        c = self.config
        label_sets = load_label_sets(list(c.label_files) or None)
        runner = self._runners.medsiglip_runner(max_batch_size=c.classify_max_batch_size)
        slot.runner = runner
        runner.load()
        slot.device, slot.dtype = _device_and_dtype(runner)
        service = ImageService(
            runner,
            label_sets=label_sets,
            max_batch_size=c.classify_max_batch_size,
            max_queue_delay=c.classify_max_queue_delay,
            max_queued_images=c.classify_max_queued_images,
            observer=self.metrics,
        )
        if c.warm_up:
            service.warm_up()
        service.start()
        slot.service = service

    def _load_medgemma(self, slot: _ModelSlot) -> None:
        c = self.config
        # torch (auto/fp32/bf16) or llama.cpp (int8/int4): the same scheduler decodes either.
        runner = self._runners.medgemma_runner(sequences=c.report_max_running)
        slot.runner = runner
        runner.load()
        slot.device, slot.dtype = _device_and_dtype(runner)
        service = ReportService(
            runner,
            max_running=c.report_max_running,
            max_waiting=c.report_max_waiting,
            max_cached_tokens=c.report_max_cached_tokens,
            max_prefills_per_step=c.report_max_prefills_per_step,
            default_max_new_tokens=c.default_max_new_tokens,
            max_new_tokens=c.max_new_tokens,
            observer=self.metrics,
        )
        service.start()
        if c.warm_up:
            service.warm_up()
        slot.service = service

    def _unload_slot(self, slot: _ModelSlot) -> None:
        runner = slot.runner
        slot.service = None
        slot.runner = None
        if runner is not None:
            try:
                runner.close()  # type: ignore[attr-defined]
            except Exception as exc:  # unloading must not hide the original problem
                logger.warning("closing the %s runner failed: %s", slot.kind, exc)

    def _set_state(self, state: str) -> None:
        self.state = state
        self.metrics.state.state(state)


def _device_and_dtype(runner: object) -> tuple[str, str]:
    model = getattr(runner, "model", None)
    try:
        parameter = next(model.parameters())  # type: ignore[union-attr]
    except (AttributeError, StopIteration, TypeError):
        return str(getattr(runner, "device", "")), str(getattr(runner, "dtype", ""))
    return str(parameter.device), str(parameter.dtype).removeprefix("torch.")
