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
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from medgemma_deploy.operators.domain import ImageFrame, Series
from medgemma_deploy.operators.report_prompts import PromptBook, PromptSpec, Rendering, is_int, is_number
from medgemma_deploy.operators.voi import apply_window

# PromptBook, PromptSpec and Rendering are defined with the prompts-file validation in
# report_prompts.py and re-exported here.
__all__ = [
    "CT_WINDOWS",
    "GenerationSettings",
    "PromptBook",
    "PromptSpec",
    "Rendering",
    "ReportRequest",
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

_SAMPLING_ONLY = ("temperature", "top_p", "top_k", "seed")


@dataclass(frozen=True)
class GenerationSettings:
    """How the report text is decoded; every field is recorded with the result and in the SR.

    Parameters
    ----------
    max_new_tokens:
        Most tokens to generate (a report cut there is flagged).
    do_sample:
        False (default): greedy decoding, deterministic. True: sample with the settings below.
    temperature, top_p, top_k:
        Sampling settings (only with ``do_sample``); None keeps the checkpoint's defaults.
    repetition_penalty:
        Applied in both modes when given (> 0; 1.0 means none).
    seed:
        Seed of a sampled generation, so that it can be reproduced (only with ``do_sample``).

    Raises
    ------
    ValueError
        A value is out of range, or a sampling setting is given with ``do_sample=False``.
    """

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be a bool, got {self.do_sample!r}")
        for name in ("temperature", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None and not (is_number(value) and value > 0):
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        if self.top_p is not None and not (is_number(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and not (is_int(self.top_k) and self.top_k >= 1):
            raise ValueError(f"top_k must be an int >= 1, got {self.top_k!r}")
        if self.seed is not None and not (is_int(self.seed) and self.seed >= 0):
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        ignored = [name for name in _SAMPLING_ONLY if getattr(self, name) is not None]
        if ignored and not self.do_sample:
            raise ValueError(f"{', '.join(ignored)} only apply with do_sample=True, not with greedy decoding")

    def as_parameters(self) -> tuple[tuple[str, str], ...]:
        """The settings as ``(key, value)`` strings, the set ones only (TID 4019 parameters)."""
        pairs = [
            ("decoding", "sampling" if self.do_sample else "greedy"),
            ("max_new_tokens", str(self.max_new_tokens)),
        ]
        for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
            value = getattr(self, name)
            if value is not None:
                pairs.append((name, str(value)))
        return tuple(pairs)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ReportRequest:
    """Everything MedGemma needs to draft one series' report.

    Attributes
    ----------
    source:
        What the request is about, for errors: the Series Instance UID.
    messages:
        Chat messages in the processor's format: a ``system`` turn, then one ``user`` turn whose
        ``content`` lists ``{"type": "text", "text": …}`` and ``{"type": "image", "image": PIL}``.
    prompt_id, prompt_version:
        The prompt-book family used (recorded in results and the SR).
    settings:
        How to decode.
    frames:
        The frames whose images are in ``messages``, in prompt order (the SR's evidence).
    modality:
        Modality of the series.
    findings_context:
        ``(finding, probability)`` pairs the instruction was grounded on; empty when not grounded.
    notes:
        What was done to build the prompt (slice sampling, rendering), for the results.
    warnings:
        What the caller should report (e.g. no dedicated prompt for the modality).
    """

    source: str
    messages: list[dict[str, Any]]
    prompt_id: str
    prompt_version: str
    settings: GenerationSettings
    frames: list[ImageFrame]
    modality: str
    findings_context: tuple[tuple[str, float], ...] = ()
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def findings_grounded(self) -> bool:
        """Whether the instruction carries automated screening findings."""
        return bool(self.findings_context)

    @property
    def n_images(self) -> int:
        return sum(
            1
            for message in self.messages
            if isinstance(message.get("content"), list)
            for item in message["content"]
            if item.get("type") == "image"
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
