"""MedGemma runner: draft report text from a prepared request (load → generate → close).

The runner knows nothing about DICOM: :mod:`medgemma_deploy.operators.medgemma.request` turns a
series into a :class:`ReportRequest` (chat messages with images, prompt id, generation settings)
and :mod:`medgemma_deploy.operators.writers.report_sr` turns the :class:`ReportResult` into an SR.
The same runner serves the in-process operator and the gRPC worker.

Decisions callers can rely on:

* The model's own processor and chat template build the prompt
  (``processor.apply_chat_template(..., add_generation_prompt=True, tokenize=True)``), so a
  hospital's copy of ``google/medgemma-4b-it`` is prompted exactly as Google's examples do.
* Greedy decoding is the default; sampling settings from the checkpoint's
  ``generation_config.json`` (top-k/top-p) apply only when ``do_sample`` is asked for. Every
  setting used is recorded in the result and, through it, in the SR.
* A prompt that does not fit the model's context is an :class:`InputError` naming the series and
  the counts (never silently truncated: cutting images or the instruction would change what the
  report is about). When the prompt fits but prompt + ``max_new_tokens`` does not, the budget is
  reduced to what fits and the result says so in ``warnings``.
* Empty text, text cut at ``max_new_tokens`` and a reduced budget are flagged in
  ``ReportResult.warnings`` for the caller to report.
* ``on_token`` receives decoded text pieces as they are generated; their concatenation is
  ``ReportResult.text``. Raising from ``on_token`` aborts the generation (client cancelled).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from medgemma_deploy.domain import (
    FinishReason,
    GenerationSettings,
    ModelIdentity,
    ReportRequest,
    ReportResult,
)
from medgemma_deploy.errors import InputError, ModelLoadError
from medgemma_deploy.model_dir import model_identity, resolve_model_dir
from medgemma_deploy.operators.medgemma.generation import (
    SAMPLING_OPTIONS,
    IncrementalTextStreamer,
    chat_inputs,
    dtype_name,
    eos_ids,
    fill_sampling_defaults,
    fit_token_budget,
)
from medgemma_deploy.precision import torch_dtype_name

# GenerationSettings and ReportRequest are defined with the request builder, ReportResult in
# medgemma_generation.py; all three are re-exported here.
__all__ = ["MedGemmaRunner"]

logger = logging.getLogger(__name__)


class MedGemmaRunner:
    """Loads a MedGemma checkpoint once and drafts reports with it.

    Parameters
    ----------
    model_dir:
        The model directory (``config.json`` of ``model_type`` ``gemma3``) or a models root
        holding ``medgemma/``.
    device:
        ``"cuda"``, ``"cuda:1"``, ``"cpu"``…; None picks CUDA when available.
    dtype:
        ``torch.dtype`` or its name (``"bfloat16"``, ``"float16"``, ``"float32"``); None means
        bfloat16 on CUDA and float32 on CPU.

    Raises
    ------
    ModelLoadError
        The directory is missing or holds no MedGemma (``resolve_model_dir``), or ``dtype`` is unknown.

    Examples
    --------
    >>> with MedGemmaRunner(model_dir) as runner:          # doctest: +SKIP
    ...     result = runner.generate(request, on_token=print)
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str | None = None,
        dtype: Any = None,
        precision: str = "auto",
    ) -> None:
        self.model_dir = resolve_model_dir(model_dir, "medgemma")
        self.identity: ModelIdentity = model_identity(self.model_dir)
        self._requested_device = device
        self._requested_dtype = dtype_name(dtype, self.model_dir)
        self.precision = precision
        if torch_dtype_name(precision, "cpu") is None:
            raise ModelLoadError(
                f"{self.model_dir}: precision {precision} is not offered for MedGemma; use auto, fp32 or bf16"
            )
        self._model: Any = None
        self._processor: Any = None
        self._device: Any = None
        self._lock = threading.Lock()
        self.context_length: int | None = None
        self.eos_token_ids: tuple[int, ...] = ()
        self._sampling_defaults: dict[str, Any] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def is_loaded(self) -> bool:
        return self._model is not None

    @property
    def device(self) -> str | None:
        """The device the model is on once loaded."""
        return None if self._device is None else str(self._device)

    @property
    def processor(self) -> Any:
        """The checkpoint's ``Gemma3Processor`` (after :meth:`load`)."""
        self._require_loaded()
        return self._processor

    @property
    def model(self) -> Any:
        """The ``Gemma3ForConditionalGeneration`` (after :meth:`load`)."""
        self._require_loaded()
        return self._model

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """The checkpoint's temperature/top_p/top_k (``generation_config.json``), used only when
        sampling and a request leaves them unset; None where the checkpoint sets none."""
        return dict(self._sampling_defaults)

    def load(self) -> MedGemmaRunner:
        """Load the model and processor from the model directory (once; later calls do nothing).

        Returns
        -------
        MedGemmaRunner
            ``self``, so ``runner = MedGemmaRunner(d).load()`` works.

        Raises
        ------
        ModelLoadError
            The weights, configuration or processor files cannot be loaded, the checkpoint is
            not a Gemma 3 image-text model, or the device has not enough memory; the message
            names the directory and the reason.
        """
        with self._lock:
            if self._model is None:
                self._load()
        return self

    def _load(self) -> None:
        import torch
        from transformers import AutoProcessor, Gemma3ForConditionalGeneration

        started = time.perf_counter()
        device = torch.device(self._requested_device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype_name = self._requested_dtype or torch_dtype_name(self.precision, device.type)
        dtype = getattr(torch, dtype_name)
        try:
            processor = AutoProcessor.from_pretrained(self.model_dir)
            model = Gemma3ForConditionalGeneration.from_pretrained(
                self.model_dir, dtype=dtype, attn_implementation="sdpa"
            )
            model.to(device).eval()
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, ImportError) as exc:
            raise ModelLoadError(
                f"{self.model_dir}: cannot load MedGemma on {device} as {dtype_name}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        for attribute in ("image_processor", "tokenizer", "chat_template"):
            if getattr(processor, attribute, None) is None:
                raise ModelLoadError(
                    f"{self.model_dir}: the processor has no {attribute}; MedGemma needs the "
                    "checkpoint's processor_config.json, tokenizer and chat template"
                )
        self._model = model
        self._processor = processor
        self._device = device
        self.context_length = int(model.config.get_text_config().max_position_embeddings)
        self.eos_token_ids = eos_ids(model.generation_config.eos_token_id, processor.tokenizer)
        # transformers fills unset generate() options from model.generation_config, so the
        # checkpoint's sampling defaults would reach (and warn in) greedy runs; keep them aside
        # and apply them only when sampling.
        self._sampling_defaults = {
            name: getattr(model.generation_config, name, None) for name in SAMPLING_OPTIONS
        }
        for name in SAMPLING_OPTIONS:
            setattr(model.generation_config, name, None)
        model.generation_config.do_sample = False
        n_parameters = sum(parameter.numel() for parameter in model.parameters())
        logger.info(
            "MedGemma %s (%s) loaded from %s on %s as %s in %.1f s: %.1fM parameters, context %d tokens",
            self.identity.name,
            self.identity.version,
            self.model_dir,
            device,
            dtype_name,
            time.perf_counter() - started,
            n_parameters / 1e6,
            self.context_length,
        )
        if self.identity.random_weights:
            logger.warning("MedGemma %s has RANDOM WEIGHTS: its reports are meaningless", self.identity.name)

    def close(self) -> None:
        """Free the model (and GPU memory); :meth:`load` may be called again afterwards."""
        with self._lock:
            if self._model is None:
                return
            device = self._device
            self._model = None
            self._processor = None
            self._device = None
            gc.collect()
            if device is not None and device.type == "cuda":
                import torch

                torch.cuda.empty_cache()
            logger.info("MedGemma %s unloaded", self.identity.name)

    def __enter__(self) -> MedGemmaRunner:
        return self.load()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def engine_parameters(self) -> tuple[tuple[str, str], ...]:
        """What ran the model, for the result and the SR: transformers and the weights' dtype."""
        import transformers

        dtype = str(self._model.dtype).removeprefix("torch.") if self._model is not None else ""
        return (
            ("engine", f"transformers {transformers.__version__}"),
            ("precision", f"{self.precision} ({dtype})"),
        )

    # -- run ---------------------------------------------------------------------------------

    def prepare_inputs(self, request: ReportRequest) -> Any:
        """The processor's model inputs for ``request`` (token ids, pixel values…), on the CPU.

        Raises
        ------
        InputError
            The processor refuses the messages (e.g. an image it cannot read).
        """
        self._require_loaded()
        return chat_inputs(self._processor, request, "pt")

    def generate(
        self, request: ReportRequest, *, on_token: Callable[[str], None] | None = None
    ) -> ReportResult:
        """Generate the report text of one request.

        Parameters
        ----------
        request:
            Messages, prompt id and settings, from ``report_inputs.build_report_request``.
        on_token:
            Called with each new piece of decoded text while generating (the pieces concatenate
            to ``ReportResult.text``). An exception raised by it stops the generation and
            propagates.

        Returns
        -------
        ReportResult

        Raises
        ------
        RuntimeError
            :meth:`load` was not called, or the device ran out of memory (the message names the
            series and the prompt size).
        InputError
            The prompt (images and text) is longer than the model's context.
        """
        if not isinstance(request, ReportRequest):
            raise TypeError(f"request must be a ReportRequest, got {type(request).__name__}")
        with self._lock:
            return self._generate(request, on_token)

    def generate_batch(self, requests: Sequence[ReportRequest]) -> list[ReportResult | InputError]:
        """One result per request, in order: a ``ReportResult`` or the request's ``InputError``."""
        results: list[ReportResult | InputError] = []
        for request in requests:
            try:
                results.append(self.generate(request))
            except InputError as exc:
                logger.warning("report for %s not generated: %s", exc.source, exc.reason)
                results.append(exc)
        return results

    def _generate(self, request: ReportRequest, on_token: Callable[[str], None] | None) -> ReportResult:
        import torch

        started = time.perf_counter()
        inputs = self.prepare_inputs(request)
        n_prompt = int(inputs["input_ids"].shape[1])
        settings = self.effective_settings(request.settings)
        warnings = list(request.warnings)
        max_new_tokens = self.token_budget(request, n_prompt, warnings)
        inputs = inputs.to(self._device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        generation_config = self._generation_config(settings, max_new_tokens)
        streamer = IncrementalTextStreamer(self._processor.tokenizer, on_token) if on_token else None
        preprocess_seconds = time.perf_counter() - started
        generate_started = time.perf_counter()
        try:
            with self._seeded(settings), torch.inference_mode():
                output = self._model.generate(
                    **inputs, generation_config=generation_config, streamer=streamer
                )
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            raise RuntimeError(
                f"out of GPU memory drafting the report of {request.source}: {n_prompt} prompt tokens "
                f"({request.n_images} images) + {max_new_tokens} new tokens"
            ) from exc
        seconds = time.perf_counter() - generate_started
        token_ids = [int(token) for token in output[0, n_prompt:].tolist()]
        text = self._processor.tokenizer.decode(token_ids, skip_special_tokens=True)
        stopped = bool(token_ids) and token_ids[-1] in self.eos_token_ids
        finish_reason: FinishReason = "stop" if stopped else "length"
        if streamer is not None and streamer.streamed_text != text:
            # Only possible with a tokenizer whose decoding of a prefix is not a prefix of the decoding.
            warnings.append("the streamed text differs from the final text; use the final text")
        if not text.strip():
            warnings.append(
                f"MedGemma generated no text ({len(token_ids)} token(s), finish reason {finish_reason}); "
                "there is no draft to report"
            )
        if finish_reason == "length":
            warnings.append(f"cut off at max_new_tokens={max_new_tokens}: the draft may be incomplete")
        result = ReportResult(
            text=text,
            token_ids=token_ids,
            n_prompt_tokens=n_prompt,
            n_generated_tokens=len(token_ids),
            finish_reason=finish_reason,
            seconds=seconds,
            tokens_per_second=len(token_ids) / seconds if seconds > 0 else 0.0,
            settings=settings,
            prompt_id=request.prompt_id,
            prompt_version=request.prompt_version,
            preprocess_seconds=preprocess_seconds,
            warnings=warnings,
            engine_parameters=self.engine_parameters,
        )
        logger.info(
            "%s: %d prompt tokens (%d images), %d generated in %.2f s (%.1f tok/s), finish %s",
            request.source,
            n_prompt,
            request.n_images,
            len(token_ids),
            seconds,
            result.tokens_per_second,
            finish_reason,
        )
        return result

    def token_budget(self, request: ReportRequest, n_prompt: int, warnings: list[str]) -> int:
        """New tokens this request may generate (:func:`fit_token_budget` on this model's context)."""
        return fit_token_budget(request, n_prompt, self.context_length or 0, warnings)

    def effective_settings(self, settings: GenerationSettings) -> GenerationSettings:
        """``settings`` with the checkpoint's sampling defaults filled in, so results record them."""
        return fill_sampling_defaults(settings, self._sampling_defaults)

    def _generation_config(self, settings: GenerationSettings, max_new_tokens: int) -> Any:
        config = copy.deepcopy(self._model.generation_config)
        config.max_new_tokens = max_new_tokens
        config.max_length = None
        config.do_sample = settings.do_sample
        config.num_beams = 1
        if settings.do_sample:
            for name in SAMPLING_OPTIONS:
                setattr(config, name, getattr(settings, name))
        if settings.repetition_penalty is not None:
            config.repetition_penalty = settings.repetition_penalty
        return config

    @contextlib.contextmanager
    def _seeded(self, settings: GenerationSettings) -> Iterator[None]:
        """Seed a sampled generation without disturbing the caller's random state."""
        if not (settings.do_sample and settings.seed is not None):
            yield
            return
        import torch

        cuda_devices = []
        if self._device.type == "cuda":
            index = self._device.index
            cuda_devices = [index if index is not None else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(settings.seed)
            yield

    def _require_loaded(self) -> None:
        if self._model is None:
            raise RuntimeError(
                f"MedGemmaRunner({self.model_dir}) is not loaded: call load() or use it in a with block"
            )
