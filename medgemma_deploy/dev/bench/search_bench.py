"""Benchmark of the search index (not a test): build time, query latency and recall@10, both stores.

``python -m medgemma_deploy.dev.bench.search_bench`` fills each store with ``--n`` synthetic unit
vectors of ``--dim`` dimensions plus ``--planted`` near-duplicates, then runs ``--queries`` queries
(top 10) and prints per store:

* build: seconds to insert every row and (PostgreSQL) build the HNSW index;
* p50/p95 query latency through the store's ``search`` (SQL, fetch and decode included);
* recall@10: the share of the exact top 10 (NumPy, float64, over all rows) that the store returns;
* planted@1: how often a query made from a planted pair's original finds that pair's duplicate or
  original first.

Synthetic data: real image embeddings are not spread evenly over the 1152-d sphere, they lie near a
low-dimensional set of clusters (modalities, views, anatomy). The vectors are therefore drawn as
``normalize(centre[k] + 0.35 * basis_k @ z + 0.05 * noise)``: 200 random centres, each with its own
32-d subspace. Uniform random vectors would be the worst case for any graph index (every distance
near 1), and say nothing about an archive. A near-duplicate is an original plus 0.05 noise,
renormalised; the queries are the originals of planted pairs (half) and fresh draws (half).

PostgreSQL is started with ``pgserver`` (pgvector 0.6.2) in a temporary folder unless
``--postgres-url`` names one. The benchmark is CPU-heavy: on a shared machine, report the load.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from medgemma_deploy.search.records import IndexRecord
from medgemma_deploy.search.store import VectorStore, open_store

__all__ = ["main", "run_queries", "run_store", "synthetic_vectors"]

logger = logging.getLogger(__name__)

MODEL = ("bench/synthetic", "1")
_CLUSTERS = 200
_SUBSPACE = 32


def synthetic_vectors(n: int, dim: int, planted: int, queries: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The data set of the module docstring: ``rows`` (n + planted), ``queries`` and their planted pairs."""
    rng = np.random.default_rng(seed)
    centres = _normalise(rng.standard_normal((_CLUSTERS, dim)))
    # Rows of about unit length: each cluster spreads over its own 32-d subspace.
    bases = rng.standard_normal((_CLUSTERS, _SUBSPACE, dim)).astype(np.float32) / np.float32(np.sqrt(dim))

    def draw(count: int) -> np.ndarray:
        labels = rng.integers(0, _CLUSTERS, count)
        out = np.empty((count, dim), np.float32)
        for start in range(0, count, 10_000):
            part = labels[start : start + 10_000]
            z = rng.standard_normal((len(part), _SUBSPACE)).astype(np.float32) / np.sqrt(_SUBSPACE)
            within = np.einsum("ns,nsd->nd", z, bases[part])  # about unit length, in the cluster's subspace
            out[start : start + len(part)] = (
                centres[part] + 0.35 * within + 0.05 * _noise(rng, len(part), dim)
            )
        return _normalise(out)

    base = draw(n)
    originals = rng.choice(n, planted, replace=False)
    duplicates = _normalise(base[originals] + 0.05 * _noise(rng, planted, dim))
    rows = np.concatenate([base, duplicates])
    planted_queries = queries // 2
    query_vectors = np.concatenate([base[originals[:planted_queries]], draw(queries - planted_queries)])
    return {
        "rows": rows,
        "queries": query_vectors,
        # For the planted queries: the row ids (0-based, insertion order) of the original and its duplicate.
        "planted_pairs": np.stack([originals[:planted_queries], n + np.arange(planted_queries)], axis=1),
    }


