"""MedSigLIP image preprocessing on torch: Google's recipe, batched, on the model's device.

The recipe is the one of MedSigLIP's own serving stack (Google-Health/medsiglip,
``python/serving/predictor.py``: ``_InputImageIter._pre_process`` and ``_zero_pad_image_to_square``),
with the resize and normalisation of the model's ``preprocessor_config.json``:

1. the image as float in [0, 1]: :attr:`ImageFrame.display <medgemma_deploy.domain.ImageFrame>`,
   grey ``(rows, columns)`` or RGB ``(rows, columns, 3)`` (an alpha channel is dropped);
2. grey becomes three identical channels;
3. zero padding to a square, centred: the short side gets ``d // 2`` zero rows (or columns) before
   the image and the rest after it, ``d`` being the difference of the sides. The padding is returned
   as a :class:`PadGeometry` so that maps computed on the model's grid can be put back on the
   source pixels (:meth:`PadGeometry.to_source`);
   An image whose square would be longer than :data:`MAX_PADDED_SIDE` is first shrunk by an integer
   factor with area averaging, so that the square never exceeds it (a 1 × 100000 image would pad to
   100000², 40 GB of float32, for a 448 × 448 model input); images of ordinary size follow the recipe
   exactly;
4. resize to the processor's ``size`` (448x448 for ``google/medsiglip-448``) with its ``resample``
   filter, antialiased the way PIL does it (``torch.nn.functional.interpolate(..., antialias=True)``
   implements PIL's filters): bilinear (PIL code 2, MedSigLIP's) or bicubic (3);
5. normalisation ``(x - mean) / std`` per channel (MedSigLIP: 0.5 and 0.5, so values in [-1, 1]).

Compared with ``transformers``' ``SiglipImageProcessor`` (whose PIL implementation is the reference
of the parity test) on the same zero-padded image, the only differences are that the PIL path rounds
the image to 8 bits before resizing and rounds the resized image to 8 bits again, while this module
stays in float32 throughout; the resampling filter is the same. ``antialias=False`` gives plain
bilinear interpolation without a low-pass filter instead (big_vision / ``tf.image.resize`` style).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medgemma_deploy.errors import ModelLoadError

__all__ = [
    "MAX_PADDED_SIDE",
    "PREPROCESSOR_CONFIG",
    "MedSigLIPPreprocessor",
    "PadGeometry",
    "PreprocessedBatch",
]

logger = logging.getLogger(__name__)

#: The file of a model directory that declares the image preprocessing.
PREPROCESSOR_CONFIG = "preprocessor_config.json"

#: PIL resampling codes (``preprocessor_config.json`` ``resample``) → torch interpolation modes.
#: Both are antialiased like PIL's; other PIL filters have no torch equivalent.
_RESAMPLE_MODES: dict[int, str] = {2: "bilinear", 3: "bicubic"}

#: Longest side of the zero-padded square built at source resolution (8192² float32 is 256 MiB
#: per channel). Longer images are shrunk first by area averaging; the model sees 448 × 448 anyway.
MAX_PADDED_SIDE = 8192

#: ``display`` values may overshoot [0, 1] by float rounding; more than this is a caller's bug.
_RANGE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class PadGeometry:
    """Where a source image sits inside the zero-padded square the model saw.

    Attributes
    ----------
    rows, columns:
        The source image's size.
    top, left:
        Zero rows above and zero columns left of the image in the square.
    side:
        The square's side, ``max(rows, columns)``.
    """

    rows: int
    columns: int
    top: int
    left: int
    side: int

    @classmethod
    def for_shape(cls, rows: int, columns: int) -> PadGeometry:
        """The centred padding of a ``rows`` x ``columns`` image (Google's ``_zero_pad_image_to_square``)."""
        if rows < 1 or columns < 1:
            raise ValueError(f"image size {rows}x{columns} is empty: both sides must be at least 1 pixel")
        side = max(rows, columns)
        return cls(rows=rows, columns=columns, top=(side - rows) // 2, left=(side - columns) // 2, side=side)

    @property
    def bottom(self) -> int:
        return self.side - self.rows - self.top

    @property
    def right(self) -> int:
        return self.side - self.columns - self.left

    def to_source(self, maps: torch.Tensor) -> torch.Tensor:
        """Put maps over the padded square back on the source pixels.

        Parameters
        ----------
        maps:
            ``(n, h, w)`` maps covering the whole padded square at any resolution (e.g. the
            model's patch grid).

        Returns
        -------
        torch.Tensor
            ``(n, rows, columns)``: the maps resized (bilinear, pixel centres aligned) to the
            square's size, then cropped to the image. Padding never reaches the result.
        """
        if maps.ndim != 3:
            raise ValueError(f"maps must have shape (n, h, w), got {tuple(maps.shape)}")
        square = F.interpolate(
            maps[:, None].float(), size=(self.side, self.side), mode="bilinear", align_corners=False
        )[:, 0]
        return square[:, self.top : self.top + self.rows, self.left : self.left + self.columns]


@dataclass
class PreprocessedBatch:
    """Model-ready pixels and where each image sits in them.

    ``pixel_values`` is ``(n, 3, height, width)`` on the preprocessor's device and dtype;
    ``geometry[i]`` is image ``i``'s padding.
    """

    pixel_values: torch.Tensor
    geometry: list[PadGeometry]


class MedSigLIPPreprocessor:
    """Google's MedSigLIP preprocessing as batched torch operations (see the module docstring).

    Parameters
    ----------
    size:
        ``(height, width)`` of the model input, from the processor config.
    image_mean, image_std:
        Per-channel normalisation (three values each).
    resample:
        PIL resampling code from the processor config: 2 (bilinear) or 3 (bicubic).
    antialias:
        Low-pass filter when shrinking, like PIL (default). ``False``: plain interpolation.
    device:
        Where to compute (the model's device); default CPU.
    dtype:
        dtype of the returned pixel values (the model's dtype); the arithmetic is float32.
    """

    def __init__(
        self,
        size: tuple[int, int],
        image_mean: Sequence[float],
        image_std: Sequence[float],
        *,
        resample: int = 2,
        antialias: bool = True,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        height, width = (int(v) for v in size)
        if height < 1 or width < 1:
            raise ValueError(f"size must be two positive integers (height, width), got {size!r}")
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ValueError(
                f"image_mean and image_std need one value per RGB channel, got {list(image_mean)!r} "
                f"and {list(image_std)!r}"
            )
        if any(float(s) <= 0 for s in image_std):
            raise ValueError(f"image_std values must be positive, got {list(image_std)!r}")
        if int(resample) not in _RESAMPLE_MODES:
            raise ValueError(
                f"resample {resample!r} is not supported: use a PIL code among "
                f"{ {code: mode for code, mode in _RESAMPLE_MODES.items()} }"
            )
        self.size = (height, width)
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.resample = int(resample)
        self.antialias = bool(antialias)
        self.device = torch.device(device or "cpu")
        self.dtype = dtype
        self._mean = torch.tensor(self.image_mean, dtype=torch.float32, device=self.device).view(3, 1, 1)
        self._std = torch.tensor(self.image_std, dtype=torch.float32, device=self.device).view(3, 1, 1)

    @property
    def resample_mode(self) -> str:
        """The resize filter by name: ``"bilinear"`` or ``"bicubic"``."""
        return _RESAMPLE_MODES[self.resample]

    @classmethod
    def from_resize(cls, size: tuple[int, int], resample_mode: str, antialias: bool) -> MedSigLIPPreprocessor:
        """Steps 1-4 only (:meth:`to_model_input`), as a worker publishes them; on the CPU.

        Raises
        ------
        ValueError
            An unknown filter name or a bad size.
        """
        codes = {mode: code for code, mode in _RESAMPLE_MODES.items()}
        if resample_mode not in codes:
            raise ValueError(f"resample {resample_mode!r} is not one of {', '.join(codes)}")
        # Normalisation is the worker's step 5; identity values keep this object well-formed.
        return cls(size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), resample=codes[resample_mode], antialias=antialias)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **kwargs: Any) -> MedSigLIPPreprocessor:
        """Read ``preprocessor_config.json`` of a local model directory (no ``transformers`` needed).

        Raises
        ------
        ModelLoadError
            The file is missing, is not JSON, or declares a preprocessing this class cannot do.
        """
        config_file = Path(model_dir) / PREPROCESSOR_CONFIG
        try:
            config = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{config_file}: cannot be read as JSON ({exc})") from exc
        try:
            return cls(**_settings_from_config(config), **kwargs)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{config_file}: unsupported image preprocessing: {exc}") from exc

    @classmethod
    def from_image_processor(cls, processor: Any, **kwargs: Any) -> MedSigLIPPreprocessor:
        """Take the settings of a ``transformers`` ``SiglipImageProcessor`` (either backend)."""
        config = {
            "size": processor.size,
            "resample": processor.resample,
            "image_mean": processor.image_mean,
            "image_std": processor.image_std,
            "do_normalize": processor.do_normalize,
            "do_resize": processor.do_resize,
        }
        return cls(**_settings_from_config(config), **kwargs)

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> MedSigLIPPreprocessor:
        """The same preprocessing computing on ``device`` and returning ``dtype``."""
        return MedSigLIPPreprocessor(
            self.size,
            self.image_mean,
            self.image_std,
            resample=self.resample,
            antialias=self.antialias,
            device=device if device is not None else self.device,
            dtype=dtype if dtype is not None else self.dtype,
        )

    def __call__(
        self,
        images: Sequence[np.ndarray],
        *,
        indices: Sequence[int] | None = None,
        at_model_input: bool = False,
    ) -> PreprocessedBatch:
        """Preprocess images of any sizes into one ``(n, 3, height, width)`` batch.

        ``indices`` are the images' positions in the caller's sequence, used in error messages
        when ``images`` is a part of it (default: 0, 1, 2…). With ``at_model_input`` the images
        are :meth:`to_model_input`'s output (steps 1-4 done, e.g. by a worker's client) and only
        the normalisation is left; ``geometry`` then describes the square itself.

        Raises
        ------
        ValueError
            An image is not a 2-D grey or 3-D RGB(A) array, is empty, holds NaN/inf, or has values
            outside [0, 1]; the message names its index.
        """
        height, width = self.size
        if len(images) == 0:
            return PreprocessedBatch(
                torch.empty((0, 3, height, width), dtype=self.dtype, device=self.device), []
            )
        positions = range(len(images)) if indices is None else indices
        pixels = []
        geometry = []
        for index, image in zip(positions, images, strict=True):
            checked = _checked_image(image, index)
            if at_model_input:
                self._check_model_input(checked, index)
                resized = _channels_first(torch.from_numpy(checked).to(self.device))
                padding = PadGeometry.for_shape(height, width)
            else:
                resized, padding = self._resized(checked)
            pixels.append(self._normalised(resized))
            geometry.append(padding)
        return PreprocessedBatch(torch.stack(pixels).to(self.dtype), geometry)

    def to_model_input(self, image: np.ndarray, *, index: int = 0) -> tuple[np.ndarray, PadGeometry]:
        """Steps 1-4 of the recipe: ``image`` padded, resized and clipped, float32 in [0, 1].

        Returns the model-size image, ``(height, width)`` grey or ``(height, width, 3)`` RGB (grey
        stays one channel: step 2 repeats it, so sending three would only triple the bytes), and
        where the source sits in the square. Calling the preprocessor on it with
        ``at_model_input=True`` gives exactly the pixels it gives for ``image`` itself: this is
        what lets a worker's client send model-size images with results equal to in-process ones.

        Raises
        ------
        ValueError
            As :meth:`__call__`, naming ``images[index]``.
        """
        resized, padding = self._resized(_checked_image(image, index))
        array = resized[0] if resized.shape[0] == 1 else resized.permute(1, 2, 0)
        return np.ascontiguousarray(array.cpu().numpy(), dtype=np.float32), padding

    def _resized(self, image: np.ndarray) -> tuple[torch.Tensor, PadGeometry]:
        """``(channels, height, width)`` float32 in [0, 1]: padded to a square, resized, clipped."""
        padding = PadGeometry.for_shape(image.shape[0], image.shape[1])
        tensor = _channels_first(torch.from_numpy(image).to(self.device))
        square = padding
        factor = -(-padding.side // MAX_PADDED_SIDE)
        if factor > 1:
            # The returned geometry stays the source's (maps go back onto source pixels); only the
            # square the model input is resized from is built at 1/factor of the source resolution.
            small = (max(1, round(padding.rows / factor)), max(1, round(padding.columns / factor)))
            tensor = F.interpolate(tensor[None], size=small, mode="area")[0]
            square = PadGeometry.for_shape(*small)
        tensor = F.pad(tensor, (square.left, square.right, square.top, square.bottom))
        mode = _RESAMPLE_MODES[self.resample]
        resized = F.interpolate(
            tensor[None], size=self.size, mode=mode, align_corners=False, antialias=self.antialias
        )[0]
        # Bicubic overshoots; PIL clips to the 8-bit range, so clip to [0, 1] like it.
        return resized.clamp_(0.0, 1.0), padding

    def _normalised(self, resized: torch.Tensor) -> torch.Tensor:
        return (resized.expand(3, -1, -1) - self._mean) / self._std

    def _check_model_input(self, image: np.ndarray, index: int) -> None:
        if image.shape[:2] != self.size:
            raise ValueError(
                f"images[{index}] has shape {image.shape}: a model-input image must be "
                f"{self.size[0]}x{self.size[1]} (the model's input size, see to_model_input)"
            )

    def __repr__(self) -> str:
        return (
            f"MedSigLIPPreprocessor(size={self.size}, resample={_RESAMPLE_MODES[self.resample]}, "
            f"antialias={self.antialias}, mean={self.image_mean}, std={self.image_std}, "
            f"device={self.device}, dtype={self.dtype})"
        )


def _settings_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments from processor settings; refuses what the recipe cannot reproduce."""
    if config.get("do_resize", True) is False:
        raise ValueError("do_resize is false: the model needs its fixed input size, so resizing is required")
    size = config["size"]
    height = size.get("height") if isinstance(size, dict) else getattr(size, "height", None)
    width = size.get("width") if isinstance(size, dict) else getattr(size, "width", None)
    if not height or not width:
        raise ValueError(
            f"size {size!r} has no height and width (a SigLIP processor resizes to a fixed size)"
        )
    normalize = config.get("do_normalize", True) is not False
    return {
        "size": (int(height), int(width)),
        "image_mean": list(config["image_mean"]) if normalize else [0.0, 0.0, 0.0],
        "image_std": list(config["image_std"]) if normalize else [1.0, 1.0, 1.0],
        "resample": int(config.get("resample", 2)),
    }


def _channels_first(tensor: torch.Tensor) -> torch.Tensor:
    """``(rows, columns)`` → ``(1, rows, columns)``; ``(rows, columns, 3)`` → ``(3, rows, columns)``."""
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)


def _checked_image(image: np.ndarray, index: int) -> np.ndarray:
    """``image`` as contiguous float32 in [0, 1], grey (rows, columns) or RGB (rows, columns, 3)."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"images[{index}] is a {type(image).__name__}, not a numpy array")
    if image.ndim == 3 and image.shape[2] in (1, 3, 4):
        image = image[:, :, 0] if image.shape[2] == 1 else image[:, :, :3]
    elif image.ndim != 2:
        raise ValueError(
            f"images[{index}] has shape {image.shape}: expected (rows, columns) grey or "
            "(rows, columns, 3) RGB"
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"images[{index}] is empty (shape {image.shape})")
    image = np.ascontiguousarray(image, dtype=np.float32)
    if not np.isfinite(image).all():
        raise ValueError(f"images[{index}] holds NaN or infinite values")
    low, high = float(image.min()), float(image.max())
    if low < -_RANGE_TOLERANCE or high > 1.0 + _RANGE_TOLERANCE:
        raise ValueError(
            f"images[{index}] has values in [{low:g}, {high:g}]: expected display values in [0, 1] "
            "(window/VOI LUT applied, as ImageFrame.display)"
        )
    return np.clip(image, 0.0, 1.0) if low < 0.0 or high > 1.0 else image
