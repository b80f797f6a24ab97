"""MedGemma on llama.cpp (llama-cpp-python): 8- and 4-bit reports on a CPU.

:class:`GgufMedGemmaRunner` is the llama.cpp twin of
:class:`~medgemma_deploy.operators.medgemma.runner.MedGemmaRunner`: it has the same rules
(``prepare_inputs``, ``token_budget``, ``effective_settings``, stop and suppressed tokens…) and is
decoded by the same loop, the worker's
:class:`~medgemma_deploy.worker.engine.scheduler.ReportScheduler` (in process through
:class:`~medgemma_deploy.backends.inproc.InprocMedGemma`, or in the worker), which drives it
through a :class:`~medgemma_deploy.worker.engine.gguf_decode.GgufDecodeBatch`; so a report has the
same sampling, streaming, result and warnings on either engine, and only the arithmetic moves to
llama.cpp. What stays ours, so that a report is prompted exactly as on the torch path:

* The checkpoint's own processor and chat template build the prompt and the image pixels
  (``apply_chat_template``, as the torch runner). llama.cpp receives token ids, never text: its
  tokenizer is not used, so the GGUF vocabulary only has to have the right size.
* The images go through MedGemma's vision tower and projector on torch
  (:class:`~medgemma_deploy.operators.medgemma.torch_vision.MedGemmaVision`: transformers' modules,
  only the vision tensors of the checkpoint read; bfloat16 where the CPU has it natively, else
  float32; float32 at ``fp32``). llama.cpp receives each image's 256 embeddings in one batch of
  embeddings, decoded with non-causal attention inside the image (Gemma 3's image tokens see each
  other both ways, as transformers' mask and llama.cpp's own ``mtmd`` do), so only the text decoder
  runs on llama.cpp: its prefill of the whole prompt, then decoding.
* Choosing tokens (greedy, or sampling with the request's settings) runs in the scheduler on
  llama.cpp's logits, and the text is decoded with the checkpoint's tokenizer.

The text decoder's weights come from
:func:`~medgemma_deploy.operators.medgemma.gguf_weights.gguf_weights` (llama.cpp's own converter,
cached next to the model with a SHA-256 digest); the result records the engine, the precision, the
decoder's digest and the vision tower's (its dtype and the digest of its tensors), and the SR writes
them into its algorithm identification.

Up to ``n_parallel`` reports decode together, each a sequence of llama.cpp's one KV cache, one
token each per llama.cpp batch: that is what makes concurrent reports cheaper than one after the
other on a CPU, each decode step reading the weights once for all of them.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from medgemma_deploy.domain import (
    ModelIdentity,
    ReportRequest,
)
from medgemma_deploy.errors import InputError, ModelLoadError
from medgemma_deploy.model_dir import model_identity, resolve_model_dir
from medgemma_deploy.operators.medgemma.generation import SAMPLING_OPTIONS, MedGemmaRules, eos_ids
from medgemma_deploy.operators.medgemma.gguf_weights import GgufWeights, gguf_weights, require_lowbit
from medgemma_deploy.operators.medgemma.torch_vision import MedGemmaVision
from medgemma_deploy.precision import cpu_has_native_bf16

__all__ = [
    "AMX_FREE_INSTALL",
    "PRECISION_WEIGHT_TYPES",
    "GgufMedGemmaRunner",
    "extra_buffer_types_usable",
    "prefer_passive_openmp",
]

logger = logging.getLogger(__name__)

#: How a site reinstalls llama-cpp-python without ggml's AMX kernels (what ``./run`` does on a
#: CPU listing AMX): the compiler keeps ``-march=native`` but leaves the AMX instructions out.
AMX_FREE_INSTALL = (
    "CMAKE_ARGS=\"-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' "
    "-DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'\" "
    "pip install --force-reinstall --no-deps --no-cache-dir --no-binary llama-cpp-python llama-cpp-python"
)

#: The GGUF weight type of each precision this runner offers (``f32`` is for parity tests).
PRECISION_WEIGHT_TYPES = {"int4": "q4_0", "int8": "q8_0", "fp32": "f32"}

#: ggml's type ids for a KV cache at full precision (parity) and at 16 bits (default).
_GGML_F32, _GGML_F16 = 0, 1


class GgufMedGemmaRunner(MedGemmaRules):
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
        ``int4`` (Q4_0), ``int8`` (Q8_0) or ``fp32`` (F32 weights and KV cache, and a float32
        vision tower, for parity tests). At ``int4``/``int8`` the vision tower runs in bfloat16
        where the CPU has it natively (:func:`~medgemma_deploy.precision.cpu_has_native_bf16`),
        else in float32.
    n_threads:
        llama.cpp threads; None uses every core this process may run on.
    n_parallel:
        Most reports decoded together (llama.cpp sequence ids).
    n_ctx:
        KV cache cells, one cache shared by the running sequences (a request alone may use all of
        them: it is the context a prompt must fit); None takes the model's context, capped at 8,192
        tokens. The scheduler admits a report only while the prompts and token budgets of the
        running ones fit (:attr:`kv_cells`).

    Raises
    ------
    ModelLoadError
        llama-cpp-python is not installed (naming the ``lowbit`` extra), the precision or device is
        not offered, or the directory holds no MedGemma.
    """

    engine = "llama.cpp"
    input_tensors = "np"

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
        prefer_passive_openmp()
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
        full_precision = precision == "fp32"
        self.vision_dtype = "bfloat16" if not full_precision and cpu_has_native_bf16() else "float32"
        self.weights: GgufWeights | None = None
        self.context_length: int | None = None
        self.eos_token_ids: tuple[int, ...] = ()
        self._sampling_defaults: dict[str, Any] = {}
        self._processor: Any = None
        self._image_token_id: int | None = None
        self._model: Any = None
        self._context: Any = None
        self._vision: MedGemmaVision | None = None
        self._n_vocab = 0
        self._n_embd = 0
        self._n_ctx = 0
        self._n_batch = 0
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
    def engine_parameters(self) -> tuple[tuple[str, str], ...]:
        """What ran the model, for the result and the SR: engine, precision, the text decoder's
        GGUF and its digest, the vision tower's engine and dtype and the digest of its tensors."""
        weights = self.weights
        version = _package_version("llama-cpp-python")
        parameters = [("engine", f"llama.cpp (llama-cpp-python {version})"), ("precision", self.precision)]
        if weights is not None:
            parameters += [
                ("weights", f"{weights.text.name} ({weights.weight_type})"),
                ("weights_sha256", weights.text_sha256),
            ]
        vision = self._vision
        if vision is not None and vision.sha256:
            parameters += [
                ("vision", f"torch {_package_version('torch')} {vision.dtype}"),
                ("vision_sha256", vision.sha256),
            ]
        return tuple(parameters)

    def _load(self) -> None:
        """Build or reuse the text decoder's GGUF, load it and the vision tower."""
        import llama_cpp
        import llama_cpp._logger as llama_logger
        from transformers import AutoProcessor, GenerationConfig

        started = time.perf_counter()
        llama_logger.set_verbose(logger.isEnabledFor(logging.DEBUG))
        weights = gguf_weights(self.model_dir, self.weight_type, mmproj=False)
        try:
            processor = AutoProcessor.from_pretrained(self.model_dir)
            generation = GenerationConfig.from_pretrained(self.model_dir)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{self.model_dir}: cannot load the MedGemma processor: {exc}") from exc
        # The vision tower first: reading it maps the checkpoint's file for a moment, and that peak
        # then comes before llama.cpp's weights and KV cache are resident, not on top of them.
        vision = MedGemmaVision(self.model_dir, self.vision_dtype).load()
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0
        model_params.use_extra_bufts = extra_buffer_types_usable()
        if model_params.use_extra_bufts:
            # Repacked weights are copies: mapped, the file's pages would stay resident beside them
            # (peak RSS 4.1 GB instead of 2.4 GB for MedGemma-4B at Q4_0). Read into memory instead.
            model_params.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE
        else:
            logger.warning(
                "this llama-cpp-python build has ggml's AMX kernels, which crash, so llama.cpp's "
                "repacked fast path is off (prefill and decoding slower, docs/performance.md); "
                "rebuild it without them: %s",
                AMX_FREE_INSTALL,
            )
        model = llama_cpp.llama_model_load_from_file(str(weights.text).encode(), model_params)
        if not model:
            raise ModelLoadError(f"{weights.text}: llama.cpp cannot load this GGUF (see the log above)")
        train_context = int(llama_cpp.llama_model_n_ctx_train(model))
        n_ctx = self._requested_n_ctx or min(train_context, 8192)
        full_precision = self.weight_type == "f32"
        context_params = llama_cpp.llama_context_default_params()
        # One KV cache for every sequence (kv_unified): its size does not grow with n_parallel
        # (MedGemma-4B: 0.7 GB for 8,192 cells at F16, where 4 caches of 8,192 took 1.3 GB).
        context_params.n_ctx = n_ctx
        # A batch of at most one image's embeddings (which must be one micro-batch: non-causal
        # attention), and no larger: llama.cpp's compute buffer grows with it (MedGemma-4B: 261 MiB
        # at 256 tokens, 522 MiB at 512). Longer text runs are decoded in pieces of this size.
        n_batch = max(256, vision.tokens_per_image)
        context_params.n_batch = context_params.n_ubatch = n_batch
        context_params.n_seq_max = self.n_parallel
        context_params.n_threads = context_params.n_threads_batch = self.n_threads
        context_params.type_k = context_params.type_v = _GGML_F32 if full_precision else _GGML_F16
        context_params.swa_full = False
        context_params.kv_unified = True
        context_params.no_perf = True
        context = llama_cpp.llama_init_from_model(model, context_params)
        if not context:
            llama_cpp.llama_model_free(model)
            raise ModelLoadError(f"{weights.text}: llama.cpp cannot create a context of {n_ctx} tokens")
        n_embd = int(llama_cpp.llama_model_n_embd(model))
        if vision.embedding_size != n_embd:
            llama_cpp.llama_free(context)
            llama_cpp.llama_model_free(model)
            raise ModelLoadError(
                f"{weights.text}: the text decoder takes {n_embd}-wide embeddings, the checkpoint's "
                f"projector makes {vision.embedding_size}; the GGUF is not this model's"
            )
        self._model, self._context, self._vision = model, context, vision
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model)))
        self._n_embd = n_embd
        self._n_ctx = n_ctx
        self._n_batch = n_batch
        self._processor = processor
        self._image_token_id = _image_token_id(self.model_dir)
        self.weights = weights
        self.context_length = min(n_ctx, train_context)
        self.eos_token_ids = eos_ids(generation.eos_token_id, processor.tokenizer)
        self._sampling_defaults = {name: getattr(generation, name, None) for name in SAMPLING_OPTIONS}
        # As transformers' generate: ids the checkpoint's generation_config.json suppresses.
        self._suppressed = np.asarray(generation.suppress_tokens or [], dtype=np.int64)
        logger.info(
            "MedGemma %s (%s) on llama.cpp from %s (%s) in %.1f s: %d threads, up to %d sequences in "
            "%d KV cells, vision tower on torch (%s)",
            self.identity.name,
            self.identity.version,
            weights.text,
            weights.weight_type,
            time.perf_counter() - started,
            self.n_threads,
            self.n_parallel,
            n_ctx,
            vision.dtype,
        )

    def _unload(self) -> None:
        """Free llama.cpp's model and context and the vision tower."""
        import llama_cpp

        if self._vision is not None:
            self._vision.close()
        llama_cpp.llama_free(self._context)
        llama_cpp.llama_model_free(self._model)
        self._model = self._context = self._vision = None
        self._processor = None

    # -- run ---------------------------------------------------------------------------------

    def teacher_forced_logits(self, request: ReportRequest, token_ids: Sequence[int]) -> np.ndarray:
        """Logits before each of ``token_ids`` when the model is fed exactly those tokens.

        Row ``i`` scores the token at position ``i`` of the continuation given the prompt and
        ``token_ids[:i]``: comparing rows with another engine's, on the same tokens, measures how far
        two engines (or precisions) are apart without one divergence changing everything after it.
        Uses sequence 0: not while a scheduler drives this runner.
        """
        inputs = self.prepare_inputs(request)
        prompt_ids = [int(token) for token in inputs["input_ids"][0]]
        pixels = inputs.get("pixel_values")
        images = [] if pixels is None else list(np.asarray(pixels, dtype=np.float32))
        rows = [self.prefill_sequence(0, prompt_ids, images, source=request.source)]
        position = len(prompt_ids)
        for token in list(token_ids)[:-1]:
            rows.append(self.decode_step([int(token)], [position], [0])[0])
            position += 1
        self.forget_sequence(0)
        return np.stack(rows)

    # -- stepping: what the report scheduler drives ------------------------------------------
    #
    # The ReportScheduler (the one decode loop of every report, in process and in the worker)
    # admits reports between decode steps and retires them at any step. These calls are what it
    # needs of llama.cpp (through medgemma_deploy/worker/engine/gguf_decode.py): each report is one
    # llama.cpp sequence id, below ``n_parallel``, in the one KV cache; choosing tokens, stopping
    # and assembling the result stay with the scheduler and the ReportService, as on torch.

    @property
    def kv_cells(self) -> int:
        """Cells of the one KV cache (``n_ctx``), shared by the running sequences; 0 until loaded."""
        return self._n_ctx

    @property
    def suppress_token_ids(self) -> tuple[int, ...]:
        """Token ids never chosen (the checkpoint's ``suppress_tokens``, as transformers applies them)."""
        return tuple(int(token) for token in self._suppressed)

    def prefill_sequence(
        self,
        seq_id: int,
        prompt_ids: Sequence[int],
        images: Sequence[np.ndarray],
        *,
        source: str = "a report",
    ) -> np.ndarray:
        """Prefill one prompt as sequence ``seq_id`` from position 0 (whatever the id held before is
        dropped); returns the logits of its last position (a copy, ``(vocab,)``).

        ``images`` are the processor's pixels, one ``(3, H, W)`` array per image run of the prompt.

        Raises
        ------
        ValueError
            ``seq_id`` is not below ``n_parallel``.
        InputError
            The prompt's image runs and ``images`` differ in number.
        """
        runs = self._prompt_runs([int(token) for token in prompt_ids], len(images), source)
        with self._lock:
            self._require_loaded()
            self._check_seq_id(seq_id)
            self._forget(seq_id)
            self._feed_prompt(seq_id, runs, list(images), source)
            return self._logits(-1).copy()

    def decode_step(
        self, tokens: Sequence[int], positions: Sequence[int], seq_ids: Sequence[int]
    ) -> np.ndarray:
        """Feed one token per sequence (token ``tokens[i]`` at ``positions[i]`` of ``seq_ids[i]``) in
        one llama.cpp batch; returns the next-token logits, ``(len(tokens), vocab)`` (a copy)."""
        import llama_cpp

        if not len(tokens) == len(positions) == len(seq_ids) > 0:
            raise ValueError("decode_step needs one position and one sequence id per token, and a token")
        with self._lock:
            self._require_loaded()
            for seq_id in seq_ids:
                self._check_seq_id(seq_id)
            batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
            try:
                self._step(batch, tokens, positions, seq_ids)
            finally:
                llama_cpp.llama_batch_free(batch)
            return np.stack([self._logits(row) for row in range(len(tokens))])

    def forget_sequence(self, seq_id: int) -> None:
        """Free sequence ``seq_id``'s KV cells (a finished or cancelled report)."""
        with self._lock:
            self._require_loaded()
            self._forget(seq_id)

    def forget_all(self) -> None:
        """Free every sequence's KV cells."""
        import llama_cpp

        with self._lock:
            self._require_loaded()
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._context), True)

    def _check_seq_id(self, seq_id: int) -> None:
        if not 0 <= seq_id < self.n_parallel:
            raise ValueError(f"sequence id {seq_id} is outside 0..{self.n_parallel - 1} (n_parallel)")

    def _forget(self, seq_id: int) -> None:
        import llama_cpp

        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._context), seq_id, -1, -1)

    def _prompt_runs(self, token_ids: list[int], n_images: int, source: str) -> list[tuple[str, list[int]]]:
        """The prompt's text and image runs, checked against the number of images it comes with."""
        runs = _split_image_runs(token_ids, self._image_token_id)
        n_image_runs = sum(1 for kind, _ in runs if kind == "image")
        if n_image_runs != n_images:
            raise InputError(source, f"the prompt has {n_image_runs} image runs for {n_images} images")
        return runs

    def _feed_prompt(
        self, seq_id: int, runs: list[tuple[str, list[int]]], images: list[np.ndarray], source: str
    ) -> int:
        """A prompt's runs into sequence ``seq_id`` from position 0 (text as tokens, each image as
        its embeddings), logits at the last position; returns the next position."""
        position = 0
        pixels = iter(images)
        for index, (kind, run) in enumerate(runs):
            last = index == len(runs) - 1
            if kind == "image":
                position = self._eval_image(
                    seq_id, position, next(pixels), len(run), logits_last=last, source=source
                )
            else:
                position = self._eval_tokens(seq_id, position, run, logits_last=last, source=source)
        return position

    def _eval_tokens(
        self, seq_id: int, position: int, tokens: list[int], *, logits_last: bool, source: str = "a report"
    ) -> int:
        """Text tokens into sequence ``seq_id`` from ``position``; returns the next position."""
        import llama_cpp

        for start in range(0, len(tokens), self._n_batch):
            piece = tokens[start : start + self._n_batch]
            batch = llama_cpp.llama_batch_init(len(piece), 0, 1)
            try:
                for offset, token in enumerate(piece):
                    _batch_add(batch, offset, token, position + offset, seq_id, False)
                batch.n_tokens = len(piece)
                if logits_last and start + len(piece) == len(tokens):
                    batch.logits[len(piece) - 1] = 1
                if llama_cpp.llama_decode(self._context, batch) != 0:
                    raise RuntimeError(f"llama.cpp could not decode the prompt of {source}")
            finally:
                llama_cpp.llama_batch_free(batch)
            position += len(piece)
        return position

    def _eval_image(
        self,
        seq_id: int,
        position: int,
        pixels: np.ndarray,
        n_tokens: int,
        *,
        logits_last: bool,
        source: str = "a report",
    ) -> int:
        """One image: its embeddings from the torch vision tower, decoded by llama.cpp in one batch
        with non-causal attention (each image token sees the whole image, as in transformers);
        returns the next position."""
        import llama_cpp

        assert self._vision is not None
        (embeddings,) = self._vision.embed(pixels[np.newaxis])
        if embeddings.shape != (n_tokens, self._n_embd):
            raise ModelLoadError(
                f"{self.model_dir}: the vision tower makes {embeddings.shape[0]} image embeddings of "
                f"{embeddings.shape[1]} values, the prompt has {n_tokens} image tokens and llama.cpp "
                f"takes {self._n_embd} values: the processor and config.json disagree"
            )
        batch = llama_cpp.llama_batch_init(n_tokens, self._n_embd, 1)
        try:
            ctypes.memmove(batch.embd, embeddings.ctypes.data, embeddings.nbytes)
            for offset in range(n_tokens):
                batch.pos[offset] = position + offset
                batch.n_seq_id[offset] = 1
                batch.seq_id[offset][0] = seq_id
                batch.logits[offset] = 0
            batch.logits[n_tokens - 1] = int(logits_last)
            batch.n_tokens = n_tokens
            # All of one image in one micro-batch (n_ubatch >= tokens per image), so that non-causal
            # attention covers the whole image and nothing after it.
            llama_cpp.llama_set_causal_attn(self._context, False)
            try:
                status = llama_cpp.llama_decode(self._context, batch)
            finally:
                llama_cpp.llama_set_causal_attn(self._context, True)
            if status != 0:
                raise RuntimeError(f"llama.cpp could not decode an image of {source}")
        finally:
            llama_cpp.llama_batch_free(batch)
        return position + n_tokens

    def _step(
        self, batch: Any, tokens: Sequence[int], positions: Sequence[int], seq_ids: Sequence[int]
    ) -> None:
        """One decode step: token ``i`` at ``positions[i]`` of ``seq_ids[i]``, logits for every row."""
        import llama_cpp

        for slot, (token, position, seq_id) in enumerate(zip(tokens, positions, seq_ids, strict=True)):
            _batch_add(batch, slot, int(token), int(position), int(seq_id), True)
        batch.n_tokens = len(tokens)
        if llama_cpp.llama_decode(self._context, batch) != 0:
            raise RuntimeError("llama.cpp could not decode a step")

    def _logits(self, index: int) -> np.ndarray:
        import llama_cpp

        pointer = llama_cpp.llama_get_logits_ith(self._context, index)
        return np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))


