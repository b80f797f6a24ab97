"""One small interface over the two index stores, and the URL that picks one.

- ``sqlite:///path/index.db``: a file on disk, no server (:mod:`.sqlite_store`, apsw + sqlite-vec,
  exact search);
- ``postgresql://…``: PostgreSQL with pgvector (:mod:`.postgres_store`, HNSW, cosine distance), for
  archives too big for one file or shared between hosts.

Both keep one row per (SOP Instance UID, frame, model name, model version): indexing the same frame
again with the same model replaces its row, and a new model version adds rows beside the old ones.
A search always runs against one model's rows, because embeddings of two models do not share a space.

Both keep those rows in one SQL table of the same columns, so the statements that read the same in
both SQL dialects are built once here (:class:`SqlDialect`, :class:`SQLTableStore`), from a table of
what differs between the two.
"""

from __future__ import annotations

import abc
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from medgemma_deploy.errors import UsageError
from medgemma_deploy.search.records import (
    HIT_COLUMNS,
    RECORD_COLUMNS,
    IndexRecord,
    SearchFilters,
    SearchHit,
    SearchQuery,
)

__all__ = [
    "POSTGRESQL",
    "SQLITE",
    "IndexedModel",
    "ModelMismatchError",
    "SQLTableStore",
    "SqlDialect",
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
        return self._search(SearchQuery(vector, model_name, model_version, filters or SearchFilters(), top))

    @abc.abstractmethod
    def _search(self, query: SearchQuery) -> list[SearchHit]:
        """:meth:`search` with its arguments as one :class:`SearchQuery` (vector float32, filters set)."""

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


@dataclass(frozen=True)
class SqlDialect:
    """What differs between the two stores' SQL (side by side in :data:`_DIALECTS`).

    Attributes
    ----------
    placeholder:
        The driver's parameter marker: ``?`` (apsw) or ``%s`` (psycopg).
    key_type, json_type, vector_type, binary_type:
        Column types of the row id, the findings, the embedding and the PNGs.
    json_cast, vector_cast:
        Appended to the inserted findings and embedding parameters (pgvector parses a text literal).
    finding_at_least:
        The filter "this key's probability is at least", with two parameters: the key as
        :attr:`finding_path` formats it, and the minimum.
    finding_keys:
        A query, up to its WHERE, of the distinct keys in the rows' findings (``{table}``: :attr:`table`).
    """

    table: str
    placeholder: str
    key_type: str
    json_type: str
    vector_type: str
    binary_type: str
    json_cast: str
    vector_cast: str
    finding_at_least: str
    finding_path: str
    finding_keys: str

    @property
    def of_model(self) -> str:
        """The condition on one model's rows, with two parameters (name, version)."""
        return f"model_name = {self.placeholder} AND model_version = {self.placeholder}"

    def create_table(self) -> str:
        """The table and its per-model index, if missing (both statements, in one string)."""
        columns = ",\n    ".join(
            [f"row_id {self.key_type}"]
            + [f"{column} {_COLUMN_TYPES[column].format_map(vars(self))}" for column in RECORD_COLUMNS]
            + [f"UNIQUE ({', '.join(ROW_KEY)})"]
        )
        return (
            f"CREATE TABLE IF NOT EXISTS {self.table} (\n    {columns}\n);\n"
            f"CREATE INDEX IF NOT EXISTS {self.table}_model ON {self.table} (model_name, model_version);"
        )

    def upsert(self) -> str:
        """Insert one row of :data:`RECORD_COLUMNS`, or replace the values of the row with its key."""
        casts = {"findings": self.json_cast, "embedding": self.vector_cast}
        markers = ", ".join(self.placeholder + casts.get(column, "") for column in RECORD_COLUMNS)
        updates = ", ".join(f"{c} = excluded.{c}" for c in RECORD_COLUMNS if c not in ROW_KEY)
        return (
            f"INSERT INTO {self.table} ({', '.join(RECORD_COLUMNS)}) VALUES ({markers}) "
            f"ON CONFLICT ({', '.join(ROW_KEY)}) DO UPDATE SET {updates}"
        )

    def filter_clauses(self, filters: SearchFilters) -> tuple[list[str], list[Any]]:
        """The conditions of ``filters`` (beyond the model) and their parameters, in order."""
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (("modality", filters.modality), ("body_part", filters.body_part)):
            if value is not None:
                clauses.append(f"upper({column}) = upper({self.placeholder})")
                params.append(value)
        for operator, value in ((">=", filters.date_from), ("<=", filters.date_to)):
            if value is not None:
                clauses.append(f"study_date {operator} {self.placeholder}")
                params.append(value)
        for finding in filters.findings:
            clauses.append(self.finding_at_least)
            params.extend((self.finding_path.format(finding.key), finding.minimum))
        return clauses, params

    def nearest(self, distance: str, where: str) -> str:
        """Rows matching ``where`` by ascending ``distance``, as a cosine distance then
        :data:`HIT_COLUMNS` (:meth:`SearchHit.from_distance_row`); the last parameter is the count."""
        return (
            f"SELECT {distance} AS distance, {', '.join(HIT_COLUMNS)} FROM {self.table} "
            f"WHERE {where} ORDER BY distance LIMIT {self.placeholder}"
        )


#: The columns that name a row: indexing the same frame with the same model replaces it.
ROW_KEY = ("sop_instance_uid", "frame_number", "model_name", "model_version")

#: Column types, the same in both stores but for the :class:`SqlDialect` fields they name.
_COLUMN_TYPES = {
    "model_name": "TEXT NOT NULL",
    "model_version": "TEXT NOT NULL",
    "study_instance_uid": "TEXT NOT NULL",
    "series_instance_uid": "TEXT NOT NULL",
    "sop_instance_uid": "TEXT NOT NULL",
    "frame_number": "INTEGER NOT NULL",
    "modality": "TEXT NOT NULL",
    "body_part": "TEXT",
    "study_date": "TEXT",
    "findings": "{json_type} NOT NULL",
    "embedding": "{vector_type} NOT NULL",
    "thumbnail": "{binary_type}",
    "overlay": "{binary_type}",
    "overlay_finding": "TEXT",
}

#: The two dialects side by side: (SQLite with sqlite-vec, PostgreSQL with pgvector).
_DIALECTS = {
    "table": ("index_rows", "medgemma_index_rows"),
    "placeholder": ("?", "%s"),
    "key_type": ("INTEGER PRIMARY KEY", "BIGSERIAL PRIMARY KEY"),
    "json_type": ("TEXT", "JSONB"),
    "vector_type": ("BLOB", "vector"),
    "binary_type": ("BLOB", "BYTEA"),
    "json_cast": ("", "::jsonb"),
    "vector_cast": ("", "::vector"),
    "finding_at_least": ("CAST(json_extract(findings, ?) AS REAL) >= ?", "(findings ->> %s)::float8 >= %s"),
    "finding_path": ('$."{}"', "{}"),
    "finding_keys": (
        "SELECT DISTINCT key FROM {table}, json_each({table}.findings)",
        "SELECT DISTINCT jsonb_object_keys(findings) FROM {table}",
    ),
}
SQLITE = SqlDialect(**{name: values[0] for name, values in _DIALECTS.items()})
POSTGRESQL = SqlDialect(**{name: values[1] for name, values in _DIALECTS.items()})


class SQLTableStore(VectorStore):
    """A store whose rows live in one SQL table behind one connection: what reads the same in both."""

    dialect: ClassVar[SqlDialect]
    _connection: Any
    #: One statement at a time on the connection (the HTTP server's requests share the store).
    _lock: threading.Lock

    def models(self) -> list[IndexedModel]:
        rows = self._rows(
            f"SELECT model_name, model_version, count(*) FROM {self.dialect.table} "
            "GROUP BY model_name, model_version ORDER BY model_name, model_version"
        )
        return [(name, version, int(count)) for name, version, count in rows]

    def finding_keys(self, model_name: str, model_version: str) -> set[str]:
        listing = self.dialect.finding_keys.format(table=self.dialect.table)
        statement = f"{listing} WHERE {self.dialect.of_model}"
        return {row[0] for row in self._rows(statement, (model_name, model_version))}

    def _image(self, row_id: int, kind: str) -> bytes | None:
        where = f"row_id = {self.dialect.placeholder}"
        rows = self._rows(f"SELECT {kind} FROM {self.dialect.table} WHERE {where}", (row_id,))
        return bytes(rows[0][0]) if rows and rows[0][0] is not None else None

    def _rows(self, statement: str, params: Sequence[Any] = ()) -> list[Any]:
        """Every row of one statement, run alone on the connection."""
        with self._lock:
            return self._connection.execute(statement, params).fetchall()

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


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
