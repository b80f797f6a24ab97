"""MedSigLIP runner: load once, score batches of images against label sets, close.

Lifecycle (Triton-style): :meth:`MedSigLIPRunner.load` reads a local model directory (a copy of
``google/medsiglip-448``, or the tiny test model), checks the model's I/O contract, warms up and
logs the time; :meth:`~MedSigLIPRunner.score`, :meth:`~MedSigLIPRunner.relevance_maps` and
:meth:`~MedSigLIPRunner.embed_images` serve any number of calls; :meth:`~MedSigLIPRunner.close`
frees the weights and the GPU memory. The same runner serves the in-process operator and the gRPC
worker.

Scoring
-------
Prompts are tokenised like SigLIP was trained (and as Google's MedSigLIP server does): padded to
the model's ``max_position_embeddings`` (64) with ``padding="max_length"`` and passed without an
attention mask. With ``e`` the L2-normalised image embedding (the vision tower's pooled output),
``t_i`` the L2-normalised embedding of prompt ``i``, and the model's own ``logit_scale`` and
``logit_bias``::

    logit_i = exp(logit_scale) * (e · t_i) + logit_bias      # = SiglipModel(...).logits_per_image
    l+ = mean of logit_i over the finding's positive prompts
    l- = mean of logit_i over its negative prompts
    softmax scoring:  p = softmax([l+, l-])[0] = sigmoid(l+ - l-)
    sigmoid scoring:  p = sigmoid(l+)

Because the logit is linear in ``t_i``, ``l+ = exp(logit_scale) * (e · mean_i t_i) + logit_bias``:
the runner keeps one mean prompt embedding per finding and polarity, which gives the same numbers
as averaging the columns of ``logits_per_image`` (the parity test does exactly that).

Relevance maps
--------------
:meth:`MedSigLIPRunner.relevance_maps` shows *where* an image looks like a finding, from the vision
tower's patch tokens rather than its pooled embedding. The method, its derivation and the cache that
lets ``score`` then ``relevance_maps`` on the same frames run the vision tower once are in
:mod:`~medgemma_deploy.operators.medsiglip.relevance` (with :func:`patch_embeddings`).
"""

from __future__ import annotations

import gc
import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medgemma_deploy.domain import ImageScores, LabelSet, ModelIdentity, ModelLifecycle
from medgemma_deploy.errors import ModelLoadError
from medgemma_deploy.model_dir import model_identity, resolve_model_dir
from medgemma_deploy.operators.medsiglip.preprocess import MedSigLIPPreprocessor
from medgemma_deploy.operators.medsiglip.relevance import (
    RelevanceGridCache,
    grid_key,
    grid_to_source,
    patch_embeddings,
    relevance_grids,
)
from medgemma_deploy.operators.medsiglip.text_cache import (
    PROBE_TEXT,
    CachedTextEmbeddings,
    TextEmbeddingCache,
    cache_key,
    default_cache_dir,
)
from medgemma_deploy.precision import torch_dtype_name

__all__ = [
    "MedSigLIPRunner",
    "RunnerNotLoadedError",
    "TextEmbeddings",
    "make_medsiglip_runner",
]

logger = logging.getLogger(__name__)


class RunnerNotLoadedError(RuntimeError):
    """The runner was used before :meth:`MedSigLIPRunner.load` or after :meth:`~MedSigLIPRunner.close`."""


@dataclass(frozen=True)
class TextEmbeddings:
    """A label set's prompt ensembles, encoded once (float32, on the model's device).

    ``positive[k]`` and ``negative[k]`` are the means of the L2-normalised prompt embeddings of
    finding ``k`` (not re-normalised: see the module docstring); ``negative[k]`` is zero where
    ``has_negative[k]`` is false.
    """

    label_set: str
    version: str
    finding_keys: tuple[str, ...]
    positive: torch.Tensor
    negative: torch.Tensor
    has_negative: torch.Tensor
    n_prompts: int


