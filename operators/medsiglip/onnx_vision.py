"""MedSigLIP's vision tower with int8 weights on ONNX Runtime: ``--precision int8`` on a CPU.

Why this path: ``torch.ao.quantization.quantize_dynamic`` is gone from torch ≥ 2.10, and torchao's
eager int8 was several times *slower* than float32 here. ONNX Runtime's dynamic quantisation
(``onnxruntime.quantization.quantize_dynamic``: int8 weights per output channel, activations
quantised per batch at run time, VNNI/AMX integer kernels) measured 3.1× faster than the float32
vision tower on MedSigLIP-448 shapes, with image embeddings at cosine 0.9998 of float32
(``docs/performance.md``, "MedSigLIP precision"). On a CPU with native bfloat16 (AMX), ``bf16``
is faster still and needs no extra; ``int8`` is for CPUs with VNNI but without it.

Only the vision tower runs here, and only its heavy part: the session returns the pooled
embedding and the patch tokens (``last_hidden_state``), and the runner keeps doing everything
after it in float32 torch (normalisation, the relevance maps' head path, scoring). The text tower
stays float32 torch: label sets' prompts are encoded once and persisted
(:mod:`~medgemma_deploy.operators.medsiglip.text_cache`).

The quantised model is built once per model and kept under the cache directory
(``<cache_dir>/vision-int8/``), named by the digest of its key (model name, version, ``config.json``
digest, weights size, ONNX Runtime and torch versions, recipe). Beside it a JSON file holds the key
and the model file's SHA-256; a file whose key or digest does not match is rebuilt, never used.
Building exports the float32 tower to ONNX and quantises it (about a minute for MedSigLIP-448 on two
cores), so the first ``int8`` run of a model is slow and every later process starts at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medgemma_deploy.errors import ModelLoadError

__all__ = [
    "INT8_EXTRA",
    "OnnxVisionTower",
    "VisionTowerGraph",
    "export_float_graph",
    "quantise_weights_int8",
    "require_onnxruntime",
]

logger = logging.getLogger(__name__)

#: The pip extra that carries ONNX Runtime and the ONNX exporter's dependency.
INT8_EXTRA = "cpu-int8"
_RECIPE = "onnx-opset17-dynamic-qint8-per-channel-7bit-const-matmul"
_FORMAT = 1


def require_onnxruntime() -> None:
    """Refuse ``int8`` at start-up, in one line naming the extra, when ONNX Runtime is missing."""
    missing = []
    for module in ("onnxruntime", "onnx"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ModelLoadError(
            f"precision int8 needs {' and '.join(missing)}: pip install 'medgemma-deploy[{INT8_EXTRA}]' "
            "(or use --precision bf16 or fp32)"
        )


class VisionTowerGraph(torch.nn.Module):
    """What is exported: pixel values → (pooled embedding, patch tokens), both before normalisation."""

    def __init__(self, vision_model: torch.nn.Module) -> None:
        super().__init__()
        self.vision_model = vision_model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.vision_model(pixel_values=pixel_values)
        return output.pooler_output, output.last_hidden_state


class OnnxVisionTower:
    """An ONNX Runtime session of the int8 vision tower; call it like the torch tower's forward.

    Build it with :meth:`load_or_build`.
    """

    def __init__(self, session: Any, path: Path) -> None:
        self.session = session
        self.path = path

    def __call__(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pooler_output, last_hidden_state)`` of a float32 ``(n, 3, h, w)`` batch, as torch tensors."""
        inputs = np.ascontiguousarray(pixel_values.detach().to(torch.float32).cpu().numpy())
        pooled, tokens = self.session.run(None, {"pixel_values": inputs})
        return torch.from_numpy(pooled), torch.from_numpy(tokens)

    @classmethod
    def load_or_build(
        cls,
        model: torch.nn.Module,
        model_dir: Path,
        identity: Any,
        cache_dir: Path | None,
    ) -> OnnxVisionTower:
        """The verified quantised tower from ``cache_dir``, built (and kept there) when absent or bad.

        ``model`` is the loaded float32 ``SiglipModel``; ``identity`` its
        :class:`~medgemma_deploy.domain.ModelIdentity`. Without ``cache_dir`` the file is
        built in a temporary folder for this process only.

        Raises
        ------
        ModelLoadError
            ONNX Runtime is missing, or the export or the quantisation fails (the message names the
            model directory and the reason).
        """
        require_onnxruntime()
        import onnxruntime

        key = _key(model_dir, identity)
        # Without a cache directory: a folder of this process, removed once the session holds the model.
        folder = Path(tempfile.mkdtemp(prefix="medgemma-int8-")) if cache_dir is None else Path(cache_dir)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        path = folder / f"vision-{digest}.onnx"
        manifest = folder / f"vision-{digest}.json"
        reason = _verify(path, manifest, key)
        if reason is not None:
            if path.exists() or manifest.exists():
                logger.warning("int8 vision tower %s: %s; building it again", path, reason)
            _build(model, model_dir, path, manifest, key)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        try:
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ONNX Runtime raises its own untyped errors
            raise ModelLoadError(f"{path}: ONNX Runtime cannot load the int8 vision tower ({exc})") from exc
        finally:
            if cache_dir is None:
                shutil.rmtree(folder, ignore_errors=True)
        logger.info("MedSigLIP vision tower: int8 on ONNX Runtime %s from %s", onnxruntime.__version__, path)
        return cls(session, path)


