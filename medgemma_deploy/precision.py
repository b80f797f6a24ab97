"""Numeric precision of a model run: one setting (``--precision``) for MedSigLIP and MedGemma.

The setting names what the user asks for; each runner decides what that means for its model on its
device. ``auto`` keeps the defaults each runner had before the setting existed: bfloat16 on a CUDA
GPU, float32 on a CPU (bfloat16 without AVX512_BF16/AMX triples compute time on a CPU).
"""

from __future__ import annotations

__all__ = ["PRECISIONS", "PRECISION_HELP", "torch_dtype_name"]

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
