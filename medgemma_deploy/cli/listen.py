"""``medgemma-deploy listen``: the DICOM listener (C-STORE SCP → spool → pipeline → PACS).

Every option can also come from the environment, ``MEDGEMMA_LISTENER_<OPTION>`` (``--quiet-seconds``
→ ``MEDGEMMA_LISTENER_QUIET_SECONDS``; lists comma-separated); a flag wins over the variable.
The STOW-RS bearer token is read only from ``MEDGEMMA_LISTENER_STOW_TOKEN``, never from the
command line. Triage notification: ``--hl7 HOST:PORT`` sends an HL7 v2.5.1 ORU^R01 over MLLP for
every study at or above ``--hl7-min-priority`` (default URGENT; ``--hl7-all``: every triaged
study), see ``docs/hl7-oru.md``. Every run setting (device, label sets, relevance maps, embeddings,
prompts, report length, findings grounding, backend) comes from :mod:`medgemma_deploy.settings`
(``MEDGEMMA_DEPLOY_*``, ``MEDGEMMA_DEPLOY_CONFIG``); ``--backend``/``--prompts`` and their
``MEDGEMMA_LISTENER_*`` variables override those two.

Exit codes: 0 after a clean stop (SIGTERM/SIGINT), 2 for a configuration that cannot start
(one line on stderr).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from medgemma_deploy.errors import UsageError

__all__ = ["ENV_PREFIX", "build_config", "main", "register", "resolve_option", "run"]

logger = logging.getLogger(__name__)

ENV_PREFIX = "MEDGEMMA_LISTENER_"


def _boolean(text: str) -> bool:
    """An environment switch: 1/true/yes/on or 0/false/no/off (any case)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a yes/no value (1/0, true/false, yes/no, on/off)")


def _on_off(text: str) -> bool:
    """``on``/``off`` (or any :func:`_boolean` value)."""
    return _boolean(text)


