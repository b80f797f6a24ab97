"""MedGemma on llama.cpp (llama-cpp-python): 8- and 4-bit reports on a CPU.

:class:`GgufMedGemmaRunner` is a ``ReportModel`` as the torch path's
:class:`~medgemma_deploy.backends.inproc.InprocMedGemma` is (``load``, ``generate``, ``close``,
``identity``; plus ``generate_batch``), has the rules of
:class:`~medgemma_deploy.operators.medgemma.runner.MedGemmaRunner` (``prepare_inputs``,
``token_budget``, ``effective_settings``…) and returns the same :class:`ReportResult`; only the
arithmetic moves to llama.cpp. What stays ours, so that a report is prompted exactly as on the
torch path:

* The checkpoint's own processor and chat template build the prompt and the image pixels
  (``apply_chat_template``, as the torch runner). llama.cpp receives token ids, never text: its
  tokenizer is not used, so the GGUF vocabulary only has to have the right size.
* Each image reaches llama.cpp's vision tower (``mtmd``) already resized by the processor, as
  8-bit RGB recovered exactly from the processor's normalised pixels; mtmd copies an image of the
  tower's size without resampling, so both engines see the same pixels.
* Decoding (greedy, or sampling with the request's settings) runs here on llama.cpp's logits, and
  the text is decoded with the checkpoint's tokenizer.

Weights come from :func:`~medgemma_deploy.operators.medgemma.gguf_weights.gguf_weights` (llama.cpp's own
converter, cached next to the model with SHA-256 digests); the result records the engine, the
precision and both digests, and the SR writes them into its algorithm identification.

``generate_batch`` decodes up to ``n_parallel`` requests as one llama.cpp batch (one sequence
each), which is what makes concurrent reports cheaper than one after the other on a CPU: each
decode step reads the weights once for all of them.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

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
    chat_inputs,
    eos_ids,
    fill_sampling_defaults,
    fit_token_budget,
)
from medgemma_deploy.operators.medgemma.gguf_weights import GgufWeights, gguf_weights, require_lowbit

__all__ = ["PRECISION_WEIGHT_TYPES", "GgufMedGemmaRunner"]

logger = logging.getLogger(__name__)

#: The GGUF weight type of each precision this runner offers (``f32`` is for parity tests).
PRECISION_WEIGHT_TYPES = {"int4": "q4_0", "int8": "q8_0", "fp32": "f32"}

#: ggml's type ids for a KV cache at full precision (parity) and at 16 bits (default).
_GGML_F32, _GGML_F16 = 0, 1
_IMAGE_CHUNK = 1  # MTMD_INPUT_CHUNK_TYPE_IMAGE


@dataclass
class _Sequence:
    """One request's decoding state inside a batch."""

    index: int
    request: ReportRequest
    settings: GenerationSettings
    budget: int
    n_prompt: int
    position: int
    warnings: list[str]
    preprocess_seconds: float
    on_token: Callable[[str], None] | None = None
    rng: np.random.Generator | None = None
    token_ids: list[int] = field(default_factory=list)
    streamed: str = ""
    done: bool = False
    started: float = 0.0
    first_token_seconds: float = 0.0


