"""Random-weight models of the real architectures, for benchmarks (never for results).

MedSigLIP-448 and MedGemma-4B (or 27B) with the published shapes (:data:`MEDSIGLIP_448_SHAPE`,
:data:`GEMMA_SHAPES`, from the public configs), random bfloat16 weights, and the tokenizer, chat template
and processor of the tiny test models (so no download is needed). The processors are set to the real
image sizes (448 px for MedSigLIP; 896 px and 256 soft tokens per image for MedGemma), so every tensor the GPU
sees has the real shape: speed and memory are those of the real models, the text is noise.

Token ids: the vocabulary keeps the real size (262,208 rows for Gemma 3: the LM head is a large part
of each decode step). The tiny tokenizer is widened to that size with filler pieces (``▁tok<ID>``),
so every id a random model generates decodes to text, as with the real vocabulary; the image,
begin- and end-of-image token ids stay the tokenizer's, which is all the model's image merging
needs. MedSigLIP's text tower projects to the vision tower's 1152 dimensions, as the real model.

``medgemma_layers`` keeps the real widths and vocabulary with fewer layers (in the decoder and in
MedGemma's vision tower), so a CPU test can draft a report end to end on real shapes without the
8.6 GB of the 34-layer 4B model.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Literal

__all__ = ["GEMMA_SHAPES", "MEDSIGLIP_448_SHAPE", "full_size_configs", "make_full_size_models"]

logger = logging.getLogger(__name__)

#: MedSigLIP-448: both towers (the text tower has the vision tower's width).
MEDSIGLIP_448_SHAPE: dict[str, Any] = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 448,
    "patch_size": 14,
    "text_length": 64,
    "text_vocab_size": 32000,
}

#: Gemma 3 text decoders of MedGemma (vision tower: SigLIP at 896 px, 256 tokens per image).
GEMMA_SHAPES: dict[str, dict[str, Any]] = {
    "4b": {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "num_hidden_layers": 34,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
    },
    "27b": {
        "hidden_size": 5376,
        "intermediate_size": 21504,
        "num_hidden_layers": 62,
        "num_attention_heads": 32,
        "num_key_value_heads": 16,
        "head_dim": 128,
        "query_pre_attn_scalar": 168,
    },
}
_GEMMA_COMMON = {"vocab_size": 262208, "sliding_window": 1024, "sliding_window_pattern": 6}
_GEMMA_VISION = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 896,
    "patch_size": 14,
}
_MM_TOKENS = 256


def full_size_configs(
    tiny_models: dict[str, Path],
    variant: Literal["4b", "27b"] = "4b",
    *,
    medgemma_layers: int | None = None,
) -> dict[str, Any]:
    """The transformers configs of the full-size models, keeping the tiny tokenizers' token ids.

    ``medgemma_layers``: that many decoder and vision-tower layers instead of the real counts.
    """
    from transformers import Gemma3Config, SiglipConfig

    shape = MEDSIGLIP_448_SHAPE
    tower = {
        k: shape[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    }
    siglip = SiglipConfig.from_pretrained(tiny_models["medsiglip"])
    siglip_dict = siglip.to_dict()
    siglip_dict["vision_config"].update(tower, image_size=shape["image_size"], patch_size=shape["patch_size"])
    # The text tower projects into the image embedding space (1152), as the real model; keeping the
    # tiny model's projection_size made every classify fail with a shape mismatch.
    siglip_dict["text_config"].update(
        tower,
        max_position_embeddings=shape["text_length"],
        vocab_size=shape["text_vocab_size"],
        projection_size=shape["hidden_size"],
    )
    gemma = Gemma3Config.from_pretrained(tiny_models["medgemma"]).to_dict()
    if medgemma_layers is not None and medgemma_layers < 1:
        raise ValueError(f"medgemma_layers must be at least 1, got {medgemma_layers}")
    layers = medgemma_layers or GEMMA_SHAPES[variant]["num_hidden_layers"]
    pattern = _GEMMA_COMMON["sliding_window_pattern"]
    gemma["text_config"].update(
        GEMMA_SHAPES[variant],
        num_hidden_layers=layers,
        vocab_size=_GEMMA_COMMON["vocab_size"],
        sliding_window=_GEMMA_COMMON["sliding_window"],
        layer_types=[
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)
        ],
        max_position_embeddings=131072,
    )
    gemma["vision_config"].update(
        _GEMMA_VISION, num_hidden_layers=medgemma_layers or _GEMMA_VISION["num_hidden_layers"]
    )
    gemma["mm_tokens_per_image"] = _MM_TOKENS
    return {"medsiglip": SiglipConfig.from_dict(siglip_dict), "medgemma": Gemma3Config.from_dict(gemma)}


def make_full_size_models(
    out: Path,
    *,
    variant: Literal["4b", "27b"] = "4b",
    device: str = "cuda",
    seed: int = 0,
    kinds: tuple[str, ...] = ("medsiglip", "medgemma"),
    medgemma_layers: int | None = None,
) -> dict[str, Path]:
    """Write ``out/medsiglip`` and ``out/medgemma`` with random bf16 weights of the real shapes.

    Weights are initialised on ``device`` (fast on a GPU) and saved as safetensors (about 1.8 GB
    for MedSigLIP, 8.6 GB for MedGemma-4B, 55 GB for 27B; 1.4 GB for MedGemma-4B with
    ``medgemma_layers=2``, most of it the 262,208 x 2,560 embedding). ``kinds`` chooses the models.
    """
    import torch
    from transformers import Gemma3ForConditionalGeneration, SiglipModel

    from medgemma_deploy.dev.testmodels import make_test_models

    out = Path(out)
    tiny = make_test_models(out / "tiny-source", seed=seed)
    configs = full_size_configs(tiny, variant, medgemma_layers=medgemma_layers)
    made: dict[str, Path] = {}
    for kind, model_class in (("medsiglip", SiglipModel), ("medgemma", Gemma3ForConditionalGeneration)):
        if kind not in kinds:
            continue
        started = time.perf_counter()
        target = out / kind
        shutil.copytree(tiny[kind], target, dirs_exist_ok=True)
        (target / "model.safetensors").unlink(missing_ok=True)
        torch.manual_seed(seed)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(device):
                model = model_class(configs[kind]).eval()
        finally:
            torch.set_default_dtype(previous)
        model.save_pretrained(target, safe_serialization=True)
        n_parameters = sum(p.numel() for p in model.parameters())
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        _set_image_sizes(target, kind)
        if kind == "medgemma":
            _widen_vocabulary(target / "tokenizer.json", _GEMMA_COMMON["vocab_size"])
        shape = "448" if kind == "medsiglip" else variant
        if kind == "medgemma" and medgemma_layers:
            shape += f"-{medgemma_layers}layers"
        marker = {
            "name": f"medgemma-deploy/full-size-random-{kind}-{shape}",
            "version": f"random-seed{seed}",
            "random_weights": True,
        }
        (target / "medgemma_deploy_model.json").write_text(json.dumps(marker, indent=2) + "\n")
        logger.info(
            "%s: %.2fB random parameters written to %s in %.0f s",
            kind,
            n_parameters / 1e9,
            target,
            time.perf_counter() - started,
        )
        made[kind] = target
    return made


def _set_image_sizes(target: Path, kind: str) -> None:
    size = MEDSIGLIP_448_SHAPE["image_size"] if kind == "medsiglip" else _GEMMA_VISION["image_size"]
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = target / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        holder = data.get("image_processor", data)
        holder["size"] = {"height": size, "width": size}
        if "image_seq_length" in data:
            data["image_seq_length"] = _MM_TOKENS
        path.write_text(json.dumps(data, indent=2) + "\n")


def _widen_vocabulary(tokenizer_file: Path, size: int) -> None:
    """Give every id below ``size`` a piece (``▁tok<ID>``), so any generated id decodes to text."""
    data = json.loads(tokenizer_file.read_text())
    vocab: dict[str, int] = data["model"]["vocab"]
    used = set(vocab.values()) | {token["id"] for token in data.get("added_tokens", [])}
    for token_id in range(size):
        if token_id not in used:
            vocab[f"\u2581tok{token_id}"] = token_id
    tokenizer_file.write_text(json.dumps(data, ensure_ascii=False))
