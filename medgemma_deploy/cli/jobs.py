"""``medgemma-deploy jobs``: list the listener's study-version jobs, or retry a failed one.

Reads the job store of a spool (``--spool``, else ``MEDGEMMA_LISTENER_SPOOL``, else
``/var/spool/medgemma``) while the listener runs. Output is a table, or JSON lines with ``--json``;
it holds UIDs, states, counts, triage priorities with their reasons (findings and probabilities)
and the HL7 notification's state, never patient data (the ORU's text stays in its spool file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from medgemma_deploy.cli.listen import resolve_option
from medgemma_deploy.errors import UsageError
from medgemma_deploy.listener.jobmodel import JobState

if TYPE_CHECKING:
    from medgemma_deploy.listener.jobmodel import Job, Notification, RejectedInput

__all__ = [
    "DEFAULT_SPOOL",
    "describe_notification",
    "describe_status",
    "format_table",
    "main",
    "register",
    "run",
]

DEFAULT_SPOOL = Path("/var/spool/medgemma")
_STATES = ("received", "queued", "running", "delivering", "delivered", "failed")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``jobs`` subcommand."""
    parser = subparsers.add_parser("jobs", help="list the DICOM listener's jobs (or retry a failed one)")
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--spool", type=Path, metavar="DIR", help=f"the listener's spool (default {DEFAULT_SPOOL})"
    )
    parser.add_argument(
        "--state", action="append", choices=_STATES, help="only jobs in this state (repeatable)"
    )
    parser.add_argument("--study", metavar="UID", help="only jobs of this Study Instance UID")
    parser.add_argument("--limit", type=int, metavar="N", help="at most N jobs (newest first)")
    parser.add_argument("--json", action="store_true", help="one JSON object per job")
    parser.add_argument(
        "--retry",
        type=int,
        metavar="JOB_ID",
        help="give a failed job (or its failed HL7 message) a fresh start",
    )


def run(args: argparse.Namespace) -> int:
    """Print the jobs (or retry one); 2 with one line on stderr for a missing spool or bad job id."""
    from medgemma_deploy.listener.jobstore import JobStore

    try:
        # The spool the listener would use (--spool, else MEDGEMMA_LISTENER_SPOOL), resolved by the
        # listener's own rule so the two commands never disagree; ours alone has a default.
        spool = resolve_option("spool", args.spool, os.environ) or DEFAULT_SPOOL
        database = spool / "jobs.sqlite"
        if args.retry is not None:
            store = JobStore(database, read_only=False) if database.is_file() else None
            if store is None:
                raise UsageError(f"{database}: no job store here (has a listener used this spool?)")
            try:
                notification = store.notification(args.retry)
                job = store.job(args.retry)
                if job is not None and job.state is not JobState.FAILED and notification is not None:
                    notification = store.requeue_notification(args.retry)
                    print(f"job {job.id}: HL7 message {notification.control_id} is queued again")
                    return 0
                job = store.requeue_failed(args.retry)
            except (KeyError, ValueError) as exc:
                raise UsageError(str(exc).strip("'\"")) from exc
            finally:
                store.close()
            print(f"job {job.id} (study {job.study_instance_uid} v{job.version}) is {job.state.value} again")
            return 0
        try:
            store = JobStore(database, read_only=True)
        except FileNotFoundError as exc:
            raise UsageError(str(exc)) from exc
        try:
            jobs = store.jobs(states=args.state, study_instance_uid=args.study)
            rejected: dict[int, list[RejectedInput]] = {}
            for item in store.rejected_inputs():
                rejected.setdefault(item.job_id, []).append(item)
            notifications = {n.job_id: n for n in store.notifications()}
        finally:
            store.close()
    except UsageError as exc:
        print(f"medgemma-deploy jobs: error: {exc}", file=sys.stderr)
        return 2
    if args.limit is not None:
        jobs = jobs[-args.limit :]
    if args.json:
        for job in jobs:
            record = {**job.to_json(), "status": describe_status(job)}
            record["rejected_inputs"] = [item.to_json() for item in rejected.get(job.id, [])]
            notification = notifications.get(job.id)
            record["hl7"] = None if notification is None else notification.to_json()
            print(json.dumps(record, sort_keys=True))
    else:
        print(format_table(jobs, rejected, notifications))
    return 0


