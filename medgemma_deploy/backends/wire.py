"""Protobuf ↔ core types: arrays, images, label sets, model identities.

Shared by the servicer (server side) and :mod:`medgemma_deploy.backends.remote` (client
side), so both ends encode and validate the same way. Every ``*_from_proto`` validates what it reads
and raises :class:`~medgemma_deploy.worker.engine.errors.BadRequestError` naming the field path.

Arrays travel as raw little-endian C-order bytes with an explicit shape and dtype: a float32 image
arrives bit-identical, which is what makes remote results equal to in-process ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medgemma_deploy._proto import worker_pb2 as pb
from medgemma_deploy.domain import Code, FindingDefinition, LabelSet, ModelIdentity
from medgemma_deploy.worker.engine.errors import BadRequestError

__all__ = [
    "DTYPE_TO_NUMPY",
    "MAX_TEXTS_PER_REQUEST",
    "array_from_proto",
    "array_to_proto",
    "check_finding_keys",
    "check_model_input_shape",
    "display_image_from_proto",
    "finding_keys",
    "identity_from_proto",
    "identity_to_proto",
    "image_to_proto",
    "label_set_from_proto",
    "label_set_key",
    "label_set_to_proto",
]

#: Wire dtype → NumPy dtype (always little-endian).
DTYPE_TO_NUMPY: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_UINT8: np.dtype("u1"),
    pb.DTYPE_UINT16: np.dtype("<u2"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
}
_NUMPY_TO_DTYPE = {dtype.str.lstrip("<|"): code for code, dtype in DTYPE_TO_NUMPY.items()}

#: Texts one EmbedText request may carry (the contract in worker.proto; clients split above it).
MAX_TEXTS_PER_REQUEST = 64

#: Divisor that maps an integer image to [0, 1].
_INTEGER_SCALE = {pb.DTYPE_UINT8: 255.0, pb.DTYPE_UINT16: 65535.0}

_SCORINGS = ("softmax", "sigmoid")


def array_to_proto(array: np.ndarray) -> pb.Array:
    """Encode an array of a supported dtype (float32/16/64, uint8/16) without any conversion.

    Raises
    ------
    TypeError
        The dtype has no wire type.
    """
    array = np.asarray(array)
    code = _NUMPY_TO_DTYPE.get(array.dtype.newbyteorder("<").str.lstrip("<|"))
    if code is None:
        raise TypeError(
            f"array dtype {array.dtype} cannot be sent; use one of "
            f"{', '.join(str(d) for d in DTYPE_TO_NUMPY.values())}"
        )
    data = np.ascontiguousarray(array, dtype=DTYPE_TO_NUMPY[code]).tobytes()
    return pb.Array(shape=list(array.shape), dtype=code, data=data)


def array_from_proto(message: pb.Array, field: str) -> np.ndarray:
    """Decode an :class:`Array`, checking dtype, shape and byte count.

    Raises
    ------
    BadRequestError
        Unknown dtype, a zero dimension, or a byte count that does not match the shape.
    """
    dtype = DTYPE_TO_NUMPY.get(message.dtype)
    if dtype is None:
        allowed = ", ".join(pb.DType.Name(code) for code in DTYPE_TO_NUMPY)
        raise BadRequestError(
            f"{field}.dtype", f"{_dtype_name(message.dtype)} is not supported; use {allowed}"
        )
    shape = tuple(int(n) for n in message.shape)
    if not shape or any(n == 0 for n in shape):
        raise BadRequestError(f"{field}.shape", f"{list(shape)} is empty; every dimension must be at least 1")
    expected = math.prod(shape) * dtype.itemsize
    if len(message.data) != expected:
        raise BadRequestError(
            f"{field}.data",
            f"{len(message.data)} bytes for shape {list(shape)} of {pb.DType.Name(message.dtype)}, "
            f"expected {expected}",
        )
    return np.frombuffer(message.data, dtype=dtype).reshape(shape)


def image_to_proto(image: np.ndarray, dtype: str = "float32") -> pb.Array:
    """Encode a display image (float in [0, 1], grey or RGB) in the wire dtype ``dtype``.

    ``float32`` (default) is lossless for the pipeline's display arrays; ``uint16`` halves the
    bytes and ``uint8`` quarters them, at a quantisation step of 1/65535 and 1/255.
    """
    image = np.asarray(image)
    if dtype == "float32":
        return array_to_proto(image.astype(np.float32, copy=False))
    if dtype == "float16":
        return array_to_proto(image.astype(np.float16))
    if dtype in ("uint8", "uint16"):
        if image.dtype.kind in "ui":
            return array_to_proto(image.astype(dtype, copy=False))
        scale = 255.0 if dtype == "uint8" else 65535.0
        return array_to_proto(np.rint(np.clip(image, 0.0, 1.0) * scale).astype(dtype))
    raise ValueError(f"image dtype {dtype!r} is not one of float32, float16, uint16, uint8")


def display_image_from_proto(message: pb.Array, field: str, *, max_pixels: int) -> np.ndarray:
    """Decode a MedSigLIP input image into float32 in [0, 1], (rows, cols) or (rows, cols, 3).

    Raises
    ------
    BadRequestError
        Wrong rank or channel count, more than ``max_pixels`` pixels, or float values that are
        not finite or lie outside [0, 1] (the client must window the image first).
    """
    array = array_from_proto(message, field)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise BadRequestError(
            f"{field}.shape",
            f"{list(array.shape)} is not an image; expected [rows, columns] or [rows, columns, 3]",
        )
    pixels = array.shape[0] * array.shape[1]
    if pixels > max_pixels:
        raise BadRequestError(f"{field}.shape", f"{pixels} pixels exceed the worker's limit of {max_pixels}")
    scale = _INTEGER_SCALE.get(message.dtype)
    if scale is not None:
        return array.astype(np.float32) / np.float32(scale)
    image = array.astype(np.float32)  # a writable copy (the wire buffer is read-only)
    if not np.isfinite(image).all():
        raise BadRequestError(f"{field}.data", "contains NaN or infinite values")
    low, high = float(image.min()), float(image.max())
    if low < 0.0 or high > 1.0:
        raise BadRequestError(
            f"{field}.data",
            f"values span [{low:g}, {high:g}]; display images must be windowed into [0, 1] by the client",
        )
    return image


def check_model_input_shape(image: np.ndarray, size: tuple[int, int], field: str) -> None:
    """An ``images_at_model_input`` image must have the model's input size.

    Raises
    ------
    BadRequestError
        Its rows and columns are not ``size`` (the client resized for another model).
    """
    if tuple(image.shape[:2]) != tuple(size):
        raise BadRequestError(
            f"{field}.shape",
            f"{list(image.shape)} is not at the model's input of {size[0]}x{size[1]}; with "
            "images_at_model_input the client pads and resizes as ModelInfo describes",
        )


def label_set_to_proto(label_set: LabelSet) -> pb.LabelSet:
    return pb.LabelSet(
        name=label_set.name,
        version=label_set.version,
        modalities=list(label_set.modalities),
        body_parts=list(label_set.body_parts),
        scoring=label_set.scoring,
        threshold=label_set.threshold,
        findings=[
            pb.Finding(
                key=finding.key,
                display_name=finding.display_name,
                code=pb.Code(
                    value=finding.code.value,
                    scheme_designator=finding.code.scheme_designator,
                    meaning=finding.code.meaning,
                    scheme_version=finding.code.scheme_version or "",
                ),
                positive_prompts=list(finding.positive_prompts),
                negative_prompts=list(finding.negative_prompts),
            )
            for finding in label_set.findings
        ],
    )


def label_set_from_proto(message: pb.LabelSet, field: str = "label_set") -> LabelSet:
    """Decode and validate a label set definition.

    Raises
    ------
    BadRequestError
        Missing name/version/findings, an unknown scoring, a threshold outside (0, 1), duplicate
        finding keys, a finding without a code or without positive prompts, or empty prompts.
    """
    if not message.name.strip():
        raise BadRequestError(f"{field}.name", "is empty")
    if not message.version.strip():
        raise BadRequestError(
            f"{field}.version", "is empty; the worker caches text embeddings per name and version"
        )
    if message.scoring not in _SCORINGS:
        raise BadRequestError(f"{field}.scoring", f"{message.scoring!r} is not one of {', '.join(_SCORINGS)}")
    if not 0.0 < message.threshold < 1.0:
        raise BadRequestError(f"{field}.threshold", f"{message.threshold!r} is not inside (0, 1)")
    if not message.findings:
        raise BadRequestError(f"{field}.findings", "is empty")
    findings = []
    seen: set[str] = set()
    for index, finding in enumerate(message.findings):
        path = f"{field}.findings[{index}]"
        if not finding.key.strip():
            raise BadRequestError(f"{path}.key", "is empty")
        if finding.key in seen:
            raise BadRequestError(f"{path}.key", f"{finding.key!r} appears twice")
        seen.add(finding.key)
        code = finding.code
        if not (code.value and code.scheme_designator and code.meaning):
            raise BadRequestError(f"{path}.code", "needs value, scheme_designator and meaning")
        if not finding.positive_prompts:
            raise BadRequestError(f"{path}.positive_prompts", "is empty")
        if message.scoring == "softmax" and not finding.negative_prompts:
            raise BadRequestError(
                f"{path}.negative_prompts", "is empty; softmax scoring needs negative prompts"
            )
        for kind in ("positive_prompts", "negative_prompts"):
            for n, prompt in enumerate(getattr(finding, kind)):
                if not prompt.strip():
                    raise BadRequestError(f"{path}.{kind}[{n}]", "is an empty prompt")
        findings.append(
            FindingDefinition(
                key=finding.key,
                display_name=finding.display_name or finding.key,
                code=Code(
                    value=code.value,
                    scheme_designator=code.scheme_designator,
                    meaning=code.meaning,
                    scheme_version=code.scheme_version or None,
                ),
                positive_prompts=tuple(finding.positive_prompts),
                negative_prompts=tuple(finding.negative_prompts),
            )
        )
    return LabelSet(
        name=message.name,
        version=message.version,
        modalities=tuple(message.modalities),
        body_parts=tuple(message.body_parts),
        scoring=message.scoring,  # type: ignore[arg-type]  # checked against _SCORINGS above
        threshold=float(message.threshold),
        findings=tuple(findings),
    )


def label_set_key(label_set: LabelSet) -> tuple[str, str]:
    """What identifies a label set for caching: (name, version)."""
    return (label_set.name, label_set.version)


def identity_to_proto(identity: ModelIdentity) -> pb.ModelRef:
    return pb.ModelRef(
        name=identity.name,
        version=identity.version,
        random_weights=identity.random_weights,
        path=str(identity.path),
    )


def identity_from_proto(message: pb.ModelRef) -> ModelIdentity:
    """The worker's model identity; ``path`` is the model directory on the worker."""
    return ModelIdentity(
        name=message.name,
        version=message.version,
        path=Path(message.path),
        random_weights=message.random_weights,
    )


def finding_keys(label_set: LabelSet) -> list[str]:
    return [finding.key for finding in label_set.findings]


def check_finding_keys(keys: Sequence[str], label_set: LabelSet, field: str) -> list[str]:
    """Validate requested relevance-map keys against the label set (no duplicates, all known)."""
    known = set(finding_keys(label_set))
    seen: set[str] = set()
    for index, key in enumerate(keys):
        if key not in known:
            raise BadRequestError(
                f"{field}[{index}]",
                f"{key!r} is not a finding of label set {label_set.name} {label_set.version}",
            )
        if key in seen:
            raise BadRequestError(f"{field}[{index}]", f"{key!r} appears twice")
        seen.add(key)
    return list(keys)


def _dtype_name(code: int) -> str:
    try:
        return pb.DType.Name(code)
    except ValueError:
        return f"dtype {code}"
