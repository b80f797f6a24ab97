"""The reference of every MedGemma parity test: plain transformers ``model.generate``, greedy.

Our reports (in process and through the worker) are decoded by our own continuous-batching core;
these tokens are what a Hugging Face user gets from the same model on the processor's inputs of
the same chat, built here without any of our code.
"""

from __future__ import annotations

from typing import Any

import torch


def plain_greedy(
    model: Any,
    processor: Any,
    messages: list[dict],
    max_new_tokens: int,
    *,
    repetition_penalty: float | None = None,
) -> tuple[list[int], int]:
    """transformers' greedy tokens for the chat ``messages``, and the prompt's length in tokens."""
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        output = model.generate(
            **inputs, do_sample=False, max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty
        )
    n_prompt = int(inputs["input_ids"].shape[1])
    return output[0, n_prompt:].tolist(), n_prompt