class GgufMedGemmaRunner:
    """Loads a MedGemma as GGUF into llama.cpp once and drafts reports with it.

    Parameters
    ----------
    model_dir:
        The Hugging Face model directory (or a models root holding ``medgemma/``); the GGUF files
        are built from it, or taken from it when it holds a user-supplied pair.
    device:
        ``"cpu"`` (or None). This build of llama-cpp-python runs on the CPU; another device is
        refused at construction rather than silently ignored.
    precision:
        ``int4`` (Q4_0), ``int8`` (Q8_0) or ``fp32`` (F32 weights and KV cache, for parity tests).
    n_threads:
        llama.cpp threads; None uses every core this process may run on.
    n_parallel:
        Most requests decoded together by ``generate_batch``.
    n_ctx:
        Context reserved per sequence; None takes the model's, capped at 8,192 tokens.

    Raises
    ------
    ModelLoadError
        llama-cpp-python is not installed (naming the ``lowbit`` extra), the precision or device is
        not offered, or the directory holds no MedGemma.
    """

    engine = "llama.cpp"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str | None = None,
        precision: str = "int4",
        n_threads: int | None = None,
        n_parallel: int = 4,
        n_ctx: int | None = None,
    ) -> None:
        require_lowbit(precision)
        self.model_dir = resolve_model_dir(model_dir, "medgemma")
        if precision not in PRECISION_WEIGHT_TYPES:
            raise ModelLoadError(
                f"{self.model_dir}: precision {precision} is not a llama.cpp precision; use "
                f"{', '.join(PRECISION_WEIGHT_TYPES)}"
            )
        if device not in (None, "cpu"):
            raise ModelLoadError(
                f"{self.model_dir}: --precision {precision} runs on llama.cpp's CPU build; use --device cpu, "
                f"or fp32/bf16 on {device}"
            )
        self.identity: ModelIdentity = model_identity(self.model_dir)
        self.precision = precision
        self.weight_type = PRECISION_WEIGHT_TYPES[precision]
        self.n_threads = n_threads or len(os.sched_getaffinity(0))
        self.n_parallel = max(1, n_parallel)
        self._requested_n_ctx = n_ctx
        self.weights: GgufWeights | None = None
        self.context_length: int | None = None
        self.eos_token_ids: tuple[int, ...] = ()
        self._sampling_defaults: dict[str, Any] = {}
        self._processor: Any = None
        self._image_token_id: int | None = None
        self._model: Any = None
        self._context: Any = None
        self._mtmd: Any = None
        self._n_vocab = 0
        self._n_ctx_seq = 0
        self._suppressed = np.zeros(0, dtype=np.int64)
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def is_loaded(self) -> bool:
        return self._context is not None

    @property
    def device(self) -> str | None:
        return "cpu" if self.is_loaded else None

    @property
    def processor(self) -> Any:
        self._require_loaded()
        return self._processor

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        return dict(self._sampling_defaults)

    @property
    def engine_parameters(self) -> tuple[tuple[str, str], ...]:
        """What ran the model, for the result and the SR: engine, precision, weight files' digests."""
        weights = self.weights
        version = _package_version("llama-cpp-python")
        parameters = [("engine", f"llama.cpp (llama-cpp-python {version})"), ("precision", self.precision)]
        if weights is not None:
            parameters += [
                ("weights", f"{weights.text.name} ({weights.weight_type})"),
                ("weights_sha256", weights.text_sha256),
                ("mmproj_sha256", weights.mmproj_sha256),
            ]
        return tuple(parameters)

    def load(self) -> GgufMedGemmaRunner:
        """Build or reuse the GGUF pair and load it (once; later calls do nothing)."""
        with self._lock:
            if self._context is None:
                self._load()
        return self

    def _load(self) -> None:
        import llama_cpp
        import llama_cpp._logger as llama_logger
        import llama_cpp.mtmd_cpp as mtmd
        from transformers import AutoProcessor, GenerationConfig

        started = time.perf_counter()
        llama_logger.set_verbose(logger.isEnabledFor(logging.DEBUG))
        mtmd.mtmd_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))
        weights = gguf_weights(self.model_dir, self.weight_type)
        try:
            processor = AutoProcessor.from_pretrained(self.model_dir)
            generation = GenerationConfig.from_pretrained(self.model_dir)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{self.model_dir}: cannot load the MedGemma processor: {exc}") from exc
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0
        # llama.cpp's "extra" CPU buffer types (AMX tiles, repacked blocks) are off: where the CPU
        # lists AMX, ggml puts weights in AMX buffers and its AMX matmul crashes here (SIGSEGV in
        # ggml_backend_amx_mul_mat on a Xeon with amx_int8, and on the tiny test model); asking for
        # the repacked layout alone by tensor override fails ggml's scheduler check. Measured cost
        # in docs/performance.md.
        model_params.use_extra_bufts = False
        model = llama_cpp.llama_model_load_from_file(str(weights.text).encode(), model_params)
        if not model:
            raise ModelLoadError(f"{weights.text}: llama.cpp cannot load this GGUF (see the log above)")
        train_context = int(llama_cpp.llama_model_n_ctx_train(model))
        n_ctx_seq = self._requested_n_ctx or min(train_context, 8192)
        full_precision = self.weight_type == "f32"
        context_params = llama_cpp.llama_context_default_params()
        context_params.n_ctx = n_ctx_seq * self.n_parallel
        context_params.n_batch = context_params.n_ubatch = 512
        context_params.n_seq_max = self.n_parallel
        context_params.n_threads = context_params.n_threads_batch = self.n_threads
        context_params.type_k = context_params.type_v = _GGML_F32 if full_precision else _GGML_F16
        context_params.swa_full = False
        context_params.kv_unified = False
        context_params.no_perf = True
        context = llama_cpp.llama_init_from_model(model, context_params)
        if not context:
            llama_cpp.llama_model_free(model)
            raise ModelLoadError(f"{weights.text}: llama.cpp cannot create a context of {n_ctx_seq} tokens")
        mtmd_params = mtmd.mtmd_context_params_default()
        mtmd_params.use_gpu = False
        mtmd_params.n_threads = self.n_threads
        mtmd_params.print_timings = False
        mtmd_params.warmup = False
        vision = mtmd.mtmd_init_from_file(str(weights.mmproj).encode(), model, mtmd_params)
        if not vision:
            llama_cpp.llama_free(context)
            llama_cpp.llama_model_free(model)
            raise ModelLoadError(f"{weights.mmproj}: llama.cpp's mtmd cannot load this projector")
        self._model, self._context, self._mtmd = model, context, vision
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model)))
        self._n_ctx_seq = n_ctx_seq
        self._processor = processor
        self._image_token_id = _image_token_id(self.model_dir)
        self.weights = weights
        self.context_length = min(n_ctx_seq, train_context)
        self.eos_token_ids = eos_ids(generation.eos_token_id, processor.tokenizer)
        self._sampling_defaults = {name: getattr(generation, name, None) for name in SAMPLING_OPTIONS}
        # As transformers' generate: ids the checkpoint's generation_config.json suppresses.
        self._suppressed = np.asarray(generation.suppress_tokens or [], dtype=np.int64)
        logger.info(
            "MedGemma %s (%s) on llama.cpp from %s (%s) in %.1f s: %d threads, %d sequences of %d tokens",
            self.identity.name,
            self.identity.version,
            weights.text,
            weights.weight_type,
            time.perf_counter() - started,
            self.n_threads,
            self.n_parallel,
            n_ctx_seq,
        )
        if self.identity.random_weights:
            logger.warning("MedGemma %s has RANDOM WEIGHTS: its reports are meaningless", self.identity.name)

    def close(self) -> None:
        """Free llama.cpp's model, context and vision tower; :meth:`load` may be called again."""
        with self._lock:
            if self._context is None:
                return
            import llama_cpp
            import llama_cpp.mtmd_cpp as mtmd

            mtmd.mtmd_free(self._mtmd)
            llama_cpp.llama_free(self._context)
            llama_cpp.llama_model_free(self._model)
            self._model = self._context = self._mtmd = None
            self._processor = None

    def __enter__(self) -> GgufMedGemmaRunner:
        return self.load()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the runner's rules, as MedGemmaRunner -----------------------------------------------

    def prepare_inputs(self, request: ReportRequest) -> Any:
        """The processor's inputs (token ids, normalised pixels) for ``request``, as numpy arrays."""
        self._require_loaded()
        return chat_inputs(self._processor, request, "np")

    def token_budget(self, request: ReportRequest, n_prompt: int, warnings: list[str]) -> int:
        """New tokens this request may generate (:func:`fit_token_budget` on this model's context)."""
        return fit_token_budget(request, n_prompt, self.context_length or 0, warnings)

    def effective_settings(self, settings: GenerationSettings) -> GenerationSettings:
        """``settings`` with the checkpoint's sampling defaults filled in, so results record them."""
        return fill_sampling_defaults(settings, self._sampling_defaults)

    # -- run ---------------------------------------------------------------------------------

    def generate(
        self, request: ReportRequest, *, on_token: Callable[[str], None] | None = None
    ) -> ReportResult:
        """Generate the report text of one request (as ``InprocMedGemma.generate``)."""
        if not isinstance(request, ReportRequest):
            raise TypeError(f"request must be a ReportRequest, got {type(request).__name__}")
        with self._lock:
            self._require_loaded()
            (result,) = self._run([request], [on_token])
        if isinstance(result, InputError):
            raise result
        return result

    def generate_batch(self, requests: Sequence[ReportRequest]) -> list[ReportResult | InputError]:
        """One result per request, in order; up to ``n_parallel`` decode together."""
        results: list[ReportResult | InputError] = []
        with self._lock:
            self._require_loaded()
            for start in range(0, len(requests), self.n_parallel):
                group = list(requests[start : start + self.n_parallel])
                results.extend(self._run(group, [None] * len(group)))
        for result in results:
            if isinstance(result, InputError):
                logger.warning("report for %s not generated: %s", result.source, result.reason)
        return results

    def teacher_forced_logits(self, request: ReportRequest, token_ids: Sequence[int]) -> np.ndarray:
        """Logits before each of ``token_ids`` when the model is fed exactly those tokens.

        Row ``i`` scores the token at position ``i`` of the continuation given the prompt and
        ``token_ids[:i]``: comparing rows with another engine's, on the same tokens, measures how far
        two engines (or precisions) are apart without one divergence changing everything after it.
        """
        import llama_cpp

        with self._lock:
            self._require_loaded()
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._context), True)
            sequence = self._prefill(0, request, None, pick=False)
            rows = [self._logits(-1).copy()]
            for token in list(token_ids)[:-1]:
                self._eval_tokens(sequence, [int(token)], logits_last=True)
                rows.append(self._logits(-1).copy())
        return np.stack(rows)

    def _run(
        self, requests: list[ReportRequest], callbacks: list[Callable[[str], None] | None]
    ) -> list[ReportResult | InputError]:
        import llama_cpp

        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._context), True)
        outcomes: list[ReportResult | InputError | None] = [None] * len(requests)
        sequences: list[_Sequence] = []
        for index, (request, on_token) in enumerate(zip(requests, callbacks, strict=True)):
            try:
                sequences.append(self._prefill(index, request, on_token))
            except InputError as exc:
                outcomes[index] = exc
        self._decode(sequences)
        for sequence in sequences:
            outcomes[sequence.index] = self._result(sequence)
        return [outcome for outcome in outcomes if outcome is not None]

    def _prefill(
        self, index: int, request: ReportRequest, on_token: Callable[[str], None] | None, *, pick: bool = True
    ) -> _Sequence:
        started = time.perf_counter()
        inputs = self.prepare_inputs(request)
        token_ids = [int(token) for token in inputs["input_ids"][0]]
        settings = self.effective_settings(request.settings)
        warnings = list(request.warnings)
        budget = self.token_budget(request, len(token_ids), warnings)
        images = _pixels_to_rgb(inputs.get("pixel_values"), self._processor.image_processor)
        preprocess_seconds = time.perf_counter() - started
        sequence = _Sequence(
            index=index,
            request=request,
            settings=settings,
            budget=budget,
            n_prompt=len(token_ids),
            position=0,
            warnings=warnings,
            preprocess_seconds=preprocess_seconds,
            on_token=on_token,
            rng=np.random.default_rng(settings.seed) if settings.do_sample else None,
            started=time.perf_counter(),
        )
        runs = _split_image_runs(token_ids, self._image_token_id)
        if sum(1 for run in runs if run[0] == "image") != len(images):
            raise InputError(
                request.source, f"the prompt has {len(runs)} image runs for {len(images)} images"
            )
        image_iter = iter(images)
        for position, (kind, run) in enumerate(runs):
            last = position == len(runs) - 1
            if kind == "image":
                self._eval_image(sequence, next(image_iter), len(run))
            else:
                self._eval_tokens(sequence, run, logits_last=last)
        sequence.first_token_seconds = time.perf_counter() - sequence.started
        if pick:
            self._accept(sequence, self._pick(sequence, self._logits(-1)))
        return sequence

    def _eval_tokens(self, sequence: _Sequence, tokens: list[int], *, logits_last: bool) -> None:
        import llama_cpp

        for start in range(0, len(tokens), 512):
            piece = tokens[start : start + 512]
            batch = llama_cpp.llama_batch_init(len(piece), 0, 1)
            try:
                for offset, token in enumerate(piece):
                    _batch_add(batch, offset, token, sequence.position + offset, sequence.index, False)
                batch.n_tokens = len(piece)
                if logits_last and start + len(piece) == len(tokens):
                    batch.logits[len(piece) - 1] = 1
                if llama_cpp.llama_decode(self._context, batch) != 0:
                    raise RuntimeError(f"llama.cpp could not decode the prompt of {sequence.request.source}")
            finally:
                llama_cpp.llama_batch_free(batch)
            sequence.position += len(piece)

    def _eval_image(self, sequence: _Sequence, rgb: np.ndarray, n_tokens: int) -> None:
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        height, width = rgb.shape[:2]
        buffer = (ctypes.c_uint8 * rgb.size).from_buffer(rgb)
        bitmap = mtmd.mtmd_bitmap_init(width, height, buffer)
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            marker = mtmd.mtmd_get_marker(self._mtmd) or mtmd.mtmd_default_marker()
            text = mtmd.mtmd_input_text()
            text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), False, True
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if mtmd.mtmd_tokenize(self._mtmd, chunks, ctypes.byref(text), bitmaps, 1) != 0:
                raise InputError(sequence.request.source, "llama.cpp's vision tower refused the image")
            for index in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, index)
                if mtmd.mtmd_input_chunk_get_type(chunk) != _IMAGE_CHUNK:
                    continue  # the begin/end-of-image markers: ours are in the prompt's token ids
                produced = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                if produced != n_tokens:
                    raise ModelLoadError(
                        f"{self.weights.mmproj if self.weights else self.model_dir}: the projector makes "
                        f"{produced} image tokens, the processor {n_tokens}; the GGUF pair is not "
                        "this model's"
                    )
                new_position = llama_cpp.llama_pos(0)
                status = mtmd.mtmd_helper_eval_chunk_single(
                    self._mtmd,
                    self._context,
                    chunk,
                    sequence.position,
                    sequence.index,
                    512,
                    False,
                    ctypes.byref(new_position),
                )
                if status != 0:
                    raise RuntimeError(f"llama.cpp could not encode an image of {sequence.request.source}")
                sequence.position = int(new_position.value)
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)

    def _decode(self, sequences: list[_Sequence]) -> None:
        """Decode every live sequence one token per step, all in one llama.cpp batch."""
        import llama_cpp

        batch = llama_cpp.llama_batch_init(max(1, len(sequences)), 0, 1)
        try:
            while live := [sequence for sequence in sequences if not sequence.done]:
                for slot, sequence in enumerate(live):
                    _batch_add(batch, slot, sequence.token_ids[-1], sequence.position, sequence.index, True)
                batch.n_tokens = len(live)
                if llama_cpp.llama_decode(self._context, batch) != 0:
                    raise RuntimeError("llama.cpp could not decode a step")
                for slot, sequence in enumerate(live):
                    sequence.position += 1
                    self._accept(sequence, self._pick(sequence, self._logits(slot)))
        finally:
            llama_cpp.llama_batch_free(batch)

    def _logits(self, index: int) -> np.ndarray:
        import llama_cpp

        pointer = llama_cpp.llama_get_logits_ith(self._context, index)
        return np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))

    def _pick(self, sequence: _Sequence, logits: np.ndarray) -> int:
        settings = sequence.settings
        if self._suppressed.size:
            logits = logits.copy()
            logits[self._suppressed] = -np.inf
        if settings.repetition_penalty is not None and sequence.token_ids:
            logits = logits.copy()
            seen = np.unique(np.asarray(sequence.token_ids))
            values = logits[seen]
            logits[seen] = np.where(
                values > 0, values / settings.repetition_penalty, values * settings.repetition_penalty
            )
        if not settings.do_sample:
            return int(np.argmax(logits))
        return _sample(logits, settings, sequence.rng)

    def _accept(self, sequence: _Sequence, token: int) -> None:
        sequence.token_ids.append(token)
        if token in self.eos_token_ids or len(sequence.token_ids) >= sequence.budget:
            sequence.done = True
        if sequence.on_token is not None:
            text = self._processor.tokenizer.decode(sequence.token_ids, skip_special_tokens=True)
            complete = sequence.done or not text.endswith("\ufffd")
            if complete and len(text) > len(sequence.streamed) and text.startswith(sequence.streamed):
                piece, sequence.streamed = text[len(sequence.streamed) :], text
                sequence.on_token(piece)

    def _result(self, sequence: _Sequence) -> ReportResult:
        seconds = time.perf_counter() - sequence.started
        token_ids = sequence.token_ids
        text = self._processor.tokenizer.decode(token_ids, skip_special_tokens=True)
        stopped = bool(token_ids) and token_ids[-1] in self.eos_token_ids
        finish_reason: FinishReason = "stop" if stopped else "length"
        warnings = sequence.warnings
        if sequence.on_token is not None and sequence.streamed != text:
            warnings.append("the streamed text differs from the final text; use the final text")
        if not text.strip():
            warnings.append(
                f"MedGemma generated no text ({len(token_ids)} token(s), finish reason {finish_reason}); "
                "there is no draft to report"
            )
        if finish_reason == "length":
            warnings.append(f"cut off at max_new_tokens={sequence.budget}: the draft may be incomplete")
        return ReportResult(
            text=text,
            token_ids=list(token_ids),
            n_prompt_tokens=sequence.n_prompt,
            n_generated_tokens=len(token_ids),
            finish_reason=finish_reason,
            seconds=seconds,
            tokens_per_second=len(token_ids) / seconds if seconds > 0 else 0.0,
            settings=sequence.settings,
            prompt_id=sequence.request.prompt_id,
            prompt_version=sequence.request.prompt_version,
            preprocess_seconds=sequence.preprocess_seconds,
            warnings=warnings,
            engine_parameters=self.engine_parameters,
            first_token_seconds=sequence.first_token_seconds,
        )

    def _require_loaded(self) -> None:
        if self._context is None:
            raise RuntimeError(
                f"GgufMedGemmaRunner({self.model_dir}) is not loaded: call load() or use it in a with block"
            )


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def _image_token_id(model_dir: Path) -> int:
    """The soft image token's id from ``config.json`` (the processor's ``image_token`` is the
    begin-of-image marker in transformers 5, not the token the image's embeddings replace)."""
    import json

    config = json.loads((model_dir / "config.json").read_text())
    token = config.get("image_token_id", config.get("image_token_index"))
    if token is None:
        raise ModelLoadError(
            f"{model_dir}/config.json: no image_token_id (image_token_index); not a Gemma 3 image-text model"
        )
    return int(token)


