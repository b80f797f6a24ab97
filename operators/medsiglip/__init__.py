"""MedSigLIP: zero-shot findings, image embeddings and relevance maps.

:mod:`.preprocess` (Google's recipe on torch), :mod:`.runner` (load → score → close, text
embeddings, the runner factory), :mod:`.relevance` (patch-token maps), :mod:`.labels` (label sets in
YAML), :mod:`.classification` (a series' findings), :mod:`.text_cache` (persisted prompt
embeddings), :mod:`.onnx_vision` (the int8 vision tower on ONNX Runtime), :mod:`.operator` (MONAI
Deploy).
"""

from medgemma_deploy.exports import public_names

#: public name → the module that defines it
_HOMES = {
    "MAX_PADDED_SIDE": "preprocess",
    "PREPROCESSOR_CONFIG": "preprocess",
    "MedSigLIPPreprocessor": "preprocess",
    "PadGeometry": "preprocess",
    "PreprocessedBatch": "preprocess",
    "MedSigLIPRunner": "runner",
    "RunnerNotLoadedError": "runner",
    "TextEmbeddings": "runner",
    "make_medsiglip_runner": "runner",
    "RelevanceGridCache": "relevance",
    "grid_key": "relevance",
    "grid_to_source": "relevance",
    "patch_embeddings": "relevance",
    "relevance_grids": "relevance",
    "CODING_SCHEMES": "labels",
    "SCORING_METHODS": "labels",
    "LabelSetError": "labels",
    "NoLabelSetError": "labels",
    "load_label_set": "labels",
    "load_label_sets": "labels",
    "packaged_label_files": "labels",
    "select_label_set": "labels",
    "classify_series": "classification",
    "relevance_keys": "classification",
    "CACHE_DIR_ENV": "text_cache",
    "PROBE_TEXT": "text_cache",
    "PROBE_TOLERANCE": "text_cache",
    "CachedTextEmbeddings": "text_cache",
    "TextEmbeddingCache": "text_cache",
    "cache_key": "text_cache",
    "default_cache_dir": "text_cache",
    "label_set_digest": "text_cache",
    "INT8_EXTRA": "onnx_vision",
    "OnnxVisionTower": "onnx_vision",
    "VisionTowerGraph": "onnx_vision",
    "require_onnxruntime": "onnx_vision",
}

__all__ = sorted(_HOMES)
__getattr__, __dir__ = public_names(__name__, _HOMES)