def describe_status(job: Job, now: float | None = None) -> str:
    """What an operator needs to know about a job's problems, in words.

    ``failed, will retry`` (a transient failure or a crash, attempts left) is told apart from
    ``failed`` (given up) and from ``rejected input`` (the job went on without some instances,
    which are listed and quarantined).
    """
    now = time.time() if now is None else now
    parts = []
    if job.last_error and job.state in (JobState.QUEUED, JobState.DELIVERING, JobState.RUNNING):
        wait = max(0.0, job.not_before - now)
        parts.append(f"failed, will retry (attempt {job.attempts} failed; next in {wait:.0f} s)")
    elif job.state is JobState.FAILED:
        parts.append(f"failed after {job.attempts} attempt(s), not retried")
    if job.n_rejected:
        parts.append(f"rejected input: {job.n_rejected} instance(s) quarantined")
    return "; ".join(parts) or job.state.value


def describe_notification(notification: Notification, now: float | None = None) -> str:
    """The HL7 message's state in words: sent (with the ACK), queued (with the retry), or failed."""
    now = time.time() if now is None else now
    head = f"HL7 {notification.control_id} to {notification.endpoint}"
    if notification.state.value == "sent":
        return f"{head}: sent ({notification.ack_code})"
    if notification.state.value == "failed":
        return f"{head}: failed after {notification.attempts} attempt(s): {notification.last_error}"
    if notification.attempts:
        wait = max(0.0, notification.not_before - now)
        return (
            f"{head}: queued, will retry (attempt {notification.attempts} failed; next in {wait:.0f} s): "
            f"{notification.last_error}"
        )
    return f"{head}: queued"


def format_table(
    jobs: Sequence[Job],
    rejected: Mapping[int, Sequence[RejectedInput]] | None = None,
    notifications: Mapping[int, Notification] | None = None,
) -> str:
    """A fixed-width table: id, state, priority, version, instances, outputs, rejected, attempts,
    updated, study.

    Under each job with a problem: its status in words (:func:`describe_status`), the last error,
    and each rejected instance with its stage and reason; under a triaged job above routine, the
    rules that fired; under a job with an HL7 message, its state (:func:`describe_notification`).
    """
    rejected = rejected or {}
    notifications = notifications or {}
    header = (
        f"{'ID':>5} {'STATE':<10} {'PRIO':<7} {'VER':>3} {'INST':>5} {'OUT':>4} {'REJ':>4} {'TRY':>3} "
        f"{'UPDATED (UTC)':<19} STUDY / STATUS"
    )
    lines = [header]
    for job in jobs:
        updated = datetime.fromtimestamp(job.updated_at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        outputs = "" if job.n_outputs is None else str(job.n_outputs)
        refused = "" if job.n_rejected is None else str(job.n_rejected)
        priority = job.priority_name or "-"
        lines.append(
            f"{job.id:>5} {job.state.value:<10} {priority:<7} {job.version:>3} {job.n_instances:>5} "
            f"{outputs:>4} {refused:>4} {job.attempts:>3} {updated:<19} {job.study_instance_uid}"
        )
        for reason in job.triage_reasons():
            lines.append(
                f"{'':>5} └ triage {reason['priority']}: {reason['display_name']} "
                f"{reason['probability']:.4f} >= {reason['threshold']:g} in series "
                f"{reason['series_instance_uid']}"
            )
        status = describe_status(job)
        if status != job.state.value:
            lines.append(f"{'':>5} └ {status}")
        if job.last_error:
            lines.append(f"{'':>5} └ last error: {job.last_error}")
        for item in rejected.get(job.id, []):
            instance = item.sop_instance_uid or item.path
            lines.append(f"{'':>5} └ rejected {instance} [{item.stage}]: {item.reason}")
        if job.id in notifications:
            lines.append(f"{'':>5} └ {describe_notification(notifications[job.id])}")
    if len(lines) == 1:
        lines.append("(no jobs)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medgemma-deploy jobs", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
