"""Helpers of the search tests: a real PostgreSQL with pgvector, and a fresh database per test.

``pgserver`` ships PostgreSQL binaries with pgvector and starts a server on a unix socket in a
folder of its own; tests create one database each so they never see each other's rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

_DATABASE_NUMBERS = itertools.count(1)


@contextmanager
def running_postgres(folder: Path) -> Iterator[Any]:
    """A PostgreSQL server (pgserver) with its data in ``folder``, stopped on exit."""
    pgserver = pytest.importorskip("pgserver", reason="PostgreSQL tests need the search extra (pgserver)")
    server = pgserver.get_server(folder, cleanup_mode="stop")
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
