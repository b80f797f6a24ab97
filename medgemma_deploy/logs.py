"""One logging set-up for every entry point: the CLI, the listener, the worker and the MONAI Deploy apps.

- Our lines (the ``medgemma_deploy`` logger: progress, one line per rejected input) go to stderr, at
  INFO, or DEBUG with ``-v``.
- Library warnings (pydicom's on every odd value) become log records, shown only at DEBUG: raw on
  stderr they bury the one line per rejected input that matters, and they name no input.
- Third-party chatter (transformers' progress bars and notices, highdicom's INFO lines) stays off
  unless asked for.
- A long-running service (``service=True``) stamps each line with its time and logger, and owns the
  process's logging: other libraries' records (WARNING and up, or whatever level a caller gave one of
  their loggers) come out through the same handler.
- :func:`configure_logging` returns the function that undoes it, so that a host program (or a test)
  that calls an entry point in-process gets its logging back as it was.

transformers is imported when the set-up runs, never when this module is imported.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable

__all__ = ["BATCH_FORMAT", "CHATTY_LIBRARIES", "PACKAGE", "SERVICE_FORMAT", "configure_logging"]

#: the logger every module of ours logs under (``logging.getLogger(__name__)``)
PACKAGE = "medgemma_deploy"
#: one command's lines: the level and the message
BATCH_FORMAT = "%(levelname)s %(message)s"
#: a service's lines: when, and from which logger
SERVICE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: libraries whose INFO lines are chatter wherever a root handler would show them (a MONAI Deploy
#: app's, at INFO): highdicom narrates every attribute it copies. WARNING unless at DEBUG.
CHATTY_LIBRARIES = ("highdicom", "PIL", "urllib3", "filelock")


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (a host may swap it, as pytest does)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:  # the base class assigns it; the property ignores it
        pass


def configure_logging(level: int = logging.INFO, *, service: bool = False) -> Callable[[], None]:
    """Send our log lines to stderr at ``level``; return the function that undoes every change.

    Parameters
    ----------
    level
        Our loggers' level: ``logging.INFO``, or ``logging.DEBUG`` for ``-v``, which also shows
        library warnings and transformers' notices.
    service
        A long-running service: time and logger on every line, and other libraries' records through
        the same handler (at WARNING unless a caller set one of their loggers otherwise).
    """
    debug = level <= logging.DEBUG
    handler = _CurrentStderrHandler()
    handler.setFormatter(logging.Formatter(SERVICE_FORMAT if service else BATCH_FORMAT))
    undo: list[Callable[[], None]] = []

    def set_level(logger: logging.Logger, logger_level: int) -> None:
        saved = logger.level
        logger.setLevel(logger_level)
        undo.append(lambda: logger.setLevel(saved))

    def attach(logger: logging.Logger, logger_level: int, *, propagate: bool) -> None:
        set_level(logger, logger_level)
        saved_propagate = logger.propagate
        logger.addHandler(handler)
        logger.propagate = propagate

        def detach() -> None:
            logger.removeHandler(handler)
            logger.propagate = saved_propagate

        undo.append(detach)

    attach(logging.getLogger(PACKAGE), level, propagate=False)
    if not _warnings_captured():
        logging.captureWarnings(True)
        undo.append(lambda: logging.captureWarnings(False))
    attach(logging.getLogger("py.warnings"), logging.DEBUG if debug else logging.ERROR, propagate=False)
    if service:
        attach(logging.getLogger(), logging.WARNING, propagate=True)
    if not debug:
        for name in CHATTY_LIBRARIES:
            set_level(logging.getLogger(name), logging.WARNING)
    undo.append(_quiet_transformers(debug))

    def restore() -> None:
        for step in reversed(undo):
            step()

    return restore


def _warnings_captured() -> bool:
    """Whether ``warnings`` already go to logging (a host called ``logging.captureWarnings(True)``)."""
    return getattr(warnings.showwarning, "__module__", None) == logging.__name__


def _quiet_transformers(debug: bool) -> Callable[[], None]:
    """No progress bars; notices only at DEBUG. Returns the function that puts transformers back."""
    set_env = "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as transformers_logging

    bars, verbosity = transformers_logging.is_progress_bar_enabled(), transformers_logging.get_verbosity()
    transformers_logging.disable_progress_bar()
    if not debug:
        transformers_logging.set_verbosity_error()

    def restore() -> None:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()
        if set_env:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)

    return restore
