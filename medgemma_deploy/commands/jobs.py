"""``medgemma-deploy jobs``: list the listener's study-version jobs, or retry a failed one.

Reads the job store of a spool (``--spool``, else ``MEDGEMMA_LISTENER_SPOOL``, else
``/var/spool/medgemma``) while the listener runs. Output is a table, or JSON lines with ``--json``;
it holds UIDs, states, counts and reasons, never patient data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from medgemma_deploy.errors import UsageError

if TYPE_CHECKING:
    from medgemma_deploy.network.jobstore import Job

__all__ = ["DEFAULT_SPOOL", "format_table", "main", "register", "run"]

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
    parser.add_argument("--retry", type=int, metavar="JOB_ID", help="give a failed job a fresh start")


def run(args: argparse.Namespace) -> int:
    """Print the jobs (or retry one); 2 with one line on stderr for a missing spool or bad job id."""
    from medgemma_deploy.network.jobstore import JobStore

    spool = args.spool or Path(os.environ.get("MEDGEMMA_LISTENER_SPOOL") or DEFAULT_SPOOL)
    database = spool / "jobs.sqlite"
    try:
        if args.retry is not None:
            store = JobStore(database, read_only=False) if database.is_file() else None
            if store is None:
                raise UsageError(f"{database}: no job store here (has a listener used this spool?)")
            try:
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
        finally:
            store.close()
    except UsageError as exc:
        print(f"medgemma-deploy jobs: error: {exc}", file=sys.stderr)
        return 2
    if args.limit is not None:
        jobs = jobs[-args.limit :]
    if args.json:
        for job in jobs:
            print(json.dumps(job.to_json(), sort_keys=True))
    else:
        print(format_table(jobs))
    return 0


def format_table(jobs: Sequence[Job]) -> str:
    """A fixed-width table: id, state, version, instances, outputs, attempts, updated, study, error."""
    header = (
        f"{'ID':>5} {'STATE':<10} {'VER':>3} {'INST':>5} {'OUT':>4} {'TRY':>3} "
        f"{'UPDATED (UTC)':<19} STUDY / LAST ERROR"
    )
    lines = [header]
    for job in jobs:
        updated = datetime.fromtimestamp(job.updated_at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        outputs = "" if job.n_outputs is None else str(job.n_outputs)
        lines.append(
            f"{job.id:>5} {job.state.value:<10} {job.version:>3} {job.n_instances:>5} {outputs:>4} "
            f"{job.attempts:>3} {updated:<19} {job.study_instance_uid}"
        )
        if job.last_error:
            lines.append(f"{'':>5} └ {job.last_error}")
    if len(lines) == 1:
        lines.append("(no jobs)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medgemma-deploy jobs", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
