"""What every MONAI Deploy (Holoscan) app of ours needs around ``compose()``.

- Holoscan wants a 32 MiB stack (it crashes or warns below that); the main thread's stack size is
  fixed when the process starts, so a too-small limit is raised and the app re-executes itself.
- MONAI Deploy's argument parser exits on any flag it does not know, so our own flags are split
  off first and only ``-i/-o/-m/-l/-w`` reach it.
- Models are loaded once, in ``compose()``, through :class:`~medgemma_deploy.engine.PipelineEngine`
  (the same loading code as the CLI and the listener) and unloaded when the app ends.
- Usage errors (bad model directory, bad settings) end the app with one line and exit code 2; the
  exit code is otherwise the run's (0 everything processed, 3 some inputs rejected).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Protocol

from holoscan.conditions import CountCondition
from monai.deploy.core import Application

from medgemma_deploy.engine import PipelineEngine, check_input_path
from medgemma_deploy.errors import UsageError
from medgemma_deploy.logs import configure_logging
from medgemma_deploy.operators.dicom_input.operator import DicomStudyLoaderOperator
from medgemma_deploy.operators.operator import PortOperator
from medgemma_deploy.results import EXIT_USAGE, RunResults
from medgemma_deploy.settings import RunSettings, resolve_settings

__all__ = [
    "HOLOSCAN_STACK_BYTES",
    "ModelApp",
    "ModelApplication",
    "input_and_output",
    "open_engine",
    "run_app",
]

logger = logging.getLogger(__name__)

HOLOSCAN_STACK_BYTES = 32 * 1024 * 1024
_REEXEC_MARK = "MEDGEMMA_DEPLOY_STACK_RAISED"


class ModelApp(Protocol):
    """What :func:`run_app` needs of an app: its engine (to close) and its final results."""

    engine: PipelineEngine | None

    def final_results(self) -> RunResults | None: ...

    def run(self) -> None: ...


class ModelApplication(Application):
    """Base of our MONAI Deploy apps: settings in, engine loaded in ``compose``, results out.

    Subclasses start ``compose`` with :meth:`open_study`, string the chains of
    :mod:`medgemma_deploy.apps.chains` together and set ``final_writer`` to the operator that writes
    ``results.json`` (it keeps the run's results as ``last_results``).
    """

    def __init__(self, *args: object, settings: RunSettings | None = None, **kwargs: object) -> None:
        self.settings = settings or RunSettings()
        self.engine: PipelineEngine | None = None
        self.final_writer: object | None = None
        super().__init__(*args, **kwargs)

    def final_results(self) -> RunResults | None:
        return getattr(self.final_writer, "last_results", None)

    def open_study(self, pipeline: str) -> tuple[PipelineEngine, DicomStudyLoaderOperator, Path]:
        """The engine, the first operator and the output folder of the app.

        Resolves the app context (flags or HOLOSCAN_*), checks the input, loads the pipeline's models
        once and makes the operator that reads the input study, once.
        """
        app_context = Application.init_app_context(self.argv)
        input_path, output_dir = input_and_output(app_context)
        self.engine = open_engine(self.settings, app_context.model_path, pipeline)
        loader = DicomStudyLoaderOperator(self, CountCondition(self, 1), name="loader", input_path=input_path)
        return self.engine, loader, output_dir

    def chain(self, *operators: PortOperator) -> None:
        """Connect each operator's output port to the next one's input port, in order."""
        for upstream, downstream in pairwise(operators):
            self.add_flow(upstream, downstream, {(upstream.OUTPUT_NAME, downstream.INPUT_NAME)})


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


def _our_arguments() -> argparse.ArgumentParser:
    """Our flags, shared by the apps; each also has an environment variable (settings.py)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--labels", action="append", default=None)
    parser.add_argument("--relevance-top-k", type=int, default=None, dest="relevance_top_k")
    parser.add_argument(
        "--relevance-format", choices=("seg", "pmap", "both"), default=None, dest="relevance_format"
    )
    parser.add_argument("--embeddings", action="store_true", default=None, dest="write_embeddings")
    parser.add_argument("--prompts", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None, dest="max_new_tokens")
    parser.add_argument("--with-findings", action="store_true", default=None, dest="with_findings")
    return parser


def open_engine(settings: RunSettings, model_path: str | Path, pipeline: str) -> PipelineEngine:
    """Load the models an app needs, once (raises UsageError with one line on any problem)."""
    return PipelineEngine.from_settings(pipeline, Path(model_path), settings).open()


def run_app(app_class: type, module: str, argv: Sequence[str] | None = None) -> int:
    """Run a MONAI Deploy app class with our flags split off; return the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ensure_stack_size(module, argv)
    ours, rest = _our_arguments().parse_known_args(argv)
    configure_logging(_log_level(rest))
    app: ModelApp | None = None
    try:
        settings = resolve_settings(vars(ours))
        app = app_class([sys.executable, module, *rest], settings=settings)
        app.run()
    except UsageError as exc:
        print(f"{module}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if app is not None and app.engine is not None:
            app.engine.close()
    results = app.final_results()
    if results is None:
        print(f"{module}: error: the pipeline produced no results", file=sys.stderr)
        return 1
    return results.exit_code


def _log_level(argv: Sequence[str]) -> int:
    """MONAI Deploy's ``-l/--log-level`` (it sets the root logger's): our lines follow it too.

    Read without taking it out of ``argv``; a value MONAI Deploy refuses leaves ours at INFO.
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-l", "--log-level", type=str.upper, default="INFO")
    level = logging.getLevelName(parser.parse_known_args(argv)[0].log_level)
    return level if isinstance(level, int) else logging.INFO


def input_and_output(app_context: object) -> tuple[Path, Path]:
    """The app's input path (checked) and output folder, from MONAI Deploy's app context."""
    return check_input_path(Path(app_context.input_path)), Path(app_context.output_path)
