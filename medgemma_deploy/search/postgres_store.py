"""The scale-out index: PostgreSQL with pgvector, HNSW over cosine distance.

Hospitals and PACS vendors already run PostgreSQL (Orthanc and dcm4chee keep their indexes there),
so an archive-wide index can live beside them. Rows go into one table; each model version gets its
own partial HNSW index over ``embedding::vector(DIM)`` with ``vector_cosine_ops``, built in bulk
after the first rows of that model arrive (building over existing rows is much faster than growing
the graph row by row), and kept up to date by PostgreSQL afterwards.

A filtered search walks the HNSW graph and then applies the filter, so ``hnsw.ef_search`` is raised
with the filters and the requested count to keep enough candidates.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from medgemma_deploy.search.records import IndexRecord, SearchHit, SearchQuery
from medgemma_deploy.search.store import POSTGRESQL, SQLTableStore, StoreError, missing_extra, redact_url

__all__ = ["PostgresStore", "vector_literal"]

logger = logging.getLogger(__name__)

_TABLE = POSTGRESQL.table

#: HNSW build parameters (pgvector's defaults) and the memory the bulk build may use.
_HNSW_M = 16
_HNSW_EF_CONSTRUCTION = 64
_BUILD_MEMORY = "1GB"
#: Candidates kept by the HNSW walk (pgvector's default is 40; see the benchmark for recall).
_EF_SEARCH = 100
_EF_SEARCH_FILTERED = 400


def vector_literal(vector: np.ndarray) -> str:
    """pgvector's text form ``[x1,x2,…]`` (float32 values printed exactly enough to round-trip)."""
    return "[" + ",".join(f"{value:.9g}" for value in np.asarray(vector, np.float32).tolist()) + "]"


