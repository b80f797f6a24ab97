"""The VOI LUT stage of :mod:`~medgemma_deploy.operators.dicom_input.pixels`: grayscale → display in [0, 1].

Holds the LINEAR window (:func:`apply_window`), the default CT windows (:data:`CT_DEFAULT_WINDOWS`,
chosen by Body Part Examined through :data:`CT_BODY_PART_WINDOWS`) and the per-frame choice between
the instance's own VOI LUT, its window, a CT default and min-max (:func:`voi_display`, rules in the
pixels module docstring, step 4), plus :func:`frame_view`, which gathers the Modality/VOI LUT
attributes of one frame of an enhanced object.

It is separate from the decoder because windowing needs no pixel data element and no codec:
:mod:`~medgemma_deploy.operators.medgemma.request` windows CT slices for MedGemma with
:func:`apply_window` alone, and the tables and DICOM rules here (PS3.3 C.11.2) change for different
reasons than the transfer-syntax handling in :mod:`~medgemma_deploy.operators.dicom_input.pixels`, which
re-exports the public names.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_voi

__all__ = [
    "CT_BODY_PART_WINDOWS",
    "CT_DEFAULT_WINDOWS",
    "apply_window",
    "ct_default_window",
    "frame_view",
    "scale_to_unit",
    "voi_display",
]

logger = logging.getLogger(__name__)

#: Hounsfield windows (center, width) used for CT instances that carry no window of their own.
#: soft tissue: the usual abdomen/mediastinum window; lung: parenchyma; bone: cortical and trabecular
#: bone; brain: grey/white matter. These are the common radiology reading defaults.
CT_DEFAULT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40, 400),
    "lung": (-600, 1500),
    "bone": (300, 1500),
    "brain": (40, 80),
}

# fmt: off
_BONE_BODY_PARTS = (
    "EXTREMITY", "UPRLIMB", "LOWRLIMB", "ARM", "LEG", "HAND", "FOOT", "WRIST", "ANKLE", "ELBOW", "KNEE",
    "HIP", "SHOULDER", "FEMUR", "TIBIA", "FIBULA", "HUMERUS", "RADIUS", "ULNA", "SCAPULA", "CLAVICLE",
    "PELVIS", "SKELETON",
)
# fmt: on

#: Body Part Examined (0018,0015) → key of :data:`CT_DEFAULT_WINDOWS`. Defined Terms from PS3.16
#: Annex L; a body part not listed here gets the soft tissue window. Chest CT defaults to the lung
#: window because chest findings are mostly parenchymal; head CT to the brain window; bones of the
#: limbs to the bone window.
CT_BODY_PART_WINDOWS: dict[str, str] = {
    **dict.fromkeys(("HEAD", "BRAIN", "SKULL"), "brain"),
    **dict.fromkeys(("CHEST", "LUNG", "THORAX"), "lung"),
    **dict.fromkeys(_BONE_BODY_PARTS, "bone"),
}

_VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
#: Attributes that decide a frame's Modality and VOI LUT (top level or functional groups).
# fmt: off
_FRAME_ATTRIBUTES = (
    "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence", "VOILUTSequence",
    "WindowCenter", "WindowWidth", "VOILUTFunction", "PixelRepresentation", "BitsStored",
)
# fmt: on


def apply_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map ``values`` through a LINEAR window to float32 in [0, 1].

    DICOM PS3.3 C.11.2.1.2.1 with y_min = 0 and y_max = 1::

        x <= c - 0.5 - (w - 1) / 2  →  0
        x >  c - 0.5 + (w - 1) / 2  →  1
        otherwise                   →  ((x - (c - 0.5)) / (w - 1) + 0.5)

    Parameters
    ----------
    values:
        Pixel values after the Modality LUT (Hounsfield units for CT), any shape.
    center:
        Window Center (0028,1050).
    width:
        Window Width (0028,1051); must be >= 1.

    Returns
    -------
    numpy.ndarray
        float32 array of the same shape as ``values``, in [0, 1].

    Raises
    ------
    ValueError
        ``width`` is below 1 (not a valid LINEAR window).
    """
    center = float(center)
    width = float(width)
    if not width >= 1:
        raise ValueError(f"apply_window: width {width:g} is invalid, a LINEAR window needs a width >= 1")
    x = np.asarray(values, dtype=np.float64)
    if width == 1:
        # The ramp has no extent: everything above c - 0.5 is y_max.
        return (x > center - 0.5).astype(np.float32)
    display = (x - (center - 0.5)) / (width - 1) + 0.5
    return np.clip(display, 0.0, 1.0).astype(np.float32)


def ct_default_window(body_part_examined: str | None) -> tuple[str, float, float]:
    """The default CT window for a Body Part Examined: ``(name, center, width)``.

    Parameters
    ----------
    body_part_examined:
        The (0018,0015) value, or ``None``; matched case-insensitively against
        :data:`CT_BODY_PART_WINDOWS`. Unknown or missing → ``soft_tissue``.
    """
    key = (body_part_examined or "").strip().upper()
    name = CT_BODY_PART_WINDOWS.get(key, "soft_tissue")
    center, width = CT_DEFAULT_WINDOWS[name]
    return name, float(center), float(width)


