"""Where the models run: in this process (``local``) or on a shared GPU worker (``grpc://``).

One interface, two transports (vLLM's ``make_client``): :func:`make_backend` returns a
:class:`Backend` whose ``medsiglip`` and ``medgemma`` are either in process (``MedSigLIPRunner``;
``InprocMedGemma``, the worker's decode core over a ``MedGemmaRunner``, or a ``GgufMedGemmaRunner``
at int8/int4) or their gRPC twins (``RemoteMedSigLIP``, ``RemoteMedGemma``). Both pairs have
``load()``, ``close()``, ``identity`` and the same calls, so operators, the CLI and the apps take
``--backend local|grpc://HOST:PORT|grpcs://HOST:PORT`` and never branch on it. The models are
created on first use: a classify run never needs MedGemma.

This module is the one place runners are built: a local backend's :meth:`Backend.medsiglip_runner`
and :meth:`Backend.medgemma_runner` are what its own models wrap and what the gRPC worker serves.
"""

from __future__ import annotations

import logging
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medgemma_deploy.domain import ImageModel, ReportModel
from medgemma_deploy.errors import UsageError

if TYPE_CHECKING:
    from medgemma_deploy.backends.grpc_client import WorkerClient
    from medgemma_deploy.operators.medgemma.gguf_runner import GgufMedGemmaRunner
    from medgemma_deploy.operators.medgemma.runner import MedGemmaRunner
    from medgemma_deploy.operators.medsiglip.runner import MedSigLIPRunner

__all__ = ["BACKEND_HELP", "Backend", "make_backend"]

logger = logging.getLogger(__name__)

#: The ``--backend`` help text shared by every command and app.
BACKEND_HELP = (
    "where the models run: local (default; needs -m MODELS) or a shared GPU worker, grpc://HOST:PORT "
    "or grpcs://HOST:PORT (TLS; certificates from MEDGEMMA_DEPLOY_TLS_CA/_CERT/_KEY)"
)


@dataclass(eq=False, repr=False)
class Backend:
    """The models of one run, created on first use and closed together.

    Use :func:`make_backend` to build one. ``client`` is the worker's (``grpc://``); without it the
    models run here, from the local settings (``-m``, ``--device``, ``--precision``, ``cache_dir``).
    """

    spec: str
    _: KW_ONLY
    models_path: Path | None = None
    device: str | None = None
    precision: str = "auto"
    cache_dir: Path | None = None
    medsiglip_path: Path | None = None
    client: WorkerClient | None = None
    _medsiglip: ImageModel | None = field(default=None, init=False)
    _medgemma: ReportModel | None = field(default=None, init=False)

    def __repr__(self) -> str:
        return f"Backend({self.spec!r})"

    @property
    def medsiglip(self) -> ImageModel:
        """MedSigLIP (not yet loaded: call ``load()``)."""
        if self._medsiglip is None:
            if self.client is not None:
                from medgemma_deploy.backends.remote import RemoteMedSigLIP

                self._medsiglip = RemoteMedSigLIP(self.client)
            else:
                self._medsiglip = self.medsiglip_runner()
        return self._medsiglip

    @property
    def medgemma(self) -> ReportModel:
        """MedGemma (not yet loaded: call ``load()``): the local runner (torch, or llama.cpp at
        int8/int4) behind the worker's decode core in this process, or the worker's."""
        if self._medgemma is None:
            if self.client is not None:
                from medgemma_deploy.backends.remote import RemoteMedGemma

                self._medgemma = RemoteMedGemma(self.client)
            else:
                from medgemma_deploy.backends.inproc import InprocMedGemma

                self._medgemma = InprocMedGemma(self.medgemma_runner())
        return self._medgemma

    def medsiglip_runner(self, **options: Any) -> MedSigLIPRunner:
        """A new MedSigLIP runner of the local settings, not loaded (the caller loads and closes it).

        ``options`` go to ``MedSigLIPRunner`` (the worker sets ``max_batch_size``).

        Raises
        ------
        UsageError
            A worker's backend (its models run there), or no models path.
        ModelLoadError
            The path holds no MedSigLIP.
        """
        from medgemma_deploy.model_dir import resolve_model_dir
        from medgemma_deploy.operators.medsiglip.runner import make_medsiglip_runner

        return make_medsiglip_runner(
            resolve_model_dir(self.medsiglip_path or self._models_path(), "medsiglip"),
            device=self.device,
            precision=self.precision,
            cache_dir=self.cache_dir,
            **options,
        )

    def medgemma_runner(self, *, sequences: int = 1) -> MedGemmaRunner | GgufMedGemmaRunner:
        """A new MedGemma runner of the local settings, not loaded (the caller loads and closes it):
        torch's ``MedGemmaRunner`` at auto/fp32/bf16, llama.cpp's ``GgufMedGemmaRunner`` at int8/int4
        (reserving ``sequences`` reports decoded together: the worker's scheduler asks for more).

        Raises
        ------
        UsageError
            A worker's backend (its models run there), or no models path.
        ModelLoadError
            The path holds no MedGemma, or int8/int4 is asked without the ``lowbit`` extra.
        """
        from medgemma_deploy.model_dir import resolve_model_dir
        from medgemma_deploy.operators.medgemma.runners import make_medgemma_runner

        return make_medgemma_runner(
            resolve_model_dir(self._models_path(), "medgemma"),
            device=self.device,
            precision=self.precision,
            sequences=sequences,
        )

    def close(self) -> None:
        """Close whatever was created (unloads local models, closes the worker channel)."""
        for model in (self._medsiglip, self._medgemma):
            if model is not None:
                model.close()
        self._medsiglip = self._medgemma = None
        if self.client is not None:
            self.client.close()

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _models_path(self) -> Path:
        if self.client is not None:
            raise UsageError(f"backend {self.spec}: the models run on the worker; no local runner is built")
        if self.models_path is None:
            raise UsageError("the local backend needs the models path (-m/--models, or HOLOSCAN_MODEL_PATH)")
        return self.models_path


