"""Search as one object over a store and a loaded MedSigLIP: text or example image in, hits out.

The CLI (``medgemma-deploy search``) and the HTTP server (:mod:`.web`) call the same
:class:`SearchService`, so a query gives the same hits from the terminal and from a viewer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from medgemma_deploy.errors import UsageError
from medgemma_deploy.search.records import SearchFilters, SearchHit
from medgemma_deploy.search.store import VectorStore

__all__ = ["MAX_TOP", "SearchService", "like_embedding"]

logger = logging.getLogger(__name__)

#: Upper bound of ``--top``: a results page, not an export.
MAX_TOP = 1000


class SearchService:
    """Queries against ``store`` with ``model`` (local runner or worker client, already loaded).

    The model's identity must match rows in the index (:meth:`VectorStore.check_model`), checked
    once here so a mismatch is refused before any query.
    """

    def __init__(self, store: VectorStore, model: Any) -> None:
        self.store = store
        self.model = model
        identity = model.identity
        self.model_name, self.model_version = identity.name, identity.version
        self.rows = store.check_model(self.model_name, self.model_version)

    def check_filters(self, filters: SearchFilters) -> None:
        """Refuse finding filters on keys the index has no probabilities for (a usage error)."""
        if not filters.findings:
            return
        known = self.store.finding_keys(self.model_name, self.model_version)
        unknown = sorted({f.key for f in filters.findings} - known)
        if unknown:
            raise UsageError(
                f"unknown finding filter {', '.join(unknown)}; "
                f"the index has {', '.join(sorted(known)) or 'none'}"
            )

    def text_embedding(self, text: str) -> np.ndarray:
        """The query text through MedSigLIP's text tower."""
        if not text or not text.strip():
            raise UsageError("the search text is empty")
        # In process or through the worker's EmbedText: the same text tower either way.
        return np.asarray(self.model.embed_texts([text.strip()])[0], np.float32)

    def search_text(self, text: str, filters: SearchFilters | None = None, top: int = 20) -> list[SearchHit]:
        return self.search_vector(self.text_embedding(text), filters, top)

    def search_like(self, path: Path, filters: SearchFilters | None = None, top: int = 20) -> list[SearchHit]:
        return self.search_vector(like_embedding(self.model, path), filters, top)

    def search_vector(
        self, vector: np.ndarray, filters: SearchFilters | None = None, top: int = 20
    ) -> list[SearchHit]:
        filters = filters or SearchFilters()
        if not 1 <= top <= MAX_TOP:
            raise UsageError(f"--top must be between 1 and {MAX_TOP}, got {top}")
        self.check_filters(filters)
        return self.store.search(
            vector, model_name=self.model_name, model_version=self.model_version, filters=filters, top=top
        )


def like_embedding(model: Any, path: Path) -> np.ndarray:
    """The embedding of an example DICOM image, read and windowed exactly as ``classify`` does.

    A multi-frame instance uses its first frame. Raises UsageError naming the file and the reason
    when it is not a usable image.
    """
    from medgemma_deploy.operators.dicom_input.reader import load_study_input

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--like {path}: not a file")
    study_input = load_study_input(path)
    frames = [frame for study in study_input.studies for series in study.series for frame in series.frames]
    if not frames:
        problems = study_input.rejected + study_input.skipped
        reason = problems[0].reason if problems else "no image frames"
        raise UsageError(f"--like {path}: {reason}")
    return np.asarray(model.embed_images([frames[0].display])[0], np.float32)
