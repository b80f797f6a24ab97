"""``medgemma-deploy index``, ``search`` and ``search-server``: the archive's semantic search.

``index`` classifies a study (no SR/SEG written) and stores one row per frame; ``classify``,
``study`` and ``listen`` do the same with ``--index``. ``search`` ranks indexed frames by cosine
similarity to a text (MedSigLIP's text tower) or to an example image (``--like FILE.dcm``);
``search-server`` serves the same search as an HTTP API and a results page.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from medgemma_deploy.backends.local import BACKEND_HELP
from medgemma_deploy.errors import UsageError

__all__ = ["add_index_arguments", "register"]

logger = logging.getLogger(__name__)

_STORE_HELP = (
    "the index: sqlite:///PATH/index.db (a file, no server; default sqlite:///medgemma-index.db) or "
    "postgresql://USER@HOST:PORT/DB with pgvector (env MEDGEMMA_DEPLOY_STORE)"
)


def add_index_arguments(parser: argparse._ActionsContainer) -> None:
    """``--index`` and ``--store`` for the commands that classify (classify, study, listen)."""
    parser.add_argument(
        "--index",
        action="store_true",
        default=None,
        help="also add every classified frame to the search index (--store)",
    )
    parser.add_argument("--store", default=None, metavar="URL", help=_STORE_HELP)


def register(sub: argparse._SubParsersAction) -> None:
    index = sub.add_parser("index", help="classify a study and add its frames to the search index")
    index.add_argument("-i", "--input", type=Path, required=True, help="DICOM file or folder (recursive)")
    index.add_argument("-o", "--output", type=Path, default=None, help="folder for results.json (optional)")
    _add_model_arguments(index)
    index.add_argument("--store", default=None, metavar="URL", help=_STORE_HELP)
    index.add_argument(
        "--labels", type=Path, action="append", metavar="YAML", help="label sets (default: the packaged ones)"
    )
    index.add_argument(
        "--relevance-top-k",
        type=int,
        default=1,
        metavar="N",
        help="relevance maps (page overlays) for present findings plus the N most probable (default 1)",
    )
    index.add_argument("--no-thumbnails", action="store_true", help="store no thumbnails or overlays")
    index.set_defaults(func=run_index)

    search = sub.add_parser("search", help="find indexed frames like a text or an example image")
    search.add_argument("text", nargs="?", default=None, help='what to look for, e.g. "right pneumothorax"')
    search.add_argument(
        "--like", type=Path, default=None, metavar="FILE.dcm", help="find frames like this image"
    )
    search.add_argument("--store", default=None, metavar="URL", help=_STORE_HELP)
    _add_model_arguments(search)
    _add_filter_arguments(search)
    search.add_argument("--top", type=int, default=20, metavar="N", help="number of hits (default 20)")
    search.add_argument("--json", action="store_true", help="print the hits as JSON")
    search.add_argument("--wado-root", default=None, metavar="URL", help="DICOMweb root for WADO-RS links")
    search.set_defaults(func=run_search)

    server = sub.add_parser("search-server", help="HTTP search API and results page over the index")
    server.add_argument("--store", default=None, metavar="URL", help=_STORE_HELP)
    _add_model_arguments(server)
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    server.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    server.add_argument("--wado-root", default=None, metavar="URL", help="DICOMweb root for WADO-RS links")
    server.set_defaults(func=run_server)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--models", type=Path, default=None, help="MedSigLIP directory or models root")
    parser.add_argument("--backend", default=None, help=BACKEND_HELP)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N")


def _add_filter_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modality", default=None, help="only this modality, e.g. CR")
    parser.add_argument("--body-part", default=None, help="only this Body Part Examined, e.g. CHEST")
    parser.add_argument("--date-from", default=None, metavar="YYYYMMDD", help="study date on or after")
    parser.add_argument("--date-to", default=None, metavar="YYYYMMDD", help="study date on or before")
    parser.add_argument(
        "--finding",
        action="append",
        default=[],
        metavar="KEY>=P",
        help="only frames whose probability of finding KEY is at least P (repeatable)",
    )


def _settings(args: argparse.Namespace) -> Any:
    from medgemma_deploy.settings import resolve_settings

    return resolve_settings(
        {
            "backend": args.backend,
            "device": args.device,
            "store": args.store,
            "labels": getattr(args, "labels", None),
        }
    )


def _open_model(settings: Any, models: Path | None) -> tuple[Any, Any]:
    from medgemma_deploy.backends.local import make_backend
    from medgemma_deploy.engine import check_device

    backend = make_backend(
        settings.backend,
        models,
        check_device(settings.device),
        precision=settings.precision,
        cache_dir=settings.cache_dir,
    )
    try:
        model = backend.medsiglip
        model.load()
    except BaseException:
        backend.close()
        raise
    return backend, model


def run_index(args: argparse.Namespace) -> int:
    import dataclasses

    from medgemma_deploy.engine import EngineOptions, check_input_path
    from medgemma_deploy.operators.dicom_input.reader import load_study_input
    from medgemma_deploy.operators.medsiglip.labels import load_label_sets
    from medgemma_deploy.operators.writers.common import AI_DISCLAIMER
    from medgemma_deploy.results import RunResults
    from medgemma_deploy.search.indexer import SearchIndexer
    from medgemma_deploy.search.store import open_store, redact_url
    from medgemma_deploy.steps.classify import classify_study_input, record_input

    settings = _settings(args)
    check_input_path(args.input)
    if args.relevance_top_k < 0:
        raise UsageError(f"--relevance-top-k must be >= 0, got {args.relevance_top_k}")
    try:
        label_sets = load_label_sets(list(settings.labels) or None)
    except (OSError, ValueError) as exc:
        raise UsageError(f"configuration: {exc}") from exc
    started = time.perf_counter()
    with open_store(settings.store) as store:
        backend, model = _open_model(settings, args.models)
        with backend:
            results = RunResults(command="index", disclaimer=AI_DISCLAIMER, models=[model.identity])
            # The same options (memory budget included) as every other pipeline, plus the embeddings.
            options = dataclasses.replace(
                EngineOptions.from_settings(settings).classify_options,
                relevance_top_k=args.relevance_top_k,
                keep_embeddings=True,
            )
            study_input = load_study_input(args.input, budget=options.budget)
            record_input(study_input, results)
            classifications = classify_study_input(
                study_input, model, model.identity, label_sets, options, results
            )
            written = SearchIndexer(store, with_thumbnails=not args.no_thumbnails)(classifications, results)
    if args.output is not None:
        results.write(args.output)
        print(f"results: {args.output / 'results.json'}")
    elapsed = time.perf_counter() - started
    print(f"indexed {written} frames into {redact_url(store.url)} in {elapsed:.1f} s")
    if results.rejected:
        print(
            f"{len(results.rejected)} input(s) rejected; nothing of their studies was indexed",
            file=sys.stderr,
        )
    return results.exit_code


def _filters(args: argparse.Namespace) -> Any:
    from medgemma_deploy.search.records import SearchFilters, parse_finding_filter

    try:
        return SearchFilters(
            modality=args.modality,
            body_part=args.body_part,
            date_from=args.date_from,
            date_to=args.date_to,
            findings=tuple(parse_finding_filter(text) for text in args.finding),
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def run_search(args: argparse.Namespace) -> int:
    from medgemma_deploy.search.service import SearchService
    from medgemma_deploy.search.store import open_store
    from medgemma_deploy.search.web import wado_rs_frame_url

    if (args.text is None) == (args.like is None):
        raise UsageError('give either a search text or --like FILE.dcm (e.g. search "pneumothorax")')
    if args.text is not None and not args.text.strip():
        raise UsageError("the search text is empty")
    filters = _filters(args)
    settings = _settings(args)
    with open_store(settings.store) as store:
        backend, model = _open_model(settings, args.models)
        with backend:
            service = SearchService(store, model)
            service.check_filters(filters)
            if args.like is not None:
                hits = service.search_like(args.like, filters, args.top)
            else:
                hits = service.search_text(args.text, filters, args.top)
    rows = []
    for hit in hits:
        row = hit.to_json()
        if args.wado_root:
            row["wado_rs_url"] = wado_rs_frame_url(args.wado_root, hit)
        rows.append(row)
    if args.json:
        print(
            json.dumps(
                {
                    "query": args.text if args.like is None else {"like": str(args.like)},
                    "model": {"name": service.model_name, "version": service.model_version},
                    "hits": rows,
                },
                indent=2,
            )
        )
        return 0
    if not hits:
        print("no hits")
        return 0
    print(f"{'#':>3}  {'score':>6}  {'mod':<4} {'body part':<10} {'date':<8}  sop instance uid / frame")
    for rank, hit in enumerate(hits, start=1):
        print(
            f"{rank:>3}  {hit.score:>6.3f}  {hit.modality:<4} {(hit.body_part or '-'):<10} "
            f"{(hit.study_date or '-'):<8}  {hit.sop_instance_uid} / {hit.frame_number}"
        )
    return 0


def run_server(args: argparse.Namespace) -> int:
    from medgemma_deploy.search.service import SearchService
    from medgemma_deploy.search.store import open_store
    from medgemma_deploy.search.web import SearchServer

    settings = _settings(args)
    # A server answers many queries: keep the embedded store's vectors in memory between them.
    with open_store(settings.store, cache_vectors=True) as store:
        backend, model = _open_model(settings, args.models)
        with backend:
            service = SearchService(store, model)
            try:
                server = SearchServer(service, args.host, args.port, wado_root=args.wado_root)
            except OSError as exc:
                raise UsageError(
                    f"search-server: cannot listen on {args.host}:{args.port} ({exc.strerror})"
                ) from exc
            # The tests and scripts read this line to find an ephemeral port.
            print(f"serving {server.url}", flush=True)
            previous = signal.signal(signal.SIGTERM, _stop_serving)
            try:
                server.serve_forever()
            except KeyboardInterrupt:
                logger.info("search-server stopping")
            finally:
                signal.signal(signal.SIGTERM, previous)
                server.stop()
    return 0


def _stop_serving(signum: int, frame: object) -> None:
    """SIGTERM (a container stop) ends ``serve_forever`` like Ctrl-C, so the store is closed cleanly."""
    raise KeyboardInterrupt
