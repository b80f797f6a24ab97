"""One DICOM instance → display-ready frames (:class:`ImageFrame`), the way a viewer would show them.

The pipeline for every frame follows DICOM PS3.3 C.11 (grayscale) and C.7.6.3 (color):

1. **Check the Image Pixel module** before decoding (:func:`check_pixel_module`): Pixel Data present,
   sane dimensions, a supported Photometric Interpretation and, for native transfer syntaxes, a buffer
   as long as Rows × Columns × Samples × Frames × Bits Allocated / 8.
2. **Decode** with pydicom's decoder for the transfer syntax (native, deflated, big endian, RLE, JPEG
   baseline/extended/lossless, JPEG-LS, JPEG 2000, HTJ2K), one frame at a time so that a multi-frame
   instance never has all frames decoded at once. YBR color is converted to RGB.
3. **Modality LUT** (C.11.1: Rescale Slope/Intercept or Modality LUT Sequence) → ``values`` (float32;
   Hounsfield units for CT). Enhanced multi-frame objects take it from the shared or per-frame
   Pixel Value Transformation functional group.
4. **VOI LUT** (C.11.2) → ``display`` in [0, 1], first match wins:

   * the instance's own VOI LUT Sequence (first LUT; output scaled by 2**bits - 1);
   * the instance's first Window Center/Width pair, with its VOI LUT Function (LINEAR, LINEAR_EXACT,
     SIGMOID); enhanced objects read the shared or per-frame Frame VOI LUT functional group;
   * CT without a window: a Hounsfield window from :data:`CT_DEFAULT_WINDOWS`, chosen by Body Part
     Examined through :data:`CT_BODY_PART_WINDOWS` (soft tissue when the body part is unknown);
   * any other grayscale image: the frame's own minimum → 0 and maximum → 1 ("min-max"), a constant
     frame → all 0. This is what most viewers do for images that carry no window.

5. **MONOCHROME1** is inverted *after* windowing, so that in ``display`` higher is always brighter.

Color images (RGB, YBR_*, PALETTE COLOR through its palette) keep shape (rows, columns, 3); their
``display`` is the RGB value divided by the largest value the stored bits allow.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, convert_color_space
from pydicom.pixels.decoders.base import Decoder, get_decoder
from pydicom.uid import UID

from medgemma_deploy.errors import InputError
from medgemma_deploy.operators.domain import ImageFrame
from medgemma_deploy.operators.voi import (
    CT_BODY_PART_WINDOWS,
    CT_DEFAULT_WINDOWS,
    apply_window,
    ct_default_window,
    frame_view,
    scale_to_unit,
    voi_display,
)

# CT_BODY_PART_WINDOWS, CT_DEFAULT_WINDOWS, apply_window and ct_default_window are defined with the
# rest of the VOI LUT stage in voi.py and re-exported here.
__all__ = [
    "CT_BODY_PART_WINDOWS",
    "CT_DEFAULT_WINDOWS",
    "MAX_DIMENSION",
    "MAX_FRAMES",
    "PIXEL_DATA_KEYWORDS",
    "SUPPORTED_PHOTOMETRIC_INTERPRETATIONS",
    "apply_window",
    "check_pixel_module",
    "ct_default_window",
    "render_frames",
]

logger = logging.getLogger(__name__)


class _PluginFailureFilter(logging.Filter):
    """Drop pydicom's per-plugin failure records (each with a traceback) while this module decodes.

    pydicom logs every failed plugin with ``LOGGER.exception`` and then raises one error that lists
    them all; :func:`render_frames` turns that error into a one-line :class:`InputError`, so the
    tracebacks would only be noise on the CLI's stderr. Other callers' records pass untouched.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_decoding, "active", False)


_decoding = threading.local()
logging.getLogger("pydicom.pixels.decoders.base").addFilter(_PluginFailureFilter())
_OBJECT_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")

#: Largest Rows or Columns accepted; larger values are corrupt headers, not images.
MAX_DIMENSION = 32768
#: Largest Number of Frames accepted.
MAX_FRAMES = 10000

#: The three pixel data elements of PS3.3 C.7.6.3 / C.7.6.24 in the order they are looked for.
PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

#: Photometric Interpretation → Samples per Pixel it needs.
SUPPORTED_PHOTOMETRIC_INTERPRETATIONS: dict[str, int] = {
    **dict.fromkeys(("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"), 1),
    **dict.fromkeys(("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"), 3),
}


