"""MedGemma runner: a loaded checkpoint and the rules of drafting a report with it.

The runner knows nothing about DICOM: :mod:`medgemma_deploy.operators.medgemma.request` turns a
series into a :class:`ReportRequest` (chat messages with images, prompt id, generation settings)
and :mod:`medgemma_deploy.operators.writers.report_sr` turns the :class:`ReportResult` into an SR.

The runner does not decode. Reports are decoded by one core,
:class:`~medgemma_deploy.worker.engine.report_service.ReportService` (continuous batching over the
runner's model), which the gRPC worker serves and
:class:`~medgemma_deploy.backends.inproc.InprocMedGemma` runs in process (``--backend local``). The
core takes from the runner its model and processor and these public rules, which are what callers
can rely on:

* :meth:`MedGemmaRunner.prepare_inputs`: the model's own processor and chat template build the
  prompt (``processor.apply_chat_template(..., add_generation_prompt=True, tokenize=True)``), so a
  hospital's copy of ``google/medgemma-4b-it`` is prompted exactly as Google's examples do; a
  message the processor refuses is an :class:`InputError` naming the series.
* :meth:`MedGemmaRunner.token_budget`: a prompt that does not fit the model's context is an
  :class:`InputError` naming the series and the counts (never silently truncated: cutting images or
  the instruction would change what the report is about). When the prompt fits but prompt +
  ``max_new_tokens`` does not, the budget is reduced to what fits, with a warning.
* :meth:`MedGemmaRunner.effective_settings`: greedy decoding is the default; sampling settings from
  the checkpoint's ``generation_config.json`` (temperature/top-k/top-p) apply only when
  ``do_sample`` is asked for and the request leaves them unset. Every setting used is recorded in
  the result and, through it, in the SR.
* :attr:`MedGemmaRunner.eos_token_ids` end a report (Gemma 3: ``<eos>`` and ``<end_of_turn>``),
  :attr:`MedGemmaRunner.suppress_token_ids` are never chosen (the checkpoint's ``suppress_tokens``,
  as ``generate`` applies them); :attr:`MedGemmaRunner.engine_parameters` name what ran the model,
  for the result and the SR.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from pathlib import Path
from typing import Any

from medgemma_deploy.domain import ModelIdentity
from medgemma_deploy.errors import ModelLoadError
from medgemma_deploy.model_dir import model_identity, resolve_model_dir
from medgemma_deploy.operators.medgemma.generation import (
    SAMPLING_OPTIONS,
    MedGemmaRules,
    dtype_name,
    eos_ids,
)
from medgemma_deploy.precision import torch_dtype_name

__all__ = ["MedGemmaRunner"]

logger = logging.getLogger(__name__)


class MedGemmaRunner(MedGemmaRules):
    """Loads a MedGemma checkpoint once and holds the rules of drafting a report with it.

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
    >>> from medgemma_deploy.backends.inproc import InprocMedGemma
    >>> with InprocMedGemma(MedGemmaRunner(model_dir)) as medgemma:   # doctest: +SKIP
    ...     result = medgemma.generate(request, on_token=print)
    """

    input_tensors = "pt"

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
        self.suppress_token_ids: tuple[int, ...] = ()
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
    def model(self) -> Any:
        """The ``Gemma3ForConditionalGeneration`` (after :meth:`load`)."""
        self._require_loaded()
        return self._model

    def _load(self) -> None:
        """Load the model and processor from the model directory.

        Raises
        ------
        ModelLoadError
            The weights, configuration or processor files cannot be loaded, the checkpoint is
            not a Gemma 3 image-text model, or the device has not enough memory; the message
            names the directory and the reason.
        """
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
        self.suppress_token_ids = tuple(int(t) for t in model.generation_config.suppress_tokens or ())
        # Keep the checkpoint's sampling defaults aside, applied only when sampling
        # (effective_settings). They are cleared from model.generation_config too, so that a plain
        # model.generate on this model (benchmark baselines, parity references) is greedy and quiet.
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

    def _unload(self) -> None:
        """Free the model (and GPU memory)."""
        device = self._device
        self._model = None
        self._processor = None
        self._device = None
        gc.collect()
        if device is not None and device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
        logger.info("MedGemma %s unloaded", self.identity.name)

    @property
    def engine_parameters(self) -> tuple[tuple[str, str], ...]:
        """What ran the model, for the result and the SR: transformers and the weights' dtype."""
        import transformers

        dtype = str(self._model.dtype).removeprefix("torch.") if self._model is not None else ""
        return (
            ("engine", f"transformers {transformers.__version__}"),
            ("precision", f"{self.precision} ({dtype})"),
        )
