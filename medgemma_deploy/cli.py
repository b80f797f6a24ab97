"""``medgemma-deploy``: the one command line of the package.

Exit codes: 0 everything processed; 3 some inputs rejected (the rest processed and written);
2 usage errors (bad paths, unloadable model), always one line on stderr and never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from medgemma_deploy.errors import UsageError

__all__ = ["build_parser", "main"]

logger = logging.getLogger("medgemma_deploy.cli")


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
    classify.add_argument(
        "--labels",
        type=Path,
        action="append",
        metavar="YAML",
        help="label-set YAML file (repeatable); default: the packaged chest X-ray, CT and dermatology sets",
    )
    classify.add_argument(
        "--relevance-top-k",
        type=int,
        default=3,
        metavar="N",
        help="relevance maps for present findings plus the N most probable (default 3)",
    )
    classify.add_argument(
        "--embeddings",
        action="store_true",
        help="also write each series' image embeddings as OUT/embeddings-<series>.npy",
    )

    models = sub.add_parser("make-test-models", help="write tiny random-weight models (tests and demo only)")
    models.add_argument("output", type=Path, help="models root to create (gets medsiglip/ and medgemma/)")
    models.add_argument("--seed", type=int, default=0)

    demo = sub.add_parser("demo", help="synthetic study + tiny random models through the whole pipeline")
    demo.add_argument("-o", "--output", type=Path, default=Path("demo-output"), help="default: ./demo-output")
    demo.add_argument("--device", choices=["cpu", "cuda"], default=None)
    return parser


def _add_io_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--input", type=Path, required=True, help="DICOM file or folder (recursive)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    parser.add_argument(
        "-m",
        "--models",
        type=Path,
        required=True,
        help="the model directory itself, or a models root holding medsiglip/ (and medgemma/)",
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available, else cpu"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        if args.command == "classify":
            return _classify(args)
        if args.command == "make-test-models":
            from medgemma_deploy.testmodels import make_test_models

            for path in make_test_models(args.output, seed=args.seed).values():
                print(path)
            return 0
        if args.command == "demo":
            from medgemma_deploy.demo import run_demo

            return run_demo(args.output, device=args.device)
    except UsageError as exc:
        print(f"medgemma-deploy: error: {exc}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {args.command}")


def _classify(args: argparse.Namespace) -> int:
    from medgemma_deploy.classify_run import run_classify
    from medgemma_deploy.operators.classify_pipeline import ClassifyOptions
    from medgemma_deploy.settings import resolve_settings

    settings = resolve_settings(
        {
            "device": args.device,
            "labels": args.labels,
            "relevance_top_k": args.relevance_top_k,
            "write_embeddings": args.embeddings,
        }
    )
    results = run_classify(
        args.input,
        args.output,
        args.models,
        label_files=settings.labels,
        device=settings.device,
        options=ClassifyOptions(
            relevance_top_k=settings.relevance_top_k, write_embeddings=settings.write_embeddings
        ),
    )
    print(f"results: {args.output / 'results.json'}")
    for written in results.outputs:
        print(f"wrote {written.kind}: {written.path}")
    if results.rejected:
        print(f"{len(results.rejected)} input(s) rejected; see results.json", file=sys.stderr)
    return results.exit_code


def _configure_logging(verbose: bool) -> None:
    """Our log lines (progress, one line per rejected file) go to stderr, whatever the host configured."""
    level = logging.DEBUG if verbose else logging.INFO
    package_logger = logging.getLogger("medgemma_deploy")
    for handler in list(package_logger.handlers):
        if getattr(handler, "_medgemma_deploy_cli", False):
            package_logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler._medgemma_deploy_cli = True  # type: ignore[attr-defined]
    package_logger.addHandler(handler)
    package_logger.setLevel(level)
    package_logger.propagate = False
    # Third-party chatter (transformers' progress bars, highdicom) stays off unless asked for.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    if not verbose:
        transformers_logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
