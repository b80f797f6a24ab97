"""One DICOM instance → display-ready frames (:class:`ImageFrame`), the way a viewer would show them.

The pipeline for every frame follows DICOM PS3.3 C.11 (grayscale) and C.7.6.3 (color):

1. **Check the Image Pixel module** before decoding (:func:`check_pixel_module`): Pixel Data present,
   sane dimensions within the memory budget (:class:`MemoryBudget`), a Number of Frames that is not
   empty, a Transfer Syntax UID that is a transfer syntax, a supported Photometric Interpretation, a
   finite and plausible Rescale Slope/Intercept and, for native transfer syntaxes, a buffer as long as
   Rows × Columns × Samples × Frames × Bits Allocated / 8.
2. **Decode** with pydicom's decoder for the transfer syntax (native, deflated, big endian, RLE, JPEG
   baseline/extended/lossless, JPEG-LS, JPEG 2000, HTJ2K), one frame at a time so that a multi-frame
   instance never has all frames decoded at once. YBR color is converted to RGB.
3. **Modality LUT** (C.11.1: Rescale Slope/Intercept or Modality LUT Sequence) → ``values`` (float32;
   Hounsfield units for CT); a LUT that overflows or gives non-finite values rejects the instance.
   Enhanced multi-frame objects take it from the shared or per-frame
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
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, convert_color_space
from pydicom.pixels.decoders.base import Decoder, get_decoder
from pydicom.uid import UID, RLELossless

from medgemma_deploy.domain import ImageFrame
from medgemma_deploy.errors import InputError
from medgemma_deploy.operators.dicom_input.voi import (
    frame_view,
    scale_to_unit,
    voi_display,
)

__all__ = [
    "DECODED_BYTES_PER_SAMPLE",
    "MAX_DIMENSION",
    "MAX_FRAMES",
    "MAX_MODALITY_MAGNITUDE",
    "PIXEL_DATA_KEYWORDS",
    "SUPPORTED_PHOTOMETRIC_INTERPRETATIONS",
    "MemoryBudget",
    "check_budget",
    "check_pixel_module",
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

#: Decoding plugin per transfer syntax where the default one is unsafe on damaged data:
#: pylibjpeg-rle panics (a Rust panic, a ``BaseException`` that prints a Rust backtrace straight to
#: stderr) on an RLE segment that overruns its frame; pydicom's own RLE decoder raises a ValueError.
_PREFERRED_PLUGINS = {RLELossless: "pydicom"}

#: Largest Rows or Columns accepted; larger values are corrupt headers, not images.
MAX_DIMENSION = 32768
#: Largest Number of Frames accepted.
MAX_FRAMES = 10000

#: Bytes held per decoded sample: ``values`` and ``display`` are both float32 (:class:`ImageFrame`).
DECODED_BYTES_PER_SAMPLE = 8

#: Largest magnitude a Modality LUT / rescale may produce. No modality's real-world unit comes near
#: it (CT: -1024…~30000 HU; PET activity concentrations stay below 1e9 Bq/ml), while a slope of
#: 1e30 or an intercept of 1e308 would turn every later float32 step into inf or NaN.
MAX_MODALITY_MAGNITUDE = 1e12


@dataclass(frozen=True)
class MemoryBudget:
    """How much decoded image one input may take, checked from the header before any decode.

    The defaults keep a classify run within 2.5 GB above the loaded models. Every frame of a series
    is held decoded twice as float32 (``values`` and ``display``), and the relevance maps and the
    SEG are built at source size for the whole series, so a run peaks at about 110 bytes per
    source pixel (measured: 100 CT slices of 512 × 512, 26 M pixels, peaked 2.8 GB above the
    models; one 4900 × 4900 radiograph, 24 M pixels, 2.2 GB; 85 CT slices of 512 × 512, 22 M
    pixels, 2.4 GB). 176 MiB decoded is 23 M pixels per series, 88 such CT slices, so the 85-slice
    CT studies the report prompts are built for fit; larger series need a larger budget (and the
    memory) until frames are streamed. A declared size beyond a limit rejects the input, naming the limit.

    Attributes
    ----------
    max_frame_megapixels:
        Rows × Columns of one frame, in millions (a 6000 × 6000 radiograph is 36).
    max_series_frames:
        Frames of one series (all its instances together).
    max_series_decoded_bytes:
        Rows × Columns × Samples × Frames × :data:`DECODED_BYTES_PER_SAMPLE` of one series.
    """

    max_frame_megapixels: float = 20.0
    max_series_frames: int = 2000
    max_series_decoded_bytes: int = 176 * 2**20

    def __post_init__(self) -> None:
        for name in ("max_frame_megapixels", "max_series_frames", "max_series_decoded_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"MemoryBudget.{name} must be a positive number, got {value!r}")

    def decoded_bytes(self, rows: int, columns: int, samples: int, frames: int) -> int:
        """Bytes the decoded frames of this shape take in memory."""
        return rows * columns * samples * frames * DECODED_BYTES_PER_SAMPLE


#: The three pixel data elements of PS3.3 C.7.6.3 / C.7.6.24 in the order they are looked for.
PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

#: Photometric Interpretation → Samples per Pixel it needs.
SUPPORTED_PHOTOMETRIC_INTERPRETATIONS: dict[str, int] = {
    **dict.fromkeys(("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"), 1),
    **dict.fromkeys(("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"), 3),
}


def check_pixel_module(dataset: Dataset, path: Path, budget: MemoryBudget | None = None) -> int:
    """Check the Image Pixel module of ``dataset`` without decoding; return its number of frames.

    Parameters
    ----------
    dataset:
        The instance as read by ``dcmread`` (pixel data included).
    path:
        Its file, named in the error.
    budget:
        Limits on one frame and on this instance's frames (default: :class:`MemoryBudget`()).

    Returns
    -------
    int
        Number of Frames (1 when absent).

    Raises
    ------
    InputError
        No pixel data element; Rows/Columns/Bits Allocated/Samples per Pixel missing or out of range;
        Number of Frames empty or out of range; a frame or an instance beyond the memory budget; a
        Transfer Syntax UID that is not a transfer syntax; an unsupported Photometric Interpretation
        or one that does not match Samples per Pixel; a Rescale Slope/Intercept that is not finite,
        a zero slope or one that gives values beyond :data:`MAX_MODALITY_MAGNITUDE`; or, for a
        native transfer syntax, a pixel buffer shorter than the header promises (the file may be
        truncated) or longer by one frame or more.
    """
    budget = budget or MemoryBudget()
    keyword = _pixel_data_keyword(dataset)
    if keyword is None:
        raise InputError(path, "missing (7FE0,0010) 'Pixel Data': the instance has no pixel data to read")
    rows = _int_attribute(dataset, "Rows", "(0028,0010)", path, MAX_DIMENSION)
    columns = _int_attribute(dataset, "Columns", "(0028,0011)", path, MAX_DIMENSION)
    frames = 1
    if "NumberOfFrames" in dataset:
        # Present but empty is not "one frame": the header is damaged and the data cannot be sized.
        if dataset.get("NumberOfFrames") in (None, ""):
            raise InputError(
                path,
                "(0028,0008) 'Number of Frames' is present but empty (it is Type 1 where present): "
                "the number of frames in the pixel data is unknown",
            )
        frames = _int_attribute(dataset, "NumberOfFrames", "(0028,0008)", path, MAX_FRAMES)
    samples = _int_attribute(dataset, "SamplesPerPixel", "(0028,0002)", path)
    check_budget(rows, columns, samples, frames, budget, path)
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
    if samples == 1:
        bits_stored = int(dataset.BitsStored) if keyword == "PixelData" else bits_allocated
        _check_rescale(dataset, bits_stored, path)
    return frames


def check_budget(
    rows: int, columns: int, samples: int, frames: int, budget: MemoryBudget, path: Path
) -> None:
    """Refuse a frame or an instance whose declared size is beyond ``budget``, naming the limit.

    Raises
    ------
    InputError
        Rows × Columns above ``max_frame_megapixels``, frames above ``max_series_frames`` or the
        decoded size above ``max_series_decoded_bytes``.
    """
    megapixels = rows * columns / 1e6
    if megapixels > budget.max_frame_megapixels:
        raise InputError(
            path,
            f"a frame of Rows × Columns {rows} × {columns} ({megapixels:.1f} megapixels) exceeds the memory "
            f"budget of {budget.max_frame_megapixels:g} megapixels per frame "
            "(setting max_frame_megapixels, MEDGEMMA_DEPLOY_MAX_FRAME_MEGAPIXELS)",
        )
    if frames > budget.max_series_frames:
        raise InputError(
            path,
            f"a (0028,0008) 'Number of Frames' of {frames} exceeds the memory budget of "
            f"{budget.max_series_frames} frames per series "
            "(setting max_series_frames, MEDGEMMA_DEPLOY_MAX_SERIES_FRAMES)",
        )
    decoded = budget.decoded_bytes(rows, columns, samples, frames)
    if decoded > budget.max_series_decoded_bytes:
        raise InputError(
            path,
            f"{frames} frame(s) of {rows} × {columns} × {samples} sample(s) take {_mib(decoded)} decoded, "
            f"beyond the memory budget of {_mib(budget.max_series_decoded_bytes)} per series "
            "(setting max_series_decoded_mib, MEDGEMMA_DEPLOY_MAX_SERIES_DECODED_MIB)",
        )


def _mib(size: int | float) -> str:
    return f"{size / 2**20:.0f} MiB"


def _check_rescale(dataset: Dataset, bits_stored: int, path: Path) -> None:
    """Rescale Slope/Intercept (top level and functional groups) finite, slope non-zero, range plausible."""
    holders: list[Dataset] = [dataset]
    for group_keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for group in dataset.get(group_keyword) or ():
            holders.extend(group.get("PixelValueTransformationSequence") or ())
    # The stored values span at most 2**bits_stored, signed or not.
    stored_magnitude = float(2**bits_stored)
    for holder in holders:
        slope = _float_or_none(holder, "RescaleSlope", "(0028,1053)", path)
        intercept = _float_or_none(holder, "RescaleIntercept", "(0028,1052)", path)
        if slope is None and intercept is None:
            continue
        slope = 1.0 if slope is None else slope
        intercept = 0.0 if intercept is None else intercept
        if slope == 0:
            raise InputError(
                path,
                "a (0028,1053) 'Rescale Slope' of 0 maps every pixel to one value: the header is damaged",
            )
        if abs(slope) * stored_magnitude + abs(intercept) > MAX_MODALITY_MAGNITUDE:
            raise InputError(
                path,
                f"a (0028,1053) 'Rescale Slope' of {slope:g} with a (0028,1052) 'Rescale Intercept' of "
                f"{intercept:g} gives values beyond ±{MAX_MODALITY_MAGNITUDE:g} for {bits_stored}-bit "
                "pixels: the header is damaged",
            )


def _float_or_none(holder: Dataset, keyword: str, tag: str, path: Path) -> float | None:
    value = holder.get(keyword)
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise InputError(path, f"a {tag} '{keyword}' value of {value!r} is not a number") from exc
    if not math.isfinite(number):
        raise InputError(path, f"a {tag} '{keyword}' value of {number} is not finite")
    return number


def render_frames(dataset: Dataset, path: Path, budget: MemoryBudget | None = None) -> list[ImageFrame]:
    """Decode every frame of ``dataset`` and render it for display (see the module docstring).

    Parameters
    ----------
    dataset:
        One image instance, pixel data included.
    path:
        The file it came from (recorded in each frame and named in errors).
    budget:
        Memory limits checked before decoding (default: :class:`MemoryBudget`()).

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
    n_frames = check_pixel_module(dataset, path, budget)
    transfer_syntax = _transfer_syntax(dataset, path)
    decoder = _decoder_for(transfer_syntax, path)
    frames: list[ImageFrame] = []
    for index in range(n_frames):
        raw, photometric = _decode_frame(dataset, decoder, transfer_syntax, index, n_frames, path)
        try:
            values, display, window_source = _render(dataset, raw, photometric, index, path)
        except (
            ArithmeticError,  # OverflowError from a Modality LUT whose entries do not fit its dtype
            AttributeError,
            IndexError,
            KeyError,
            NotImplementedError,
            TypeError,
            ValueError,
        ) as exc:
            detail = " ".join(str(exc).split()) or type(exc).__name__
            raise InputError(
                path, f"the Modality, VOI or palette LUT of frame {index + 1} cannot be applied: {detail}"
            ) from exc
        if not np.isfinite(values).all():
            raise InputError(
                path,
                f"the Modality LUT of frame {index + 1} gives non-finite values (inf or NaN): "
                "the rescale or LUT attributes are damaged",
            )
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
    transfer_syntax = UID(str(uid).strip(), validation_mode=config.IGNORE)
    if not transfer_syntax.is_valid or not transfer_syntax.is_transfer_syntax:
        raise InputError(
            path,
            f"a (0002,0010) 'Transfer Syntax UID' of {str(uid)[:64]!r} is not a transfer syntax "
            "(PS3.5 Annex A): the pixel data cannot be interpreted",
        )
    return transfer_syntax


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
    plugin = _PREFERRED_PLUGINS.get(transfer_syntax, "")
    _decoding.active = True
    try:
        array, meta = decoder.as_array(dataset, index=index, decoding_plugin=plugin)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # plugins raise their own types, Rust panics included
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
