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

from medgemma_deploy.search.records import HIT_COLUMNS, RECORD_COLUMNS, IndexRecord, SearchFilters, SearchHit
from medgemma_deploy.search.store import IndexedModel, StoreError, VectorStore, missing_extra, redact_url

__all__ = ["PostgresStore", "vector_literal"]

logger = logging.getLogger(__name__)

_TABLE = "medgemma_index_rows"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {_TABLE} (
    row_id BIGSERIAL PRIMARY KEY,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    frame_number INTEGER NOT NULL,
    modality TEXT NOT NULL,
    body_part TEXT,
    study_date TEXT,
    findings JSONB NOT NULL,
    embedding vector NOT NULL,
    thumbnail BYTEA,
    overlay BYTEA,
    overlay_finding TEXT,
    UNIQUE (sop_instance_uid, frame_number, model_name, model_version)
);
CREATE INDEX IF NOT EXISTS {_TABLE}_model ON {_TABLE} (model_name, model_version);
"""


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


class PostgresStore(VectorStore):
    """The index in a PostgreSQL database with pgvector (see the module docstring). Use :meth:`open`."""

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
            connection.execute(_SCHEMA)
        except psycopg.Error as exc:
            connection.close()
            raise StoreError(f"store {shown}: cannot create the index table ({_first_line(exc)})") from exc
        return cls(url, connection)

    def add(self, records: Sequence[IndexRecord]) -> int:
        if not records:
            return 0
        values_sql = ", ".join(
            "%s::jsonb" if c == "findings" else "%s::vector" if c == "embedding" else "%s"
            for c in RECORD_COLUMNS
        )
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in RECORD_COLUMNS[2:] if c != "sop_instance_uid")
        sql = (
            f"INSERT INTO {_TABLE} ({', '.join(RECORD_COLUMNS)}) VALUES ({values_sql}) "
            "ON CONFLICT (sop_instance_uid, frame_number, model_name, model_version) "
            f"DO UPDATE SET {updates}"
        )
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
                cursor.executemany(sql, rows)
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

    def search(
        self,
        vector: np.ndarray,
        *,
        model_name: str,
        model_version: str,
        filters: SearchFilters | None = None,
        top: int = 20,
    ) -> list[SearchHit]:
        prepared = self._search_query(vector, model_name, model_version, filters, top)
        if prepared is None:
            return []
        query, params, settings = prepared
        with self._lock, self._connection.transaction():
            self._connection.execute(settings)
            rows = self._connection.execute(query, params).fetchall()
        return [SearchHit.from_row(1.0 - float(row[0]), row[1:]) for row in rows]

    def query_plan(
        self,
        vector: np.ndarray,
        *,
        model_name: str,
        model_version: str,
        filters: SearchFilters | None = None,
        top: int = 20,
    ) -> str:
        """PostgreSQL's ``EXPLAIN`` of that search (to check that the HNSW index is used)."""
        from psycopg import sql

        prepared = self._search_query(vector, model_name, model_version, filters, top)
        if prepared is None:
            return ""
        query, params, settings = prepared
        with self._lock, self._connection.transaction():
            self._connection.execute(settings)
            rows = self._connection.execute(sql.SQL("EXPLAIN ") + query, params).fetchall()
        return "\n".join(row[0] for row in rows)

    def _search_query(
        self,
        vector: np.ndarray,
        model_name: str,
        model_version: str,
        filters: SearchFilters | None,
        top: int,
    ) -> tuple[Any, list[Any], Any] | None:
        """The search SQL, its parameters and its ``SET LOCAL``; None when the model has no rows."""
        from psycopg import sql

        filters = filters or SearchFilters()
        with self._lock:
            size = self._dimension(model_name, model_version)
        if size is None:
            return None
        typed = sql.SQL("embedding::vector({})").format(sql.Literal(size))
        # Literals, not parameters, for the model: the planner must see them to use the partial index.
        where = [
            sql.SQL("model_name = {}").format(sql.Literal(model_name)),
            sql.SQL("model_version = {}").format(sql.Literal(model_version)),
        ]
        params: list[Any] = [vector_literal(vector)]
        for column, value in (("modality", filters.modality), ("body_part", filters.body_part)):
            if value is not None:
                where.append(sql.SQL("upper({}) = upper(%s)").format(sql.Identifier(column)))
                params.append(value)
        if filters.date_from is not None:
            where.append(sql.SQL("study_date >= %s"))
            params.append(filters.date_from)
        if filters.date_to is not None:
            where.append(sql.SQL("study_date <= %s"))
            params.append(filters.date_to)
        for finding in filters.findings:
            where.append(sql.SQL("(findings ->> %s)::float8 >= %s"))
            params.extend((finding.key, finding.minimum))
        params.append(int(top))
        query = sql.SQL(
            "SELECT {typed} <=> %s::vector({size}) AS distance, {hit_columns} "
            "FROM {table} WHERE {where} ORDER BY distance LIMIT %s"
        ).format(
            typed=typed,
            size=sql.Literal(size),
            hit_columns=sql.SQL(", ".join(HIT_COLUMNS)),
            table=sql.Identifier(_TABLE),
            where=sql.SQL(" AND ").join(where),
        )
        # The graph walk keeps ef_search candidates and filters afterwards: more with filters.
        filtered = len(where) > 2
        ef_search = min(1000, max(_EF_SEARCH, 2 * int(top), _EF_SEARCH_FILTERED if filtered else 0))
        settings = sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(ef_search))
        return query, params, settings

    def models(self) -> list[IndexedModel]:
        with self._lock:
            rows = self._connection.execute(
                f"SELECT model_name, model_version, count(*) FROM {_TABLE} "
                "GROUP BY model_name, model_version ORDER BY model_name, model_version"
            ).fetchall()
        return [(name, version, int(count)) for name, version, count in rows]

    def finding_keys(self, model_name: str, model_version: str) -> set[str]:
        with self._lock:
            rows = self._connection.execute(
                f"SELECT DISTINCT jsonb_object_keys(findings) FROM {_TABLE} "
                "WHERE model_name = %s AND model_version = %s",
                (model_name, model_version),
            ).fetchall()
        return {row[0] for row in rows}

    def _image(self, row_id: int, kind: str) -> bytes | None:
        with self._lock:
            row = self._connection.execute(
                f"SELECT {kind} FROM {_TABLE} WHERE row_id = %s", (int(row_id),)
            ).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _dimension(self, model_name: str, model_version: str) -> int | None:
        key = (model_name, model_version)
        if key not in self._dimensions:
            row = self._connection.execute(
                f"SELECT vector_dims(embedding) FROM {_TABLE} "
                "WHERE model_name = %s AND model_version = %s LIMIT 1",
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
