"""MedGemma: draft reports from a series' images.

:mod:`.prompts` (the prompt book), :mod:`.request` (images and prompt of one series), :mod:`.runner`
(transformers: the model and its rules, decoded by ``worker/engine/report_service.py``),
:mod:`.gguf_runner` with :mod:`.gguf_weights`, :mod:`.gguf_convert` and :mod:`.torch_vision`
(llama.cpp at 8 and 4 bits, its images embedded on torch), :mod:`.runners` (the runner factory),
:mod:`.generation` (prompt inputs, token budget and sampling rules every engine shares, and
the runners' base), :mod:`.text` (report sections), :mod:`.operator` (MONAI Deploy).
"""

from medgemma_deploy.exports import public_names

#: public name → the module that defines it
_HOMES = {
    "PromptBook": "prompts",
    "PromptSpec": "prompts",
    "Rendering": "prompts",
    "CT_WINDOWS": "request",
    "build_report_request": "request",
    "render_ct_three_window": "request",
    "sample_evenly": "request",
    "MedGemmaRunner": "runner",
    "PRECISION_WEIGHT_TYPES": "gguf_runner",
    "GgufMedGemmaRunner": "gguf_runner",
    "LOWBIT_HINT": "gguf_weights",
    "WEIGHT_TYPES": "gguf_weights",
    "GgufWeights": "gguf_weights",
    "converter_dir": "gguf_weights",
    "require_lowbit": "gguf_weights",
    "MedGemmaVision": "torch_vision",
    "LOW_BIT": "runners",
    "make_medgemma_runner": "runners",
    "SAMPLING_OPTIONS": "generation",
    "MedGemmaRules": "generation",
    "chat_inputs": "generation",
    "dtype_name": "generation",
    "eos_ids": "generation",
    "fill_sampling_defaults": "generation",
    "fit_token_budget": "generation",
    "ReportSections": "text",
    "clean_report_text": "text",
    "split_report": "text",
}

__all__ = sorted(_HOMES)
__getattr__, __dir__ = public_names(__name__, _HOMES)
