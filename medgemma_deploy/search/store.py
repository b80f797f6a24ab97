"""One small interface over the two index stores, and the URL that picks one.

- ``sqlite:///path/index.db``: a file on disk, no server (:mod:`.sqlite_store`, apsw + sqlite-vec,
  exact search);
- ``postgresql://…``: PostgreSQL with pgvector (:mod:`.postgres_store`, HNSW, cosine distance), for
  archives too big for one file or shared between hosts.

Both keep one row per (SOP Instance UID, frame, model name, model version): indexing the same frame
again with the same model replaces its row, and a new model version adds rows beside the old ones.
A search always runs against one model's rows, because embeddings of two models do not share a space.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Iterable, Sequence
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from medgemma_deploy.errors import UsageError
from medgemma_deploy.search.records import IndexRecord, SearchFilters, SearchHit

__all__ = [
    "IndexedModel",
    "ModelMismatchError",
    "StoreError",
    "VectorStore",
    "open_store",
    "redact_url",
]

logger = logging.getLogger(__name__)

#: The embedded default when ``--store`` is not given.
DEFAULT_STORE = "sqlite:///medgemma-index.db"


class StoreError(UsageError):
    """The store cannot be opened or used (unreachable, no pgvector, bad URL): one line, exit 2."""


class ModelMismatchError(UsageError):
    """The index holds embeddings of other model versions than the one loaded."""


IndexedModel = tuple[str, str, int]
"""(model name, model version, number of rows)."""


class VectorStore(abc.ABC):
    """The index: add frames, search one model's rows, read back a hit's thumbnail."""

    url: str

    @abc.abstractmethod
    def add(self, records: Sequence[IndexRecord]) -> int:
        """Insert or replace ``records`` (one transaction); returns how many rows were written."""

    def bulk_load(self, batches: Iterable[Sequence[IndexRecord]]) -> int:
        """Add many batches at once (a back-fill, the benchmark); returns the rows written.

        The same rows as :meth:`add` batch by batch; a store may defer its index build to the end.
        """
        return sum(self.add(batch) for batch in batches)

    @abc.abstractmethod
    def search(
        self,
        vector: np.ndarray,
        *,
        model_name: str,
        model_version: str,
        filters: SearchFilters | None = None,
        top: int = 20,
    ) -> list[SearchHit]:
        """The ``top`` rows of that model most similar to ``vector`` (cosine), best first."""

    @abc.abstractmethod
    def models(self) -> list[IndexedModel]:
        """Every model whose embeddings the index holds, with its row count."""

    @abc.abstractmethod
    def finding_keys(self, model_name: str, model_version: str) -> set[str]:
        """The finding keys that model's rows carry probabilities for (to check ``--finding``)."""

    def image(self, row_id: int, kind: str) -> bytes | None:
        """A row's ``thumbnail`` or ``overlay`` PNG, or None when it has none.

        ``kind`` names a column in the stores' SQL, so it is checked here, once, for both stores.
        """
        if kind not in ("thumbnail", "overlay"):
            raise ValueError(f"image kind must be thumbnail or overlay, got {kind!r}")
        return self._image(int(row_id), kind)

    @abc.abstractmethod
    def _image(self, row_id: int, kind: str) -> bytes | None:
        """The stored ``kind`` PNG of row ``row_id`` (``kind`` already checked)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection (and, for the embedded store, the file)."""

    def check_model(self, model_name: str, model_version: str) -> int:
        """Refuse to search with a model whose embeddings the index does not hold.

        Returns that model's row count. Raises :class:`ModelMismatchError` naming the loaded model
        and the versions the index was made with, or :class:`StoreError` when the index is empty.
        """
        indexed = self.models()
        for name, version, count in indexed:
            if (name, version) == (model_name, model_version):
                return count
        if not indexed:
            raise StoreError(f"index {redact_url(self.url)} is empty: run `medgemma-deploy index` first")
        made_with = "; ".join(f"{name} version {version} ({count} rows)" for name, version, count in indexed)
        raise ModelMismatchError(
            f"index {redact_url(self.url)} was made by {made_with}, but the loaded model is "
            f"{model_name} version {model_version}; re-index with this model or load the one above"
        )

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_store(url: str | None, *, cache_vectors: bool = False) -> VectorStore:
    """The store named by ``url`` (default :data:`DEFAULT_STORE`), connected and with its schema.

    ``cache_vectors`` (long-running servers): the embedded store keeps each model's embeddings in
    memory between queries; PostgreSQL's own buffers do that job, so it ignores the flag.

    Raises
    ------
    StoreError
        Unknown scheme, missing extra, unreachable server, or PostgreSQL without pgvector; the one
        line names the (password-free) URL and what to do.
    """
    url = (url or DEFAULT_STORE).strip()
    scheme = urlsplit(url).scheme.lower()
    if scheme == "sqlite":
        from medgemma_deploy.search.sqlite_store import SQLiteStore

        return SQLiteStore.open(url, cache_vectors=cache_vectors)
    if scheme in ("postgresql", "postgres"):
        from medgemma_deploy.search.postgres_store import PostgresStore

        return PostgresStore.open(url)
    raise StoreError(
        f"store {redact_url(url)}: unknown scheme {scheme!r}; use sqlite:///PATH/index.db or "
        "postgresql://USER@HOST:PORT/DB"
    )


def redact_url(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))


def missing_extra(package: str) -> StoreError:
    """The error for a store whose Python package is not installed (pydicom-style dependency hint)."""
    return StoreError(f"the {package} package is not installed: pip install 'medgemma-deploy[search]'")
