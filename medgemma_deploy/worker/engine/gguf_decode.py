"""The running report sequences as llama.cpp sequences: the scheduler's batch on the low-bit runner.

:class:`GgufDecodeBatch` does for a loaded
:class:`~medgemma_deploy.operators.medgemma.gguf_runner.GgufMedGemmaRunner` (``--precision
int4|int8``) what :class:`~medgemma_deploy.worker.engine.decode.DecodeBatch` does for a torch model,
so that one :class:`~medgemma_deploy.worker.engine.scheduler.ReportScheduler` admits, decodes,
streams and retires reports on either engine. llama.cpp needs no padding: its one KV cache holds
each running report as its own sequence id (below the runner's ``n_parallel``), positions are per
sequence, and a decode step is one llama.cpp batch of one token per sequence, so each step reads
the weights once for every running report (what makes concurrent reports cheaper on a CPU).

* ``prefill`` takes a free sequence id per prompt and prefills it alone (text as tokens, each image
  as the runner's vision embeddings, non-causal inside the image), apart from the running ones,
  which keep their cells;
* ``join`` keeps the prefilled sequences that continue; the others' ids are freed at once;
* ``step`` decodes one token for every row; ``remove`` and ``reset`` free ids and their cells.

Choosing tokens stays with the scheduler (``choose_tokens`` on these logits), as on torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medgemma_deploy.operators.medgemma.gguf_runner import GgufMedGemmaRunner
from medgemma_deploy.worker.engine.decode import PreparedPrompt

__all__ = ["GgufDecodeBatch", "GgufPrefilled"]


@dataclass
class GgufPrefilled:
    """New sequences after prefill: their llama.cpp sequence ids, last logits and lengths."""

    seq_ids: list[int]
    logits: torch.Tensor  # (n, vocab) float32
    lengths: list[int]


class GgufDecodeBatch:
    """The running reports of a loaded llama.cpp runner, one sequence id each (rows in order).

    Parameters
    ----------
    runner:
        A loaded ``GgufMedGemmaRunner``; at most ``runner.n_parallel`` reports run at once (the
        scheduler's ``max_running`` must not exceed it).
    """

    def __init__(self, runner: GgufMedGemmaRunner) -> None:
        self.runner = runner
        self._free = list(range(runner.n_parallel))
        #: llama.cpp sequence id of each row, and its next position (its tokens so far).
        self.seq_ids: list[int] = []
        self.lengths: list[int] = []

    @property
    def rows(self) -> int:
        return len(self.seq_ids)

    def prefill(self, prompts: Sequence[PreparedPrompt]) -> GgufPrefilled:
        """Prefill each prompt as a new sequence, apart from the running ones.

        Raises
        ------
        RuntimeError
            More prompts than free sequence ids, or llama.cpp failed; the ids taken are freed
            again and the running rows are untouched, so the caller can retry them alone.
        InputError
            A prompt's image runs and images differ in number.
        """
        if not prompts:
            raise ValueError("prefill needs at least one prompt")
        if len(prompts) > len(self._free):
            raise RuntimeError(
                f"{len(prompts)} reports to prefill, {len(self._free)} of {self.runner.n_parallel} "
                "llama.cpp sequences free"
            )
        taken: list[int] = []
        logits: list[np.ndarray] = []
        try:
            for prompt in prompts:
                seq_id = self._free.pop(0)
                taken.append(seq_id)
                pixels = prompt.model_inputs.get("pixel_values")
                images = [] if pixels is None else list(np.asarray(pixels, dtype=np.float32))
                logits.append(self.runner.prefill_sequence(seq_id, prompt.input_ids[0].tolist(), images))
        except BaseException:
            self._release(taken)
            raise
        return GgufPrefilled(taken, torch.from_numpy(np.stack(logits)), [p.n_tokens for p in prompts])

    def join(self, prefilled: GgufPrefilled, rows: Sequence[int] | None = None) -> None:
        """Append the given rows of a prefill (all by default) as running rows; free the others."""
        keep = set(range(len(prefilled.seq_ids)) if rows is None else rows)
        for row, (seq_id, length) in enumerate(zip(prefilled.seq_ids, prefilled.lengths, strict=True)):
            if row in keep:
                self.seq_ids.append(seq_id)
                self.lengths.append(length)
            else:
                self._release([seq_id])

    def step(self, next_tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row; return the float32 next-token logits, shape ``(rows, vocab)``."""
        if not self.rows:
            raise RuntimeError("GgufDecodeBatch.step called with no running sequence")
        if next_tokens.shape != (self.rows,):
            raise ValueError(f"next_tokens has shape {tuple(next_tokens.shape)}, expected ({self.rows},)")
        logits = self.runner.decode_step(next_tokens.tolist(), self.lengths, self.seq_ids)
        self.lengths = [length + 1 for length in self.lengths]
        return torch.from_numpy(logits)

    def remove(self, rows: list[int]) -> None:
        """Drop the given rows (finished or cancelled reports) and free their sequences."""
        drop = set(rows)
        self._release([seq_id for row, seq_id in enumerate(self.seq_ids) if row in drop])
        self.lengths = [length for row, length in enumerate(self.lengths) if row not in drop]
        self.seq_ids = [seq_id for row, seq_id in enumerate(self.seq_ids) if row not in drop]

    def reset(self) -> None:
        """Forget every row and free every sequence's cells."""
        if self.runner.is_loaded:
            self.runner.forget_all()
        self._free = list(range(self.runner.n_parallel))
        self.seq_ids, self.lengths = [], []

    def _release(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            if self.runner.is_loaded:
                self.runner.forget_sequence(seq_id)
            self._free.append(seq_id)
        self._free.sort()
