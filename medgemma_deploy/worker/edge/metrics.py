"""Prometheus metrics of the worker (prometheus-client), on a registry of its own.

Each :class:`WorkerMetrics` owns a ``CollectorRegistry`` (several workers can run in one test
process) and is the observer the batcher and the report scheduler report to. Exposed over HTTP by
:meth:`WorkerMetrics.serve` (``--metrics-port``; Prometheus scrapes ``/metrics``).

Names (all prefixed ``medgemma_worker_``): ``requests_total{method,code}``,
``request_seconds{method}``, ``queue_seconds{queue}``, ``batch_size{queue}``,
``batch_seconds{queue}``, ``queue_depth{queue}``, ``images_total{method}``,
``generated_tokens_total``, ``tokens_per_second`` (last 10 s), ``gpu_memory_bytes{device,kind}``
(allocated, reserved, peak; CUDA only), ``model_info{kind,name,version,device,dtype}`` and
``state`` (loading, serving, draining, stopped).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["WORKER_STATES", "WorkerMetrics"]

logger = logging.getLogger(__name__)

WORKER_STATES = ("loading", "serving", "draining", "stopped")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 256)
_RATE_WINDOW_S = 10.0


class _GpuMemoryCollector(Collector):
    """CUDA memory per device at scrape time (nothing on a machine without CUDA)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        import torch

        family = GaugeMetricFamily(
            "medgemma_worker_gpu_memory_bytes", "CUDA memory of the worker process", labels=["device", "kind"]
        )
        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                device = f"cuda:{index}"
                family.add_metric([device, "allocated"], float(torch.cuda.memory_allocated(index)))
                family.add_metric([device, "reserved"], float(torch.cuda.memory_reserved(index)))
                family.add_metric([device, "peak_allocated"], float(torch.cuda.max_memory_allocated(index)))
        yield family


class WorkerMetrics:
    """The worker's metrics; also the ``QueueObserver``/``SchedulerObserver`` of its queues."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "medgemma_worker_requests", "RPCs answered, by final status code", ["method", "code"], registry=r
        )
        self.request_seconds = Histogram(
            "medgemma_worker_request_seconds", "RPC latency", ["method"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_seconds = Histogram(
            "medgemma_worker_queue_seconds",
            "Time waiting for the GPU",
            ["queue"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "medgemma_worker_batch_size",
            "Images per MedSigLIP batch; running sequences per MedGemma decode step",
            ["queue"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "medgemma_worker_batch_seconds",
            "Model time per batch / decode step",
            ["queue"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth_gauge = Gauge(
            "medgemma_worker_queue_depth", "Waiting work (images or reports)", ["queue"], registry=r
        )
        self.images = Counter("medgemma_worker_images", "Images received", ["method"], registry=r)
        self.tokens = Counter("medgemma_worker_generated_tokens", "Tokens generated", registry=r)
        self.tokens_per_second_gauge = Gauge(
            "medgemma_worker_tokens_per_second",
            f"Generated tokens per second over the last {_RATE_WINDOW_S:g} s",
            registry=r,
        )
        self.tokens_per_second_gauge.set_function(self.tokens_per_second)
        self.model_info = Gauge(
            "medgemma_worker_model_info",
            "Loaded models (value 1)",
            ["kind", "name", "version", "device", "dtype"],
            registry=r,
        )
        self.state = Enum(
            "medgemma_worker_state", "Worker lifecycle state", states=list(WORKER_STATES), registry=r
        )
        self.state.state("loading")
        r.register(_GpuMemoryCollector())
        self._token_times: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None

    # Observer protocol ------------------------------------------------------------------------

    def queue_wait(self, queue: str, seconds: float) -> None:
        self.queue_seconds.labels(queue).observe(seconds)

    def batch_done(self, queue: str, size: int, seconds: float) -> None:
        self.batch_size.labels(queue).observe(size)
        self.batch_seconds.labels(queue).observe(seconds)

    def queue_depth(self, queue: str, depth: int) -> None:
        self.queue_depth_gauge.labels(queue).set(depth)

    def tokens_generated(self, count: int) -> None:
        self.tokens.inc(count)
        now = time.monotonic()
        with self._lock:
            self._token_times.append((now, count))
            self._expire(now)

    # Requests -------------------------------------------------------------------------------

    def request_done(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.request_seconds.labels(method).observe(seconds)

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            total = sum(count for _, count in self._token_times)
        return total / _RATE_WINDOW_S

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` over HTTP on ``host:port`` (0: any free port); return the port."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._http, self._http_thread = server, thread
        bound = int(server.server_address[1])
        logger.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._http_thread is not None:
            self._http_thread.join(timeout=5)
            self._http_thread = None

    def _expire(self, now: float) -> None:
        while self._token_times and now - self._token_times[0][0] > _RATE_WINDOW_S:
            self._token_times.popleft()