def make_backend(
    spec: str,
    models_path: Path | None,
    device: str | None,
    *,
    precision: str = "auto",
    cache_dir: Path | None = None,
    medsiglip_path: Path | None = None,
    tls: Any = None,
    timeout: float = 600.0,
) -> Backend:
    """A backend from ``--backend``: ``local``, ``grpc://HOST:PORT`` or ``grpcs://HOST:PORT``.

    Parameters
    ----------
    spec:
        The ``--backend`` value.
    models_path:
        The model directory or models root (local backend only).
    device:
        ``cpu``/``cuda`` for the local backend (the worker chooses its own).
    precision:
        ``--precision`` for the local backend (medgemma_deploy/precision.py; the worker chooses its own).
    cache_dir:
        The ``cache_dir`` setting for the local backend (MedSigLIP's persisted prompt embeddings).
    medsiglip_path:
        The MedSigLIP directory when ``models_path`` is the MedGemma directory itself (local only).
    tls:
        A ``ClientTLS`` for ``grpcs://``; default: from the ``MEDGEMMA_DEPLOY_TLS_*`` variables.
    timeout:
        Seconds per worker call, retries included.

    Raises
    ------
    UsageError
        An unknown scheme, a target without a port, or ``grpc://`` given TLS settings.
    """
    spec = (spec or "local").strip()
    if spec == "local":
        return Backend(
            "local",
            models_path=models_path,
            device=device,
            precision=precision,
            cache_dir=cache_dir,
            medsiglip_path=medsiglip_path,
        )
    from medgemma_deploy.backends.grpc_client import WorkerClient, parse_target
    from medgemma_deploy.backends.tls import ClientTLS

    target, secure = parse_target(spec)
    if secure:
        tls = tls or ClientTLS.from_env()
    elif tls is not None:
        raise UsageError(f"backend {spec}: TLS settings given for a plaintext grpc:// backend; use grpcs://")
    if models_path is not None or device is not None:
        logger.info("backend %s: the worker uses its own models and device; ignoring -m/--device", spec)
    return Backend(spec, client=WorkerClient(target, tls=tls, timeout=timeout))