def exact_top(rows: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """Row indices of the exact top ``k`` by cosine similarity (rows are unit vectors), float64."""
    top = np.empty((len(queries), k), np.int64)
    rows64 = rows.astype(np.float64)
    for start in range(0, len(queries), 64):
        scores = queries[start : start + 64].astype(np.float64) @ rows64.T
        part = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.take_along_axis(scores, part, axis=1).argsort(axis=1)[:, ::-1]
        top[start : start + 64] = np.take_along_axis(part, order, axis=1)
    return top


def _records(rows: np.ndarray, batch: int = 2000) -> Iterator[list[IndexRecord]]:
    for start in range(0, len(rows), batch):
        yield [
            IndexRecord(
                embedding=rows[i],
                model_name=MODEL[0],
                model_version=MODEL[1],
                study_instance_uid="2.25.1",
                series_instance_uid="2.25.1.1",
                # The row index in the UID lets the benchmark map hits back to rows.
                sop_instance_uid=f"2.25.1.1.{i}",
                frame_number=1,
                modality="OT",
            )
            for i in range(start, min(start + batch, len(rows)))
        ]


def run_store(
    store: VectorStore, data: dict[str, np.ndarray], exact: np.ndarray, k: int = 10
) -> dict[str, Any]:
    """Fill ``store``, run the queries, measure (see the module docstring)."""
    started = time.perf_counter()
    store.bulk_load(_records(data["rows"]))
    build_s = time.perf_counter() - started
    return {**run_queries(store, data, exact, k), "build_s": build_s}


def run_queries(
    store: VectorStore, data: dict[str, np.ndarray], exact: np.ndarray, k: int = 10
) -> dict[str, Any]:
    """Run the queries on an already filled ``store`` (``build_s`` None)."""
    latencies, recalls, planted_hits = [], [], []
    pairs = {int(original): int(duplicate) for original, duplicate in data["planted_pairs"]}
    for index, query in enumerate(data["queries"]):
        began = time.perf_counter()
        hits = store.search(query, model_name=MODEL[0], model_version=MODEL[1], top=k)
        latencies.append(time.perf_counter() - began)
        found = [int(hit.sop_instance_uid.rsplit(".", 1)[1]) for hit in hits]
        recalls.append(len(set(found) & set(exact[index].tolist())) / k)
        if index < len(pairs):
            original = int(data["planted_pairs"][index][0])
            planted_hits.append(bool(found) and found[0] in (original, pairs[original]))
    first_ms = 1000 * latencies[0]
    latencies.sort()
    return {
        "first_ms": first_ms,
        "rows": len(data["rows"]),
        "build_s": None,
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * latencies[min(len(latencies) - 1, round(0.95 * len(latencies)) - 1)],
        "recall_at_10": float(np.mean(recalls)),
        "planted_at_1": float(np.mean(planted_hits)) if planted_hits else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="search_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="synthetic vectors (default 100000)")
    parser.add_argument("--dim", type=int, default=1152, help="dimensions (default 1152, MedSigLIP-448)")
    parser.add_argument("--planted", type=int, default=1000, help="near-duplicates added (default 1000)")
    parser.add_argument("--queries", type=int, default=200, help="queries per store (default 200)")
    parser.add_argument("--stores", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    parser.add_argument("--postgres-url", default=None, help="an existing database (default: start pgserver)")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where the index files go (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)

    started = time.perf_counter()
    data = synthetic_vectors(args.n, args.dim, args.planted, args.queries)
    exact = exact_top(data["rows"], data["queries"])
    logger.info(
        "data: %d rows x %d, %d queries, exact top-10 in %.1f s",
        len(data["rows"]),
        args.dim,
        args.queries,
        time.perf_counter() - started,
    )
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="search-bench-", dir=args.workdir) as work:
        for name in [s.strip() for s in args.stores.split(",") if s.strip()]:
            if name == "sqlite":
                with open_store(f"sqlite:///{Path(work) / 'bench.db'}") as store:
                    results["sqlite, exact: table scan (CLI)"] = run_store(store, data, exact)
                # The same file again, searched as search-server does: vectors cached in memory.
                with open_store(f"sqlite:///{Path(work) / 'bench.db'}", cache_vectors=True) as store:
                    results["sqlite, exact: in-memory matrix (search-server)"] = run_queries(
                        store, data, exact
                    )
            elif name == "postgresql":
                results["postgresql (pgvector HNSW, cosine)"] = _run_postgres(
                    args.postgres_url, Path(work), data, exact
                )
            else:
                parser.error(f"unknown store {name!r}; use sqlite and/or postgresql")
    load = os.getloadavg()
    print(
        f"\n{args.n:,} vectors + {args.planted:,} planted near-duplicates, dim {args.dim}, "
        f"{args.queries} queries, top 10; {os.cpu_count()} CPUs, "
        f"load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}"
    )
    print("| store | rows | build (s) | first query (ms) | p50 (ms) | p95 (ms) | recall@10 | planted@1 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        build = "(same file)" if r["build_s"] is None else f"{r['build_s']:.1f}"
        print(
            f"| {name} | {r['rows']:,} | {build} | {r['first_ms']:.1f} | {r['p50_ms']:.1f} | "
            f"{r['p95_ms']:.1f} | {r['recall_at_10']:.4f} | {r['planted_at_1']:.3f} |"
        )
    return 0


def _run_postgres(
    url: str | None, work: Path, data: dict[str, np.ndarray], exact: np.ndarray
) -> dict[str, Any]:
    if url is not None:
        with open_store(url) as store:
            return run_store(store, data, exact)
    import pgserver

    server = pgserver.get_server(work / "pg", cleanup_mode="stop")
    try:
        server.psql("CREATE DATABASE bench;")
        query = server.get_uri().partition("?")[2]
        with open_store(f"postgresql://postgres@/bench?{query}") as store:
            return run_store(store, data, exact)
    finally:
        server.cleanup()


def _noise(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    """Isotropic Gaussian vectors of about unit length."""
    return rng.standard_normal((count, dim)).astype(np.float32) / np.float32(np.sqrt(dim))


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


if __name__ == "__main__":
    sys.exit(main())