def _key(model_dir: Path, identity: Any) -> dict[str, Any]:
    import onnxruntime

    weights = sorted(model_dir.glob("*.safetensors"))
    return {
        "format": _FORMAT,
        "recipe": _RECIPE,
        "model_name": identity.name,
        "model_version": identity.version,
        "config_digest": hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest(),
        "weights_bytes": sum(w.stat().st_size for w in weights),
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
    }


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path, manifest: Path, key: dict[str, Any]) -> str | None:
    """None when ``path`` is the verified build of ``key``, else the reason it is not."""
    if not path.is_file() or not manifest.is_file():
        return "not built yet"
    try:
        recorded = json.loads(manifest.read_text())
    except (OSError, ValueError) as exc:
        return f"its manifest cannot be read ({exc})"
    if not isinstance(recorded, dict) or recorded.get("key") != key:
        return "it was built for another model or library version (its key differs)"
    if recorded.get("sha256") != _file_digest(path):
        return "its SHA-256 differs from the one recorded at build time (the file was altered or truncated)"
    return None


def _build(model: torch.nn.Module, model_dir: Path, path: Path, manifest: Path, key: dict[str, Any]) -> None:
    started = time.perf_counter()
    config = model.config.vision_config
    size = int(config.image_size)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as work:
            float_path = Path(work) / "vision-fp32.onnx"
            export_float_graph(VisionTowerGraph(model.vision_model).eval(), size, float_path)
            quantised = Path(work) / "vision-int8.onnx"
            quantise_weights_int8(float_path, quantised)
            os.replace(quantised, path)
        manifest.write_text(json.dumps({"key": key, "sha256": _file_digest(path)}, indent=2) + "\n")
    except ModelLoadError:
        raise
    except Exception as exc:  # the exporter and the quantiser raise many types
        path.unlink(missing_ok=True)
        reason = " ".join(str(exc).split())
        raise ModelLoadError(
            f"{model_dir}: cannot build the int8 vision tower ({type(exc).__name__}: {reason})"
        ) from exc
    logger.info("int8 vision tower of %s built in %.0f s: %s", model_dir, time.perf_counter() - started, path)


def export_float_graph(tower: VisionTowerGraph, image_size: int, path: Path) -> None:
    """Export ``tower`` as a float32 ONNX graph with a dynamic batch axis."""
    example = torch.zeros((1, 3, image_size, image_size), dtype=torch.float32)
    with warnings.catch_warnings(), torch.inference_mode():
        # The TorchScript exporter: it needs no onnxscript, and it warns about itself.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            tower,
            (example,),
            str(path),
            input_names=["pixel_values"],
            output_names=["pooled", "tokens"],
            dynamic_axes={"pixel_values": {0: "batch"}, "pooled": {0: "batch"}, "tokens": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )


def quantise_weights_int8(float_path: Path, int8_path: Path) -> None:
    """The shipped int8 recipe: ``float_path``'s constant weights quantised, per channel, to 7 bits."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().disabled, previous = True, logging.getLogger().disabled
    try:
        # quantize_dynamic logs a pre-processing hint on the root logger at every call.
        # Weights only (every MatMul/Gemm whose second input is a constant: the projections
        # and MLPs); attention's activation × activation products stay float32. Weights use 7
        # bits (reduce_range): with onnxruntime 1.32's u8 × s8 kernels on this AVX-512 CPU,
        # 8-bit weights saturate the pairwise sums and moved the tiny test model's
        # probabilities by 0.08 (limit 0.02); 7-bit weights pass the parity tests.
        quantize_dynamic(
            float_path,
            int8_path,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,
            op_types_to_quantize=["MatMul", "Gemm"],
            extra_options={"MatMulConstBOnly": True},
        )
    finally:
        logging.getLogger().disabled = previous