def check_pixel_module(dataset: Dataset, path: Path) -> int:
    """Check the Image Pixel module of ``dataset`` without decoding; return its number of frames.

    Parameters
    ----------
    dataset:
        The instance as read by ``dcmread`` (pixel data included).
    path:
        Its file, named in the error.

    Returns
    -------
    int
        Number of Frames (1 when absent).

    Raises
    ------
    InputError
        No pixel data element; Rows/Columns/Bits Allocated/Samples per Pixel missing or out of range;
        Number of Frames out of range; an unsupported Photometric Interpretation or one that does not
        match Samples per Pixel; or, for a native transfer syntax, a pixel buffer shorter than the
        header promises (the file may be truncated) or longer by one frame or more.
    """
    keyword = _pixel_data_keyword(dataset)
    if keyword is None:
        raise InputError(path, "missing (7FE0,0010) 'Pixel Data': the instance has no pixel data to read")
    rows = _int_attribute(dataset, "Rows", "(0028,0010)", path, MAX_DIMENSION)
    columns = _int_attribute(dataset, "Columns", "(0028,0011)", path, MAX_DIMENSION)
    frames = 1
    if dataset.get("NumberOfFrames") not in (None, ""):
        frames = _int_attribute(dataset, "NumberOfFrames", "(0028,0008)", path, MAX_FRAMES)
    samples = _int_attribute(dataset, "SamplesPerPixel", "(0028,0002)", path)
    bits_allocated = _int_attribute(dataset, "BitsAllocated", "(0028,0100)", path)
    if bits_allocated not in (1, 8, 16, 32, 64):
        raise InputError(
            path,
            f"a (0028,0100) 'Bits Allocated' value of {bits_allocated} is invalid, "
            "it must be 1, 8, 16, 32 or 64",
        )
    if keyword == "PixelData":
        bits_stored = _int_attribute(dataset, "BitsStored", "(0028,0101)", path)
        if not 1 <= bits_stored <= bits_allocated:
            raise InputError(
                path,
                f"a (0028,0101) 'Bits Stored' value of {bits_stored} is invalid, it must be between 1 and "
                f"the 'Bits Allocated' value of {bits_allocated}",
            )
    photometric = str(dataset.get("PhotometricInterpretation", "")).strip()
    if photometric not in SUPPORTED_PHOTOMETRIC_INTERPRETATIONS:
        raise InputError(
            path,
            f"a (0028,0004) 'Photometric Interpretation' of '{photometric}' is not supported "
            f"(supported: {', '.join(SUPPORTED_PHOTOMETRIC_INTERPRETATIONS)})",
        )
    if samples != SUPPORTED_PHOTOMETRIC_INTERPRETATIONS[photometric]:
        raise InputError(
            path,
            f"a (0028,0002) 'Samples per Pixel' value of {samples} does not match the (0028,0004) "
            f"'Photometric Interpretation' '{photometric}', which needs "
            f"{SUPPORTED_PHOTOMETRIC_INTERPRETATIONS[photometric]}",
        )
    transfer_syntax = _transfer_syntax(dataset, path)
    if keyword != "PixelData" or not transfer_syntax.is_encapsulated:
        samples_stored = 2 if photometric == "YBR_FULL_422" else samples
        _check_native_length(dataset, keyword, (rows, columns, samples_stored, frames, bits_allocated), path)
    return frames


def render_frames(dataset: Dataset, path: Path) -> list[ImageFrame]:
    """Decode every frame of ``dataset`` and render it for display (see the module docstring).

    Parameters
    ----------
    dataset:
        One image instance, pixel data included.
    path:
        The file it came from (recorded in each frame and named in errors).

    Returns
    -------
    list[ImageFrame]
        One frame per frame of the instance, ``frame_number`` 1-based, in stored order.

    Raises
    ------
    InputError
        Everything :func:`check_pixel_module` rejects, plus a transfer syntax with no decoder or no
        installed decoding plugin, and pixel data the decoder cannot decode.
    """
    path = Path(path)
    n_frames = check_pixel_module(dataset, path)
    transfer_syntax = _transfer_syntax(dataset, path)
    decoder = _decoder_for(transfer_syntax, path)
    frames: list[ImageFrame] = []
    for index in range(n_frames):
        raw, photometric = _decode_frame(dataset, decoder, transfer_syntax, index, n_frames, path)
        try:
            values, display, window_source = _render(dataset, raw, photometric, index, path)
        except (AttributeError, IndexError, KeyError, NotImplementedError, TypeError, ValueError) as exc:
            raise InputError(
                path, f"the Modality, VOI or palette LUT of frame {index + 1} cannot be applied: {exc}"
            ) from exc
        frames.append(ImageFrame(path, dataset, index + 1, values, display, window_source))
    return frames


def _pixel_data_keyword(dataset: Dataset) -> str | None:
    for keyword in PIXEL_DATA_KEYWORDS:
        if keyword in dataset and dataset[keyword].value not in (None, b""):
            return keyword
    return None


def _int_attribute(dataset: Dataset, keyword: str, tag: str, path: Path, maximum: int | None = None) -> int:
    try:
        value = dataset.get(keyword)
    except (ValueError, TypeError) as exc:
        raise InputError(path, f"the {tag} '{keyword}' value cannot be read ({exc})") from exc
    if value is None or value == "":
        raise InputError(path, f"missing {tag} '{keyword}', required by the Image Pixel module")
    try:
        number = int(value)
    except (ValueError, TypeError) as exc:
        raise InputError(path, f"a {tag} '{keyword}' value of {value!r} is not an integer") from exc
    if maximum is not None and not 1 <= number <= maximum:
        raise InputError(
            path, f"a {tag} '{keyword}' value of {number} is invalid, it must be between 1 and {maximum}"
        )
    return number