#: option (argparse dest) → (converter, default) for options resolvable from the environment.
_OPTIONS: dict[str, tuple[Callable[[str], Any], Any]] = {
    "ae_title": (str, "MEDGEMMA"),
    "bind": (str, "0.0.0.0"),
    "port": (int, 11112),
    "spool": (Path, None),
    "pipeline": (str, "classify"),
    "destination": (str, ()),
    "stow_url": (str, None),
    "allow": (str, ()),
    "models": (Path, None),
    # None: not given to the listener; the run settings (MEDGEMMA_DEPLOY_BACKEND/_PROMPTS) decide.
    "backend": (str, None),
    "prompts": (Path, None),
    "quiet_seconds": (float, 30.0),
    "concurrency": (int, 2),
    "max_attempts": (int, 10),
    "backoff_seconds": (float, 5.0),
    "max_backoff_seconds": (float, 600.0),
    "min_free_mb": (int, 256),
    "max_associations": (int, 32),
    "timeout_seconds": (float, 60.0),
    "tls_cert": (Path, None),
    "tls_key": (Path, None),
    "tls_ca": (Path, None),
    "metrics_port": (int, None),
    "retention_hours": (float, 72.0),
    "drain_seconds": (float, 60.0),
    "audit_log": (Path, None),
    "triage_aging_seconds": (float, 600.0),
    "triage_queue": (_on_off, True),
    "hl7": (str, None),
    "hl7_min_priority": (str, "URGENT"),
    "hl7_all": (_boolean, False),
    "hl7_tls": (_boolean, False),
    "hl7_tls_ca": (Path, None),
    "hl7_tls_cert": (Path, None),
    "hl7_tls_key": (Path, None),
    "hl7_sending_application": (str, "MEDGEMMA_DEPLOY"),
    "hl7_sending_facility": (str, ""),
    "hl7_receiving_application": (str, ""),
    "hl7_receiving_facility": (str, ""),
    "hl7_processing_id": (str, "P"),
}
_LIST_OPTIONS = frozenset({"destination", "allow"})
#: The "spool and jobs" flags: option, metavar, help; type and default (named in the help) come
#: from :data:`_OPTIONS`, so the help cannot drift from what the listener uses.
_SPOOL_AND_JOB_OPTIONS = (
    ("spool", "DIR", "spool folder (required)"),
    ("quiet_seconds", "S", "a study is complete after S seconds without a new instance"),
    ("concurrency", "N", "job worker threads"),
    ("max_attempts", "N", "attempts before a job fails"),
    ("backoff_seconds", "S", "first retry delay, doubled each time"),
    ("max_backoff_seconds", "S", "longest retry delay"),
    ("min_free_mb", "MB", "refuse instances (0xA700) when less would stay free"),
    ("retention_hours", "H", "delete finished studies' files after H hours; 0 keeps them"),
    ("drain_seconds", "S", "on SIGTERM, wait for running jobs"),
    ("audit_log", "FILE", "JSON-lines audit log (default SPOOL/audit.jsonl)"),
    ("metrics_port", "PORT", "Prometheus /metrics port (default off)"),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``listen`` subcommand."""
    parser = subparsers.add_parser(
        "listen",
        help="DICOM listener: C-STORE SCP → durable spool → pipeline → results to the PACS",
        description=__doc__.split("\n\n")[0],
        epilog=f"Environment: every option as {ENV_PREFIX}<OPTION> (e.g. {ENV_PREFIX}QUIET_SECONDS).",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``listen`` options (defaults are resolved later, so the environment can fill them)."""
    net = parser.add_argument_group("DICOM")
    net.add_argument("--ae-title", metavar="AET", help="our AE title (default MEDGEMMA)")
    net.add_argument("--bind", metavar="ADDRESS", help="interface to listen on (default 0.0.0.0)")
    net.add_argument("--port", type=int, help="DICOM port (default 11112)")
    net.add_argument(
        "--allow",
        action="append",
        metavar="AET[@HOST]",
        help="allowed calling AE: AET, AET@HOST, *@HOST; HOST an address, CIDR network or name "
        "(repeatable; none = accept all, with a warning)",
    )
    net.add_argument(
        "--max-associations", type=int, metavar="N", help="simultaneous associations (default 32)"
    )
    net.add_argument(
        "--timeout-seconds", type=float, metavar="S", help="ACSE/DIMSE/network timeout (default 60)"
    )
    net.add_argument("--tls-cert", type=Path, metavar="PEM", help="DICOM TLS server certificate")
    net.add_argument("--tls-key", type=Path, metavar="PEM", help="DICOM TLS private key")
    net.add_argument(
        "--tls-ca", type=Path, metavar="PEM", help="require client certificates signed by this CA"
    )

    work = parser.add_argument_group("spool and jobs")
    for name, metavar, text in _SPOOL_AND_JOB_OPTIONS:
        convert, default = _OPTIONS[name]
        work.add_argument(
            "--" + name.replace("_", "-"),
            type=convert,
            metavar=metavar,
            help=text if default is None else f"{text} (default {default:g})",
        )

    pipe = parser.add_argument_group("pipeline and delivery")
    pipe.add_argument(
        "--pipeline", metavar="NAME", help="classify, report, study, or module:factory (default classify)"
    )
    pipe.add_argument(
        "-m", "--models", type=Path, metavar="DIR", help="models root or model folder (local backend)"
    )
    pipe.add_argument("--backend", metavar="SPEC", help="local (default) or grpc://HOST:PORT of a worker")
    pipe.add_argument("--device", choices=["cpu", "cuda"], default=None, help="local backend device")
    pipe.add_argument(
        "--labels", type=Path, action="append", metavar="YAML", help="label-set file (repeatable)"
    )
    pipe.add_argument("--prompts", type=Path, metavar="YAML", help="MedGemma prompts file (report/study)")
    pipe.add_argument(
        "--destination", action="append", metavar="AET@HOST:PORT", help="C-STORE results here (repeatable)"
    )
    from medgemma_deploy.cli.search import add_index_arguments

    add_index_arguments(pipe)
    pipe.add_argument("--stow-url", metavar="URL", help="also/instead STOW-RS results to this DICOMweb root")

    triage = parser.add_argument_group("triage and HL7 notification (docs/hl7-oru.md)")
    triage.add_argument(
        "--triage-queue",
        type=_on_off,
        metavar="on|off",
        help="urgent studies first, every study classified before any report (default on); "
        "off: first come, first served (triage still recorded and notified)",
    )
    triage.add_argument(
        "--triage-aging-seconds",
        type=float,
        metavar="S",
        help="queue order: waiting S seconds counts as one triage level, so routine work "
        "still advances (default 600)",
    )
    triage.add_argument(
        "--hl7", metavar="HOST:PORT", help="send an HL7 v2.5.1 ORU^R01 over MLLP to this interface engine"
    )
    triage.add_argument(
        "--hl7-min-priority",
        type=str.upper,
        choices=["ROUTINE", "URGENT", "STAT"],
        help="notify studies at or above this triage level (default URGENT)",
    )
    triage.add_argument(
        "--hl7-all", action="store_true", default=None, help="notify every triaged study, routine ones too"
    )
    triage.add_argument("--hl7-tls", action="store_true", default=None, help="MLLP over TLS (system CAs)")
    triage.add_argument("--hl7-tls-ca", type=Path, metavar="PEM", help="MLLP over TLS, trusting this CA")
    triage.add_argument("--hl7-tls-cert", type=Path, metavar="PEM", help="client certificate for MLLP/TLS")
    triage.add_argument("--hl7-tls-key", type=Path, metavar="PEM", help="its private key")
    triage.add_argument("--hl7-sending-application", metavar="NAME", help="MSH-3 (default MEDGEMMA_DEPLOY)")
    triage.add_argument("--hl7-sending-facility", metavar="NAME", help="MSH-4 (default empty)")
    triage.add_argument("--hl7-receiving-application", metavar="NAME", help="MSH-5 (default empty)")
    triage.add_argument("--hl7-receiving-facility", metavar="NAME", help="MSH-6 (default empty)")
    triage.add_argument(
        "--hl7-processing-id", choices=["P", "T", "D"], help="MSH-11: production, training, debugging"
    )


def resolve_option(name: str, flag: Any, environ: Mapping[str, str]) -> Any:
    """One option from its flag (not None), else ``MEDGEMMA_LISTENER_<OPTION>``, else its default.

    ``medgemma-deploy jobs`` finds the spool this way too, so the two commands never disagree on it.

    Raises
    ------
    UsageError
        The environment value cannot be converted (naming the variable and the value).
    """
    convert, default = _OPTIONS[name]
    if flag is not None:
        return tuple(flag) if name in _LIST_OPTIONS else flag
    variable = ENV_PREFIX + name.upper()
    raw = environ.get(variable, "")
    if raw == "":
        return default
    try:
        if name in _LIST_OPTIONS:
            return tuple(item.strip() for item in raw.split(",") if item.strip())
        return convert(raw)
    except ValueError as exc:
        raise UsageError(f"{variable}={raw!r}: {exc}") from exc


def resolve_options(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, Any]:
    """Every option by :func:`resolve_option`.

    Raises
    ------
    UsageError
        An environment value cannot be converted (naming the variable and the value).
    """
    return {name: resolve_option(name, getattr(args, name, None), environ) for name in _OPTIONS}


def build_config(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Any:
    """Resolve ``args`` + environment into a :class:`~medgemma_deploy.listener.service.ListenerConfig`."""
    from medgemma_deploy.listener.delivery import DicomNode
    from medgemma_deploy.listener.pipelines import PipelineOptions
    from medgemma_deploy.listener.service import ListenerConfig
    from medgemma_deploy.listener.worker_loop import RetryPolicy
    from medgemma_deploy.settings import resolve_settings

    environ = os.environ if environ is None else environ
    options = resolve_options(args, environ)
    if options["spool"] is None:
        raise UsageError(f"--spool DIR is required (or {ENV_PREFIX}SPOOL)")
    try:
        destinations = tuple(DicomNode.parse(text) for text in options["destination"])
        retry = RetryPolicy(
            max_attempts=options["max_attempts"],
            base_s=options["backoff_seconds"],
            max_s=options["max_backoff_seconds"],
        )
    except ValueError as exc:
        raise UsageError(f"--destination/--max-attempts/--backoff-seconds: {exc}") from exc
    # The listener's own flags and MEDGEMMA_LISTENER_BACKEND/_PROMPTS win over the run settings,
    # which bring every other setting (MEDGEMMA_DEPLOY_*, MEDGEMMA_DEPLOY_CONFIG).
    settings = resolve_settings(
        {
            "device": args.device,
            "labels": args.labels,
            "backend": options["backend"],
            "prompts": options["prompts"],
            "index": args.index,
            "store": args.store,
        },
        environ,
    )
    retention = options["retention_hours"]
    hl7 = _hl7_settings(options)
    return ListenerConfig(
        ae_title=options["ae_title"],
        host=options["bind"],
        port=options["port"],
        spool=options["spool"],
        pipeline=options["pipeline"],
        pipeline_options=PipelineOptions(models_path=options["models"], settings=settings),
        destinations=destinations,
        stow_url=options["stow_url"],
        stow_token=environ.get(ENV_PREFIX + "STOW_TOKEN") or None,
        allow=options["allow"],
        quiet_s=options["quiet_seconds"],
        concurrency=options["concurrency"],
        retry=retry,
        min_free_bytes=options["min_free_mb"] * 1024 * 1024,
        max_associations=options["max_associations"],
        timeout_s=options["timeout_seconds"],
        tls_cert=options["tls_cert"],
        tls_key=options["tls_key"],
        tls_ca=options["tls_ca"],
        metrics_port=options["metrics_port"],
        metrics_host=options["bind"],
        retention_s=retention * 3600.0 if retention and retention > 0 else None,
        drain_s=options["drain_seconds"],
        audit_log=options["audit_log"],
        hl7=hl7,
        triage_aging_s=options["triage_aging_seconds"],
        triage_queue=options["triage_queue"],
    )


def _hl7_settings(options: Mapping[str, Any]) -> Any:
    """The HL7 notification settings from the resolved options, or None without ``--hl7``.

    Raises
    ------
    UsageError
        A bad endpoint, priority, identity name or TLS file, or HL7 options without ``--hl7``.
    """
    import ssl

    from medgemma_deploy.domain import TriagePriority
    from medgemma_deploy.listener.hl7 import Hl7Identity
    from medgemma_deploy.listener.mllp import Hl7Endpoint
    from medgemma_deploy.listener.notify import Hl7Settings

    tls_files = (options["hl7_tls_ca"], options["hl7_tls_cert"], options["hl7_tls_key"])
    if options["hl7"] is None:
        if options["hl7_all"] or options["hl7_tls"] or any(tls_files):
            raise UsageError("--hl7-all and --hl7-tls* need --hl7 HOST:PORT (the interface engine)")
        return None
    if (options["hl7_tls_cert"] is None) != (options["hl7_tls_key"] is None):
        raise UsageError("--hl7-tls-cert and --hl7-tls-key go together")
    context = None
    if options["hl7_tls"] or any(tls_files):
        try:
            context = ssl.create_default_context(cafile=options["hl7_tls_ca"])
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            if options["hl7_tls_cert"] is not None:
                context.load_cert_chain(options["hl7_tls_cert"], options["hl7_tls_key"])
        except (OSError, ssl.SSLError) as exc:
            files = ", ".join(str(f) for f in tls_files if f)
            raise UsageError(f"--hl7-tls: cannot load {files} ({exc})") from exc
    priority_name = str(options["hl7_min_priority"]).strip().upper()
    if priority_name not in TriagePriority.__members__:
        raise UsageError(f"--hl7-min-priority {priority_name!r}: must be ROUTINE, URGENT or STAT")
    try:
        endpoint = Hl7Endpoint.parse(options["hl7"], ssl_context=context)
        endpoint = Hl7Endpoint(endpoint.host, endpoint.port, context, timeout_s=options["timeout_seconds"])
        identity = Hl7Identity(
            sending_application=options["hl7_sending_application"],
            sending_facility=options["hl7_sending_facility"],
            receiving_application=options["hl7_receiving_application"],
            receiving_facility=options["hl7_receiving_facility"],
            processing_id=options["hl7_processing_id"],
        )
    except ValueError as exc:
        raise UsageError(f"--hl7: {exc}") from exc
    return Hl7Settings(
        endpoint=endpoint,
        identity=identity,
        min_priority=TriagePriority[priority_name],
        send_all=bool(options["hl7_all"]),
    )


def run(args: argparse.Namespace) -> int:
    """Run the listener until SIGTERM/SIGINT; 2 with one line on stderr if it cannot start."""
    import pydicom

    from medgemma_deploy.listener.service import Listener

    # pydicom's read-validation warnings quote attribute values (patient names included); the
    # listener's logs must hold UIDs only, so they are off in this process.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pynetdicom").setLevel(
        logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING
    )
    stop = threading.Event()
    try:
        listener = Listener(build_config(args))
        listener.start()
    except UsageError as exc:
        print(f"medgemma-deploy listen: error: {exc}", file=sys.stderr)
        return 2
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop.wait(0.5):
            pass
        logger.info("stopping: no new associations, draining running jobs")
    finally:
        listener.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m medgemma_deploy.apps.listener``: the same options as ``medgemma-deploy listen``."""
    parser = argparse.ArgumentParser(prog="medgemma-deploy-listener", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_arguments(parser)
    args = parser.parse_args(argv)
    from medgemma_deploy.logs import configure_logging

    configure_logging(logging.DEBUG if args.verbose else logging.INFO, service=True)
    return run(args)
