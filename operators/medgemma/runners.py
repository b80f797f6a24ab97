"""The one place that picks MedGemma's runner class for a precision.

``make_medgemma_runner(model_dir, device=, precision=)`` is called by
:meth:`~medgemma_deploy.backends.local.Backend.medgemma_runner`, the one place runners are built
(for the local backend and the worker). ``auto``, ``fp32`` and ``bf16`` run on torch
(:class:`~medgemma_deploy.operators.medgemma.runner.MedGemmaRunner`; ``auto`` is bf16 on a GPU and
fp32 on a CPU, medgemma_deploy/precision.py), decoded by the worker's ``ReportService``: in the
worker, or in process through :class:`~medgemma_deploy.backends.inproc.InprocMedGemma`, which the
local backend wraps around it. ``int8`` and ``int4`` run on llama.cpp
(:class:`~medgemma_deploy.operators.medgemma.gguf_runner.GgufMedGemmaRunner`, the optional ``lowbit``
extra, used as it is), which is what a CPU-only site should ask for (docs/performance.md). Its
callers draft one report at a time (``generate``), so it reserves KV cache for one sequence
(``n_parallel=1``; at 4 the sliding-window layers' cache of MedGemma-4B takes 0.36 GB more); a caller
that batches with ``generate_batch`` builds the runner itself with the ``n_parallel`` it needs.

``auto`` does not switch to llama.cpp by itself when the extra is installed: every report would
then change engine (and text) with an installed package, including the test suite's torch-parity
runs; a site opts in with ``--precision int4``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from medgemma_deploy.precision import PRECISIONS

if TYPE_CHECKING:
    from medgemma_deploy.operators.medgemma.gguf_runner import GgufMedGemmaRunner
    from medgemma_deploy.operators.medgemma.runner import MedGemmaRunner

__all__ = ["LOW_BIT", "make_medgemma_runner"]

#: Precisions that run on llama.cpp.
LOW_BIT = ("int8", "int4")


def make_medgemma_runner(
    model_dir: str | Path, *, device: str | None = None, precision: str = "auto"
) -> MedGemmaRunner | GgufMedGemmaRunner:
    """A MedGemma runner (not loaded) for ``precision`` on ``device``.

    Raises
    ------
    ModelLoadError
        The directory holds no MedGemma, or ``int8``/``int4`` is asked without the ``lowbit``
        extra (the message names it).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision in LOW_BIT:
        from medgemma_deploy.operators.medgemma.gguf_runner import GgufMedGemmaRunner

        return GgufMedGemmaRunner(model_dir, device=device, precision=precision, n_parallel=1)
    from medgemma_deploy.operators.medgemma.runner import MedGemmaRunner

    return MedGemmaRunner(model_dir, device=device, precision=precision)
