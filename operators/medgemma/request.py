"""MedGemma inputs from a series: the modality's prompt, the images to send, the request.

Prompts live in ``medgemma_deploy/config/prompts.yaml`` (a hospital passes its own file): one
family per modality group, each with an id and a version that every report records. Images are
chosen and rendered per family:

* 2-D families (chest X-ray, dermatology, fundus): the frames as windowed by the DICOM input, the
  instruction first, as in Google's MedGemma examples ("Describe this X-ray").
* CT: up to 85 slices sampled evenly over the series (first and last kept), each rendered as RGB
  from three Hounsfield windows (R −1024..1024, G −135..215, B 0..80), images interleaved with
  "SLICE n" and the instruction last, as in Google's MedGemma CT notebook.
* MR, pathology and every other modality: their own prompts; a modality without a family gets the
  ``generic`` prompt and a warning.

Nothing here imports torch or transformers: a client can build requests without a model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from medgemma_deploy.domain import GenerationSettings, ImageFrame, ReportRequest, Series, is_number
from medgemma_deploy.operators.dicom_input.voi import apply_window
from medgemma_deploy.operators.medgemma.prompts import PromptBook, PromptSpec

__all__ = [
    "CT_WINDOWS",
    "build_report_request",
    "render_ct_three_window",
    "sample_evenly",
]

logger = logging.getLogger(__name__)

#: (name, center, width) of the three HU windows of a CT slice's R, G and B channels: wide
#: (−1024..1024), soft tissue (−135..215) and brain (0..80), as in Google's MedGemma CT notebook.
CT_WINDOWS: tuple[tuple[str, float, float], ...] = (
    ("wide", 0.0, 2048.0),
    ("soft tissue", 40.0, 350.0),
    ("brain", 40.0, 80.0),
)


def sample_evenly(n_frames: int, max_frames: int) -> list[int]:
    """Indices of at most ``max_frames`` of ``n_frames``, evenly spaced, first and last included
    (all of them when they fit; the middle one when only one may be sent).

    Raises
    ------
    ValueError
        ``n_frames`` < 1 or ``max_frames`` < 1.
    """
    if n_frames < 1 or max_frames < 1:
        raise ValueError(f"sample_evenly needs n_frames and max_frames >= 1, got {n_frames}, {max_frames}")
    if n_frames <= max_frames:
        return list(range(n_frames))
    if max_frames == 1:
        return [(n_frames - 1) // 2]  # one image: the middle one says most about a series
    # Spacing > 1 when n_frames > max_frames, so rounding never repeats an index.
    return [round(index) for index in np.linspace(0, n_frames - 1, max_frames).tolist()]


def render_ct_three_window(hounsfield: np.ndarray) -> Image.Image:
    """An RGB image of one CT slice: R, G, B are the :data:`CT_WINDOWS` (DICOM LINEAR windows).

    Raises
    ------
    ValueError
        ``hounsfield`` is not a 2-D array.
    """
    values = np.asarray(hounsfield)
    if values.ndim != 2:
        raise ValueError(f"a CT slice must be a 2-D array of Hounsfield units, got shape {values.shape}")
    channels = [apply_window(values, center, width) for _, center, width in CT_WINDOWS]
    return Image.fromarray(_to_uint8(np.stack(channels, axis=-1)), mode="RGB")


def build_report_request(
    series: Series,
    prompts: PromptBook,
    *,
    settings: GenerationSettings,
    findings_context: Sequence[tuple[str, float]] | None = None,
) -> ReportRequest:
    """The MedGemma request of one series: its family's prompt, sampled and rendered images.

    Parameters
    ----------
    series:
        Frames in slice/acquisition order (``display`` in [0, 1]; ``values`` in HU for CT).
    prompts:
        The prompt book (``PromptBook.load``).
    settings:
        Generation settings, passed through to the result.
    findings_context:
        Optional ``(finding name, probability)`` pairs, e.g. MedSigLIP's top findings: the
        instruction then says "Automated screening suggests: …" and the request is marked
        findings-grounded.

    Raises
    ------
    TypeError
        An argument has the wrong type.
    ValueError
        The series has no frames, or a finding has an empty name or a probability outside [0, 1].
    """
    if not isinstance(series, Series):
        raise TypeError(f"series must be a Series, got {type(series).__name__}")
    if not isinstance(prompts, PromptBook):
        raise TypeError(f"prompts must be a PromptBook, got {type(prompts).__name__}")
    if not isinstance(settings, GenerationSettings):
        raise TypeError(f"settings must be GenerationSettings, got {type(settings).__name__}")
    if not series.frames:
        raise ValueError(f"series {series.series_instance_uid} has no frames to report on")
    context = _check_findings(findings_context)
    spec, dedicated = prompts.for_modality(series.modality)
    notes: list[str] = []
    warnings: list[str] = []
    if not dedicated:
        warnings.append(
            f"modality {series.modality or '(none)'} has no dedicated prompt in {prompts.path.name}; "
            f"the generic prompt {spec.id} was used"
        )
    indices = sample_evenly(len(series.frames), spec.max_images)
    frames = [series.frames[index] for index in indices]
    n_frames = len(series.frames)
    if len(frames) < n_frames:
        notes.append(
            f"{len(frames)} of {n_frames} {_unit(spec)} sampled evenly (frames "
            f"{', '.join(str(index + 1) for index in indices)})"
        )
    else:
        notes.append(f"all {n_frames} {_unit(spec)} used")
    images = [_render(frame, spec, notes, warnings) for frame in frames]
    notes.append(_rendering_note(spec, frames))

    instruction = spec.instruction.strip()
    if context:
        listed = ", ".join(f"{name} (p={probability:.2f})" for name, probability in context)
        instruction += "\n\n" + prompts.findings_context.strip().replace("{findings}", listed)
    content: list[dict[str, Any]] = []
    if spec.preamble:
        _add_text(content, spec.preamble)
    if spec.instruction_position == "before":
        _add_text(content, instruction)
    for number, image in enumerate(images, start=1):
        content.append({"type": "image", "image": image})
        if spec.image_label:
            _add_text(content, spec.image_label.replace("{n}", str(number)))
    if spec.instruction_position == "after":
        _add_text(content, instruction)
    messages = [
        {"role": "system", "content": [{"type": "text", "text": spec.system.strip()}]},
        {"role": "user", "content": content},
    ]
    logger.debug("series %s: prompt %s with %d image(s)", series.series_instance_uid, spec.id, len(images))
    return ReportRequest(
        source=series.series_instance_uid,
        messages=messages,
        prompt_id=spec.id,
        prompt_version=spec.version,
        settings=settings,
        frames=frames,
        modality=series.modality,
        findings_context=context,
        notes=notes,
        warnings=warnings,
    )


def _render(frame: ImageFrame, spec: PromptSpec, notes: list[str], warnings: list[str]) -> Image.Image:
    if spec.rendering == "ct_three_window":
        if frame.values.ndim == 2:
            return render_ct_three_window(frame.values)
        message = (
            f"frame {frame.frame_number} of {frame.sop_instance_uid} is RGB: sent as displayed, "
            "not as three HU windows"
        )
        if message not in warnings:
            warnings.append(message)
    pixels = _to_uint8(frame.display)
    if pixels.ndim == 2:
        return Image.fromarray(pixels, mode="L").convert("RGB")
    return Image.fromarray(pixels[..., :3], mode="RGB")


def _rendering_note(spec: PromptSpec, frames: Sequence[ImageFrame]) -> str:
    if spec.rendering == "ct_three_window":
        windows = ", ".join(
            f"{channel} {name} {center - width / 2:g}..{center + width / 2:g} HU"
            for channel, (name, center, width) in zip("RGB", CT_WINDOWS, strict=True)
        )
        return f"slices rendered as RGB from three windows ({windows})"
    sources = sorted({frame.window_source for frame in frames})
    return f"images as displayed ({'; '.join(sources)})"


def _to_uint8(display: np.ndarray) -> np.ndarray:
    return np.round(np.clip(np.nan_to_num(display, nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)


def _add_text(content: list[dict[str, Any]], text: str) -> None:
    """Append a text item, merged into a preceding text item: the chat template joins items
    without a separator, so two texts in a row would run together."""
    text = text.strip()
    if content and content[-1]["type"] == "text":
        content[-1]["text"] += "\n\n" + text
    else:
        content.append({"type": "text", "text": text})


def _unit(spec: PromptSpec) -> str:
    return "slices" if spec.image_label and spec.image_label.upper().startswith("SLICE") else "frames"


def _check_findings(findings: Sequence[tuple[str, float]] | None) -> tuple[tuple[str, float], ...]:
    if findings is None:
        return ()
    if isinstance(findings, (str, bytes)):
        raise TypeError("findings_context must be a sequence of (name, probability) pairs, not a string")
    checked = []
    for index, pair in enumerate(findings):
        try:
            name, probability = pair
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"findings_context[{index}] must be a (name, probability) pair, got {pair!r}"
            ) from exc
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"findings_context[{index}] has an empty or non-string name: {name!r}")
        if not is_number(probability) or not 0.0 <= float(probability) <= 1.0:
            raise ValueError(
                f"findings_context[{index}] ({name!r}) probability must be in [0, 1], got {probability!r}"
            )
        checked.append((name.strip(), float(probability)))
    return tuple(checked)
