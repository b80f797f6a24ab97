"""A tiny, randomly initialised MedSigLIP saved exactly like a local copy of ``google/medsiglip-448``.

The model is the real ``transformers.SiglipModel`` class (text tower, vision tower with the
attention-pooling head, ``logit_scale`` and ``logit_bias``), written with ``save_pretrained``
(safetensors). Beside it lie what the real download holds: a SentencePiece ``spiece.model`` read by
``SiglipTokenizer`` (trained here, offline, on a fixed medical corpus), a ``preprocessor_config.json``
with the real MedSigLIP values except the image size, and the marker file that
:func:`medgemma_deploy.model_dir.model_identity` reads, which says the weights are random.

Only the sizes are shrunk so that a test runs in seconds on a CPU: 64x64 images in 8x8 patches
(an 8x8 patch grid; the real model has 448x448 in 14x14 patches, a 32x32 grid), two layers of
width 32, and 64 text positions like the real model. Code that reads the image size from the
model's own ``preprocessor_config.json`` therefore works unchanged on both.

The weights are random: every score computed with them is meaningless.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "MEDSIGLIP_PREPROCESSOR_CONFIG",
    "TEST_MEDSIGLIP_NAME",
    "make_test_medsiglip",
]

logger = logging.getLogger(__name__)

#: ``name`` in the marker file of the tiny model.
TEST_MEDSIGLIP_NAME = "medgemma-deploy/tiny-random-medsiglip"

#: ``preprocessor_config.json`` of ``google/medsiglip-448``: bilinear resize (PIL resample 2), rescale
#: by 1/255, normalise with mean = std = 0.5 (pixel values in [-1, 1]). The tiny model keeps all of
#: it but the size.
MEDSIGLIP_PREPROCESSOR_CONFIG: dict[str, Any] = {
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "SiglipImageProcessor",
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "SiglipProcessor",
    "resample": 2,
    "rescale_factor": 1 / 255,
    "size": {"height": 448, "width": 448},
}

_IMAGE_SIZE = 64
_PATCH_SIZE = 8
_TEXT_POSITIONS = 64  # like google/medsiglip-448: SigLIP text is always padded to 64 tokens
_WIDTH = 32

# The architecture of the tiny model; it enters the version string.
_ARCHITECTURE: dict[str, dict[str, int]] = {
    "text": {
        "hidden_size": _WIDTH,
        "intermediate_size": 2 * _WIDTH,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": _TEXT_POSITIONS,
        "projection_size": _WIDTH,
    },
    "vision": {
        "hidden_size": _WIDTH,
        "intermediate_size": 2 * _WIDTH,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": _IMAGE_SIZE,
        "patch_size": _PATCH_SIZE,
    },
}

# Random SigLIP weights start with logit_scale = log(1) and logit_bias = 0, which squeezes every
# probability into a narrow band around sigmoid(0). A larger scale spreads them, so that tests on
# thresholds, maxima and rankings can fail. (The real model has exp(scale) ≈ 100 and a bias ≈ -16.)
_LOGIT_SCALE = math.log(10.0)
_LOGIT_BIAS = 0.0

# The tokenizer's training text: a fixed corpus, so the tokenizer does not change when a label
# set is edited. Lower case because SiglipTokenizer lower-cases its input.
_CORPUS = (
    "a chest x-ray showing a pneumothorax",
    "a chest x-ray with no pneumothorax",
    "a chest radiograph with a pleural effusion and blunting of the costophrenic angle",
    "a chest radiograph with sharp costophrenic angles and no effusion",
    "an enlarged heart, cardiomegaly, widened cardiomediastinal silhouette",
    "normal heart size and a normal mediastinum",
    "atelectasis, consolidation, lung opacity, pulmonary edema, pneumonia",
    "clear lungs without consolidation or edema",
    "a rib fracture, a lung lesion, a pulmonary nodule or mass",
    "support devices: endotracheal tube, central line, pacemaker, chest tube",
    "pleural thickening, pleural plaque, fibrosis",
    "a ct slice of the head showing intracranial hemorrhage",
    "a ct slice showing a pulmonary embolism, emphysema, ascites, a kidney stone",
    "a normal ct scan without acute findings",
    "a dermatology photograph of a melanoma, an irregular pigmented skin lesion",
    "a benign melanocytic nevus, a seborrheic keratosis, an actinic keratosis",
    "basal cell carcinoma, squamous cell carcinoma, psoriasis plaques, eczema",
    "healthy normal skin without a lesion",
    "the image shows no abnormality; findings are within normal limits",
)


def make_test_medsiglip(out_dir: Path, *, seed: int = 0) -> Path:
    """Write the tiny random MedSigLIP into ``out_dir`` (created if needed) and return ``out_dir``.

    The result loads with ``SiglipModel.from_pretrained``, ``AutoTokenizer.from_pretrained`` and
    ``AutoProcessor.from_pretrained``, like a local copy of ``google/medsiglip-448``. It is
    deterministic for a seed: the same seed writes the same weights and the same version string
    (``random-seed<seed>-<hash>``), whose hash covers the architecture, the preprocessing, the
    tokenizer model and the weights' seed. The caller's global torch random state is left as it was.

    Parameters
    ----------
    out_dir:
        The model directory to write; files of an earlier tiny model there are overwritten.
    seed:
        Seed of the random weights.

    Returns
    -------
    Path
        ``out_dir``.
    """
    import torch
    from transformers import SiglipConfig, SiglipModel, SiglipTokenizer

    from medgemma_deploy.model_dir import MODEL_MARKER

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    spiece = _train_sentencepiece()
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file = Path(scratch) / "spiece.model"
        vocab_file.write_bytes(spiece)
        tokenizer = SiglipTokenizer(vocab_file=str(vocab_file), model_max_length=_TEXT_POSITIONS)
        tokenizer.save_pretrained(out_dir)

    config = SiglipConfig(
        text_config={
            **_ARCHITECTURE["text"],
            "vocab_size": tokenizer.vocab_size,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.eos_token_id,
        },
        vision_config=dict(_ARCHITECTURE["vision"]),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SiglipModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(_LOGIT_SCALE)
        model.logit_bias.fill_(_LOGIT_BIAS)
    model.save_pretrained(out_dir)

    preprocessor = {
        **MEDSIGLIP_PREPROCESSOR_CONFIG,
        "size": {"height": _IMAGE_SIZE, "width": _IMAGE_SIZE},
    }
    (out_dir / "preprocessor_config.json").write_text(
        json.dumps(preprocessor, indent=2, sort_keys=True) + "\n"
    )

    fingerprint = hashlib.sha256()
    fingerprint.update(json.dumps(_ARCHITECTURE, sort_keys=True).encode())
    fingerprint.update(json.dumps(preprocessor, sort_keys=True).encode())
    fingerprint.update(json.dumps([_LOGIT_SCALE, _LOGIT_BIAS]).encode())
    fingerprint.update(spiece)
    marker = {
        "name": TEST_MEDSIGLIP_NAME,
        "version": f"random-seed{seed}-{fingerprint.hexdigest()[:12]}",
        "random_weights": True,
    }
    (out_dir / MODEL_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    logger.info("wrote tiny random MedSigLIP %s to %s", marker["version"], out_dir)
    return out_dir


def _train_sentencepiece() -> bytes:
    """A small unigram SentencePiece model with SigLIP's special tokens (``</s>`` pads and ends)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS),
        model_writer=model,
        vocab_size=256,
        hard_vocab_limit=False,  # the corpus is small: take as many pieces as it yields
        model_type="unigram",
        character_coverage=1.0,
        num_threads=1,  # one thread: the same model on every run
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    return model.getvalue()
