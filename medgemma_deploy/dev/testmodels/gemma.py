"""A tiny randomly initialised MedGemma: the real classes and file layout, about 0.6 MB.

``make_test_medgemma`` writes a directory that loads exactly like a downloaded
``google/medgemma-4b-it``: ``config.json`` of a ``Gemma3ForConditionalGeneration`` (Gemma 3 text
decoder + SigLIP vision tower + multimodal projector), ``model.safetensors``, a Gemma BPE tokenizer
with byte fallback and the real special tokens, the Gemma 3 chat template, a
``Gemma3ImageProcessor`` configuration and ``processor_config.json``, so that
``AutoProcessor.from_pretrained`` returns a ``Gemma3Processor`` that expands each image into its
soft tokens. Everything is built locally (no downloads) and is deterministic for a seed.

The proportions follow the real model with small numbers: the real vision tower sees 896 px in
14 px patches (64 patches per side) and the projector average-pools them 4×4 to 16×16 = 256 soft
tokens; here 64 px in 4 px patches (16 per side) pooled 4×4 to 4×4 = 16 soft tokens.

The weights are random: whatever it generates is meaningless, and the marker file says so
(``random_weights: true``), which every output then repeats.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

__all__ = ["GEMMA3_CHAT_TEMPLATE", "TINY_MEDGEMMA_NAME", "make_test_medgemma"]

logger = logging.getLogger(__name__)

#: ``name`` in the marker file of the tiny model.
TINY_MEDGEMMA_NAME = "medgemma-deploy/tiny-random-medgemma"

#: The chat template of the Gemma 3 / MedGemma instruction-tuned checkpoints: the system prompt is
#: folded into the first user turn, the assistant is called ``model`` and each image is rendered
#: as ``<start_of_image>`` (the processor expands it into the image's soft tokens).
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

#: Control tokens in the order of the real Gemma 3 vocabulary (their ids differ: the real
#: vocabulary has 262k entries).
_SPECIAL_TOKENS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)
#: Byte-fallback pieces, so any UTF-8 text (Cyrillic, CJK…) encodes without <unk>.
_BYTE_TOKENS = tuple(f"<0x{value:02X}>" for value in range(256))

#: Training text of the tiny BPE vocabulary: report words, so decoded noise looks like words.
_CORPUS = (
    "Findings: The lungs are clear. There is no focal consolidation, pleural effusion or pneumothorax.",
    "The cardiomediastinal silhouette is within normal limits. Heart size is normal.",
    "Impression: No acute cardiopulmonary abnormality.",
    "CT of the chest, abdomen and pelvis with contrast. The liver, spleen and kidneys are unremarkable.",
    "A hypodense lesion in the right hepatic lobe measures 12 mm. No lymphadenopathy.",
    "MRI of the brain: no restricted diffusion, no mass effect, ventricles of normal size.",
    "Dermatology image: a pigmented lesion with irregular borders. Fundus: the optic disc is normal.",
    "Pathology: tissue with benign glands and no evidence of malignancy.",
    "Recommendation: clinical correlation and follow-up imaging.",
)
_VOCAB_SIZE = 640

#: Model geometry (see the module docstring for the real proportions).
_IMAGE_SIZE = 64
_PATCH_SIZE = 4
_MM_TOKENS_PER_IMAGE = 16
_CONTEXT_LENGTH = 8192


def make_test_medgemma(out_dir: Path, *, seed: int = 0) -> Path:
    """Write a tiny random MedGemma (``Gemma3ForConditionalGeneration``) to ``out_dir``.

    Parameters
    ----------
    out_dir:
        Directory to write (created if needed; files of an earlier build are overwritten).
    seed:
        Seed of the weights; the same seed always gives byte-identical weights and the same
        version in the marker file.

    Returns
    -------
    pathlib.Path
        ``out_dir``, ready for ``MedGemmaRunner`` / ``AutoProcessor.from_pretrained``.

    Raises
    ------
    ValueError
        ``seed`` is negative.
    """
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
        GenerationConfig,
        SiglipVisionConfig,
    )

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer()
    image_processor = Gemma3ImageProcessorPil(
        size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        resample=2,  # bilinear, as the real preprocessor_config.json
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=_MM_TOKENS_PER_IMAGE,
    )

    token_id = tokenizer.convert_tokens_to_ids
    text_config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=32,
        # Both attention kinds of the real model (5 sliding layers per global one there).
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=_CONTEXT_LENGTH,
        pad_token_id=token_id("<pad>"),
        eos_token_id=token_id("<eos>"),
        bos_token_id=token_id("<bos>"),
    )
    vision_config = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=_IMAGE_SIZE,
        patch_size=_PATCH_SIZE,
        vision_use_head=False,
    )
    config = Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=_MM_TOKENS_PER_IMAGE,
        boi_token_index=token_id("<start_of_image>"),
        eoi_token_index=token_id("<end_of_image>"),
        image_token_index=token_id("<image_soft_token>"),
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        # transformers initialises the projector to zeros (real checkpoints overwrite it); random
        # values make the generated tokens depend on the pixels, which the tests rely on.
        projection = model.model.multi_modal_projector.mm_input_projection_weight
        projection.normal_(0.0, vision_config.hidden_size**-0.5)
    # As the real checkpoint's generation_config.json: stop at <eos> or <end_of_turn>, the hybrid
    # (sliding + global) cache, and sampling defaults that greedy callers must override.
    model.generation_config = GenerationConfig(
        cache_implementation="hybrid",
        bos_token_id=token_id("<bos>"),
        pad_token_id=token_id("<pad>"),
        eos_token_id=[token_id("<eos>"), token_id("<end_of_turn>")],
        do_sample=True,
        top_k=64,
        top_p=0.95,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    _write_legacy_preprocessor_config(out_dir)

    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        digest.update((out_dir / name).read_bytes())
    marker = {
        "name": TINY_MEDGEMMA_NAME,
        "version": f"seed{seed}-{digest.hexdigest()[:12]}",
        "random_weights": True,
    }
    (out_dir / "medgemma_deploy_model.json").write_text(json.dumps(marker, indent=2) + "\n")
    seconds = time.perf_counter() - started
    logger.info("tiny MedGemma (%s) written to %s in %.1f s", marker["version"], out_dir, seconds)
    return out_dir


def _build_tokenizer():
    """A Gemma BPE tokenizer (byte fallback, ``▁`` for spaces) trained on ``_CORPUS``."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import GemmaTokenizer

    # Same normalizer/pre-tokenizer as transformers' GemmaTokenizer, so the trained merges apply.
    trainee = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    trainee.normalizer = normalizers.Replace(" ", "▁")
    trainee.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE, special_tokens=[*_SPECIAL_TOKENS, *_BYTE_TOKENS], show_progress=False
    )
    trainee.train_from_iterator(_CORPUS, trainer)
    merges = [tuple(pair) for pair in json.loads(trainee.to_str())["model"]["merges"]]
    tokenizer = GemmaTokenizer(
        vocab=trainee.get_vocab(),
        merges=merges,
        add_bos_token=True,
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    # Turn markers are special, so decoding with skip_special_tokens drops them as for the real model.
    turn_markers = {"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]}
    tokenizer.add_special_tokens(turn_markers, replace_extra_special_tokens=False)
    return tokenizer


def _write_legacy_preprocessor_config(out_dir: Path) -> None:
    """Also write ``preprocessor_config.json``, as the Hub checkpoints have it.

    transformers 5 nests the image processor in ``processor_config.json``; the flat file keeps the
    directory loadable by transformers 4.x and by tools that look for it.
    """
    processor_config = json.loads((out_dir / "processor_config.json").read_text())
    image_config = dict(processor_config.get("image_processor", {}))
    if not image_config:
        return
    image_config["image_seq_length"] = _MM_TOKENS_PER_IMAGE
    image_config["processor_class"] = "Gemma3Processor"
    (out_dir / "preprocessor_config.json").write_text(json.dumps(image_config, indent=2) + "\n")
