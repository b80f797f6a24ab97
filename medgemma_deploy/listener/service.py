"""The listener as one object: spool + job store + pipeline + completion + workers + SCP.

:class:`Listener` starts the parts in the order that keeps the promise: lock the spool, open the
job store and put back jobs a crash left running, load the pipeline's models (a bad pipeline or
model stops the start here, before any association is accepted), start completing, processing and
delivering, and only then accept associations. :meth:`Listener.stop` reverses it: no new
associations, running jobs get ``drain_s`` to finish, and whatever is left resumes on the next start.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medgemma_deploy.errors import UsageError
from medgemma_deploy.listener.allowlist import AllowList
from medgemma_deploy.listener.audit import AuditLog
from medgemma_deploy.listener.completion import StudyCompletion
from medgemma_deploy.listener.delivery import CStoreDestination, Destination, DicomNode, StowDestination
from medgemma_deploy.listener.jobstore import JobStore
from medgemma_deploy.listener.metrics import ListenerMetrics
from medgemma_deploy.listener.notify import Hl7Outbox, Hl7Settings
from medgemma_deploy.listener.pipelines import Pipeline, PipelineOptions, make_pipeline
from medgemma_deploy.listener.receiver import InstanceReceiver
from medgemma_deploy.listener.scp import StorageSCP
from medgemma_deploy.listener.spool import Spool, SpoolLockedError
from medgemma_deploy.listener.worker_loop import RetryPolicy, WorkerLoop

__all__ = ["Listener", "ListenerConfig", "server_ssl_context"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ListenerConfig:
    """Everything ``medgemma-deploy listen`` resolved; logged at start-up (the STOW token is hidden)."""

    ae_title: str
    spool: Path
    destinations: tuple[DicomNode, ...] = ()
    stow_url: str | None = None
    stow_token: str | None = field(default=None, repr=False)
    host: str = "0.0.0.0"
    port: int = 11112
    pipeline: str = "classify"
    pipeline_options: PipelineOptions = field(default_factory=PipelineOptions)
    allow: tuple[str, ...] = ()
    quiet_s: float = 30.0
    concurrency: int = 2
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    min_free_bytes: int = 256 * 1024 * 1024
    max_associations: int = 32
    timeout_s: float = 60.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"
    retention_s: float | None = 72 * 3600.0
    drain_s: float = 60.0
    audit_log: Path | None = None
    #: HL7 ORU notification of triaged studies (``--hl7``); None: no notification.
    hl7: Hl7Settings | None = None
    #: Seconds of waiting that count as one triage level in the queue (starvation freedom).
    triage_aging_s: float = 600.0
    #: Order the queue by triage priority, classification first (False: first come, first served).
    triage_queue: bool = True

    def __post_init__(self) -> None:
        if not self.ae_title or len(self.ae_title) > 16:
            raise UsageError(f"--ae-title {self.ae_title!r}: must be 1-16 characters")
        if not self.destinations and not self.stow_url:
            raise UsageError(
                "give --destination AET@HOST:PORT and/or --stow-url URL: results need somewhere to go"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise UsageError("--tls-cert and --tls-key go together")
        if self.tls_ca is not None and self.tls_cert is None:
            raise UsageError("--tls-ca (client certificates) needs --tls-cert and --tls-key")
        if self.quiet_s < 0 or self.concurrency < 1 or self.max_associations < 1:
            raise UsageError("--quiet-seconds must be >= 0, --concurrency and --max-associations >= 1")
        if self.triage_aging_s <= 0:
            raise UsageError(f"--triage-aging-seconds must be > 0, got {self.triage_aging_s:g}")


def server_ssl_context(cert: Path, key: Path, ca: Path | None) -> ssl.SSLContext:
    """TLS 1.2+ server context; with ``ca``, clients must present a certificate it signed.

    Raises
    ------
    UsageError
        A certificate, key or CA file cannot be read or does not match.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
        if ca is not None:
            context.load_verify_locations(cafile=str(ca))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"TLS: cannot load {cert}, {key}{', ' + str(ca) if ca else ''} ({exc})") from exc
    return context


