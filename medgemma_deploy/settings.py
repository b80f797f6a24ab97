"""Run settings, resolved once from one table: CLI flag > environment > YAML file > default.

Like MONAI Deploy's ``RuntimeEnv`` (``HOLOSCAN_INPUT_PATH`` & co.), every setting has one
environment variable and one default, so a MAP, a compose file or a Kubernetes ConfigMap can set it
without touching the command line. ``MEDGEMMA_DEPLOY_CONFIG`` may name a YAML file whose keys are the
setting names below.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from medgemma_deploy.errors import UsageError
from medgemma_deploy.precision import PRECISIONS

__all__ = ["SETTINGS_TABLE", "RunSettings", "resolve_settings"]

logger = logging.getLogger(__name__)

#: setting name → (environment variable, default). Paths lists use os.pathsep in the environment.
SETTINGS_TABLE: dict[str, tuple[str, Any]] = {
    "backend": ("MEDGEMMA_DEPLOY_BACKEND", "local"),
    "device": ("MEDGEMMA_DEPLOY_DEVICE", None),
    # Numeric precision of both models (medgemma_deploy/precision.py); each runner maps it to its device.
    "precision": ("MEDGEMMA_DEPLOY_PRECISION", "auto"),
    "labels": ("MEDGEMMA_DEPLOY_LABELS", ()),
    "relevance_top_k": ("MEDGEMMA_DEPLOY_RELEVANCE_TOP_K", 3),
    "relevance_format": ("MEDGEMMA_DEPLOY_RELEVANCE_FORMAT", "both"),
    "write_embeddings": ("MEDGEMMA_DEPLOY_EMBEDDINGS", False),
    "prompts": ("MEDGEMMA_DEPLOY_PROMPTS", None),
    "max_new_tokens": ("MEDGEMMA_DEPLOY_MAX_NEW_TOKENS", 512),
    "with_findings": ("MEDGEMMA_DEPLOY_WITH_FINDINGS", False),
    "index": ("MEDGEMMA_DEPLOY_INDEX", False),
    "store": ("MEDGEMMA_DEPLOY_STORE", "sqlite:///medgemma-index.db"),
    # The memory budget (operators/dicom_input/pixels.py MemoryBudget), checked from headers before
    # any decode.
    "max_frame_megapixels": ("MEDGEMMA_DEPLOY_MAX_FRAME_MEGAPIXELS", 20),
    "max_series_frames": ("MEDGEMMA_DEPLOY_MAX_SERIES_FRAMES", 2000),
    "max_series_decoded_mib": ("MEDGEMMA_DEPLOY_MAX_SERIES_DECODED_MIB", 176),
    # Label sets' prompt embeddings persist here between processes (operators/medsiglip/text_cache.py);
    # None: $XDG_CACHE_HOME/medgemma-deploy, else ~/.cache/medgemma-deploy.
    "cache_dir": ("MEDGEMMA_DEPLOY_CACHE_DIR", None),
}
CONFIG_ENV = "MEDGEMMA_DEPLOY_CONFIG"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class RunSettings:
    """The resolved settings of one run (logged at start-up; holds no secrets)."""

    backend: str = "local"
    device: str | None = None
    precision: str = "auto"
    labels: tuple[Path, ...] = ()
    relevance_top_k: int = 3
    relevance_format: str = "both"
    write_embeddings: bool = False
    prompts: Path | None = None
    max_new_tokens: int = 512
    with_findings: bool = False
    index: bool = False
    # Not in the logged repr: a PostgreSQL URL may carry a password.
    store: str = field(default="sqlite:///medgemma-index.db", repr=False)
    max_frame_megapixels: int = 20
    max_series_frames: int = 2000
    max_series_decoded_mib: int = 176
    cache_dir: Path | None = None


def resolve_settings(
    cli: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> RunSettings:
    """Resolve every setting by precedence: CLI value (not None) > environment > YAML > default.

    Raises
    ------
    UsageError
        A value cannot be converted (naming the setting, its source and the value), or the YAML
        file named by ``MEDGEMMA_DEPLOY_CONFIG`` is missing, unreadable or has unknown keys.
    """
    cli = cli or {}
    environ = os.environ if environ is None else environ
    from_yaml = _read_yaml(environ.get(CONFIG_ENV))
    values: dict[str, Any] = {}
    for name, (env_var, default) in SETTINGS_TABLE.items():
        if cli.get(name) is not None:
            raw, source = cli[name], f"--{name.replace('_', '-')}"
        elif environ.get(env_var) not in (None, ""):
            raw, source = environ[env_var], env_var
        elif name in from_yaml:
            raw, source = from_yaml[name], f"{environ.get(CONFIG_ENV)}:{name}"
        else:
            values[name] = default
            continue
        values[name] = _convert(name, raw, source)
    settings = RunSettings(**values)
    if settings.backend != "local" and not settings.backend.startswith(("grpc://", "grpcs://")):
        raise UsageError(
            f"backend must be local, grpc://HOST:PORT or grpcs://HOST:PORT, got {settings.backend!r}"
        )
    if settings.device not in (None, "cpu", "cuda") and not str(settings.device).startswith("cuda:"):
        raise UsageError(f"device must be cpu, cuda or cuda:N, got {settings.device!r}")
    if settings.precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {settings.precision!r}")
    if settings.relevance_top_k < 0:
        raise UsageError(f"relevance_top_k must be >= 0, got {settings.relevance_top_k}")
    if settings.relevance_format not in ("seg", "pmap", "both"):
        raise UsageError(f"relevance_format must be seg, pmap or both, got {settings.relevance_format!r}")
    if settings.max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be >= 1, got {settings.max_new_tokens}")
    for name in ("max_frame_megapixels", "max_series_frames", "max_series_decoded_mib"):
        if getattr(settings, name) < 1:
            raise UsageError(f"{name} must be >= 1, got {getattr(settings, name)}")
    logger.debug("settings: %s", settings)
    return settings


def _convert(name: str, raw: Any, source: str) -> Any:
    field_type = {f.name: f.type for f in fields(RunSettings)}[name]
    try:
        if "bool" in str(field_type):
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in _TRUE | _FALSE:
                return text in _TRUE
            raise ValueError("expected true/false")
        if "int" in str(field_type):
            return int(raw)
        if str(field_type).startswith("tuple[Path"):
            items = raw.split(os.pathsep) if isinstance(raw, str) else list(raw)
            return tuple(Path(item) for item in items if str(item))
        if "Path" in str(field_type):
            return Path(raw)
        return None if raw is None else str(raw)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{source}: invalid value {raw!r} for {name} ({exc})") from exc


def _read_yaml(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"{CONFIG_ENV}={path}: cannot read settings ({exc})") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{path}: settings must be a mapping of setting names to values")
    unknown = sorted(set(data) - set(SETTINGS_TABLE))
    if unknown:
        known = ", ".join(SETTINGS_TABLE)
        raise UsageError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {known}")
    return data
