"""The shared GPU worker: gRPC serving of MedSigLIP and MedGemma to many app instances.

Layers, each usable alone (vLLM's split between engine and entry points):

* cores without gRPC: :mod:`~.batcher` (dynamic batching), :mod:`~.decode_batch` and
  :mod:`~.report_scheduler` with :mod:`~.sampling` (continuous batching), :mod:`~.image_service` and
  :mod:`~.report_service` (the models behind them);
* the gRPC edge: :mod:`~.convert` and :mod:`~.chat_convert` (protobuf ↔ core types),
  :mod:`~.servicer` (one exception → status table), :mod:`~.server` (lifecycle, health,
  reflection), :mod:`~.config`, :mod:`~.metrics`, :mod:`~.tls`;
* the client transport: :mod:`~.client` (used by ``operators.remote_backend``).

The contract is ``protos/medgemma_deploy/v1/worker.proto``; see ``protos/README.md``. The names
below are imported on first use, so that ``--help`` and option errors do not wait for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ClientTLS", "ServerTLS", "WorkerClient", "WorkerConfig", "WorkerServer"]

_HOMES = {
    "ClientTLS": "medgemma_deploy.serving.tls",
    "ServerTLS": "medgemma_deploy.serving.tls",
    "WorkerClient": "medgemma_deploy.serving.client",
    "WorkerConfig": "medgemma_deploy.serving.config",
    "WorkerServer": "medgemma_deploy.serving.server",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
