"""Choosing each row's next token: greedy, or the request's own penalty and sampling settings.

Greedy rows (the default, and what parity with single-stream decoding is about) are one batched
``argmax``; only rows with a repetition penalty or sampling are processed one by one, in
transformers' order: repetition penalty (over prompt and generated ids), temperature, top-k, top-p,
then a draw from the request's own seeded generator (so a sampled report is reproducible).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from medgemma_deploy.domain import GenerationSettings

__all__ = ["apply_repetition_penalty", "choose_tokens", "sample_token"]


def choose_tokens(
    logits: torch.Tensor,
    settings: Sequence[GenerationSettings],
    histories: Sequence[Callable[[], list[int]]],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """One token per row of ``logits`` (rows × vocab, float32).

    ``histories[row]()`` returns the row's prompt and generated ids (called only for rows with a
    repetition penalty).
    """
    chosen = logits.argmax(dim=-1).tolist()
    for row, row_settings in enumerate(settings):
        penalty = row_settings.repetition_penalty
        penalised = penalty is not None and penalty != 1.0
        if not row_settings.do_sample and not penalised:
            continue
        scores = logits[row].clone()
        if penalised:
            scores = apply_repetition_penalty(scores, histories[row](), float(penalty))  # type: ignore[arg-type]
        if row_settings.do_sample:
            chosen[row] = sample_token(scores, row_settings, generators[row])
        else:
            chosen[row] = int(scores.argmax())
    return [int(token) for token in chosen]


def apply_repetition_penalty(scores: torch.Tensor, token_ids: Sequence[int], penalty: float) -> torch.Tensor:
    """transformers' rule: divide positive and multiply negative logits of tokens already seen."""
    seen = sorted({token for token in token_ids if 0 <= token < scores.shape[-1]})
    if not seen:
        return scores
    index = torch.tensor(seen, dtype=torch.long, device=scores.device)
    picked = scores[index]
    scores[index] = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores


def sample_token(
    scores: torch.Tensor, settings: GenerationSettings, generator: torch.Generator | None
) -> int:
    """Temperature, top-k, top-p (transformers' warper order), then a draw."""
    if settings.temperature is not None and settings.temperature > 0:
        scores = scores / settings.temperature
    if settings.top_k:
        k = min(int(settings.top_k), scores.shape[-1])
        threshold = torch.topk(scores, k).values[-1]
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    if settings.top_p is not None and 0 < settings.top_p < 1:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - settings.top_p)
        remove_sorted[-1] = False  # always keep the most likely token
        scores = scores.masked_fill(remove_sorted.scatter(0, order, remove_sorted), float("-inf"))
    probabilities = scores.softmax(dim=-1).cpu()
    return int(torch.multinomial(probabilities, 1, generator=generator).item())
