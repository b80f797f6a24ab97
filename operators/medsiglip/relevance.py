"""MedSigLIP relevance maps: per-patch embeddings, the patch-grid maps and their cache.

:class:`~medgemma_deploy.operators.medsiglip.runner.MedSigLIPRunner` scores the vision tower's pooled
embedding; everything here works on its patch tokens instead. It is kept apart from the runner so
that the scoring path reads on its own and the map's maths sits next to its derivation below; the
runner calls these functions after its forward pass, and re-exports :func:`patch_embeddings`.

SigLIP pools its patch tokens with one attention head (a learned probe attends to all tokens, then
a layer norm and an MLP with a residual). If the probe attended to patch ``j`` alone, the pooled
embedding would be ``p_j = z_j + MLP(LN(z_j))`` with ``z_j = out_proj(v_proj(x_j))``: the
embedding the model itself would produce from that patch, in the joint image-text space
(:func:`patch_embeddings`; the same idea as MaskCLIP's dense features from the value path).
A finding's map is ``p̂_j · (mean_i t+_i - mean_i t-_i)`` with ``p̂_j`` normalised: the patch's own
``(l+ - l-) / exp(logit_scale)``, positive exactly where that patch alone would give the finding a
softmax probability above 0.5 (without negative prompts: ``p̂_j · mean_i t+_i`` minus its mean over
the image). It is rectified and divided by its maximum (so it spans [0, 1], or is all zero when no
patch alone favours the finding); :func:`grid_to_source` then resizes it from the patch grid onto
the source pixels (the worker returns the grid itself, and its client calls the same function).
It costs one matrix product per image on top of the forward pass, needs
no gradients, is deterministic, and depends on the finding only through its text embeddings.
A map shows *where* the image looks like the finding; *whether* it is there is the probability's job.

:meth:`~medgemma_deploy.operators.medsiglip.runner.MedSigLIPRunner.score` keeps each image's patch-grid
maps for all findings in a small LRU cache (:class:`RelevanceGridCache`, keyed by :func:`grid_key`:
the image's bytes and the label set), so the usual ``score`` then ``relevance_maps`` on the same
frames runs the vision tower once.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from medgemma_deploy.domain import LabelSet
from medgemma_deploy.operators.medsiglip.preprocess import PadGeometry

if TYPE_CHECKING:
    from medgemma_deploy.operators.medsiglip.runner import TextEmbeddings

__all__ = [
    "RelevanceGridCache",
    "grid_key",
    "grid_to_source",
    "patch_embeddings",
    "relevance_grids",
]


def patch_embeddings(head: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Each patch token pushed through SigLIP's attention-pooling head as if it alone were attended.

    Parameters
    ----------
    head:
        ``SiglipMultiheadAttentionPoolingHead`` (``vision_model.head``).
    tokens:
        ``(n, patches, width)``: the vision tower's ``last_hidden_state`` (after ``post_layernorm``).

    Returns
    -------
    torch.Tensor
        ``(n, patches, width)``; entry ``j`` equals ``head(tokens[:, j:j+1])``, because attention over a
        single key gives it weight 1 in every head.
    """
    attention = head.attention
    width = attention.embed_dim
    if attention.in_proj_weight is not None:
        value_weight = attention.in_proj_weight[2 * width :]
    else:
        value_weight = attention.v_proj_weight
    value_bias = attention.in_proj_bias[2 * width :] if attention.in_proj_bias is not None else None
    pooled = attention.out_proj(F.linear(tokens, value_weight, value_bias))
    return pooled + head.mlp(head.layernorm(pooled))


def relevance_grids(patches: torch.Tensor, text: TextEmbeddings, grid_size: int) -> list[torch.Tensor]:
    """Per image, ``(n_findings, grid_size, grid_size)`` float32 maps in [0, 1] on the CPU.

    ``patches`` are the L2-normalised :func:`patch_embeddings`, ``(n, grid_size**2, width)``; ``text``
    the label set's prompt means; see the module docstring for the map itself.
    """
    with torch.inference_mode():
        positive = patches @ text.positive.T  # (n, patches, findings)
        negative = patches @ text.negative.T
        contrast = positive - negative
        # Without negative prompts, contrast each patch with the image's average patch.
        centred = positive - positive.mean(dim=1, keepdim=True)
        similarity = torch.where(text.has_negative, contrast, centred).clamp(min=0.0)
        peak = similarity.amax(dim=1, keepdim=True)
        normalised = torch.where(peak > 0, similarity / peak.clamp(min=1e-12), torch.zeros_like(similarity))
        n, n_patches, n_findings = normalised.shape
        if n_patches != grid_size * grid_size:
            raise RuntimeError(f"vision tower gave {n_patches} tokens, not a {grid_size}x{grid_size} grid")
        grids = normalised.permute(0, 2, 1).reshape(n, n_findings, grid_size, grid_size).cpu()
    return list(grids)


