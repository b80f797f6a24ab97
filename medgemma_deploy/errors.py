"""Error types shared by every core.

An :class:`InputError` is about one input (a file or an instance): it carries the path and a
pydicom-style reason (what was found, what is allowed, the likely cause) and never patient values.
Cores collect them per file so the rest of a study is still processed.
"""

from __future__ import annotations

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
