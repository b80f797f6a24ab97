"""Semantic search over the archive: an index of MedSigLIP image embeddings, and queries over it.

Two stores behind :class:`VectorStore` (``sqlite:///…`` embedded, ``postgresql://…`` with
pgvector); :class:`SearchIndexer` fills them from classified series; :class:`SearchService`
answers text and example-image queries; :mod:`medgemma_deploy.search.web` serves them over HTTP.
"""

from medgemma_deploy.search.indexer import SearchIndexer, records_from_classification
from medgemma_deploy.search.records import (
    FindingFilter,
    IndexRecord,
    SearchFilters,
    SearchHit,
    parse_finding_filter,
)
from medgemma_deploy.search.service import SearchService, like_embedding
from medgemma_deploy.search.store import (
    ModelMismatchError,
    StoreError,
    VectorStore,
    open_store,
    redact_url,
)

__all__ = [
    "FindingFilter",
    "IndexRecord",
    "ModelMismatchError",
    "SearchFilters",
    "SearchHit",
    "SearchIndexer",
    "SearchService",
    "StoreError",
    "VectorStore",
    "like_embedding",
    "open_store",
    "parse_finding_filter",
    "records_from_classification",
    "redact_url",
]
