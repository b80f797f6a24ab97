"""The embedded index: one SQLite file, searched exactly with sqlite-vec.

Python's own ``sqlite3`` cannot load extensions on this project's reference machine (it is built
without ``enable_load_extension``), so the store uses ``apsw``, which bundles its own SQLite, and
loads ``sqlite-vec`` into it. Embeddings are float32 BLOBs in an ordinary table and a search is a
filtered scan ordered by ``vec_distance_cosine``: exact (recall 1.0) and any SQL filter. On two busy
cores that scan took about 0.25 s per query at 100,000 rows of 1152 dimensions; sqlite-vec's ``vec0``
table was barely faster (about 0.19 s), twenty times slower to fill (15 s against 0.7 s), and cannot
filter on a findings column of varying keys. A long-running server opens the store with
``cache_vectors=True`` instead: each model's embeddings stay in memory as one matrix and a query is
one matrix product, still exact (figures: ``medgemma_deploy/dev/bench/search_dev/bench.py``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from medgemma_deploy.search.records import HIT_COLUMNS, IndexRecord, SearchHit, SearchQuery
from medgemma_deploy.search.store import SQLITE, SQLTableStore, StoreError, missing_extra

__all__ = ["SQLiteStore"]

logger = logging.getLogger(__name__)

_HIT_COLUMNS = ", ".join(HIT_COLUMNS)


@dataclass(frozen=True)
class _VectorMatrix:
    """One model's embeddings in row-id order, and the database state they were read at."""

    version: tuple[int, int]
    row_ids: np.ndarray
    vectors: np.ndarray
    norms: np.ndarray


def _where(query: SearchQuery) -> tuple[str, list[Any]]:
    """The WHERE clause of a search and its parameters (the model first, then the filters)."""
    clauses, params = SQLITE.filter_clauses(query.filters)
    return " AND ".join([SQLITE.of_model, *clauses]), [query.model_name, query.model_version, *params]


