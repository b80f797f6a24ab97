"""MedGemma's vision tower and projector on torch, loaded alone: the image embeddings llama.cpp decodes.

:class:`MedGemmaVision` builds transformers' own modules from the checkpoint's ``config.json``
(``vision_config``'s ``SiglipVisionModel`` and ``Gemma3MultiModalProjector``) and fills them with the
vision tensors of the checkpoint's safetensors only, chosen by key prefix: the 8.6 GB text decoder of
MedGemma-4B is never read. :meth:`MedGemmaVision.embed` then does what
``Gemma3ForConditionalGeneration.get_image_features`` does (same module code, same order of
operations), so at float32 its output equals transformers' exactly; it returns, per image, the
``mm_tokens_per_image`` rows (256 for MedGemma) that replace the prompt's image tokens.

Why torch and not llama.cpp's ``mtmd``: the SigLIP tower at 896 px is 4,096 patches through 27
layers, compute-bound on a CPU; torch's kernels (oneDNN, bfloat16 where the CPU has it natively:
:func:`~medgemma_deploy.precision.cpu_has_native_bf16`) run it several times faster than mtmd's
F16 graph (docs/performance.md, "MedGemma reports on the CPU").

Checkpoint layouts: transformers 5 saves ``vision_tower.embeddings.…``; checkpoints written
before it (``google/medgemma-4b-it``) hold ``vision_tower.vision_model.embeddings.…``; some put
``model.`` in front. All three load; a tensor the modules need and the checkpoint lacks is a
:class:`ModelLoadError` naming it.

:attr:`MedGemmaVision.sha256` digests the tensors as stored (names, dtypes, shapes, bytes, in name
order), so the SR can record which vision weights drew a report without hashing the whole checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from medgemma_deploy.errors import ModelLoadError

__all__ = ["MedGemmaVision"]

logger = logging.getLogger(__name__)

#: Key prefixes of the vision tower and the projector in a checkpoint, each with its module.
_PREFIXES = (
    ("model.vision_tower.", "tower"),
    ("vision_tower.", "tower"),
    ("model.multi_modal_projector.", "projector"),
    ("multi_modal_projector.", "projector"),
)
#: What transformers before version 5 put between ``vision_tower.`` and the tower's own names.
_LEGACY_TOWER_PREFIX = "vision_model."


class MedGemmaVision:
    """The vision tower and multimodal projector of one MedGemma checkpoint, on the CPU.

    Parameters
    ----------
    model_dir:
        The MedGemma directory (``config.json`` of ``model_type`` ``gemma3`` and its safetensors).
    dtype:
        ``"float32"`` or ``"bfloat16"``: the weights and the arithmetic. Embeddings are always
        returned as float32.

    Raises
    ------
    ModelLoadError
        ``dtype`` is neither (at construction); the config or a vision tensor is missing (at
        :meth:`load`).
    """

    def __init__(self, model_dir: Path, dtype: str = "float32") -> None:
        if dtype not in ("float32", "bfloat16"):
            raise ModelLoadError(f"{model_dir}: the vision tower runs in float32 or bfloat16, not {dtype!r}")
        self.model_dir = Path(model_dir)
        self.dtype = dtype
        self.sha256 = ""
        self.tokens_per_image = 0
        self.embedding_size = 0
        self._tower: Any = None
        self._projector: Any = None

    @property
    def is_loaded(self) -> bool:
        return self._tower is not None

    def load(self) -> MedGemmaVision:
        """Build the two modules and read their tensors (once; later calls do nothing)."""
        if self._tower is None:
            self._load()
        return self

    def _load(self) -> None:
        import torch
        from transformers import AutoConfig, AutoModel
        from transformers.initialization import no_init_weights
        from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

        started = time.perf_counter()
        try:
            config = AutoConfig.from_pretrained(self.model_dir)
            vision_config = config.vision_config
        except (OSError, ValueError, AttributeError) as exc:
            raise ModelLoadError(
                f"{self.model_dir}: config.json has no MedGemma vision_config: {exc}"
            ) from exc
        dtype = getattr(torch, self.dtype)
        keys = self._vision_keys()
        with ExitStack() as stack, torch.no_grad():
            from safetensors import safe_open

            opened = {file: stack.enter_context(safe_open(file, "pt")) for file in {f for f, _ in keys}}
            # float32 arithmetic on a bfloat16 checkpoint: the matrices stay bfloat16 in memory and
            # are widened layer by layer as they are used (exactly the float32 values loading them
            # as float32 gives, at half the memory: 0.8 instead of 1.6 GB for MedGemma-4B).
            stored_types = {opened[file].get_slice(key).get_dtype() for file, key in keys}
            storage = torch.bfloat16 if dtype == torch.float32 and stored_types == {"BF16"} else dtype
            vision_config._attn_implementation = "sdpa"  # as the runner's Gemma3ForConditionalGeneration
            previous = torch.get_default_dtype()
            torch.set_default_dtype(storage)  # build the modules in that dtype: no copy to free
            try:
                with no_init_weights():  # every parameter is read from the checkpoint below
                    tower = AutoModel.from_config(vision_config, dtype=storage)
                    projector = Gemma3MultiModalProjector(config)
            finally:
                torch.set_default_dtype(previous)
            modules = {"tower": tower, "projector": projector}
            wanted = {name: dict(module.state_dict()) for name, module in modules.items()}
            digest = hashlib.sha256()
            for file, key in keys:
                module, name = _module_name(key, wanted)
                if module is None:
                    continue
                stored = opened[file].get_tensor(key)
                target = wanted[module].pop(name)
                if tuple(target.shape) != tuple(stored.shape):
                    raise ModelLoadError(
                        f"{file}: {key} has shape {tuple(stored.shape)}, config.json's vision_config "
                        f"needs {tuple(target.shape)}"
                    )
                digest.update(f"{key} {stored.dtype} {tuple(stored.shape)}\n".encode())
                digest.update(stored.contiguous().view(torch.uint8).numpy().data)
                target.copy_(stored)
                del stored
        missing = [f"{module}: {name}" for module, names in wanted.items() for name in names]
        # Non-persistent buffers (SigLIP's position ids) are built by the constructor, not stored.
        persistent = [name for name in missing if not name.endswith("position_ids")]
        if persistent:
            raise ModelLoadError(
                f"{self.model_dir}: the checkpoint lacks {len(persistent)} vision tensor(s), first "
                f"{persistent[0]}; it is not a complete MedGemma (Gemma 3 image-text) checkpoint"
            )
        if storage != dtype:
            for module in modules.values():
                _widen_as_used(module, dtype)
        tower.eval()
        projector.eval()
        self._tower, self._projector = tower, projector
        self.sha256 = digest.hexdigest()
        self.tokens_per_image = int(config.mm_tokens_per_image)
        self.embedding_size = int(config.text_config.hidden_size)
        n_parameters = sum(p.numel() for module in modules.values() for p in module.parameters())
        logger.info(
            "MedGemma vision tower and projector (%.0fM parameters, %s, matrices stored as %s) "
            "loaded from %s in %.1f s",
            n_parameters / 1e6,
            self.dtype,
            str(storage).removeprefix("torch."),
            self.model_dir,
            time.perf_counter() - started,
        )

    def _vision_keys(self) -> list[tuple[Path, str]]:
        """(file, key) of every vision tensor in the checkpoint, from its index when sharded."""
        index = self.model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            pairs = [(self.model_dir / file, key) for key, file in weight_map.items()]
        else:
            from safetensors import safe_open

            files = sorted(self.model_dir.glob("*.safetensors"))
            if not files:
                raise ModelLoadError(f"{self.model_dir}: no *.safetensors to read the vision tower from")
            pairs = []
            for file in files:
                with safe_open(file, "pt") as weights:
                    pairs += [(file, key) for key in weights.keys()]  # noqa: SIM118 (not a dict)
        return sorted(
            ((file, key) for file, key in pairs if key.startswith(tuple(p for p, _ in _PREFIXES))),
            key=lambda pair: pair[1],
        )

    def embed(self, pixel_values: np.ndarray) -> np.ndarray:
        """The projected image embeddings, float32 ``(n_images, tokens_per_image, embedding_size)``.

        ``pixel_values`` are the processor's (normalised, ``(n_images, 3, size, size)``), exactly as
        ``Gemma3ForConditionalGeneration`` receives them.
        """
        import torch

        if self._tower is None:
            raise RuntimeError(f"MedGemmaVision({self.model_dir}) is not loaded: call load()")
        dtype = getattr(torch, self.dtype)
        with torch.inference_mode():
            pixels = torch.from_numpy(np.ascontiguousarray(pixel_values)).to(dtype)
            hidden = self._tower(pixel_values=pixels, return_dict=True).last_hidden_state
            features = self._projector(hidden)
        return np.ascontiguousarray(features.float().numpy())

    def close(self) -> None:
        self._tower = self._projector = None


def _widen_as_used(module: Any, dtype: Any) -> None:
    """Keep ``module``'s linear matrices in their dtype and widen each to ``dtype`` when it is used
    (a parametrisation, so transformers' module code runs unchanged); everything else (biases,
    norms, the patch and position embeddings: 1 % of the tower) becomes ``dtype`` now."""
    import torch
    from torch.nn.utils import parametrize

    class _Widen(torch.nn.Module):
        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return weight.to(dtype)

    for child in module.modules():
        if isinstance(child, torch.nn.Linear):
            parametrize.register_parametrization(child, "weight", _Widen(), unsafe=True)
    for name, parameter in module.named_parameters():
        if not name.endswith("parametrizations.weight.original") and parameter.is_floating_point():
            parameter.data = parameter.data.to(dtype)
    for buffer in module.buffers():
        if buffer.is_floating_point():
            buffer.data = buffer.data.to(dtype)


def _module_name(key: str, wanted: dict[str, dict[str, Any]]) -> tuple[str | None, str]:
    """Which module (``tower``/``projector``) a checkpoint key belongs to, and its name there."""
    for prefix, module in _PREFIXES:
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if module == "tower" and name not in wanted[module] and name.startswith(_LEGACY_TOWER_PREFIX):
            name = name[len(_LEGACY_TOWER_PREFIX) :]
        if name in wanted[module]:
            return module, name
        return None, name  # a tensor the modules do not use (a pooling head): not loaded
    return None, key
