"""The one place that picks MedGemma's runner class for a precision.

``make_medgemma_runner(model_dir, device=, precision=)`` is called by
:meth:`~medgemma_deploy.backends.local.Backend.medgemma_runner`, the one place runners are built
(for the local backend and the worker). ``auto``, ``fp32`` and ``bf16`` run on torch
(:class:`~medgemma_deploy.operators.medgemma.runner.MedGemmaRunner`; ``auto`` is bf16 on a GPU and
fp32 on a CPU, medgemma_deploy/precision.py), decoded by the worker's ``ReportService``: in the
worker, or in process through :class:`~medgemma_deploy.backends.inproc.InprocMedGemma`, which the
local backend wraps around it. ``int8`` and ``int4`` run on llama.cpp
(:class:`~medgemma_deploy.operators.medgemma.gguf_runner.GgufMedGemmaRunner`, the optional ``lowbit``
extra, used as it is), which is what a CPU-only site should ask for (docs/performance.md). In
process its callers draft one report at a time (``generate``), so it reserves KV cache for one
sequence (``sequences=1``); the worker, whose scheduler decodes concurrent reports together, asks
for as many as its ``--report-max-running``, up to :data:`LOW_BIT_MAX_SEQUENCES`.

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

__all__ = ["LOW_BIT", "LOW_BIT_MAX_SEQUENCES", "make_medgemma_runner"]

#: Precisions that run on llama.cpp.
LOW_BIT = ("int8", "int4")

#: Most llama.cpp sequences (reports decoded together) a low-bit runner reserves. Each costs the
#: sliding-window layers' KV cells (MedGemma-4B: 0.12 GB per sequence at F16), and on a CPU a
#: decode step is compute-bound well before that: four MedGemma-4B reports at Q4_0 decoded 2.3×
#: the tokens per second of one on the 2-core machine of docs/performance.md.
LOW_BIT_MAX_SEQUENCES = 4


def make_medgemma_runner(
    model_dir: str | Path, *, device: str | None = None, precision: str = "auto", sequences: int = 1
) -> MedGemmaRunner | GgufMedGemmaRunner:
    """A MedGemma runner (not loaded) for ``precision`` on ``device``.

    ``sequences`` is how many reports its caller decodes together: llama.cpp reserves that many
    sequences (at most :data:`LOW_BIT_MAX_SEQUENCES`); torch reserves nothing ahead.

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

        n_parallel = max(1, min(sequences, LOW_BIT_MAX_SEQUENCES))
        return GgufMedGemmaRunner(model_dir, device=device, precision=precision, n_parallel=n_parallel)
    from medgemma_deploy.operators.medgemma.runner import MedGemmaRunner

    return MedGemmaRunner(model_dir, device=device, precision=precision)
