"""Whether the ``lowbit`` extra (llama-cpp-python and llama.cpp's converter) is here for a test.

Tests that need it are marked :data:`needs_lowbit`: on a machine without it they skip, naming what
is missing; with ``CI=true`` importing this module fails instead, so CI cannot skip them.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from medgemma_deploy.errors import ModelLoadError
from medgemma_deploy.operators.medgemma.gguf_weights import converter_dir

__all__ = ["LOWBIT_MISSING", "needs_lowbit"]


def _lowbit_missing() -> str | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python (the lowbit extra) is not installed"
    try:
        converter_dir()
    except ModelLoadError as exc:
        return str(exc)
    return None


#: Why the llama.cpp tests cannot run here, or None.
LOWBIT_MISSING = _lowbit_missing()
if LOWBIT_MISSING and os.environ.get("CI") == "true":
    raise RuntimeError(f"CI must run the llama.cpp tests: {LOWBIT_MISSING}")
needs_lowbit = pytest.mark.skipif(LOWBIT_MISSING is not None, reason=LOWBIT_MISSING or "")