def grid_to_source(grid: torch.Tensor | np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Maps on the model's patch grid → ``(n_maps, rows, columns)`` float32 on the source pixels.

    The one place maps leave the patch grid: the in-process runner and the worker's client both
    call it (the worker sends grids, 4 KiB per map on MedSigLIP-448's 32x32 grid, not full-size
    maps), so the SEG writer gets the same full-size map either way.

    The result is the grid resized bilinearly (pixel centres aligned, edges clamped: PyTorch's
    ``interpolate(..., mode="bilinear", align_corners=False)``) to the zero-padded square the
    model saw, restricted to where the source image sits in it
    (:class:`~medgemma_deploy.operators.medsiglip.preprocess.PadGeometry`). It is computed as two small
    matrix products straight onto the cropped region, never materialising the square: a 1xN strip
    costs N values per map, not N².

    Parameters
    ----------
    grid:
        ``(n_maps, g, g)`` values in [0, 1] over the whole padded square.
    rows, columns:
        The source image's size.
    """
    values = np.asarray(grid, dtype=np.float32)
    if values.ndim != 3 or values.shape[1] != values.shape[2]:
        raise ValueError(f"grid must have shape (n_maps, g, g), got {values.shape}")
    geometry = PadGeometry.for_shape(rows, columns)
    size = values.shape[1]
    down = _bilinear_weights(size, geometry.side, geometry.top, rows)  # (rows, g)
    across = _bilinear_weights(size, geometry.side, geometry.left, columns)  # (columns, g)
    maps = np.matmul(np.matmul(down, values), across.T)
    return np.clip(maps, 0.0, 1.0, out=maps)


def _bilinear_weights(size: int, side: int, start: int, count: int) -> np.ndarray:
    """``(count, size)`` weights of output pixels ``start … start+count-1`` of a ``size``→``side`` resize."""
    scale = size / side
    source = np.maximum((np.arange(start, start + count, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(np.int64), size - 1)
    high = np.minimum(low + 1, size - 1)
    fraction = source - low
    weights = np.zeros((count, size), np.float64)
    positions = np.arange(count)
    np.add.at(weights, (positions, low), 1.0 - fraction)
    np.add.at(weights, (positions, high), fraction)
    return weights.astype(np.float32)


def grid_key(label_set: LabelSet, image: np.ndarray) -> tuple:
    """Cache key of an image's relevance grids: its exact pixels and the label set's findings."""
    array = np.ascontiguousarray(image)
    digest = hashlib.blake2b(array.view(np.uint8).reshape(-1), digest_size=16)
    digest.update(f"{array.shape}{array.dtype}".encode())
    return (label_set.name, label_set.version, label_set.findings, digest.digest())


class RelevanceGridCache:
    """Images' patch-grid maps from :func:`relevance_grids`, keyed by :func:`grid_key`: a thread-safe LRU.

    Parameters
    ----------
    max_images:
        Images kept; beyond that the least recently used is dropped. 0 keeps nothing.
    """

    def __init__(self, max_images: int) -> None:
        self.max_images = max_images
        self._grids: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._grids)

    def lookup(self, keys: Sequence[tuple]) -> list[torch.Tensor | None]:
        """The cached grid of each key, or None; every hit becomes the most recently used."""
        grids: list[torch.Tensor | None] = []
        with self._lock:
            for key in keys:
                grid = self._grids.get(key)
                if grid is not None:
                    self._grids.move_to_end(key)
                grids.append(grid)
        return grids

    def remember(self, key: tuple, grid: torch.Tensor) -> None:
        """Keep ``grid`` as the most recently used (no-op when ``max_images`` is 0)."""
        if not self.max_images:
            return
        with self._lock:
            self._grids[key] = grid
            self._grids.move_to_end(key)
            while len(self._grids) > self.max_images:
                self._grids.popitem(last=False)

    def clear(self) -> None:
        """Drop every grid (the runner's ``close``)."""
        with self._lock:
            self._grids.clear()
