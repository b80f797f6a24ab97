"""A persistent, verified cache of label sets' prompt embeddings, so a fresh process skips the text tower.

Every MONAI Deploy app run is a fresh process per study. Encoding a label set's prompts (52 for the
chest set) through MedSigLIP's 27-layer text tower costs several image forward passes on a CPU,
and the result depends only on the model, the prompts and the precision. So the runner keeps the
encoded means (:class:`~medgemma_deploy.operators.medsiglip.runner.TextEmbeddings`) in one ``.npz`` file
per (model, label set, precision) under the cache directory, and a later process reads them back.

A cached value is used only when all of these hold, otherwise it is re-encoded and rewritten (a
WARNING names the file and the reason):

- the file's name is the digest of its key (:func:`cache_key`: model name, version and
  ``config.json`` digest, the label set's name, version and prompts digest, the precision, the
  text length, this format's version), and the key stored inside equals the expected key exactly;
- the arrays' SHA-256, stored beside them, matches (a truncated or altered file is caught);
- the shapes fit the label set and the model;
- the **probe**: the embedding of a fixed prompt, stored with the entry, equals (within
  :data:`PROBE_TOLERANCE`) what the loaded model gives for it right now (the runner computes it
  in its warm-up, so this costs nothing). Weights replaced under an unchanged version string are
  caught here.

Files are written atomically (a temporary file renamed), never with pickle, and read with
``allow_pickle=False``. A directory that cannot be written is reported once and the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medgemma_deploy.domain import LabelSet

__all__ = [
    "CACHE_DIR_ENV",
    "PROBE_TEXT",
    "PROBE_TOLERANCE",
    "CachedTextEmbeddings",
    "TextEmbeddingCache",
    "cache_key",
    "default_cache_dir",
    "label_set_digest",
]

logger = logging.getLogger(__name__)

#: The environment variable of the cache directory (the ``cache_dir`` setting).
CACHE_DIR_ENV = "MEDGEMMA_DEPLOY_CACHE_DIR"
#: The prompt whose embedding verifies an entry against the loaded model (module docstring).
PROBE_TEXT = "a chest x-ray"
#: Largest difference allowed between the cached and the fresh probe embedding (unit vectors):
#: the same model on another CPU differs by float rounding (about 1e-6), another model by far more.
PROBE_TOLERANCE = 1e-3
_FORMAT = 1
_ARRAYS = ("positive", "negative", "has_negative", "probe")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/medgemma-deploy``, else ``~/.cache/medgemma-deploy``."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "medgemma-deploy"


def label_set_digest(label_set: LabelSet) -> str:
    """SHA-256 of what the embeddings depend on: each finding's key and its prompts, in order."""
    content = [
        [finding.key, list(finding.positive_prompts), list(finding.negative_prompts)]
        for finding in label_set.findings
    ]
    return hashlib.sha256(json.dumps(content, ensure_ascii=False).encode()).hexdigest()


def cache_key(
    *,
    model_name: str,
    model_version: str,
    config_digest: str,
    label_set: LabelSet,
    precision: str,
    text_length: int,
) -> dict[str, Any]:
    """Everything an entry depends on; the file name is its digest and the file holds it in full."""
    return {
        "format": _FORMAT,
        "model_name": model_name,
        "model_version": model_version,
        "config_digest": config_digest,
        "label_set": label_set.name,
        "label_set_version": label_set.version,
        "label_set_digest": label_set_digest(label_set),
        "precision": precision,
        "text_length": text_length,
    }


@dataclass(frozen=True)
class CachedTextEmbeddings:
    """One entry's arrays (float32 means per finding and polarity, as the runner computes them)."""

    finding_keys: tuple[str, ...]
    positive: np.ndarray
    negative: np.ndarray
    has_negative: np.ndarray
    n_prompts: int


