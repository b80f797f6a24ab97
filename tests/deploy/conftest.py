"""Fixtures of the deployment tests: servers a module starts once for all its tests."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

#: ``start(argv, log_path, *, stop_timeout_s, **popen_options)`` → the process and its open log.
StartProcess = Callable[..., tuple[subprocess.Popen, IO[str]]]


@pytest.fixture(scope="module")
def background_process() -> Iterator[StartProcess]:
    """Start servers for the module's tests, output and errors to a log file; stop them after the
    module: SIGTERM, ``stop_timeout_s`` to exit, then SIGKILL. The log stays open (``w+``, so a
    fixture may read it back to explain a failed start) until then."""
    started: list[tuple[subprocess.Popen, IO[str], float]] = []

    def start(
        argv: list[str], log_path: Path, *, stop_timeout_s: float, **popen_options: Any
    ) -> tuple[subprocess.Popen, IO[str]]:
        log = log_path.open("w+")
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, **popen_options)
        started.append((process, log, stop_timeout_s))
        return process, log

    yield start
    for process, log, stop_timeout_s in reversed(started):
        process.terminate()
        try:
            process.wait(timeout=stop_timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=stop_timeout_s / 3)
        log.close()
