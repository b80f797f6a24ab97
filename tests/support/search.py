"""Helpers of the search tests: a real PostgreSQL with pgvector, and a fresh database per test.

``pgserver`` ships PostgreSQL binaries with pgvector and starts a server on a unix socket in a
folder of its own; tests create one database each so they never see each other's rows.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

_DATABASE_NUMBERS = itertools.count(1)


@contextmanager
def running_postgres() -> Iterator[Any]:
    """A PostgreSQL server (pgserver) with its data in a new temporary folder, stopped and removed on exit.

    Not under pytest's ``tmp_path``: with several pytest sessions on one machine (they share
    ``/tmp/pytest-of-USER`` and prune its old numbered folders), a server's data folder vanished
    under it once here (``pg_ctl start`` failed, its log file missing).
    """
    pgserver = pytest.importorskip("pgserver", reason="PostgreSQL tests need the search extra (pgserver)")
    with tempfile.TemporaryDirectory(prefix="medgemma-pg-") as folder:
        server = pgserver.get_server(Path(folder), cleanup_mode="stop")
        try:
            yield server
        finally:
            server.cleanup()


def fresh_database(server: Any, prefix: str = "search_test") -> str:
    """Create an empty database on ``server``; returns its URL (unix socket, user postgres)."""
    name = f"{prefix}_{next(_DATABASE_NUMBERS)}"
    server.psql(f"CREATE DATABASE {name};")
    return database_url(server, name)


def database_url(server: Any, name: str, user: str = "postgres") -> str:
    """The URL of database ``name`` on ``server`` for ``user`` (no password: local trust auth)."""
    base = server.get_uri()  # postgresql://postgres:@/postgres?host=/path/to/socket/folder
    _, _, rest = base.partition("@")
    _, _, query = rest.partition("?")
    return f"postgresql://{user}@/{name}?{query}"
