"""Prometheus metrics of the listener (``--metrics-port``), on a registry of its own.

Counters for associations, instances (by DIMSE status name), jobs (by outcome) and deliveries (by
destination and result); a histogram of pipeline seconds; and a gauge of jobs per state read from
the job store at scrape time, so it is right after a restart too. Without ``--metrics-port`` the
calls are no-ops and ``prometheus-client`` is not needed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from medgemma_deploy.errors import UsageError

__all__ = ["ListenerMetrics"]

logger = logging.getLogger(__name__)


class ListenerMetrics:
    """The listener's metrics; every method is a no-op until :meth:`enable`."""

    def __init__(self) -> None:
        self._enabled = False
        self._server: Any = None

    def enable(self, job_counts: Callable[[], dict[str, int]]) -> None:
        """Create the metrics on a private registry; ``job_counts`` feeds the per-state gauge.

        Raises
        ------
        UsageError
            ``prometheus-client`` is not installed (it comes with the ``worker`` extra).
        """
        try:
            from prometheus_client import CollectorRegistry, Counter, Histogram
            from prometheus_client.core import GaugeMetricFamily
        except ImportError as exc:
            raise UsageError(
                "--metrics-port needs prometheus-client: pip install 'medgemma-deploy[worker]'"
            ) from exc

        class _JobStates:
            def collect(self) -> Iterator[GaugeMetricFamily]:
                gauge = GaugeMetricFamily(
                    "medgemma_listener_jobs", "Study-version jobs by state", labels=["state"]
                )
                for state, count in job_counts().items():
                    gauge.add_metric([state], count)
                yield gauge

        self.registry = CollectorRegistry()
        self._associations = Counter(
            "medgemma_listener_associations", "Associations by result", ["result"], registry=self.registry
        )
        self._instances = Counter(
            "medgemma_listener_instances",
            "C-STORE requests by response status",
            ["status"],
            registry=self.registry,
        )
        self._jobs = Counter(
            "medgemma_listener_job_events", "Job outcomes", ["outcome"], registry=self.registry
        )
        self._deliveries = Counter(
            "medgemma_listener_deliveries",
            "Objects delivered, or delivery attempts failed, by destination",
            ["destination", "result"],
            registry=self.registry,
        )
        self._pipeline_seconds = Histogram(
            "medgemma_listener_pipeline_seconds",
            "Pipeline run time per study version",
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=self.registry,
        )
        self.registry.register(_JobStates())
        self._enabled = True

    def serve(self, port: int, address: str) -> None:
        """Serve ``/metrics`` over HTTP (call after :meth:`enable`)."""
        from prometheus_client import start_http_server

        self._server, _thread = start_http_server(port, addr=address, registry=self.registry)
        logger.info("metrics on http://%s:%d/metrics", address, port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def association(self, result: str) -> None:
        if self._enabled:
            self._associations.labels(result).inc()

    def instance(self, status: str) -> None:
        if self._enabled:
            self._instances.labels(status).inc()

    def job(self, outcome: str) -> None:
        if self._enabled:
            self._jobs.labels(outcome).inc()

    def delivery(self, destination: str, result: str, count: int = 1) -> None:
        if self._enabled:
            self._deliveries.labels(destination, result).inc(count)

    def pipeline_seconds(self, seconds: float) -> None:
        if self._enabled:
            self._pipeline_seconds.observe(seconds)