class PostgresStore(SQLTableStore):
    """The index in a PostgreSQL database with pgvector (see the module docstring). Use :meth:`open`."""

    dialect = POSTGRESQL

    def __init__(self, url: str, connection: Any) -> None:
        self.url = url
        self._connection = connection
        self._lock = threading.Lock()
        self._dimensions: dict[tuple[str, str], int] = {}
        self._defer_index = False

    @classmethod
    def open(cls, url: str) -> PostgresStore:
        """Connect, make sure pgvector is enabled, and create the table if needed."""
        try:
            import psycopg
        except ModuleNotFoundError as exc:
            raise missing_extra("psycopg") from exc
        shown = redact_url(url)
        try:
            connection = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise StoreError(f"store {shown}: cannot connect to PostgreSQL ({_first_line(exc)})") from exc
        try:
            enabled = connection.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone()
            if enabled is None:
                connection.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except psycopg.Error as exc:
            connection.close()
            raise StoreError(
                f"store {shown}: the pgvector extension is not enabled and could not be "
                f"({_first_line(exc)}); install pgvector on the server and run `CREATE EXTENSION vector` "
                "in that database as a superuser"
            ) from exc
        try:
            connection.execute(POSTGRESQL.create_table())
        except psycopg.Error as exc:
            connection.close()
            raise StoreError(f"store {shown}: cannot create the index table ({_first_line(exc)})") from exc
        return cls(url, connection)

    def add(self, records: Sequence[IndexRecord]) -> int:
        if not records:
            return 0
        rows = [r.row_values(vector_literal) for r in records]
        models = {(r.model_name, r.model_version): r.embedding.size for r in records}
        with self._lock:
            for (name, version), size in models.items():
                known = self._dimension(name, version)
                if known is not None and known != size:
                    raise ValueError(
                        f"embeddings have {size} dimensions but {name} version {version} rows in "
                        f"{redact_url(self.url)} have {known}"
                    )
            with self._connection.transaction(), self._connection.cursor() as cursor:
                cursor.executemany(POSTGRESQL.upsert(), rows)
            for (name, version), size in models.items():
                self._dimensions[(name, version)] = size
                if not self._defer_index:
                    self._ensure_hnsw(name, version, size)
        return len(rows)

    def bulk_load(self, batches: Iterable[Sequence[IndexRecord]]) -> int:
        """Insert every batch, then build the missing HNSW indexes once over all the rows."""
        self._defer_index = True
        try:
            written = sum(self.add(batch) for batch in batches)
        finally:
            self._defer_index = False
        with self._lock:
            for (name, version), size in self._dimensions.items():
                self._ensure_hnsw(name, version, size)
        return written

    def _search(self, query: SearchQuery) -> list[SearchHit]:
        prepared = self._search_statements(query)
        if prepared is None:
            return []
        statement, params, settings = prepared
        with self._lock, self._connection.transaction():
            self._connection.execute(settings)
            rows = self._connection.execute(statement, params).fetchall()
        return [SearchHit.from_distance_row(row) for row in rows]

    def query_plan(self, query: SearchQuery) -> str:
        """PostgreSQL's ``EXPLAIN`` of that search (to check that the HNSW index is used)."""
        from psycopg import sql

        prepared = self._search_statements(query)
        if prepared is None:
            return ""
        statement, params, settings = prepared
        with self._lock, self._connection.transaction():
            self._connection.execute(settings)
            rows = self._connection.execute(sql.SQL("EXPLAIN ") + statement, params).fetchall()
        return "\n".join(row[0] for row in rows)

    def _search_statements(self, query: SearchQuery) -> tuple[Any, list[Any], Any] | None:
        """The search SQL, its parameters and its ``SET LOCAL``; None when the model has no rows."""
        from psycopg import sql

        with self._lock:
            size = self._dimension(query.model_name, query.model_version)
        if size is None:
            return None
        clauses, params = POSTGRESQL.filter_clauses(query.filters)
        # Literals, not parameters, for the model and the size: the planner must see them to use
        # the model's partial index over embedding::vector(size).
        statement = sql.SQL(
            POSTGRESQL.nearest(
                "embedding::vector({size}) <=> %s::vector({size})",
                " AND ".join(["model_name = {model}", "model_version = {version}", *clauses]),
            )
        ).format(
            size=sql.Literal(size),
            model=sql.Literal(query.model_name),
            version=sql.Literal(query.model_version),
        )
        # The graph walk keeps ef_search candidates and filters afterwards: more with filters.
        filtered = _EF_SEARCH_FILTERED if clauses else 0
        ef_search = min(1000, max(_EF_SEARCH, 2 * query.top, filtered))
        settings = sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(ef_search))
        return statement, [vector_literal(query.vector), *params, query.top], settings

    def _dimension(self, model_name: str, model_version: str) -> int | None:
        key = (model_name, model_version)
        if key not in self._dimensions:
            row = self._connection.execute(
                f"SELECT vector_dims(embedding) FROM {_TABLE} WHERE {POSTGRESQL.of_model} LIMIT 1",
                key,
            ).fetchone()
            if row is None:
                return None
            self._dimensions[key] = int(row[0])
        return self._dimensions[key]

    def _ensure_hnsw(self, model_name: str, model_version: str, size: int) -> None:
        """Build the model's partial HNSW index once, in bulk over the rows already there."""
        from psycopg import sql

        digest = hashlib.sha256(f"{model_name}\0{model_version}\0{size}".encode()).hexdigest()[:16]
        name = f"{_TABLE}_hnsw_{digest}"
        exists = self._connection.execute("SELECT 1 FROM pg_class WHERE relname = %s", (name,)).fetchone()
        if exists:
            return
        logger.info(
            "building the HNSW index of %s version %s (%d dimensions)", model_name, model_version, size
        )
        with self._connection.transaction():
            self._connection.execute(
                sql.SQL("SET LOCAL maintenance_work_mem = {}").format(sql.Literal(_BUILD_MEMORY))
            )
            self._connection.execute(
                sql.SQL(
                    "CREATE INDEX IF NOT EXISTS {name} ON {table} USING hnsw ((embedding::vector({size})) "
                    "vector_cosine_ops) WITH (m = {m}, ef_construction = {ef}) "
                    "WHERE model_name = {model} AND model_version = {version}"
                ).format(
                    name=sql.Identifier(name),
                    table=sql.Identifier(_TABLE),
                    size=sql.Literal(size),
                    m=sql.Literal(_HNSW_M),
                    ef=sql.Literal(_HNSW_EF_CONSTRUCTION),
                    model=sql.Literal(model_name),
                    version=sql.Literal(model_version),
                )
            )
        # Fresh statistics, or the planner takes the (model) b-tree over the new HNSW index.
        self._connection.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(_TABLE)))


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
