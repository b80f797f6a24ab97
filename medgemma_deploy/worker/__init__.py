"""The shared GPU worker: gRPC serving of MedSigLIP and MedGemma to many app instances.

Two layers (vLLM's split between engine core and entry points):

* :mod:`.engine`, no gRPC: dynamic batching of images, continuous batching of reports over one
  left-padded KV cache, and the models behind them;
* :mod:`.edge`: the gRPC servicer (one exception → status table), the server (lifecycle, health,
  reflection) and metrics; :mod:`.config` holds the worker's settings.

Clients reach it through :mod:`medgemma_deploy.backends` (the same wire conversion and TLS). The
contract is ``protos/medgemma_deploy/v1/worker.proto``; see ``protos/README.md``. The names below are
imported on first use, so that ``--help`` and option errors do not wait for torch.
"""

from medgemma_deploy.exports import public_names

#: public name → the module that defines it
_HOMES = {
    "WorkerConfig": "config",
    "WorkerServer": "edge.server",
}

__all__ = sorted(_HOMES)
__getattr__, __dir__ = public_names(__name__, _HOMES)
