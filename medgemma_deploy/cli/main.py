"""``medgemma-deploy``: the one command line of the package.

Exit codes: 0 everything processed; 3 some inputs rejected (the rest processed and written);
2 usage errors (bad paths, unloadable model), always one line on stderr and never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from medgemma_deploy.backends.local import BACKEND_HELP
from medgemma_deploy.errors import ServiceError, UsageError
from medgemma_deploy.logs import configure_logging
from medgemma_deploy.precision import PRECISION_HELP, PRECISIONS
from medgemma_deploy.results import EXIT_SERVICE_UNAVAILABLE

__all__ = ["build_parser", "main"]

logger = logging.getLogger("medgemma_deploy.cli.main")

#: Subcommands contributed by other modules: each exposes ``register(subparsers)`` and ``run(args)``.
_COMMAND_MODULES: tuple[str, ...] = (
    "medgemma_deploy.cli.worker",
    "medgemma_deploy.cli.listen",
    "medgemma_deploy.cli.jobs",
    "medgemma_deploy.cli.search",
)
#: Subcommands that run until stopped: their log lines carry the time and the logger.
_SERVICE_COMMANDS = ("listen", "worker")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medgemma-deploy",
        description="MedSigLIP findings and MedGemma draft reports from DICOM studies, as DICOM SR/SEG. "
        "Research models: every output is AI-generated and UNVERIFIED.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    classify = sub.add_parser("classify", help="MedSigLIP zero-shot findings → TID 1500 SR + relevance SEG")
    _add_io_arguments(classify)
    _add_classify_arguments(classify)

    report = sub.add_parser("report", help="MedGemma draft report → UNVERIFIED report SR (TID 2000)")
    _add_io_arguments(report)
    _add_report_arguments(report)
    report.add_argument(
        "--labels",
        type=Path,
        action="append",
        metavar="YAML",
        help="label sets for --with-findings (default: the packaged ones)",
    )
    report.add_argument(
        "--medsiglip",
        type=Path,
        metavar="DIR",
        help="MedSigLIP directory for --with-findings when -m is the MedGemma directory",
    )

    study = sub.add_parser("study", help="classify + report in one pass: findings SR, SEG and report SR")
    _add_io_arguments(study)
    _add_classify_arguments(study)
    _add_report_arguments(study)

    models = sub.add_parser("make-test-models", help="write tiny random-weight models (tests and demo only)")
    models.add_argument("output", type=Path, help="models root to create (gets medsiglip/ and medgemma/)")
    models.add_argument("--seed", type=int, default=0)

    demo = sub.add_parser("demo", help="synthetic study + tiny random models through the whole pipeline")
    demo.add_argument("-o", "--output", type=Path, default=Path("demo-output"), help="default: ./demo-output")
    demo.add_argument("--device", default=None)

    for module_name in _COMMAND_MODULES:
        module = _optional_command(module_name)
        if module is not None:
            module.register(sub)
    return parser


def _add_io_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--input", type=Path, required=True, help="DICOM file or folder (recursive)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    parser.add_argument(
        "-m",
        "--models",
        type=Path,
        default=None,
        help="the model directory itself, or a models root holding medsiglip/ and medgemma/ "
        "(needed with the local backend)",
    )
    parser.add_argument("--backend", default=None, help=BACKEND_HELP)
    parser.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)"
    )
    parser.add_argument("--precision", choices=PRECISIONS, default=None, help=PRECISION_HELP)


def _add_classify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--labels",
        type=Path,
        action="append",
        metavar="YAML",
        help="label-set YAML file (repeatable); default: the packaged chest X-ray, CT and dermatology sets",
    )
    parser.add_argument(
        "--relevance-top-k",
        type=int,
        default=None,
        metavar="N",
        help="relevance maps for present findings plus the N most probable (default 3)",
    )
    parser.add_argument(
        "--relevance-format",
        choices=("seg", "pmap", "both"),
        default=None,
        help="relevance maps as FRACTIONAL SEG, Parametric Map or both (default both; see README)",
    )
    parser.add_argument(
        "--embeddings",
        action="store_true",
        default=None,
        help="also write each series' image embeddings as OUT/embeddings-<series>.npy",
    )
    from medgemma_deploy.cli.search import add_index_arguments

    add_index_arguments(parser)


def _add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prompts", type=Path, metavar="YAML", help="prompt book overriding the packaged prompts.yaml"
    )
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="N", help="default 512")
    parser.add_argument(
        "--with-findings",
        action="store_true",
        default=None,
        help="give MedGemma MedSigLIP's top findings as context (recorded in the SR)",
    )
    parser.add_argument(
        "--quiet-tokens",
        action="store_true",
        help="do not stream the report text to the terminal as it is generated",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    restore_logging = configure_logging(
        logging.DEBUG if args.verbose else logging.INFO, service=args.command in _SERVICE_COMMANDS
    )
    try:
        if args.command in ("classify", "report", "study"):
            return _run_pipeline(args)
        if args.command == "make-test-models":
            from medgemma_deploy.dev.testmodels import make_test_models

            for path in make_test_models(args.output, seed=args.seed).values():
                print(path)
            return 0
        if args.command == "demo":
            from medgemma_deploy.dev.demo import run_demo

            return run_demo(args.output, device=args.device)
        if hasattr(args, "func"):
            return int(args.func(args))
    except UsageError as exc:
        print(f"medgemma-deploy: error: {exc}", file=sys.stderr)
        return 2
    except ServiceError as exc:
        # A worker that stops answering mid-run is no input's fault and no usage error: one line,
        # its own exit code, so a script can retry the run later.
        message = " ".join(str(exc).split())
        print(
            f"medgemma-deploy: error: {message} (the run stopped; retry later)",
            file=sys.stderr,
        )
        return EXIT_SERVICE_UNAVAILABLE
    finally:
        restore_logging()
    raise AssertionError(f"unhandled command {args.command}")


def _run_pipeline(args: argparse.Namespace) -> int:
    from medgemma_deploy.engine import PipelineEngine, check_input_path
    from medgemma_deploy.settings import resolve_settings

    settings = resolve_settings(
        {
            "backend": args.backend,
            "device": args.device,
            "precision": args.precision,
            "labels": getattr(args, "labels", None),
            "relevance_top_k": getattr(args, "relevance_top_k", None),
            "relevance_format": getattr(args, "relevance_format", None),
            "write_embeddings": getattr(args, "embeddings", None),
            "prompts": getattr(args, "prompts", None),
            "max_new_tokens": getattr(args, "max_new_tokens", None),
            "with_findings": getattr(args, "with_findings", None),
            "index": getattr(args, "index", None),
            "store": getattr(args, "store", None),
        }
    )
    check_input_path(args.input)
    engine = PipelineEngine.from_settings(
        args.command, args.models, settings, medsiglip_path=getattr(args, "medsiglip", None)
    )
    sink = None if args.command == "classify" or args.quiet_tokens else _TokenPrinter()
    indexer = None
    if settings.index:
        from medgemma_deploy.search.indexer import SearchIndexer

        indexer = engine.on_classified = SearchIndexer.open(settings.store)
    try:
        with engine:
            results = engine.process(args.input, args.output, on_token=sink)
    finally:
        if indexer is not None:
            indexer.close()
    if sink is not None:
        sink.finish()
    print(f"results: {args.output / 'results.json'}")
    for written in results.outputs:
        print(f"wrote {written.kind}: {written.path}")
    if results.random_weights:
        print("RANDOM WEIGHTS: these outputs come from a random test model and mean nothing.")
    if results.rejected:
        print(f"{len(results.rejected)} input(s) rejected; see results.json", file=sys.stderr)
    return results.exit_code


class _TokenPrinter:
    """Streams report text to stdout as it is generated, with a header per series."""

    def __init__(self) -> None:
        self._series: str | None = None

    def __call__(self, series: object, piece: str) -> None:
        uid = series.series_instance_uid
        if uid != self._series:
            self.finish()
            print(f"--- draft report, {series.modality} series {uid} (UNVERIFIED) ---", flush=True)
            self._series = uid
        sys.stdout.write(piece)
        sys.stdout.flush()

    def finish(self) -> None:
        if self._series is not None:
            print(flush=True)
            self._series = None


def _optional_command(module_name: str) -> object | None:
    """A contributed subcommand's module, or None when its extra is not installed."""
    import importlib

    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == module_name or module_name.startswith(exc.name)):
            return None
        logger.debug("subcommand %s unavailable: %s", module_name, exc)
        return None


if __name__ == "__main__":
    sys.exit(main())
