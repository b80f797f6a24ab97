"""A small HTTP API and results page over :class:`~medgemma_deploy.search.service.SearchService`.

Why HTTP and not a gRPC ``Search`` RPC on the worker: the callers are PACS viewers (OHIF and the
like) running in a browser, which speak HTTP/JSON and cannot call gRPC without a grpc-web proxy;
the page must be served anyway; and the search process needs the index, which the GPU worker does
not. It is the standard library's ``ThreadingHTTPServer`` (no new dependency, a handful of routes);
put it behind the hospital's reverse proxy for TLS and authentication, as with any viewer backend.

Routes
------
``GET /``                              the page; ``?q=TEXT`` shows the hits as thumbnails with scores
``GET /api/search?q=TEXT``             JSON hits (``top``, ``modality``, ``body_part``, ``date_from``,
                                       ``date_to`` and repeatable ``finding=KEY>=P`` filters)
``GET /images/ROW/thumbnail.png``      the stored thumbnail of a hit (``overlay.png``: with its map)

Every hit carries its Study/Series/SOP Instance UIDs and frame number, and a WADO-RS frame URL when
the server is given the PACS's DICOMweb root.
"""

from __future__ import annotations

import html
import json
import logging
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from medgemma_deploy.errors import UsageError
from medgemma_deploy.search.records import SearchFilters, SearchHit, parse_finding_filter
from medgemma_deploy.search.service import SearchService

__all__ = ["SearchServer", "filters_from_query", "wado_rs_frame_url"]

logger = logging.getLogger(__name__)

_IMAGE_ROUTE = re.compile(r"^/images/(\d+)/(thumbnail|overlay)\.png$")
_KNOWN_PARAMETERS = {"q", "top", "modality", "body_part", "date_from", "date_to", "finding"}


def wado_rs_frame_url(root: str, hit: SearchHit) -> str:
    """The DICOMweb WADO-RS URL of a hit's frame (PS3.18 §10.4, Retrieve Transaction, frames)."""
    return (
        f"{root.rstrip('/')}/studies/{hit.study_instance_uid}/series/{hit.series_instance_uid}"
        f"/instances/{hit.sop_instance_uid}/frames/{hit.frame_number}"
    )


def filters_from_query(query: dict[str, list[str]]) -> tuple[SearchFilters, int]:
    """Filters and ``top`` from URL parameters; UsageError on unknown names or bad values."""
    unknown = sorted(set(query) - _KNOWN_PARAMETERS)
    if unknown:
        raise UsageError(
            f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(_KNOWN_PARAMETERS))}"
        )

    def one(name: str) -> str | None:
        values = query.get(name)
        return values[-1].strip() or None if values else None

    try:
        filters = SearchFilters(
            modality=one("modality"),
            body_part=one("body_part"),
            date_from=one("date_from"),
            date_to=one("date_to"),
            findings=tuple(parse_finding_filter(text) for text in query.get("finding", [])),
        )
        top = int(one("top") or 20)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return filters, top


class SearchServer:
    """Serves the API and page on ``host:port`` (port 0: an ephemeral port) in a background thread."""

    def __init__(
        self,
        service: SearchService,
        host: str = "127.0.0.1",
        port: int = 8765,
        *,
        wado_root: str | None = None,
    ) -> None:
        self.service = service
        self.wado_root = wado_root
        handler = type("_BoundHandler", (_Handler,), {"server_state": self})
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> SearchServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="search-http", daemon=True)
        self._thread.start()
        logger.info("search page and API on %s", self.url)
        return self

    def serve_forever(self) -> None:
        logger.info("search page and API on %s", self.url)
        self._httpd.serve_forever()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> SearchServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def hit_json(self, hit: SearchHit) -> dict[str, Any]:
        data = hit.to_json()
        data["thumbnail_url"] = f"/images/{hit.row_id}/thumbnail.png"
        data["overlay_url"] = f"/images/{hit.row_id}/overlay.png" if hit.has_overlay else None
        if self.wado_root:
            data["wado_rs_url"] = wado_rs_frame_url(self.wado_root, hit)
        return data