def frame_view(dataset: Dataset, index: int) -> Dataset:
    """The Modality/VOI LUT attributes that apply to frame ``index`` as one flat dataset.

    Top-level attributes first, overridden by the shared and then the per-frame functional groups
    (PS3.3 C.7.6.16: Pixel Value Transformation and Frame VOI LUT macros) of enhanced objects.
    """
    view = Dataset()
    if hasattr(dataset, "file_meta"):
        view.file_meta = dataset.file_meta
    for keyword in _FRAME_ATTRIBUTES:
        if keyword in dataset:
            view[keyword] = dataset[keyword]
    groups: list[Dataset] = []
    if dataset.get("SharedFunctionalGroupsSequence"):
        groups.append(dataset.SharedFunctionalGroupsSequence[0])
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        groups.append(per_frame[index])
    for group in groups:
        for sequence in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            if group.get(sequence):
                for element in group[sequence][0]:
                    if element.keyword in _FRAME_ATTRIBUTES:
                        view[element.keyword] = element
    return view


def voi_display(values: np.ndarray, view: Dataset, dataset: Dataset, path: Path) -> tuple[np.ndarray, str]:
    """Grayscale ``values`` (after the Modality LUT) → ``(display in [0, 1], window source)``.

    The first rule of step 4 of the pixels module docstring that applies wins. ``view`` is the
    frame's :func:`frame_view`, ``dataset`` the instance (Modality, Body Part Examined); ``path``
    is named in warnings.
    """
    if view.get("VOILUTSequence"):
        lut_item = view.VOILUTSequence[0]
        descriptor = lut_item.get("LUTDescriptor")
        if descriptor is not None and lut_item.get("LUTData") is not None:
            mapped = apply_voi(np.rint(values).astype(np.int64), view, 0)
            bits = int(descriptor[2])
            return scale_to_unit(mapped.astype(np.float32), 2**bits - 1), "instance VOI LUT"
        logger.warning("%s: VOI LUT Sequence item has no LUT Descriptor/Data; ignored", path)
    window = _instance_window(view, path)
    if window is not None:
        center, width, function = window
        suffix = "" if function == "LINEAR" else f" {function}"
        source = f"instance window {center:g}/{width:g}{suffix}"
        return _window_function(values, center, width, function), source
    if str(dataset.get("Modality", "")).upper() == "CT":
        name, center, width = ct_default_window(dataset.get("BodyPartExamined"))
        source = f"CT default {name.replace('_', ' ')} {center:g}/{width:g}"
        return apply_window(values, center, width), source
    return _min_max(values)


def _instance_window(view: Dataset, path: Path) -> tuple[float, float, str] | None:
    """The first Window Center/Width pair and VOI LUT Function, or ``None`` when absent or unusable."""
    if view.get("WindowCenter") in (None, "") or view.get("WindowWidth") in (None, ""):
        return None
    center = _first_value(view.WindowCenter)
    width = _first_value(view.WindowWidth)
    function = str(view.get("VOILUTFunction") or "LINEAR").strip().upper()
    if function not in _VOI_FUNCTIONS:
        logger.warning("%s: (0028,1056) VOI LUT Function '%s' is unknown; LINEAR used", path, function)
        function = "LINEAR"
    if center is None or width is None or not (np.isfinite(center) and np.isfinite(width)):
        logger.warning("%s: window %s/%s is not numeric; instance window ignored", path, center, width)
        return None
    if (function == "LINEAR" and width < 1) or width <= 0:
        logger.warning(
            "%s: Window Width %g is invalid for %s; instance window ignored", path, width, function
        )
        return None
    return center, width, function


def _first_value(value: object) -> float | None:
    if isinstance(value, (list, tuple)) or (hasattr(value, "__getitem__") and not isinstance(value, str)):
        value = value[0] if len(value) else None  # type: ignore[index, arg-type]
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _window_function(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 (LINEAR), C.11.2.1.3.2 (LINEAR_EXACT) and C.11.2.1.3.1 (SIGMOID) into [0, 1]."""
    if function == "LINEAR":
        return apply_window(values, center, width)
    x = values.astype(np.float64)
    if function == "LINEAR_EXACT":
        display = (x - center) / width + 0.5
    else:
        display = 1.0 / (1.0 + np.exp(np.clip(-4.0 * (x - center) / width, -700, 700)))
    return np.clip(display, 0.0, 1.0).astype(np.float32)


def _min_max(values: np.ndarray) -> tuple[np.ndarray, str]:
    low = float(values.min())
    high = float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32), "min-max (constant frame)"
    display = (values.astype(np.float64) - low) / (high - low)
    return display.astype(np.float32), "min-max"


def scale_to_unit(values: np.ndarray, peak: float) -> np.ndarray:
    """``values / peak`` clipped to [0, 1], float32 (``peak``: the largest value the stored bits allow)."""
    return np.clip(values / np.float32(peak), 0.0, 1.0).astype(np.float32)
