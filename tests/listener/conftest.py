"""Fixtures of the listener tests: a spool with its job store (closed after the test), and a port
on 127.0.0.1 that nothing listens on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from medgemma_deploy.listener.jobstore import JobStore
from medgemma_deploy.listener.spool import Spool
from tests.support.orthanc import free_port


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool", min_free_bytes=0)


@pytest.fixture
def store(spool: Spool) -> Iterator[JobStore]:
    store = JobStore(spool.root / "jobs.sqlite")
    yield store
    store.close()


@pytest.fixture
def unused_port() -> int:
    return free_port()
