"""Local Hugging Face model directories: find them, check them, and say which model they hold.

A hospital downloads ``google/medsiglip-448`` or ``google/medgemma-4b-it`` once and mounts it; a MAP
lays models out as ``/opt/holoscan/models/<name>``. ``-m`` may therefore name the model directory
itself or a models root holding ``medsiglip/`` and ``medgemma/``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Literal

from medgemma_deploy.domain import ModelIdentity
from medgemma_deploy.errors import ModelLoadError

__all__ = ["MODEL_MARKER", "ModelKind", "model_identity", "resolve_model_dir"]

ModelKind = Literal["medsiglip", "medgemma"]

#: Written by ``make-test-models`` next to ``config.json``: names the model and marks random weights.
MODEL_MARKER = "medgemma_deploy_model.json"

#: ``model_type`` values in ``config.json`` accepted for each kind of model.
_MODEL_TYPES: dict[str, tuple[str, ...]] = {
    "medsiglip": ("siglip",),
    "medgemma": ("gemma3",),
}

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def resolve_model_dir(path: str | Path, kind: ModelKind) -> Path:
    """Return the model directory of ``kind`` given the directory itself or a models root.

    Raises
    ------
    ModelLoadError
        The path does not exist, or neither it nor ``path/kind`` holds a ``config.json`` whose
        ``model_type`` is one ``kind`` accepts.
    """
    root = Path(path)
    if not root.exists():
        raise ModelLoadError(f"model path {root} does not exist")
    candidates = [root, root / kind]
    for candidate in candidates:
        config_file = candidate / "config.json"
        if not config_file.is_file():
            continue
        model_type = _read_config(config_file).get("model_type")
        if model_type in _MODEL_TYPES[kind]:
            return candidate
        if candidate == root and (root / kind / "config.json").is_file():
            continue
        raise ModelLoadError(
            f"{config_file}: model_type is {model_type!r}, a {kind} model needs "
            f"{' or '.join(map(repr, _MODEL_TYPES[kind]))}"
        )
    raise ModelLoadError(f"{root} is not a {kind} model directory: no config.json in it or in {root / kind}")


def model_identity(model_dir: str | Path) -> ModelIdentity:
    """Name and version of the model in ``model_dir``.

    The version is, in order of preference: the marker file's version, the Hub commit recorded by
    ``huggingface-cli download --local-dir`` (``.cache/huggingface/download/*.metadata``), the
    ``snapshots/<commit>`` folder of a Hub cache, else ``config-<sha256 of config.json>[:12]`` so
    two different models never share a version string.
    """
    model_dir = Path(model_dir)
    config = _read_config(model_dir / "config.json")
    marker_file = model_dir / MODEL_MARKER
    if marker_file.is_file():
        marker = json.loads(marker_file.read_text())
        return ModelIdentity(
            name=str(marker["name"]),
            version=str(marker["version"]),
            path=model_dir,
            random_weights=bool(marker.get("random_weights", False)),
        )
    name = str(config.get("_name_or_path") or "") or model_dir.name
    return ModelIdentity(name=name, version=_revision(model_dir), path=model_dir)


def _revision(model_dir: Path) -> str:
    for metadata in sorted((model_dir / ".cache" / "huggingface" / "download").glob("*.metadata")):
        first_line = metadata.read_text().splitlines()[:1]
        if first_line and _COMMIT.match(first_line[0].strip()):
            return first_line[0].strip()
    if model_dir.parent.name == "snapshots" and _COMMIT.match(model_dir.name):
        return model_dir.name
    digest = hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()
    return f"config-{digest[:12]}"


def _read_config(config_file: Path) -> dict:
    try:
        return json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{config_file}: cannot be read as JSON ({exc})") from exc
