"""The rules of a MedGemma report that need no loaded model, shared by every engine.

:func:`eos_ids` finds the tokens that end a report and :func:`dtype_name` checks the ``dtype``
argument; :func:`chat_inputs`, :func:`fit_token_budget` and :func:`fill_sampling_defaults` are the
rules every MedGemma engine (the torch core of
:class:`~medgemma_deploy.worker.engine.report_service.ReportService`, llama.cpp) applies alike,
through the runners' ``prepare_inputs``, ``token_budget`` and ``effective_settings``, which
:class:`MedGemmaRules`, the base of both runners, defines once. They are separate from
:mod:`~medgemma_deploy.operators.medgemma.runner` so that the runner modules hold a model's
lifecycle; none of them touches the model.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from medgemma_deploy.domain import GenerationSettings, ModelIdentity, ModelLifecycle, ReportRequest
from medgemma_deploy.errors import InputError, ModelLoadError

__all__ = [
    "SAMPLING_OPTIONS",
    "MedGemmaRules",
    "chat_inputs",
    "dtype_name",
    "eos_ids",
    "fill_sampling_defaults",
    "fit_token_budget",
]

#: Sampling options a checkpoint's generation_config may set; applied only when sampling.
SAMPLING_OPTIONS = ("temperature", "top_p", "top_k")

_DTYPES = ("float32", "bfloat16", "float16")

logger = logging.getLogger(__name__)


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
    ``context``.

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


_Runner = TypeVar("_Runner", bound="MedGemmaRules")


class MedGemmaRules(ModelLifecycle):
    """The base of the MedGemma runners (transformers and llama.cpp): loading once, the checkpoint's
    processor and sampling defaults, and the rules above applied to them, so that the engines
    prompt, budget and record a report alike.

    A runner sets :attr:`model_dir`, ``identity``, ``context_length`` (its model's context, once
    loaded), ``_processor``, ``_sampling_defaults`` and ``_lock``, and defines :attr:`is_loaded`,
    ``_load`` and ``_unload`` (each called under the lock, only when it has something to do).
    """

    #: How :meth:`prepare_inputs` returns its arrays: ``"pt"`` (torch tensors) or ``"np"``.
    input_tensors: ClassVar[str]
    model_dir: Path
    identity: ModelIdentity
    context_length: int | None
    _processor: Any
    _sampling_defaults: dict[str, Any]
    _lock: threading.Lock

    @property
    def is_loaded(self) -> bool:
        raise NotImplementedError

    def _load(self) -> None:
        raise NotImplementedError

    def _unload(self) -> None:
        raise NotImplementedError

    def load(self: _Runner) -> _Runner:
        """Load the model (once; later calls do nothing) and return the runner.

        Raises
        ------
        ModelLoadError
            The model cannot be loaded; the message names the directory and the reason.
        """
        with self._lock:
            if not self.is_loaded:
                self._load()
                if self.identity.random_weights:
                    logger.warning(
                        "MedGemma %s has RANDOM WEIGHTS: its reports are meaningless", self.identity.name
                    )
        return self

    def close(self) -> None:
        """Free the model; :meth:`load` may be called again afterwards."""
        with self._lock:
            if self.is_loaded:
                self._unload()

    @property
    def processor(self) -> Any:
        """The checkpoint's ``Gemma3Processor`` (after :meth:`load`)."""
        self._require_loaded()
        return self._processor

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """The checkpoint's temperature/top_p/top_k (``generation_config.json``), used only when
        sampling and a request leaves them unset; None where the checkpoint sets none."""
        return dict(self._sampling_defaults)

    def prepare_inputs(self, request: ReportRequest) -> Any:
        """The processor's model inputs for ``request`` (token ids, pixel values…), on the CPU, as
        :attr:`input_tensors` say.

        Raises
        ------
        InputError
            The processor refuses the messages (e.g. an image it cannot read).
        """
        self._require_loaded()
        return chat_inputs(self._processor, request, self.input_tensors)

    def token_budget(self, request: ReportRequest, n_prompt: int, warnings: list[str]) -> int:
        """New tokens ``request`` may generate after its ``n_prompt``-token prompt.

        ``request.settings.max_new_tokens``, reduced to what this model's context leaves (the
        reduction appended to ``warnings``); :func:`fit_token_budget`.

        Raises
        ------
        InputError
            The prompt alone fills the context; the message names the counts and what to change.
        """
        return fit_token_budget(request, n_prompt, self.context_length or 0, warnings)

    def effective_settings(self, settings: GenerationSettings) -> GenerationSettings:
        """The settings a report is decoded with and recorded under: ``settings`` with the
        checkpoint's sampling defaults filled in where sampling leaves them unset (greedy settings
        are returned as they are)."""
        return fill_sampling_defaults(settings, self._sampling_defaults)

    def _require_loaded(self) -> None:
        if not self.is_loaded:
            raise RuntimeError(
                f"{type(self).__name__}({self.model_dir}) is not loaded: call load() or use it in a "
                "with block"
            )
