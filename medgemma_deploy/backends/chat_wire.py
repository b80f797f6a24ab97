"""Protobuf ↔ MedGemma requests: chat messages (text and images) and generation settings.

The chat is sent as the processor's own message structure (roles, text parts, image parts) and
rendered by the model's chat template on the worker (``MedGemmaRunner.prepare_inputs``, as in
process).
Images travel as 8-bit arrays: a PIL image (what the prompt builder makes) arrives pixel-identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from medgemma_deploy._proto import worker_pb2 as pb
from medgemma_deploy.backends.wire import array_from_proto, array_to_proto
from medgemma_deploy.domain import GenerationSettings
from medgemma_deploy.worker.engine.errors import BadRequestError

__all__ = [
    "MAX_CHAT_MESSAGES",
    "MAX_CHAT_TEXT_CHARS",
    "chat_from_proto",
    "chat_to_proto",
    "image_to_chat_array",
    "sampling_from_proto",
    "settings_to_proto",
]

_ROLES = ("system", "user", "assistant")

#: Most chat messages one request may hold. A report prompt is one system turn and one user turn
#: (with its images); a longer conversation is not what the worker serves.
MAX_CHAT_MESSAGES = 32
#: Most characters of text in one request, all turns together. MedGemma's context is 128 K tokens
#: (several characters each); far more text only costs tokenizer time before the context check
#: refuses it (a 10 MB text took 75 s and 5 GB to be refused).
MAX_CHAT_TEXT_CHARS = 262_144
_OPTIONAL_SETTINGS = ("temperature", "top_p", "top_k", "repetition_penalty", "seed")


def chat_from_proto(messages: Sequence[pb.ChatMessage], *, max_pixels: int) -> list[dict[str, Any]]:
    """Chat messages in the processor's format (images as PIL), validated.

    Raises
    ------
    BadRequestError
        No messages, too many messages or too much text (:data:`MAX_CHAT_MESSAGES`,
        :data:`MAX_CHAT_TEXT_CHARS`), an unknown role, turns that do not alternate, an empty turn
        or text, an image of the wrong shape or dtype, or no user text at all (an empty prompt).
    """
    if not messages:
        raise BadRequestError("messages", "is empty")
    if len(messages) > MAX_CHAT_MESSAGES:
        raise BadRequestError("messages", f"{len(messages)} messages exceed the limit of {MAX_CHAT_MESSAGES}")
    n_chars = sum(len(part.text) for message in messages for part in message.content)
    if n_chars > MAX_CHAT_TEXT_CHARS:
        raise BadRequestError(
            "messages", f"{n_chars} characters of text exceed the limit of {MAX_CHAT_TEXT_CHARS}"
        )
    _check_alternation([message.role for message in messages])
    chat: list[dict[str, Any]] = []
    user_text = False
    for index, message in enumerate(messages):
        field_name = f"messages[{index}]"
        if message.role not in _ROLES:
            raise BadRequestError(f"{field_name}.role", f"{message.role!r} is not one of {', '.join(_ROLES)}")
        if not message.content:
            raise BadRequestError(f"{field_name}.content", "is empty")
        content: list[dict[str, Any]] = []
        for n, part in enumerate(message.content):
            part_field = f"{field_name}.content[{n}]"
            kind = part.WhichOneof("part")
            if kind == "text":
                if not part.text.strip():
                    raise BadRequestError(f"{part_field}.text", "is empty")
                user_text = user_text or message.role == "user"
                content.append({"type": "text", "text": part.text})
            elif kind == "image":
                array = array_from_proto(part.image, f"{part_field}.image")
                content.append(
                    {"type": "image", "image": _pil_image(array, f"{part_field}.image", max_pixels)}
                )
            else:
                raise BadRequestError(part_field, "has neither text nor image")
        chat.append({"role": message.role, "content": content})
    if not user_text:
        raise BadRequestError("messages", "no user turn has any text: the prompt is empty")
    return chat


def _check_alternation(roles: Sequence[str]) -> None:
    """An optional first system turn, then user and assistant turns alternating from a user turn.

    Gemma's chat template raises a TemplateError for anything else (200 consecutive user turns were
    an INTERNAL error); checking here names the turn and answers INVALID_ARGUMENT.
    """
    turns = list(roles[1:] if roles and roles[0] == "system" else roles)
    offset = len(roles) - len(turns)
    for index, role in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            raise BadRequestError(
                f"messages[{index + offset}].role",
                f"{role!r} where {expected!r} is expected: after an optional first system turn, "
                "turns must alternate user, assistant, user…",
            )


def chat_to_proto(messages: Sequence[dict[str, Any]]) -> list[pb.ChatMessage]:
    """Processor-format chat messages (text and PIL/array images) → wire messages.

    Raises
    ------
    ValueError
        A content item is neither text nor image.
    """
    wire = []
    for index, message in enumerate(messages):
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
        out = pb.ChatMessage(role=str(message.get("role", "")))
        for n, part in enumerate(parts):
            if part.get("type") == "text":
                out.content.add(text=str(part.get("text", "")))
            elif part.get("type") == "image":
                out.content.add(image=array_to_proto(image_to_chat_array(part.get("image"))))
            else:
                raise ValueError(
                    f"messages[{index}].content[{n}]: type {part.get('type')!r} is not text or image"
                )
        wire.append(out)
    return wire


def settings_to_proto(settings: GenerationSettings) -> pb.GenerationSettings:
    message = pb.GenerationSettings(max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample)
    for name in _OPTIONAL_SETTINGS:
        value = getattr(settings, name)
        if value is not None:
            setattr(message, name, value)
    return message


def image_to_chat_array(image: Any) -> np.ndarray:
    """A chat image (PIL, or an array) as the uint8 array sent on the wire, losslessly for 8-bit PIL."""
    if isinstance(image, Image.Image):
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        return np.asarray(image, dtype=np.uint8)
    array = np.asarray(image)
    if array.dtype == np.uint8:
        return array
    return np.rint(np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def sampling_from_proto(
    message: pb.GenerationSettings, default_max_new_tokens: int, limit: int
) -> GenerationSettings:
    """The request's decoding settings (0 max_new_tokens → the worker's default).

    Raises
    ------
    BadRequestError
        ``max_new_tokens`` above the worker's limit, or settings the runner would refuse.
    """
    max_new_tokens = message.max_new_tokens or default_max_new_tokens
    if max_new_tokens > limit:
        raise BadRequestError(
            "settings.max_new_tokens", f"{max_new_tokens} exceeds the worker's limit of {limit}"
        )
    optional = {
        name: getattr(message, name) if message.HasField(name) else None for name in _OPTIONAL_SETTINGS
    }
    try:
        return GenerationSettings(max_new_tokens=max_new_tokens, do_sample=message.do_sample, **optional)
    except ValueError as exc:
        raise BadRequestError("settings", str(exc)) from exc


def _pil_image(array: np.ndarray, field_name: str, max_pixels: int) -> Image.Image:
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise BadRequestError(
            f"{field_name}.shape", f"{list(array.shape)} is not [rows, columns] or [rows, columns, 3]"
        )
    if array.shape[0] * array.shape[1] > max_pixels:
        raise BadRequestError(
            f"{field_name}.shape", f"{array.shape[0] * array.shape[1]} pixels exceed {max_pixels}"
        )
    if array.dtype != np.uint8:
        if array.dtype.kind != "f":
            raise BadRequestError(
                f"{field_name}.dtype", f"{array.dtype} is not supported for chat images; send UINT8"
            )
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise BadRequestError(f"{field_name}.data", "float chat images must be finite and within [0, 1]")
        array = image_to_chat_array(array)
    return Image.fromarray(np.ascontiguousarray(array), "L" if array.ndim == 2 else "RGB")