class MedSigLIPRunner(ModelLifecycle):
    """MedSigLIP zero-shot scoring, embeddings and relevance maps (see the module docstring).

    Parameters
    ----------
    model_dir:
        The model directory, or a models root holding ``medsiglip/``.
    device:
        ``"cuda"``, ``"cuda:1"``, ``"cpu"``…; default: CUDA when available, else CPU.
    dtype:
        Weights and activations; default bfloat16 on CUDA, float32 on CPU. Similarities and
        probabilities are always computed in float32.
    max_batch_size:
        Images (and prompts) per forward pass.
    relevance_cache_size:
        Images whose patch-grid maps are kept between :meth:`score` and :meth:`relevance_maps`
        (4 KiB per finding and image on MedSigLIP-448's 32x32 grid, so 1024 chest images with 13
        findings hold about 53 MiB of CPU memory); 0 disables the cache.
    text_cache_dir:
        Where label sets' prompt embeddings persist between processes
        (:mod:`~medgemma_deploy.operators.medsiglip.text_cache`); None keeps them in this process only.
    int8_cache_dir:
        Where ``precision="int8"`` keeps its quantised vision tower
        (:mod:`~medgemma_deploy.operators.medsiglip.onnx_vision`); None builds it for this process only.

    Precision: ``auto``, ``fp32`` and ``bf16`` load the torch model in that dtype. ``int8`` (CPU
    only) runs the vision tower with int8 weights on ONNX Runtime and everything else in float32.
    ``int4`` is refused: MedSigLIP is a 0.9 B-parameter encoder whose time goes into matrix products
    over 1,024 patch tokens, where 4-bit weights save memory but no compute on a CPU, and no int4
    path of the libraries here is faster than int8.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        precision: str = "auto",
        max_batch_size: int = 32,
        relevance_cache_size: int = 1024,
        text_cache_dir: str | Path | None = None,
        int8_cache_dir: str | Path | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if relevance_cache_size < 0:
            raise ValueError(f"relevance_cache_size must be 0 or more, got {relevance_cache_size}")
        self.model_dir = Path(model_dir)
        self.device = torch.device(device) if device else _default_device()
        self.precision = precision
        dtype_name = torch_dtype_name(precision, self.device.type)
        if precision == "int8":
            if self.device.type != "cpu":
                raise ModelLoadError(
                    f"{self.model_dir}: precision int8 is offered for MedSigLIP on the CPU only "
                    "(ONNX Runtime); on a GPU use bf16"
                )
            dtype_name = "float32"  # the text tower and the head; the vision tower is int8
        if dtype_name is None:
            raise ModelLoadError(
                f"{self.model_dir}: precision {precision} is not offered for MedSigLIP; "
                "use auto, fp32, bf16 or (on a CPU) int8"
            )
        self.dtype = dtype or getattr(torch, dtype_name)
        self.int8_cache_dir = Path(int8_cache_dir) if int8_cache_dir is not None else None
        self._onnx_vision: Any = None
        self.max_batch_size = max_batch_size
        self.relevance_cache_size = relevance_cache_size
        self._identity: ModelIdentity | None = None
        self._model: torch.nn.Module | None = None
        self._tokenizer = None
        self._preprocessor: MedSigLIPPreprocessor | None = None
        self._text_length = 0
        self._grid = 0
        self._logit_scale = 0.0
        self._logit_bias = 0.0
        self._text_cache: dict[tuple, TextEmbeddings] = {}
        self._disk_cache = TextEmbeddingCache(Path(text_cache_dir)) if text_cache_dir is not None else None
        self._probe: np.ndarray | None = None
        self._config_digest = ""
        self._grid_cache = RelevanceGridCache(relevance_cache_size)
        self._lock = threading.Lock()

    # ---- lifecycle ------------------------------------------------------------------------------

    def load(self) -> MedSigLIPRunner:
        """Load weights, tokenizer and preprocessing once; check the I/O contract; warm up.

        Raises
        ------
        ModelLoadError
            The directory is missing or not a SigLIP model, a file does not load, the device is
            not available, or the preprocessing does not fit the model; the message names the path.
        """
        if self._model is not None:
            return self
        started = time.perf_counter()
        model_dir = resolve_model_dir(self.model_dir, "medsiglip")
        if self.precision == "int8":
            from medgemma_deploy.operators.medsiglip.onnx_vision import require_onnxruntime

            require_onnxruntime()  # before minutes of loading: the missing extra is named at once
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError(f"device {self.device}: CUDA is not available on this machine (use cpu)")
        import transformers
        from safetensors import SafetensorError

        try:
            model = transformers.SiglipModel.from_pretrained(model_dir, **{_dtype_argument(): self.dtype})
            tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
            raise ModelLoadError(
                f"{model_dir}: cannot load MedSigLIP ({type(exc).__name__}: {' '.join(str(exc).split())})"
            ) from exc
        preprocessor = MedSigLIPPreprocessor.from_pretrained(model_dir, device=self.device, dtype=self.dtype)
        config = model.config
        _check_contract(model_dir, config, preprocessor)
        self._model = model.to(self.device).eval()
        self._tokenizer = tokenizer
        self._preprocessor = preprocessor
        self._text_length = int(config.text_config.max_position_embeddings)
        self._grid = int(config.vision_config.image_size) // int(config.vision_config.patch_size)
        self._logit_scale = float(model.logit_scale.detach().float().exp())
        self._logit_bias = float(model.logit_bias.detach().float())
        self._identity = model_identity(model_dir)
        if self.precision == "int8":
            from medgemma_deploy.operators.medsiglip.onnx_vision import OnnxVisionTower

            self._onnx_vision = OnnxVisionTower.load_or_build(
                self._model, model_dir, self._identity, self.int8_cache_dir
            )
        self._config_digest = hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()
        self.model_dir = model_dir
        loaded = time.perf_counter()
        self._warm_up()
        logger.info(
            "MedSigLIP %s %s loaded from %s on %s (%s) in %.1f s, warm-up %.1f s",
            self._identity.name,
            self._identity.version,
            model_dir,
            self.device,
            str(self.dtype).removeprefix("torch."),
            loaded - started,
            time.perf_counter() - loaded,
        )
        if self._identity.random_weights:
            logger.warning("MedSigLIP %s has RANDOM weights: every score is meaningless", self._identity.name)
        return self

    def close(self) -> None:
        """Free the model, the caches and (on CUDA) the cached GPU memory. Safe to call twice."""
        if self._model is None:
            return
        with self._lock:
            self._model = None
            self._onnx_vision = None
            self._tokenizer = None
            self._preprocessor = None
            self._text_cache.clear()
            self._grid_cache.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        logger.info("MedSigLIP unloaded from %s", self.device)

    @property
    def is_loaded(self) -> bool:
        return self._model is not None

    @property
    def identity(self) -> ModelIdentity:
        """Name, version and path of the model (read from the directory even before loading)."""
        if self._identity is None:
            self._identity = model_identity(resolve_model_dir(self.model_dir, "medsiglip"))
        return self._identity

    @property
    def embedding_dim(self) -> int:
        return int(self._loaded().config.vision_config.hidden_size)

    @property
    def image_size(self) -> tuple[int, int]:
        """The model input's (height, width), from its ``preprocessor_config.json``."""
        return self.preprocessor.size

    @property
    def patch_grid(self) -> int:
        """The side of the vision tower's patch grid, the resolution of :meth:`relevance_grids`."""
        self._loaded()
        return self._grid

    @property
    def preprocessor(self) -> MedSigLIPPreprocessor:
        """The model's image preprocessing (a worker publishes it so clients send model-size images)."""
        self._loaded()
        assert self._preprocessor is not None
        return self._preprocessor

    # ---- text -----------------------------------------------------------------------------------

    def text_embeddings(self, label_set: LabelSet) -> TextEmbeddings:
        """Encode all prompts of ``label_set`` once; later calls with the same set hit a cache.

        The cache key is the name, the version and the findings themselves, so a set edited
        without a version bump is re-encoded rather than served stale.
        """
        model = self._loaded()
        key = (label_set.name, label_set.version, label_set.findings)
        cached = self._text_cache.get(key)
        if cached is not None:
            return cached
        persisted = self._persisted_text_embeddings(label_set)
        if persisted is not None:
            self._text_cache[key] = persisted
            return persisted
        # One row per prompt: (finding index, 0 positive / 1 negative, text).
        rows = [
            (index, polarity, prompt)
            for index, finding in enumerate(label_set.findings)
            for polarity, prompts in ((0, finding.positive_prompts), (1, finding.negative_prompts))
            for prompt in prompts
        ]
        prompts = [prompt for _, _, prompt in rows]
        self._warn_truncated(label_set, rows)
        encoded = torch.cat(
            [
                self._encode_text(model, prompts[start : start + self.max_batch_size])
                for start in range(0, len(prompts), self.max_batch_size)
            ]
        )
        n_findings = len(label_set.findings)
        slots = torch.tensor(
            [polarity * n_findings + index for index, polarity, _ in rows], device=self.device
        )
        sums = torch.zeros((2 * n_findings, encoded.shape[1]), device=self.device).index_add_(
            0, slots, encoded
        )
        counts = torch.bincount(slots, minlength=2 * n_findings).float()
        means = (sums / counts.clamp(min=1)[:, None]).view(2, n_findings, -1)
        embeddings = TextEmbeddings(
            label_set=label_set.name,
            version=label_set.version,
            finding_keys=tuple(f.key for f in label_set.findings),
            positive=means[0],
            negative=means[1],
            has_negative=counts[n_findings:] > 0,
            n_prompts=len(prompts),
        )
        self._text_cache[key] = embeddings
        self._persist_text_embeddings(label_set, embeddings)
        logger.info(
            "encoded %d prompts of label set %s %s (%d findings)",
            len(prompts),
            label_set.name,
            label_set.version,
            n_findings,
        )
        return embeddings

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """``(n_texts, embedding_dim)`` float32 L2-normalised text embeddings (free-text search queries).

        Tokenised like the label-set prompts (padded to the model's length, no attention mask), so
        a query lands in the same space as the prompts and the image embeddings.
        """
        model = self._loaded()
        rows = [
            self._encode_text(model, texts[start : start + self.max_batch_size])
            for start in range(0, len(texts), self.max_batch_size)
        ]
        if not rows:
            return np.zeros((0, self.embedding_dim), np.float32)
        return torch.cat(rows).cpu().numpy().astype(np.float32)

    # ---- images ---------------------------------------------------------------------------------

    def score(
        self, images: Sequence[np.ndarray], label_set: LabelSet, *, at_model_input: bool = False
    ) -> ImageScores:
        """Probabilities of every finding of ``label_set`` and the embedding of every image.

        Parameters
        ----------
        images:
            Display images in [0, 1]: grey ``(rows, columns)`` or RGB ``(rows, columns, 3)``, any
            sizes; processed in batches of ``max_batch_size``.
        label_set:
            Findings and scoring (module docstring).
        at_model_input:
            The images are already padded and resized to the model's input
            (``preprocessor.to_model_input``, done by a worker's client).

        Returns
        -------
        ImageScores
            One row per image, in order.

        Raises
        ------
        ValueError
            An image cannot be preprocessed (the message names its index).
        RunnerNotLoadedError
            :meth:`load` has not been called.
        """
        model = self._loaded()
        text = self.text_embeddings(label_set)
        probabilities: list[np.ndarray] = []
        embeddings: list[np.ndarray] = []
        for start in range(0, len(images), self.max_batch_size):
            chunk = images[start : start + self.max_batch_size]
            indices = range(start, start + len(chunk))
            pooled, patches = self._encode_images(
                model, chunk, indices, with_patches=True, at_model_input=at_model_input
            )
            positive = self._logit_scale * pooled @ text.positive.T + self._logit_bias
            if label_set.scoring == "softmax":
                negative = self._logit_scale * pooled @ text.negative.T + self._logit_bias
                chunk_probabilities = torch.sigmoid(positive - negative)
            else:
                chunk_probabilities = torch.sigmoid(positive)
            probabilities.append(chunk_probabilities.cpu().numpy())
            embeddings.append(pooled.cpu().numpy())
            if self.relevance_cache_size:
                grids = relevance_grids(patches, text, self._grid)
                for image, grid in zip(chunk, grids, strict=True):
                    self._grid_cache.remember(grid_key(label_set, image), grid)
        if not images:
            return ImageScores(
                probabilities=np.zeros((0, len(label_set.findings)), np.float32),
                embeddings=np.zeros((0, self.embedding_dim), np.float32),
            )
        return ImageScores(
            probabilities=np.concatenate(probabilities).astype(np.float32),
            embeddings=np.concatenate(embeddings).astype(np.float32),
        )

    def embed_images(self, images: Sequence[np.ndarray], *, at_model_input: bool = False) -> np.ndarray:
        """``(n_images, embedding_dim)`` float32 L2-normalised image embeddings, in order.

        ``at_model_input``: as :meth:`score`.
        """
        model = self._loaded()
        rows = [
            self._encode_images(
                model,
                images[start : start + self.max_batch_size],
                range(start, min(start + self.max_batch_size, len(images))),
                with_patches=False,
                at_model_input=at_model_input,
            )[0]
            for start in range(0, len(images), self.max_batch_size)
        ]
        if not rows:
            return np.zeros((0, self.embedding_dim), np.float32)
        return torch.cat(rows).cpu().numpy().astype(np.float32)

    def relevance_maps(
        self, images: Sequence[np.ndarray], label_set: LabelSet, finding_keys: Sequence[str]
    ) -> list[np.ndarray]:
        """Per image, ``(len(finding_keys), rows, columns)`` float32 maps in [0, 1] on its own pixels.

        The :meth:`relevance_grids` put on each image's pixels by
        :func:`~medgemma_deploy.operators.medsiglip.relevance.grid_to_source`.

        Raises
        ------
        ValueError
            A key is not a finding of ``label_set``, or an image cannot be preprocessed.
        """
        grids = self.relevance_grids(images, label_set, finding_keys)
        return [
            grid_to_source(grid, image.shape[0], image.shape[1])
            for image, grid in zip(images, grids, strict=True)
        ]

    def relevance_grids(
        self,
        images: Sequence[np.ndarray],
        label_set: LabelSet,
        finding_keys: Sequence[str],
        *,
        at_model_input: bool = False,
    ) -> list[np.ndarray]:
        """Per image, ``(len(finding_keys), g, g)`` float32 maps in [0, 1] on the model's patch grid.

        The grid covers the zero-padded square the model saw; ``at_model_input``: as :meth:`score`.

        Raises
        ------
        ValueError
            A key is not a finding of ``label_set``, or an image cannot be preprocessed.
        """
        model = self._loaded()
        columns = {finding.key: index for index, finding in enumerate(label_set.findings)}
        unknown = [key for key in finding_keys if key not in columns]
        if unknown:
            raise ValueError(
                f"finding keys {unknown} are not in label set {label_set.name!r} (it has {sorted(columns)})"
            )
        selected = [columns[key] for key in finding_keys]
        keys = [grid_key(label_set, image) if self.relevance_cache_size else () for image in images]
        grids = self._grid_cache.lookup(keys)
        missing = [index for index, grid in enumerate(grids) if grid is None]
        if missing:
            text = self.text_embeddings(label_set)
            for start in range(0, len(missing), self.max_batch_size):
                indices = missing[start : start + self.max_batch_size]
                chunk = [images[i] for i in indices]
                _, patches = self._encode_images(
                    model, chunk, indices, with_patches=True, at_model_input=at_model_input
                )
                for index, grid in zip(indices, relevance_grids(patches, text, self._grid), strict=True):
                    grids[index] = grid
                    self._grid_cache.remember(keys[index], grid)
        chosen = []
        for grid in grids:
            assert grid is not None
            chosen.append(grid[selected].numpy().astype(np.float32))
        return chosen

    # ---- internals ------------------------------------------------------------------------------

    def _text_cache_key(self, label_set: LabelSet) -> dict[str, Any]:
        identity = self.identity
        return cache_key(
            model_name=identity.name,
            model_version=identity.version,
            config_digest=self._config_digest,
            label_set=label_set,
            precision=f"{self.precision}:{str(self.dtype).removeprefix('torch.')}",
            text_length=self._text_length,
        )

    def _persisted_text_embeddings(self, label_set: LabelSet) -> TextEmbeddings | None:
        """The label set's embeddings from the disk cache, verified against this model, or None."""
        if self._disk_cache is None or self._probe is None:
            return None
        entry = self._disk_cache.load(self._text_cache_key(label_set), self._probe, len(label_set.findings))
        if entry is None:
            return None
        return TextEmbeddings(
            label_set=label_set.name,
            version=label_set.version,
            finding_keys=tuple(f.key for f in label_set.findings),
            positive=torch.from_numpy(entry.positive).to(self.device),
            negative=torch.from_numpy(entry.negative).to(self.device),
            has_negative=torch.from_numpy(entry.has_negative).to(self.device),
            n_prompts=entry.n_prompts,
        )

    def _persist_text_embeddings(self, label_set: LabelSet, embeddings: TextEmbeddings) -> None:
        if self._disk_cache is None or self._probe is None:
            return
        entry = CachedTextEmbeddings(
            finding_keys=embeddings.finding_keys,
            positive=embeddings.positive.cpu().numpy(),
            negative=embeddings.negative.cpu().numpy(),
            has_negative=embeddings.has_negative.cpu().numpy(),
            n_prompts=embeddings.n_prompts,
        )
        self._disk_cache.store(self._text_cache_key(label_set), entry, self._probe)

    def _loaded(self) -> torch.nn.Module:
        if self._model is None:
            raise RunnerNotLoadedError(f"MedSigLIP from {self.model_dir} is not loaded (call load() first)")
        return self._model

    def _encode_text(self, model: torch.nn.Module, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self._tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self._text_length,
            truncation=True,
            return_tensors="pt",
        )
        with torch.inference_mode():
            # No attention mask: SigLIP was trained attending to its padding (it pools the last token).
            output = model.text_model(input_ids=tokens["input_ids"].to(self.device))
            return F.normalize(output.pooler_output.float(), dim=-1)

    def _encode_images(
        self,
        model: torch.nn.Module,
        images: Sequence[np.ndarray],
        indices: Sequence[int],
        *,
        with_patches: bool,
        at_model_input: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        assert self._preprocessor is not None
        batch = self._preprocessor(images, indices=indices, at_model_input=at_model_input)
        with torch.inference_mode():
            if self._onnx_vision is not None:
                pooler_output, last_hidden_state = self._onnx_vision(batch.pixel_values)
            else:
                output = model.vision_model(pixel_values=batch.pixel_values)
                pooler_output, last_hidden_state = output.pooler_output, output.last_hidden_state
            pooled = F.normalize(pooler_output.float(), dim=-1)
            if not with_patches:
                return pooled, None
            patches = patch_embeddings(model.vision_model.head, last_hidden_state.to(self.dtype))
            return pooled, F.normalize(patches.float(), dim=-1)

    def _warn_truncated(self, label_set: LabelSet, rows: list[tuple[int, int, str]]) -> None:
        lengths = [len(ids) for ids in self._tokenizer([prompt for _, _, prompt in rows])["input_ids"]]
        for length, (index, _, prompt) in zip(lengths, rows, strict=True):
            if length > self._text_length:
                logger.warning(
                    "label set %s, finding %s: prompt %r has %d tokens, truncated to the model's %d",
                    label_set.name,
                    label_set.findings[index].key,
                    prompt,
                    length,
                    self._text_length,
                )

    def _warm_up(self) -> None:
        """One forward pass of each tower, so the first real request is not the slow one.

        The text pass encodes the text-embedding cache's probe prompt: its embedding is what a
        persisted entry is verified against (:mod:`~medgemma_deploy.operators.medsiglip.text_cache`).
        """
        model = self._loaded()
        height, width = self.image_size
        self._encode_images(model, [np.zeros((height, width), np.float32)], [0], with_patches=True)
        self._probe = self._encode_text(model, [PROBE_TEXT])[0].cpu().numpy()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _check_contract(model_dir: Path, config: Any, preprocessor: MedSigLIPPreprocessor) -> None:
    """The model's declared I/O must fit what this runner feeds it and reads from it."""
    vision = config.vision_config
    text = config.text_config
    if not getattr(vision, "vision_use_head", True):
        raise ModelLoadError(
            f"{model_dir / 'config.json'}: vision_use_head is false; MedSigLIP's pooled image embedding "
            "comes from the attention-pooling head"
        )
    image_size = int(vision.image_size)
    if preprocessor.size != (image_size, image_size):
        raise ModelLoadError(
            f"{model_dir / 'preprocessor_config.json'}: size {preprocessor.size} does not match the "
            f"model's image_size {image_size} in config.json"
        )
    if image_size % int(vision.patch_size):
        raise ModelLoadError(
            f"{model_dir / 'config.json'}: image_size {image_size} is not a multiple of "
            f"patch_size {vision.patch_size}"
        )
    projection = int(getattr(text, "projection_size", None) or text.hidden_size)
    if projection != int(vision.hidden_size):
        raise ModelLoadError(
            f"{model_dir / 'config.json'}: text embeddings have {projection} dimensions but image "
            f"embeddings {vision.hidden_size}; they must share one space"
        )


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype_argument() -> str:
    """``from_pretrained``'s dtype keyword: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def make_medsiglip_runner(
    model_dir: str | Path,
    *,
    device: str | None = None,
    precision: str = "auto",
    cache_dir: str | Path | None = None,
    **kwargs: Any,
) -> MedSigLIPRunner:
    """The MedSigLIP runner for ``precision``, as
    :meth:`~medgemma_deploy.backends.local.Backend.medsiglip_runner` (the one place runners are built,
    for the CLI, the apps and the worker) asks for it.

    ``cache_dir`` is the ``cache_dir`` setting (default
    :func:`~medgemma_deploy.operators.medsiglip.text_cache.default_cache_dir`): prompt embeddings persist
    under its ``text-embeddings/``, and ``int8``'s quantised vision tower under ``vision-int8/``.
    Other keyword arguments go to :class:`MedSigLIPRunner`.

    ``int4`` runs MedSigLIP at ``int8``: one ``--precision`` serves both models, and a site that asks
    for 4-bit MedGemma (``study --precision int4``) wants the lowest precision of each, not a refusal
    (MedSigLIP has no 4-bit path; see :class:`MedSigLIPRunner`).
    """
    if precision == "int4":
        logger.info("MedSigLIP has no 4-bit path: precision int4 runs it at int8")
        precision = "int8"
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return MedSigLIPRunner(
        model_dir,
        device=device,
        precision=precision,
        text_cache_dir=root / "text-embeddings",
        int8_cache_dir=root / "vision-int8",
        **kwargs,
    )
