"""The running report sequences as one left-padded batch over transformers' own KV cache.

Continuous batching needs sequences of different lengths, which join and leave at any step, to be
decoded by one forward pass. :class:`DecodeBatch` keeps them in one transformers ``DynamicCache``
whose every layer holds ``(rows, kv_heads, columns, head_dim)`` tensors, **left-padded** so that all
rows write their next token into the same column:

.. code-block:: text

    row 0   [pad pad pad  t0  t1  t2  t3 ] ← next token of every row goes here
    row 1   [ t0  t1  t2  t3  t4  t5  t6 ]
    row 2   [pad pad pad pad pad  t0  t1 ]

* Joining sequences are prefilled apart from the running batch (their images, their bidirectional
  image-block masks, exactly as ``model.generate`` would: alone, or several left-padded together)
  into a cache of their own, then padded on the left and concatenated as new rows; if they are
  longer than the batch, the batch is padded instead.
* A 2-D attention mask marks the padding; each row's ``position_ids`` count only its real tokens,
  so RoPE sees the positions a single-stream run would.
* Because padding is only ever on the left and tokens are contiguous, the column distance between
  two tokens of a row equals their token distance: the model's own sliding-window mask (applied on
  cache indices) stays exact. Every layer is therefore kept as a full ``DynamicLayer``; sliding
  layers are not truncated to their window. That costs memory beyond the window for very long
  prompts (a CT of 85 slices), and buys a single code path whose masking is the model's own.
* Leaving rows are dropped with ``index_select``; columns that are padding in every remaining row
  are trimmed from the left so the batch never carries dead width.

Only the model's public forward is called (``input_ids``, ``attention_mask``, ``position_ids``,
the cache, ``logits_to_keep``); the masks are built by the model itself. The cache goes in as
``cache`` where the forward takes it (transformers 5.24 on; ``past_key_values`` there warns that it
is deprecated), else as ``past_key_values``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import DynamicCache

__all__ = ["DecodeBatch", "Prefilled", "PrefilledRows", "PreparedPrompt", "SequenceBatch"]

logger = logging.getLogger(__name__)


@dataclass
class PreparedPrompt:
    """A tokenised prompt ready for prefill (one sequence, batch dimension 1).

    Attributes
    ----------
    input_ids:
        ``(1, n_prompt_tokens)`` token ids, image soft tokens included.
    model_inputs:
        The other tensors the processor produced for this prompt (``attention_mask``,
        ``pixel_values``, ``token_type_ids``…), passed to the prefill forward unchanged.
    """

    input_ids: torch.Tensor
    model_inputs: Mapping[str, torch.Tensor]

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[-1])


@dataclass
class Prefilled:
    """New sequences after prefill: their own left-padded cache, last logits, mask and lengths."""

    cache: DynamicCache
    logits: torch.Tensor  # (n, vocab) float32
    attention_mask: torch.Tensor  # (n, width)
    lengths: list[int]


class PrefilledRows(Protocol):
    """What a batch's ``prefill`` returns: at least the last logits of each new sequence."""

    logits: torch.Tensor  # (n, vocab) float32


class SequenceBatch(Protocol):
    """The running sequences of one engine, as the scheduler drives them: :class:`DecodeBatch` on
    torch, :class:`~medgemma_deploy.worker.engine.gguf_decode.GgufDecodeBatch` on llama.cpp."""

    @property
    def rows(self) -> int: ...

    def prefill(self, prompts: Sequence[PreparedPrompt]) -> PrefilledRows: ...

    def join(self, prefilled: PrefilledRows, rows: Sequence[int] | None = None) -> None: ...

    def step(self, next_tokens: torch.Tensor) -> torch.Tensor: ...

    def remove(self, rows: list[int]) -> None: ...

    def reset(self) -> None: ...


