"""Run llama.cpp's own Hugging Face → GGUF converter on a MedGemma directory (one subprocess).

``python -m medgemma_deploy.operators.medgemma.gguf_convert CONVERTER_DIR MODEL_DIR OUT.gguf --outtype f32
[--mmproj]`` writes the text decoder (or, with ``--mmproj``, the SigLIP tower and projector) of a
``Gemma3ForConditionalGeneration`` checkpoint. It is a subprocess so that llama.cpp's ``conversion``
package and its matching ``gguf-py`` (put first on ``sys.path``) never mix with the caller's imports,
and so that a full-size conversion's memory is returned to the system when it ends.

One change to llama.cpp's converter: the vocabulary. The converter reads ``tokenizer.model``
(SentencePiece) when there is one and otherwise refuses a ``tokenizer.json`` whose pre-tokenizer
it does not know (the case of the tiny test model and the full-size benchmark model). Our runner
tokenizes with the checkpoint's own processor and hands llama.cpp token ids, so llama.cpp only
needs the pieces, their kinds and the special ids: :func:`_hf_vocab` writes them from the
Hugging Face tokenizer as a SentencePiece-style (``llama``) vocabulary.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]

#: llama.cpp's SentencePiece token kinds (gguf ``TokenType``): normal, unknown, control, byte.
_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6


def _hf_vocab(model_dir: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """Pieces, scores and kinds of the checkpoint's tokenizer, padded to ``vocab_size`` rows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pieces = [f"[PAD{index}]".encode() for index in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    kinds = [_CONTROL] * vocab_size
    special = set(tokenizer.all_special_ids)
    for piece, index in tokenizer.get_vocab().items():
        if index >= vocab_size:
            continue
        pieces[index] = piece.encode("utf-8")
        scores[index] = -float(index)
        if index == tokenizer.unk_token_id:
            kinds[index] = _UNKNOWN
        elif index in special or (piece.startswith("<") and piece.endswith(">") and "_of_" in piece):
            kinds[index] = _CONTROL
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            kinds[index] = _BYTE
        else:
            kinds[index] = _NORMAL
    return pieces, scores, kinds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("converter_dir", type=Path, help="llama.cpp's directory with convert_hf_to_gguf.py")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("outfile", type=Path)
    parser.add_argument("--outtype", default="f32", choices=("f32", "f16", "bf16", "q8_0"))
    parser.add_argument("--mmproj", action="store_true", help="write the vision tower and projector")
    args = parser.parse_args(argv)

    sys.path[:0] = [str(args.converter_dir / "gguf-py"), str(args.converter_dir)]
    import gguf
    import torch
    from conversion import ModelBase, ModelType, get_model_class  # type: ignore[import-not-found]

    hparams = ModelBase.load_hparams(args.model_dir, False)
    model_type = ModelType.MMPROJ if args.mmproj else ModelType.TEXT
    base: Any = get_model_class("Gemma3ForConditionalGeneration", mmproj=args.mmproj)
    outtypes = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }

    class _Gemma3(base):  # type: ignore[misc, valid-type]
        model_arch = base.model_arch

        @classmethod
        def filter_tensors(cls, item: tuple[str, Any]) -> tuple[str, Any] | None:
            # transformers 5 saves the SigLIP tower without its ``vision_model.`` level; llama.cpp's
            # tensor map knows the names of transformers 4 checkpoints (Google's release).
            name, generator = item
            if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
                name = "vision_tower.vision_model." + name.removeprefix("vision_tower.")
            return super().filter_tensors((name, generator))

        def set_gguf_parameters(self) -> None:
            super().set_gguf_parameters()
            layer_types = self.hparams.get("layer_types")
            if model_type == ModelType.TEXT and layer_types:
                # llama.cpp assumes Gemma 3's 5:1 sliding/global pattern unless told; a checkpoint
                # lists its own (the tiny test model alternates 1:1).
                self.gguf_writer.add_sliding_window_pattern(
                    [kind == "sliding_attention" for kind in layer_types]
                )

        def set_vocab(self) -> None:
            if model_type == ModelType.MMPROJ or (self.dir_model / "tokenizer.model").is_file():
                super().set_vocab()
                return
            text = hparams.get("text_config", hparams)
            pieces, scores, kinds = _hf_vocab(self.dir_model, int(text["vocab_size"]))
            self.gguf_writer.add_tokenizer_model("llama")
            self.gguf_writer.add_tokenizer_pre("default")
            self.gguf_writer.add_token_list(pieces)
            self.gguf_writer.add_token_scores(scores)
            self.gguf_writer.add_token_types(kinds)
            gguf.SpecialVocab(self.dir_model, n_vocab=len(pieces)).add_to_gguf(self.gguf_writer)
            self.gguf_writer.add_add_space_prefix(False)

    _Gemma3.__name__ = base.__name__
    with torch.inference_mode():
        model = _Gemma3(args.model_dir, outtypes[args.outtype], args.outfile)
        model.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
