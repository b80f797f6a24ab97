"""``medgemma-deploy worker``: the shared GPU worker (gRPC) serving MedSigLIP and MedGemma.

Example::

    medgemma-deploy worker --listen 0.0.0.0:50051 --medsiglip /models/medsiglip \\
        --medgemma /models/medgemma --tls-cert server.pem --tls-key server.key \\
        --client-ca clients-ca.pem --metrics-port 9400

Exit codes: 0 after a clean shutdown (SIGTERM/SIGINT drain in-flight work first); 2 for usage
errors (bad address, unreadable certificate, no model could be loaded), one line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from medgemma_deploy.errors import UsageError
from medgemma_deploy.precision import PRECISION_HELP, PRECISIONS

if TYPE_CHECKING:
    from medgemma_deploy.worker.config import WorkerConfig

__all__ = ["add_arguments", "config_from_args", "register", "run"]

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``worker`` subcommand."""
    parser = subparsers.add_parser(
        "worker",
        help="shared GPU worker: serve MedSigLIP and MedGemma to many apps over gRPC",
        description=__doc__.split("\n\n")[0],
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The worker's options (shared by the CLI subcommand and ``python -m medgemma_deploy.apps.worker``)."""
    models = parser.add_argument_group("models")
    models.add_argument("--medsiglip", type=Path, metavar="DIR", help="MedSigLIP model directory")
    models.add_argument("--medgemma", type=Path, metavar="DIR", help="MedGemma model directory")
    models.add_argument(
        "-m",
        "--models",
        type=Path,
        metavar="ROOT",
        help="models root: serves ROOT/medsiglip and ROOT/medgemma when present",
    )
    models.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    models.add_argument("--precision", choices=PRECISIONS, default=None, help=PRECISION_HELP)
    models.add_argument(
        "--labels",
        type=Path,
        action="append",
        metavar="YAML",
        help="label sets clients may name (repeatable; default: the packaged ones)",
    )
    net = parser.add_argument_group("network and security")
    net.add_argument(
        "--listen", default="127.0.0.1:50051", metavar="HOST:PORT", help="default 127.0.0.1:50051"
    )
    net.add_argument("--tls-cert", type=Path, metavar="PEM", help="server certificate (turns TLS on)")
    net.add_argument("--tls-key", type=Path, metavar="PEM", help="server private key")
    net.add_argument(
        "--client-ca", type=Path, metavar="PEM", help="require client certificates signed by this CA"
    )
    net.add_argument(
        "--allow-insecure",
        action="store_true",
        help="allow plaintext on a non-loopback address (trusted networks only)",
    )
    net.add_argument(
        "--metrics-port", type=int, metavar="PORT", help="Prometheus /metrics port (default: off)"
    )
    net.add_argument(
        "--metrics-host", metavar="HOST", help="metrics bind address (default: the --listen host)"
    )
    net.add_argument(
        "--max-message-mb", type=int, default=128, metavar="MB", help="largest gRPC message (128)"
    )
    net.add_argument(
        "--max-concurrent-rpcs", type=int, default=256, metavar="N", help="more get RESOURCE_EXHAUSTED"
    )
    batch = parser.add_argument_group("batching")
    batch.add_argument(
        "--max-batch-size", type=int, default=32, metavar="N", help="MedSigLIP images per batch (32)"
    )
    batch.add_argument(
        "--max-queue-delay-ms",
        type=float,
        default=5.0,
        metavar="MS",
        help="longest wait for a MedSigLIP batch to fill (5)",
    )
    batch.add_argument(
        "--max-queued-images", type=int, default=1024, metavar="N", help="MedSigLIP queue bound"
    )
    batch.add_argument("--max-images-per-request", type=int, default=512, metavar="N")
    batch.add_argument(
        "--report-max-running", type=int, default=32, metavar="N", help="reports decoded together"
    )
    batch.add_argument("--report-max-waiting", type=int, default=64, metavar="N", help="report queue bound")
    batch.add_argument(
        "--report-max-cached-tokens",
        type=int,
        default=0,
        metavar="N",
        help="KV-cache budget in tokens (rows x longest prompt+new tokens); 0 = unlimited",
    )
    batch.add_argument(
        "--report-max-prefills",
        type=int,
        default=8,
        metavar="N",
        help="waiting reports prefilled together in one forward (8)",
    )
    batch.add_argument("--default-max-new-tokens", type=int, default=512, metavar="N")
    batch.add_argument(
        "--max-new-tokens", type=int, default=2048, metavar="N", help="most a request may ask for"
    )
    life = parser.add_argument_group("lifecycle")
    life.add_argument(
        "--drain-seconds", type=float, default=30.0, metavar="S", help="in-flight work gets this long"
    )
    life.add_argument("--no-warm-up", action="store_true", help="skip the warm-up passes")
    life.add_argument(
        "--require-all-models",
        action="store_true",
        help="exit when a configured model fails to load (default: serve the others)",
    )


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    """A validated ``WorkerConfig`` from parsed arguments (device and labels also from the environment)."""
    from medgemma_deploy.backends.tls import ServerTLS
    from medgemma_deploy.settings import resolve_settings
    from medgemma_deploy.worker.config import WorkerConfig

    settings = resolve_settings({"device": args.device, "precision": args.precision, "labels": args.labels})
    medsiglip, medgemma = args.medsiglip, args.medgemma
    if args.models is not None:
        medsiglip = medsiglip or _kind_under(args.models, "medsiglip")
        medgemma = medgemma or _kind_under(args.models, "medgemma")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    if args.client_ca is not None and args.tls_cert is None:
        raise UsageError("--client-ca (mutual TLS) needs --tls-cert and --tls-key")
    tls = ServerTLS(args.tls_cert, args.tls_key, args.client_ca) if args.tls_cert else None
    config = WorkerConfig(
        listen=args.listen,
        medsiglip=medsiglip,
        medgemma=medgemma,
        device=settings.device,
        precision=settings.precision,
        cache_dir=settings.cache_dir,
        label_files=tuple(settings.labels),
        tls=tls,
        allow_insecure=args.allow_insecure,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
        max_images_per_request=args.max_images_per_request,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        classify_max_batch_size=args.max_batch_size,
        classify_max_queue_delay=args.max_queue_delay_ms / 1000.0,
        classify_max_queued_images=args.max_queued_images,
        report_max_running=args.report_max_running,
        report_max_waiting=args.report_max_waiting,
        report_max_cached_tokens=args.report_max_cached_tokens,
        report_max_prefills_per_step=args.report_max_prefills,
        default_max_new_tokens=args.default_max_new_tokens,
        max_new_tokens=args.max_new_tokens,
        drain_timeout=args.drain_seconds,
        warm_up=not args.no_warm_up,
    )
    config.validate()
    return config


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT, then drain and exit 0.

    Raises
    ------
    UsageError
        Bad options, an address that cannot be bound, or no model could be loaded (or, with
        ``--require-all-models``, any one failed).
    """
    config = config_from_args(args)  # before the heavy imports: option errors come at once
    from medgemma_deploy.worker.edge.server import WorkerServer

    server = WorkerServer(config)
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        if not stop_requested.is_set():
            stop_requested.set()
            logger.info("%s received: draining", signal.Signals(signum).name)
            threading.Thread(target=server.shutdown, name="drain", daemon=True).start()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with server:
            failed = [d.kind for d in server.describe().models if not d.loaded]
            if failed and args.require_all_models:
                raise UsageError(f"--require-all-models: {', '.join(failed)} did not load (see the log)")
            print(f"worker serving on {server.address}", file=sys.stderr, flush=True)
            while not server.wait(timeout=1.0):
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _kind_under(root: Path, kind: str) -> Path | None:
    from medgemma_deploy.model_dir import resolve_model_dir

    try:
        return resolve_model_dir(root, kind)  # type: ignore[arg-type]
    except UsageError:
        return None
