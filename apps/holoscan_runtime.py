"""What every MONAI Deploy (Holoscan) app of ours needs before it starts.

- Holoscan wants a 32 MiB stack (it crashes or warns below that); the main thread's stack size is
  fixed when the process starts, so a too-small limit is raised and the app re-executes itself.
- MONAI Deploy's argument parser exits on any flag it does not know, so our own flags are split
  off first and only ``-i/-o/-m/-l/-w`` reach it.
- Usage errors (bad model directory, bad settings) end the app with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
from collections.abc import Sequence

__all__ = ["HOLOSCAN_STACK_BYTES", "add_run_arguments", "ensure_stack_size", "split_app_arguments"]

logger = logging.getLogger(__name__)

HOLOSCAN_STACK_BYTES = 32 * 1024 * 1024
_REEXEC_MARK = "MEDGEMMA_DEPLOY_STACK_RAISED"


def ensure_stack_size(module: str, argv: Sequence[str]) -> None:
    """Re-execute ``python -m module argv...`` with a 32 MiB stack if the limit is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    if soft == resource.RLIM_INFINITY or soft >= HOLOSCAN_STACK_BYTES or os.environ.get(_REEXEC_MARK):
        return
    if hard != resource.RLIM_INFINITY and hard < HOLOSCAN_STACK_BYTES:
        logger.warning("stack limit %d < 32 MiB and cannot be raised; Holoscan may be unstable", hard)
        return
    resource.setrlimit(resource.RLIMIT_STACK, (HOLOSCAN_STACK_BYTES, hard))
    os.environ[_REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", module, *argv])


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Our flags, shared by the apps; each has an environment variable (see settings.py)."""
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (env MEDGEMMA_DEPLOY_DEVICE)")
    parser.add_argument(
        "--labels",
        type=str,
        action="append",
        default=None,
        help="label-set YAML (env MEDGEMMA_DEPLOY_LABELS)",
    )
    parser.add_argument("--relevance-top-k", type=int, default=None, dest="relevance_top_k")
    parser.add_argument("--embeddings", action="store_true", default=None, dest="write_embeddings")


def split_app_arguments(
    argv: Sequence[str], parser: argparse.ArgumentParser
) -> tuple[argparse.Namespace, list[str]]:
    """Parse our flags out of ``argv`` and return them with the rest (for MONAI Deploy)."""
    ours, rest = parser.parse_known_args(list(argv))
    return ours, rest