class _Handler(BaseHTTPRequestHandler):
    server_state: SearchServer
    server_version = "medgemma-deploy-search"

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        try:
            if parts.path == "/api/search":
                self._api(query)
            elif parts.path == "/":
                self._page(query)
            elif match := _IMAGE_ROUTE.match(parts.path):
                self._image(int(match.group(1)), match.group(2))
            else:
                self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no route {parts.path}"})
        except UsageError as exc:
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("http %s: " + format, self.client_address[0], *args)

    def _search(self, query: dict[str, list[str]]) -> tuple[str, list[SearchHit]]:
        filters, top = filters_from_query(query)
        text = (query.get("q") or [""])[-1]
        return text, self.server_state.service.search_text(text, filters, top)

    def _api(self, query: dict[str, list[str]]) -> None:
        text, hits = self._search(query)
        service = self.server_state.service
        self._send_json(
            HTTPStatus.OK,
            {
                "query": text,
                "model": {"name": service.model_name, "version": service.model_version},
                "hits": [self.server_state.hit_json(hit) for hit in hits],
            },
        )

    def _page(self, query: dict[str, list[str]]) -> None:
        text = (query.get("q") or [""])[-1]
        body = ""
        if text.strip():
            try:
                _, hits = self._search(query)
                body = _hits_html(self.server_state, hits)
            except UsageError as exc:
                body = f'<p class="error">{html.escape(str(exc))}</p>'
        service = self.server_state.service
        page = _PAGE.format(
            query=html.escape(text, quote=True),
            model=html.escape(f"{service.model_name} {service.model_version}"),
            rows=service.rows,
            body=body,
        )
        self._send(HTTPStatus.OK, "text/html; charset=utf-8", page.encode())

    def _image(self, row_id: int, kind: str) -> None:
        data = self.server_state.service.store.image(row_id, kind)
        if data is None:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"row {row_id} has no {kind}"})
        else:
            self._send(HTTPStatus.OK, "image/png", data)

    def _send_json(self, status: HTTPStatus, document: dict[str, Any]) -> None:
        self._send(status, "application/json", json.dumps(document).encode())

    def _send(self, status: HTTPStatus, content_type: str, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)


def _hits_html(state: SearchServer, hits: list[SearchHit]) -> str:
    if not hits:
        return "<p>No hits.</p>"
    cards = []
    for rank, hit in enumerate(hits, start=1):
        data = state.hit_json(hit)
        images = f'<img class="thumb" src="{data["thumbnail_url"]}" alt="frame {hit.frame_number}">'
        if data["overlay_url"]:
            images += (
                f'<img class="overlay" src="{data["overlay_url"]}" '
                f'alt="relevance of {html.escape(hit.overlay_finding or "")}">'
            )
        link = (
            f'<a href="{html.escape(data["wado_rs_url"], quote=True)}">WADO-RS</a>'
            if "wado_rs_url" in data
            else ""
        )
        cards.append(
            f'<figure class="hit" data-row="{hit.row_id}"><div class="images">{images}</div>'
            f"<figcaption><b>#{rank}</b> score {hit.score:.3f} · {html.escape(hit.modality)}"
            f" {html.escape(hit.body_part or '')} {html.escape(hit.study_date or '')}"
            f"{' · map: ' + html.escape(hit.overlay_finding) if data['overlay_url'] else ''}<br>"
            f'<span class="uid" title="SOP Instance UID">{html.escape(hit.sop_instance_uid)}'
            f" frame {hit.frame_number}</span> {link}</figcaption></figure>"
        )
    return '<div class="hits">' + "".join(cards) + "</div>"


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>medgemma-deploy search</title>
<style>
body {{ font-family: sans-serif; margin: 16px; background: #ffffff; color: #111111; }}
.hits {{ display: flex; flex-wrap: wrap; gap: 12px; }}
.hit {{ margin: 0; padding: 6px; border: 1px solid #cccccc; width: 270px; }}
.images {{ display: flex; gap: 4px; }}
.images img {{ display: block; image-rendering: pixelated; }}
.uid {{ font-size: 10px; word-break: break-all; }}
.error {{ color: #b00000; }}
.banner {{ font-size: 12px; color: #555555; }}
</style></head><body>
<form action="/" method="get"><input name="q" size="60" value="{query}"> <button>Search</button></form>
<p class="banner">Model {model}, {rows} indexed frames. AI similarity, not a diagnosis.</p>
{body}
</body></html>
"""