def extra_buffer_types_usable() -> bool:
    """Whether llama.cpp may put weights in its "extra" CPU buffer types (repacked blocks, AMX tiles).

    The repacked layouts (e.g. Q4_0 as 8x8 interleaved blocks for AVX2/AVX-512) are llama.cpp's
    fast CPU path for prefill and decoding. They are switched off only where this llama.cpp build
    has AMX kernels: ggml then puts weights in AMX buffers, and its AMX matrix multiply crashed
    (SIGSEGV in ``ggml_backend_amx_mul_mat`` on a Xeon with ``amx_int8``, also on the tiny test
    model), while asking for the repacked layout alone by tensor override fails ggml's scheduler
    check. A build without the AMX kernels (:data:`AMX_FREE_INSTALL`; ``./run`` builds one on such
    a CPU) gets the repacked layout back: on that Xeon, MedGemma-4B at Q4_0 decoded 4.3 instead of
    3.6 tok/s and reached the first token of an image prompt in 17 instead of 25 s
    (docs/performance.md).
    """
    import llama_cpp

    info = (llama_cpp.llama_print_system_info() or b"").decode(errors="replace")
    return "AMX_INT8 = 1" not in info


def prefer_passive_openmp() -> bool:
    """Let OpenMP threads sleep while they wait (``OMP_WAIT_POLICY=PASSIVE``), unless a policy is set.

    llama.cpp's CPU threads meet at an OpenMP barrier after every operation, hundreds of times per
    decoded token. With OpenMP's default waiting a thread spins until the others arrive; when
    another process holds one of the cores, the spinning thread burns the time slice its partner
    needs. On the 2 shared cores of docs/performance.md (load average about 3), MedGemma-4B at Q4_0
    decoded 0.38 tok/s on 2 threads spinning, 2.9 on 1 thread and 2.7 to 3.0 on 2 threads waiting
    passively. OpenMP reads the setting once, when its runtime loads (with torch or llama.cpp,
    whichever comes first), so it is set only while no OpenMP runtime is loaded, and a policy the
    deployment set in the environment is kept.

    Returns
    -------
    bool
        Whether this call set the policy.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return False
    if _openmp_loaded():
        logger.debug("an OpenMP runtime is already loaded: OMP_WAIT_POLICY=PASSIVE would not take effect")
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def _openmp_loaded() -> bool:
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        import sys

        return "torch" in sys.modules or "llama_cpp" in sys.modules
    return any(name in maps for name in ("libgomp", "libiomp", "libomp"))


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
