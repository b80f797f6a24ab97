"""What one MedGemma generation returns, and the pieces of it that need no loaded runner.

:class:`ReportResult` (with :data:`FinishReason`) is the runner's output for one request;
:class:`IncrementalTextStreamer` hands decoded text to ``on_token`` while ``generate`` runs;
:func:`eos_ids` finds the tokens that end a report and :func:`dtype_name` checks the ``dtype``
argument; :func:`chat_inputs`, :func:`fit_token_budget` and :func:`fill_sampling_defaults` are the
rules every MedGemma engine (transformers, llama.cpp) applies alike. They are separate from
:mod:`~medgemma_deploy.operators.medgemma.runner` so that the runner modules hold a model's lifecycle and
its generate call only; none of them touches the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from transformers.generation.streamers import BaseStreamer

from medgemma_deploy.domain import GenerationSettings, ReportRequest
from medgemma_deploy.errors import InputError, ModelLoadError

__all__ = [
    "SAMPLING_OPTIONS",
    "IncrementalTextStreamer",
    "chat_inputs",
    "dtype_name",
    "eos_ids",
    "fill_sampling_defaults",
    "fit_token_budget",
]

#: Sampling options a checkpoint's generation_config may set; applied only when sampling.
SAMPLING_OPTIONS = ("temperature", "top_p", "top_k")

_DTYPES = ("float32", "bfloat16", "float16")


class IncrementalTextStreamer(BaseStreamer):
    """Hands newly decoded text to a callback, token by token, without a thread.

    ``generate`` first puts the prompt (skipped), then each new token. The generated ids so far
    are decoded as a whole each time and the new suffix is passed on, except while the text ends
    in an incomplete UTF-8 sequence (byte-fallback tokens of a multi-byte character), which is
    held back until its last byte arrives; ``end`` flushes whatever is left.
    """

    def __init__(self, tokenizer: Any, on_token: Callable[[str], None]) -> None:
        self._tokenizer = tokenizer
        self._on_token = on_token
        self._prompt_seen = False
        self._token_ids: list[int] = []
        self.streamed_text = ""

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self._token_ids.extend(int(token) for token in value.reshape(-1).tolist())
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, *, final: bool) -> None:
        text = self._tokenizer.decode(self._token_ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return
        if text.startswith(self.streamed_text) and len(text) > len(self.streamed_text):
            piece = text[len(self.streamed_text) :]
            self.streamed_text = text
            self._on_token(piece)


def dtype_name(dtype: Any, model_dir: Path) -> str | None:
    """``dtype`` (a ``torch.dtype`` or its name) as ``"float32"``, ``"bfloat16"`` or ``"float16"``.

    Raises
    ------
    ModelLoadError
        ``dtype`` is not one of them; the message names ``model_dir``. None is returned as None.
    """
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ModelLoadError(f"{model_dir}: dtype {dtype!r} is not supported; use {', '.join(_DTYPES)}")
    return name


def eos_ids(configured: int | list[int] | None, tokenizer: Any) -> tuple[int, ...]:
    """The generation config's end-of-sequence id(s), else the tokenizer's, as a tuple."""
    ids = [configured] if isinstance(configured, int) else list(configured or [])
    if not ids and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    return tuple(int(token) for token in ids)


# The rules every MedGemma engine applies the same way (transformers in process, llama.cpp at low
# bit): one definition, so the engines cannot drift apart.


def chat_inputs(processor: Any, request: ReportRequest, return_tensors: str) -> Any:
    """The processor's inputs (token ids, normalised pixels) for ``request``.

    Raises
    ------
    InputError
        The processor refuses the messages (e.g. an image it cannot read); ``source`` is
        ``request.source``.
    """
    try:
        return processor.apply_chat_template(
            request.messages,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors=return_tensors,
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise InputError(
            request.source, f"the MedGemma processor cannot build the prompt ({request.prompt_id}): {exc}"
        ) from exc


def fit_token_budget(request: ReportRequest, n_prompt: int, context: int, warnings: list[str]) -> int:
    """New tokens ``request`` may generate: its max_new_tokens, shrunk (with a warning) to fit the
    ``context``; the worker's scheduler applies the same rule.

    Raises
    ------
    InputError
        The prompt alone fills the context.
    """
    wanted = request.settings.max_new_tokens
    if n_prompt >= context:
        raise InputError(
            request.source,
            f"the prompt is {n_prompt} tokens ({request.n_images} images plus text, prompt "
            f"{request.prompt_id}) and MedGemma's context is {context} tokens: send fewer images "
            "(max_images in prompts.yaml) or a shorter prompt",
        )
    if n_prompt + wanted > context:
        budget = context - n_prompt
        warnings.append(
            f"max_new_tokens reduced from {wanted} to {budget}: the {n_prompt}-token prompt leaves "
            f"only that much of the {context}-token context"
        )
        return budget
    return wanted


def fill_sampling_defaults(settings: GenerationSettings, defaults: dict[str, Any]) -> GenerationSettings:
    """``settings`` with the checkpoint's sampling ``defaults`` filled in, so results record them."""
    if not settings.do_sample:
        return settings
    filled = {
        name: defaults[name]
        for name in SAMPLING_OPTIONS
        if getattr(settings, name) is None and defaults.get(name) is not None
    }
    return replace(settings, **filled) if filled else settings