def _transfer_syntax(dataset: Dataset, path: Path) -> UID:
    file_meta = getattr(dataset, "file_meta", None)
    uid = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if not uid:
        raise InputError(
            path, "missing (0002,0010) 'Transfer Syntax UID': the pixel data cannot be interpreted"
        )
    return UID(str(uid))


def _check_native_length(
    dataset: Dataset, keyword: str, shape: tuple[int, int, int, int, int], path: Path
) -> None:
    """Native pixel data must hold every frame (PS3.5 8.1.1); ``shape``: rows, columns, samples, frames, bits.

    YBR_FULL_422 stores 2 samples per pixel on average (PS3.3 C.7.6.3.1.2), so callers pass 2 for it.
    """
    rows, columns, samples, frames, bits_allocated = shape
    frame_bits = rows * columns * samples * bits_allocated
    expected = (frame_bits * frames + 7) // 8
    element = dataset[keyword]
    actual = len(element.value)
    tag = f"({element.tag.group:04X},{element.tag.element:04X})"
    if actual < expected:
        raise InputError(
            path,
            f"the {tag} '{keyword}' value is {actual} bytes but Rows × Columns × Samples × Frames × "
            f"Bits Allocated / 8 = {rows} × {columns} × {samples} × {frames} × {bits_allocated} / 8 = "
            f"{expected} bytes: the file may be truncated or the group 0028 values may be wrong",
        )
    frame_bytes = frame_bits // 8
    if frame_bytes and actual - expected >= max(frame_bytes, 2):
        raise InputError(
            path,
            f"the {tag} '{keyword}' value is {actual} bytes, {actual - expected} more than the {expected} "
            f"bytes that {frames} frame(s) of {rows} × {columns} need: (0028,0008) 'Number of Frames' or "
            "the image size may be wrong",
        )


def _decoder_for(transfer_syntax: UID, path: Path) -> Decoder:
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError as exc:
        raise InputError(
            path,
            f"pixel data in transfer syntax '{transfer_syntax.name}' ({transfer_syntax}) cannot be decoded: "
            "pydicom has no decoder for it",
        ) from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin installed"
        raise InputError(
            path,
            f"pixel data in transfer syntax '{transfer_syntax.name}' ({transfer_syntax}) cannot be decoded: "
            f"no decoding plugin is available ({missing}); install the 'compression' extra",
        )
    return decoder


def _decode_frame(
    dataset: Dataset, decoder: Decoder, transfer_syntax: UID, index: int, n_frames: int, path: Path
) -> tuple[np.ndarray, str]:
    _decoding.active = True
    try:
        array, meta = decoder.as_array(dataset, index=index)
    except Exception as exc:  # the plugins raise their own types; every one means "undecodable"
        detail = _OBJECT_ADDRESS.sub("", " ".join(str(exc).split())) or type(exc).__name__
        raise InputError(
            path,
            f"pixel data of frame {index + 1} of {n_frames} in transfer syntax '{transfer_syntax.name}' "
            f"({transfer_syntax}) cannot be decoded: {detail}",
        ) from exc
    finally:
        _decoding.active = False
    photometric = str(meta.get("photometric_interpretation", dataset.PhotometricInterpretation))
    return array, photometric


def _render(
    dataset: Dataset, raw: np.ndarray, photometric: str, index: int, path: Path
) -> tuple[np.ndarray, np.ndarray, str]:
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(raw, dataset)
        entry_bits = int(dataset.RedPaletteColorLookupTableDescriptor[2])
        values = rgb.astype(np.float32)
        return values, scale_to_unit(values, 2**entry_bits - 1), "palette color LUT"
    if raw.ndim == 3:
        if photometric in ("YBR_FULL", "YBR_FULL_422"):
            # Only reached when the decoder left the data in YBR (PS3.3 C.7.6.3.1.2).
            raw = convert_color_space(raw, photometric, "RGB")
        values = raw.astype(np.float32)
        if "PixelData" in dataset:
            peak = float(2 ** int(dataset.BitsStored) - 1)
        else:
            peak = float(values.max()) if values.size and values.max() > 0 else 1.0
        return values, scale_to_unit(values, peak), "RGB"
    view = frame_view(dataset, index)
    values = np.asarray(apply_modality_lut(raw, view), dtype=np.float32)
    display, window_source = voi_display(values, view, dataset, path)
    if str(dataset.PhotometricInterpretation).strip() == "MONOCHROME1":
        display = 1.0 - display
        window_source += ", MONOCHROME1 inverted"
    return values, display.astype(np.float32, copy=False), window_source