def _batch_add(batch: Any, slot: int, token: int, position: int, sequence: int, logits: bool) -> None:
    batch.token[slot] = token
    batch.pos[slot] = position
    batch.n_seq_id[slot] = 1
    batch.seq_id[slot][0] = sequence
    batch.logits[slot] = int(logits)


def _split_image_runs(token_ids: list[int], image_token_id: int | None) -> list[tuple[str, list[int]]]:
    """The prompt as alternating ("text", ids) and ("image", ids) runs of consecutive tokens."""
    runs: list[tuple[str, list[int]]] = []
    for token in token_ids:
        kind = "image" if token == image_token_id else "text"
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(token)
        else:
            runs.append((kind, [token]))
    return runs


def _pixels_to_rgb(pixel_values: Any, image_processor: Any) -> list[np.ndarray]:
    """8-bit RGB images (H, W, 3) from the processor's normalised pixels, inverting its arithmetic.

    The processor resizes 8-bit images, then rescales and normalises; undoing the last two and
    rounding gives back the resized 8-bit pixels exactly, which mtmd then normalises itself.
    """
    if pixel_values is None:
        return []
    values = np.asarray(pixel_values, dtype=np.float64)
    mean = np.asarray(image_processor.image_mean, dtype=np.float64).reshape(1, 3, 1, 1)
    std = np.asarray(image_processor.image_std, dtype=np.float64).reshape(1, 3, 1, 1)
    scale = float(getattr(image_processor, "rescale_factor", 1 / 255))
    restored = np.clip(np.rint((values * std + mean) / scale), 0, 255).astype(np.uint8)
    return [np.ascontiguousarray(image.transpose(1, 2, 0)) for image in restored]


def _sample(logits: np.ndarray, settings: GenerationSettings, rng: np.random.Generator | None) -> int:
    """Temperature, top-k and top-p sampling, in transformers' order."""
    scores = logits.astype(np.float64) / max(float(settings.temperature or 1.0), 1e-5)
    if settings.top_k:
        cutoff = np.partition(scores, -settings.top_k)[-settings.top_k]
        scores = np.where(scores < cutoff, -np.inf, scores)
    probabilities = np.exp(scores - scores.max())
    probabilities /= probabilities.sum()
    if settings.top_p is not None and settings.top_p < 1.0:
        order = np.argsort(-probabilities)
        cumulative = np.cumsum(probabilities[order])
        keep = order[: int(np.searchsorted(cumulative, settings.top_p)) + 1]
        mask = np.zeros_like(probabilities)
        mask[keep] = probabilities[keep]
        probabilities = mask / mask.sum()
    generator = rng or np.random.default_rng()
    return int(generator.choice(len(probabilities), p=probabilities))
