"""``python -m medgemma_deploy.apps.worker``: the same options as ``medgemma-deploy worker``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from medgemma_deploy.cli.worker import add_arguments, run
from medgemma_deploy.errors import UsageError
from medgemma_deploy.logs import configure_logging


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m medgemma_deploy.apps.worker",
        description="Shared GPU worker: MedSigLIP and MedGemma over gRPC for many app instances.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(logging.DEBUG if args.verbose else logging.INFO, service=True)
    try:
        return run(args)
    except UsageError as exc:
        print(f"medgemma-deploy worker: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
