"""The shared GPU worker as an app: ``python -m medgemma_deploy.apps.worker --listen HOST:PORT …``.

An entry point, not an engine: it parses the options of ``medgemma-deploy worker``
(:mod:`medgemma_deploy.cli.worker`) and runs :class:`medgemma_deploy.worker.WorkerServer`.
It is not a MONAI Deploy application (no ``app.yaml``): it is the long-lived service that the
MONAI Deploy apps reach with ``--backend grpc://HOST:PORT``. Deployment: ``deploy/`` and
``docs/deployment.md``.
"""

__all__: list[str] = []