class SQLiteStore(SQLTableStore):
    """The index in one SQLite file (see the module docstring). Use :meth:`open`."""

    dialect = SQLITE

    def __init__(self, url: str, path: Path, connection: Any, *, cache_vectors: bool = False) -> None:
        self.url = url
        self.path = path
        self.cache_vectors = cache_vectors
        self._connection = connection
        # apsw connections may be shared between threads, but one statement at a time keeps the
        # HTTP server's concurrent requests from interleaving cursors.
        self._lock = threading.Lock()
        self._own_changes = 0
        self._matrices: dict[tuple[str, str], _VectorMatrix] = {}

    @classmethod
    def open(cls, url: str, *, cache_vectors: bool = False) -> SQLiteStore:
        """Open (creating if needed) the file named by ``sqlite:///PATH``.

        ``cache_vectors``: keep each searched model's embeddings in memory as one matrix (4 bytes
        per dimension and row: 460 MB for 100,000 MedSigLIP rows), reloaded when the file changes,
        so a long-running server ranks with one matrix product instead of a table scan per query.
        The results are the same exact ranking.
        """
        parts = urlsplit(url)
        path_text = unquote(parts.path)
        if parts.netloc or not path_text or path_text == "/":
            raise StoreError(
                f"store {url}: expected sqlite:///PATH/index.db (a file path after three slashes)"
            )
        path = Path(path_text)
        if not path.parent.is_dir():
            raise StoreError(f"store {url}: folder {path.parent} does not exist")
        try:
            import apsw
            import sqlite_vec
        except ModuleNotFoundError as exc:
            raise missing_extra(exc.name or "apsw") from exc
        try:
            connection = apsw.Connection(str(path))
            connection.enable_load_extension(True)
            connection.load_extension(sqlite_vec.loadable_path())
            connection.enable_load_extension(False)
            connection.setbusytimeout(10_000)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(SQLITE.create_table())
        except apsw.Error as exc:
            raise StoreError(f"store {url}: cannot open {path} as an index ({exc})") from exc
        return cls(url, path, connection, cache_vectors=cache_vectors)

    def add(self, records: Sequence[IndexRecord]) -> int:
        rows = [r.row_values(lambda embedding: embedding.astype(np.float32).tobytes()) for r in records]
        with self._lock, self._connection:
            self._check_dimension(records)
            self._connection.executemany(SQLITE.upsert(), rows)
            self._own_changes += 1
        return len(rows)

    def _search(self, query: SearchQuery) -> list[SearchHit]:
        where, params = _where(query)
        with self._lock:
            if self.cache_vectors:
                return self._search_matrix(query, where, params)
            rows = list(
                self._connection.execute(
                    SQLITE.nearest("vec_distance_cosine(embedding, ?)", where),
                    [query.vector.tobytes(), *params, query.top],
                )
            )
        return [SearchHit.from_distance_row(row) for row in rows]

    def _search_matrix(self, query: SearchQuery, where: str, params: list[Any]) -> list[SearchHit]:
        """Exact ranking with the cached matrix; the filters still run in SQL, on the metadata only."""
        matrix = self._matrix(query.model_name, query.model_version)
        if matrix.row_ids.size == 0:
            return []
        vector = query.vector
        norm = float(np.linalg.norm(vector)) or 1.0
        if len(params) > 2:  # filters beyond the model: rank only the rows SQL lets through
            allowed = np.fromiter(
                (
                    row[0]
                    for row in self._connection.execute(
                        f"SELECT row_id FROM index_rows WHERE {where}", params
                    )
                ),
                np.int64,
            )
            positions = np.searchsorted(matrix.row_ids, np.sort(allowed))
            scores = (matrix.vectors[positions] @ vector) / (matrix.norms[positions] * norm)
        else:
            # No copy of the matrix: all rows, in row-id order.
            positions = None
            scores = (matrix.vectors @ vector) / (matrix.norms * norm)
        if scores.size == 0:
            return []
        count = min(query.top, scores.size)
        best = np.argpartition(-scores, count - 1)[:count]
        best = best[np.argsort(-scores[best], kind="stable")]
        rows = best if positions is None else positions[best]
        ids = [int(matrix.row_ids[i]) for i in rows]
        found = {
            row[0]: row
            for row in self._connection.execute(
                f"SELECT {_HIT_COLUMNS} FROM index_rows WHERE row_id IN ({', '.join('?' * len(ids))})", ids
            )
        }
        return [
            SearchHit.from_row(float(scores[i]), found[row_id]) for i, row_id in zip(best, ids, strict=True)
        ]

    def _matrix(self, model_name: str, model_version: str) -> _VectorMatrix:
        """The model's embeddings as one matrix, reloaded when this or another connection wrote."""
        version = (self._own_changes, self._connection.execute("PRAGMA data_version").fetchone()[0])
        cached = self._matrices.get((model_name, model_version))
        if cached is not None and cached.version == version:
            return cached
        ids, blobs = [], []
        for row_id, blob in self._connection.execute(
            f"SELECT row_id, embedding FROM index_rows WHERE {SQLITE.of_model} ORDER BY row_id",
            (model_name, model_version),
        ):
            ids.append(row_id)
            blobs.append(blob)
        vectors = (
            np.frombuffer(b"".join(blobs), np.float32).reshape(len(ids), -1) if ids else np.zeros((0, 1))
        )
        norms = np.linalg.norm(vectors, axis=1)
        matrix = _VectorMatrix(version, np.asarray(ids, np.int64), vectors, np.where(norms > 0, norms, 1.0))
        self._matrices[(model_name, model_version)] = matrix
        return matrix

    def _check_dimension(self, records: Sequence[IndexRecord]) -> None:
        """One model version, one embedding size: a mix would make the distances meaningless."""
        seen: dict[tuple[str, str], int] = {}
        for record in records:
            key = (record.model_name, record.model_version)
            if key not in seen:
                row = self._connection.execute(
                    f"SELECT length(embedding) / 4 FROM index_rows WHERE {SQLITE.of_model} LIMIT 1",
                    key,
                ).fetchone()
                seen[key] = int(row[0]) if row else record.embedding.size
            if record.embedding.size != seen[key]:
                raise ValueError(
                    f"{record.sop_instance_uid}: embedding has {record.embedding.size} dimensions but "
                    f"{key[0]} version {key[1]} rows in {self.url} have {seen[key]}"
                )