class TextEmbeddingCache:
    """Entries under ``directory`` (module docstring); :meth:`load` verifies, :meth:`store` writes.

    Parameters
    ----------
    directory:
        Where the ``.npz`` files live (created on the first :meth:`store`).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._write_failed = False

    def path_for(self, key: dict[str, Any]) -> Path:
        """The file of ``key``: the first 32 hex digits of its SHA-256, with the label set's name."""
        digest = hashlib.sha256(_canonical(key).encode()).hexdigest()[:32]
        safe_name = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(key["label_set"]))
        return self.directory / f"{safe_name}-{digest}.npz"

    def load(self, key: dict[str, Any], probe: np.ndarray, n_findings: int) -> CachedTextEmbeddings | None:
        """The verified entry of ``key``, or None when there is none or it fails a check (logged).

        ``probe`` is the loaded model's embedding of :data:`PROBE_TEXT`; ``n_findings`` the label
        set's number of findings.
        """
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            entry = self._read_verified(path, key, probe, n_findings)
        except _RejectedError as exc:
            logger.warning("text-embedding cache %s: %s; re-encoding the prompts", path, exc)
            return None
        logger.info(
            "label set %s %s: prompt embeddings read from %s",
            key["label_set"],
            key["label_set_version"],
            path,
        )
        return entry

    def store(self, key: dict[str, Any], entry: CachedTextEmbeddings, probe: np.ndarray) -> Path | None:
        """Write ``entry`` atomically; returns its path, or None when the directory is not writable."""
        path = self.path_for(key)
        arrays = {
            "positive": np.ascontiguousarray(entry.positive, dtype=np.float32),
            "negative": np.ascontiguousarray(entry.negative, dtype=np.float32),
            "has_negative": np.ascontiguousarray(entry.has_negative, dtype=np.bool_),
            "probe": np.ascontiguousarray(probe, dtype=np.float32),
        }
        meta = {
            "key": key,
            "finding_keys": list(entry.finding_keys),
            "n_prompts": entry.n_prompts,
            "sha256": _arrays_digest(arrays),
        }
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".npz")
            try:
                with os.fdopen(handle, "wb") as stream:
                    np.savez(stream, meta=np.array(json.dumps(meta)), **arrays)
                os.replace(temporary, path)
            finally:
                Path(temporary).unlink(missing_ok=True)
        except OSError as exc:
            if not self._write_failed:
                logger.warning(
                    "text-embedding cache %s cannot be written (%s): every new process will re-encode "
                    "the prompts; set MEDGEMMA_DEPLOY_CACHE_DIR to a writable folder",
                    self.directory,
                    exc.strerror or exc,
                )
                self._write_failed = True
            return None
        return path

    def _read_verified(
        self, path: Path, key: dict[str, Any], probe: np.ndarray, n_findings: int
    ) -> CachedTextEmbeddings:
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [name for name in ("meta", *_ARRAYS) if name not in data.files]
                if missing:
                    raise _RejectedError(f"arrays {missing} are missing")
                meta = json.loads(str(data["meta"]))
                arrays = {name: data[name] for name in _ARRAYS}
        except _RejectedError:
            raise
        except Exception as exc:
            raise _RejectedError(f"cannot be read ({type(exc).__name__}: {exc})") from exc
        if not isinstance(meta, dict) or meta.get("key") != key:
            raise _RejectedError("it was made for another model, label set or precision (its key differs)")
        if meta.get("sha256") != _arrays_digest(arrays):
            raise _RejectedError("its arrays do not match their SHA-256 (the file was altered or truncated)")
        positive, negative = arrays["positive"], arrays["negative"]
        dim = probe.shape[-1]
        if positive.shape != (n_findings, dim) or negative.shape != (n_findings, dim):
            raise _RejectedError(
                f"its embeddings have shape {positive.shape}, expected ({n_findings}, {dim})"
            )
        cached_probe = arrays["probe"]
        if cached_probe.shape != probe.shape:
            raise _RejectedError(f"its probe has shape {cached_probe.shape}, expected {probe.shape}")
        difference = float(np.max(np.abs(cached_probe.astype(np.float64) - probe.astype(np.float64))))
        if not difference <= PROBE_TOLERANCE:
            raise _RejectedError(
                f"the loaded model embeds the probe prompt {difference:.2g} away from the cached "
                f"embedding (more than {PROBE_TOLERANCE:g}): the weights differ from those it was made with"
            )
        return CachedTextEmbeddings(
            finding_keys=tuple(meta["finding_keys"]),
            positive=positive,
            negative=negative,
            has_negative=arrays["has_negative"].astype(bool),
            n_prompts=int(meta["n_prompts"]),
        )


class _RejectedError(Exception):
    """An entry failed a check; the message says which."""


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in _ARRAYS:
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