class DecodeBatch:
    """Left-padded KV cache and masks of the running sequences of one causal LM.

    Parameters
    ----------
    model:
        A loaded transformers model whose forward accepts a ``DynamicCache`` (``cache``, or
        ``past_key_values`` before transformers 5.24), ``attention_mask``, ``position_ids`` and
        ``logits_to_keep`` (Gemma 3 does).
    device:
        Where the cache lives (the model's device).
    pad_token_id:
        Fills the left padding of a batched prefill (masked out; must not be the image token).
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, *, pad_token_id: int = 0) -> None:
        self.model = model
        self.device = device
        self.pad_token_id = pad_token_id
        self.cache: DynamicCache | None = None
        parameters = inspect.signature(model.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self.attention_mask = torch.zeros((0, 0), dtype=torch.long, device=device)
        #: Real (non-padding) tokens of each row, in row order.
        self.lengths: list[int] = []

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        """Columns of the cache (longest row plus padding)."""
        return int(self.attention_mask.shape[1])

    def cached_tokens(self) -> int:
        """Cache slots in use, padding included (rows × width): what memory admission counts."""
        return self.rows * self.width

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[PreparedPrompt]) -> Prefilled:
        """Run new prompts together, apart from the running batch; return their cache and logits.

        One prompt runs unpadded, exactly as ``generate`` runs it. Several are left-padded into one
        forward as ``generate`` batches them: a 2-D padding mask, positions counting real tokens
        only, their images concatenated in prompt order (each ``pixel_values`` row belongs to the
        next image token block), and ``token_type_ids`` padded with text (0).

        Raises
        ------
        torch.cuda.OutOfMemoryError, RuntimeError, ValueError
            From the model; the running batch is untouched, so the caller can retry them alone.
        """
        if not prompts:
            raise ValueError("prefill needs at least one prompt")
        lengths = [prompt.n_tokens for prompt in prompts]
        if len(prompts) == 1:
            inputs = {name: _to(value, self.device) for name, value in prompts[0].model_inputs.items()}
            inputs["input_ids"] = prompts[0].input_ids.to(self.device)
            mask = torch.ones((1, lengths[0]), dtype=torch.long, device=self.device)
        else:
            inputs, mask = self._padded(prompts, lengths)
        cache = DynamicCache()
        inputs[self._cache_argument] = cache
        output = self.model(**inputs, use_cache=True, logits_to_keep=1)
        return Prefilled(cache, output.logits[:, -1].to(dtype=torch.float32), mask, lengths)

    def _padded(self, prompts: Sequence[PreparedPrompt], lengths: list[int]) -> tuple[dict, torch.Tensor]:
        width = max(lengths)
        names = set().union(*(prompt.model_inputs for prompt in prompts)) - {"attention_mask"}
        unknown = names - {"pixel_values", "token_type_ids"}
        if unknown:
            raise ValueError(
                f"cannot batch prompts with model inputs {sorted(unknown)}; prefill them one by one"
            )
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        token_types = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, (prompt, length) in enumerate(zip(prompts, lengths, strict=True)):
            input_ids[row, width - length :] = prompt.input_ids[0]
            mask[row, width - length :] = 1
            if "token_type_ids" in prompt.model_inputs:
                token_types[row, width - length :] = prompt.model_inputs["token_type_ids"][0]
        inputs: dict[str, torch.Tensor] = {
            "input_ids": input_ids.to(self.device),
            "attention_mask": mask.to(self.device),
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0).to(self.device),
        }
        if "token_type_ids" in names:
            inputs["token_type_ids"] = token_types.to(self.device)
        images = [
            prompt.model_inputs["pixel_values"] for prompt in prompts if "pixel_values" in prompt.model_inputs
        ]
        if images:
            inputs["pixel_values"] = torch.cat(images).to(self.device)
        return inputs, mask.to(self.device)

    def join(self, prefilled: Prefilled, rows: Sequence[int] | None = None) -> None:
        """Append prefilled sequences (all, or the given rows of the prefill) to the running batch."""
        keep = list(range(len(prefilled.lengths))) if rows is None else list(rows)
        if not keep:
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        new_layers = [
            (layer.keys.index_select(0, index), layer.values.index_select(0, index))
            for layer in prefilled.cache.layers
        ]
        new_mask = prefilled.attention_mask.index_select(0, index)
        lengths = [prefilled.lengths[row] for row in keep]
        if self.cache is None or self.rows == 0:
            for layer, (keys, values) in zip(prefilled.cache.layers, new_layers, strict=True):
                layer.keys, layer.values = keys, values
            self.cache = prefilled.cache  # the prefill cache becomes the batch cache
            self.attention_mask = new_mask
            self.lengths = lengths
            self._trim()
            return
        width = max(self.width, new_mask.shape[1])
        grow_batch, pad_new = width - self.width, width - new_mask.shape[1]
        for layer, (keys, values) in zip(self.cache.layers, new_layers, strict=True):
            layer.keys = torch.cat([_pad_left(layer.keys, grow_batch), _pad_left(keys, pad_new)], dim=0)
            layer.values = torch.cat([_pad_left(layer.values, grow_batch), _pad_left(values, pad_new)], dim=0)
        self.attention_mask = torch.cat(
            [F.pad(self.attention_mask, (grow_batch, 0)), F.pad(new_mask, (pad_new, 0))]
        )
        self.lengths.extend(lengths)
        self._trim()

    @torch.inference_mode()
    def step(self, next_tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row; return the float32 next-token logits, shape ``(rows, vocab)``."""
        if self.cache is None or self.rows == 0:
            raise RuntimeError("DecodeBatch.step called with no running sequence")
        if next_tokens.shape != (self.rows,):
            raise ValueError(f"next_tokens has shape {tuple(next_tokens.shape)}, expected ({self.rows},)")
        ones = torch.ones((self.rows, 1), dtype=torch.long, device=self.device)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        position_ids = torch.tensor(self.lengths, dtype=torch.long, device=self.device).unsqueeze(1)
        output = self.model(
            input_ids=next_tokens.to(self.device).unsqueeze(1),
            attention_mask=self.attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_argument: self.cache},
        )
        self.lengths = [length + 1 for length in self.lengths]
        return output.logits[:, -1].to(dtype=torch.float32)

    def remove(self, rows: list[int]) -> None:
        """Drop the given rows (finished or cancelled sequences) and trim shared left padding."""
        if not rows:
            return
        drop = set(rows)
        keep = [row for row in range(self.rows) if row not in drop]
        if not keep:
            self.reset()
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        assert self.cache is not None
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        self.attention_mask = self.attention_mask.index_select(0, index)
        self.lengths = [self.lengths[row] for row in keep]
        self._trim()

    def reset(self) -> None:
        """Forget every row and free the cache."""
        self.cache = None
        self.attention_mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self.lengths = []

    def _trim(self) -> None:
        dead = self.width - max(self.lengths)
        if dead <= 0:
            return
        assert self.cache is not None
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, dead:, :].contiguous()
            layer.values = layer.values[:, :, dead:, :].contiguous()
        self.attention_mask = self.attention_mask[:, dead:].contiguous()


def _to(value: object, device: torch.device) -> object:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _pad_left(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    """Zero-pad a ``(rows, heads, length, dim)`` cache tensor by ``columns`` on the left of ``length``."""
    if columns == 0:
        return tensor
    return F.pad(tensor, (0, 0, columns, 0))
