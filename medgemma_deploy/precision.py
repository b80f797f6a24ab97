"""Numeric precision of a model run: one setting (``--precision``) for MedSigLIP and MedGemma.

The setting names what the user asks for; each runner decides what that means for its model on its
device. ``auto`` keeps the defaults each runner had before the setting existed: bfloat16 on a CUDA
GPU, float32 on a CPU (bfloat16 without AVX512_BF16/AMX triples compute time on a CPU).
:func:`cpu_has_native_bf16` says whether this CPU is one where bfloat16 pays; the low-bit MedGemma
path uses it to choose the dtype of its torch vision tower.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

__all__ = ["PRECISIONS", "PRECISION_HELP", "cpu_has_native_bf16", "torch_dtype_name"]

#: Every value the setting accepts, in the order the help text lists them.
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "int8", "int4")

PRECISION_HELP = (
    "numeric precision of the local models: auto (bf16 on a GPU, fp32 on a CPU), fp32, bf16, int8 "
    "or int4 (default auto)"
)

_FLOAT_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def torch_dtype_name(precision: str, device_type: str) -> str | None:
    """The torch dtype name a floating-point precision loads weights in, or None for low-bit ones.

    ``auto`` is ``bfloat16`` on CUDA and ``float32`` elsewhere; ``int8``/``int4`` return None: the
    runner that offers them builds its own quantised model.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bfloat16" if device_type == "cuda" else "float32"
    return _FLOAT_DTYPES.get(precision)


#: CPU flags (``/proc/cpuinfo``) of native bfloat16 arithmetic: AVX-512 BF16 or AMX tiles.
_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@cache
def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes bfloat16 natively (``avx512_bf16`` or ``amx_bf16`` among its flags).

    Reads ``/proc/cpuinfo`` (Linux); where it cannot be read the answer is False, so float32 is
    chosen: never slower than emulated bfloat16.
    """
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return any(flag in flags for flag in _NATIVE_BF16_FLAGS)
    return False