class Listener:
    """A running DICOM listener (see the module docstring).

    Parameters
    ----------
    config:
        The resolved configuration.
    pipeline:
        An unopened pipeline to use instead of building ``config.pipeline`` (for embedding).
    destinations:
        Destinations to use instead of those the configuration names (for embedding).
    """

    def __init__(
        self,
        config: ListenerConfig,
        *,
        pipeline: Pipeline | None = None,
        destinations: Sequence[Destination] | None = None,
    ) -> None:
        self.config = config
        self._pipeline_override = pipeline
        self._destinations_override = list(destinations) if destinations is not None else None
        self.metrics = ListenerMetrics()
        self.spool: Spool | None = None
        self.store: JobStore | None = None
        self.audit: AuditLog | None = None
        self.pipeline: Pipeline | None = None
        self.scp: StorageSCP | None = None
        self.completion: StudyCompletion | None = None
        self.workers: WorkerLoop | None = None
        self.outbox: Hl7Outbox | None = None

    @property
    def port(self) -> int:
        if self.scp is None:
            raise RuntimeError("the listener is not running")
        return self.scp.port

    def start(self) -> None:
        """Start everything (see the module docstring); on failure, undo what was started.

        Raises
        ------
        UsageError
            Bad configuration, a spool in use by another listener, an unknown or unavailable
            pipeline, a model that does not load, unreadable TLS files.
        """
        config = self.config
        try:
            self._start(config)
        except BaseException:
            self.stop(drain_s=0.0)
            raise

    def _start(self, config: ListenerConfig) -> None:
        allow_list = _allow_list(config.allow)
        ssl_context = (
            server_ssl_context(config.tls_cert, config.tls_key, config.tls_ca) if config.tls_cert else None
        )
        destinations = self._destinations()
        self.spool = Spool(config.spool, min_free_bytes=config.min_free_bytes)
        try:
            self.spool.lock()
        except SpoolLockedError as exc:
            raise UsageError(str(exc)) from exc
        self.audit = AuditLog(config.audit_log or config.spool / "audit.jsonl")
        self.store = JobStore(config.spool / "jobs.sqlite")
        for job in self.store.recover(max_attempts=config.retry.max_attempts):
            self.audit.job_event(
                "job-recovered",
                job,
                state=job.state.value,
                attempts=job.attempts,
            )
            logger.warning(
                "job %d (study %s v%d) was interrupted: now %s",
                job.id,
                job.study_instance_uid,
                job.version,
                job.state.value,
            )
        pipeline = self._pipeline_override or make_pipeline(config.pipeline, config.pipeline_options)
        pipeline.open()
        self.pipeline = pipeline
        if config.metrics_port is not None:
            self.metrics.enable(self.store.counts_by_state)
            self.metrics.serve(config.metrics_port, config.metrics_host)
        if config.hl7 is not None:
            self.outbox = Hl7Outbox(
                self.store,
                self.spool,
                self.audit,
                config.hl7,
                max_attempts=config.retry.max_attempts,
                backoff=config.retry.delay,
                metrics=self.metrics,
            )
        self.workers = WorkerLoop(
            self.store,
            self.spool,
            pipeline,
            destinations,
            self.audit,
            metrics=self.metrics,
            concurrency=config.concurrency,
            retry=config.retry,
            outbox=self.outbox,
            aging_s=config.triage_aging_s,
            triage_queue=config.triage_queue,
        )
        self.completion = StudyCompletion(
            self.store,
            self.spool,
            self.audit,
            quiet_s=config.quiet_s,
            on_complete=self.workers.wake,
            retention_s=config.retention_s,
        )
        self.workers.start()
        if self.outbox is not None:
            self.outbox.start()  # messages a previous run queued go out now
        self.completion.start()
        receiver = InstanceReceiver(self.spool, self.store, self.audit, self.metrics)
        self.scp = StorageSCP(
            config.ae_title,
            receiver,
            allow_list=allow_list,
            ssl_context=ssl_context,
            max_associations=config.max_associations,
            timeout_s=config.timeout_s,
        )
        self.scp.start(config.host, config.port)
        self.audit.event(
            "listener-started",
            ae_title=config.ae_title,
            port=self.scp.port,
            pipeline=pipeline.name,
            destination=", ".join(
                [d.name for d in destinations] + ([str(config.hl7.endpoint)] if config.hl7 else [])
            ),
            tls=ssl_context is not None,
        )
        logger.info("listener ready: %s", config)

    def stop(self, *, drain_s: float | None = None) -> None:
        """Stop accepting, let running jobs finish (up to ``drain_s``), release everything."""
        drain_s = self.config.drain_s if drain_s is None else drain_s
        if self.scp is not None:
            self.scp.stop()
            self.scp = None
        if self.completion is not None:
            self.completion.stop()
            self.completion = None
        drained = True
        if self.workers is not None:
            drained = self.workers.stop(timeout_s=drain_s)
            if not drained:
                logger.warning("jobs still running after %.0f s; they resume at the next start", drain_s)
            self.workers = None
        if self.outbox is not None:
            self.outbox.stop()
            self.outbox = None
        if self.pipeline is not None:
            if drained:  # never unload models under a running job; process exit frees them
                self.pipeline.close()
            self.pipeline = None
        self.metrics.stop()
        if self.audit is not None:
            self.audit.event("listener-stopped", ae_title=self.config.ae_title)
            self.audit.close()
            self.audit = None
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.spool is not None:
            self.spool.unlock()
            self.spool = None

    def _destinations(self) -> list[Destination]:
        if self._destinations_override is not None:
            return self._destinations_override
        destinations: list[Destination] = [
            CStoreDestination(node, calling_aet=self.config.ae_title, timeout_s=self.config.timeout_s)
            for node in self.config.destinations
        ]
        if self.config.stow_url:
            destinations.append(StowDestination(self.config.stow_url, token=self.config.stow_token))
        return destinations


def _allow_list(entries: tuple[str, ...]) -> AllowList:
    try:
        return AllowList(entries)
    except ValueError as exc:
        raise UsageError(f"--allow: {exc}") from exc
