"""The configuration of a gRPC worker for tests: on 127.0.0.1, an ephemeral port, the CPU, no metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medgemma_deploy.worker.config import WorkerConfig

#: ``drain_timeout`` is short so that a test's teardown never waits out the production default.
_LOOPBACK = {"listen": "127.0.0.1:0", "device": "cpu", "metrics_port": 0, "drain_timeout": 10}


def loopback_worker_config(models_root: Path, **overrides: Any) -> WorkerConfig:
    """A worker serving ``models_root``'s ``medsiglip/`` and ``medgemma/``; ``overrides`` set any field."""
    models = {"medsiglip": models_root / "medsiglip", "medgemma": models_root / "medgemma"}
    return WorkerConfig(**(_LOOPBACK | models | overrides))
