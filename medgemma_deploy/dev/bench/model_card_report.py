"""The model card's recipe on one DICOM image, end to end in a fresh process: the baseline that
``time medgemma-deploy report --precision int4`` is compared with.

``python -m medgemma_deploy.dev.bench.model_card_report IMAGE.dcm MODEL_DIR [--max-new-tokens 64]``

As Google's MedGemma card: ``AutoModelForImageTextToText`` in bfloat16, the processor's chat
template with a system prompt, one user turn of text and image, ``generate(do_sample=False)``. The
DICOM pixels become an 8-bit image by a plain min-max scaling (the card starts from a PNG; our
pipeline applies the DICOM display rules instead). Prints the seconds of each step and the total.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    import numpy as np
    import pydicom
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    pixels = pydicom.dcmread(args.image).pixel_array.astype(np.float32)
    pixels = (pixels - pixels.min()) / max(float(np.ptp(pixels)), 1e-6)
    image = Image.fromarray((pixels * 255).astype(np.uint8)).convert("RGB")
    model = AutoModelForImageTextToText.from_pretrained(args.model_dir, dtype=torch.bfloat16)
    processor = AutoProcessor.from_pretrained(args.model_dir)
    loaded = time.perf_counter()
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "You are an expert radiologist."}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Describe this X-ray"}, {"type": "image", "image": image}],
        },
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(model.device, dtype=torch.bfloat16)
    input_len = inputs["input_ids"].shape[-1]
    with torch.inference_mode():
        generation = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    decoded = processor.decode(generation[0][input_len:], skip_special_tokens=True)
    done = time.perf_counter()
    print(
        f"load {loaded - started:.1f} s, generate {done - loaded:.1f} s, total {done - started:.1f} s, "
        f"{generation.shape[-1] - input_len} tokens, {len(decoded)} characters"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
