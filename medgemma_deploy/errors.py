"""Error types shared by every core.

An :class:`InputError` is about one input (a file or an instance): it carries the path and a
pydicom-style reason (what was found, what is allowed, the likely cause) and never patient values.
Cores collect them per file so the rest of a study is still processed. A :class:`ServiceError` is
the opposite: a failure of something the run depends on, which no input caused.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class InputError(Exception):
    """One input that cannot be used, with the file (or SOP Instance UID) and the reason.

    Parameters
    ----------
    source:
        The file path, or the SOP Instance UID for objects that never had a file.
    reason:
        One line saying what is wrong and, where it helps, the likely cause.
    """

    def __init__(self, source: str | Path, reason: str) -> None:
        self.source = str(source)
        self.reason = " ".join(str(reason).split())  # always one line
        super().__init__(f"{self.source}: {self.reason}")


class UsageError(Exception):
    """The command was called wrongly (bad path, bad option): exit code 2, one line, no traceback."""


class ModelLoadError(UsageError):
    """A model directory is missing, incomplete or not of the expected architecture."""


class ServiceError(RuntimeError):
    """A service the run depends on failed (a model worker, its transport): not the input's fault.

    Per-input isolation rejects an input for anything else that goes wrong with it; this one stops
    the run instead, so that the caller (the listener) retries the whole job later rather than
    recording good inputs as rejected.
    """


def describe_exception(error: BaseException) -> str:
    """``Type: message`` on one line (the message's whitespace collapsed), for a rejection reason."""
    detail = " ".join(str(error).split())
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


@contextmanager
def warnings_logged(logger: logging.Logger, source: str | Path) -> Iterator[None]:
    """Send the warnings raised inside the block to ``logger`` at DEBUG, naming ``source``.

    pydicom and highdicom warn about every odd value they meet; raw on stderr those lines drown the
    one line per rejected input that matters, and they do not say which input they are about.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        logger.debug("%s: %s: %s", source, warning.category.__name__, " ".join(str(warning.message).split()))
