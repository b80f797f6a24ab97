"""TLS for the worker and its clients: mutual TLS when certificates are given, plaintext on loopback.

Server: ``--tls-cert`` and ``--tls-key`` (PEM) turn TLS on; ``--client-ca`` additionally requires
every client to present a certificate signed by that CA (mutual TLS) and refuses the others during
the handshake. Without certificates the worker listens in plaintext only on a loopback address
(``127.0.0.1``, ``::1``, ``localhost``) unless ``--allow-insecure`` says otherwise, so a misconfigured
hospital deployment cannot expose images unencrypted by accident.

Client: a ``grpcs://`` backend uses :class:`ClientTLS` — the CA that signed the worker's
certificate, and the client's own certificate and key for mutual TLS — read from the
``MEDGEMMA_DEPLOY_TLS_CA`` / ``_CERT`` / ``_KEY`` environment variables or given explicitly.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from medgemma_deploy.errors import UsageError

__all__ = [
    "CLIENT_TLS_ENV",
    "ClientTLS",
    "ServerTLS",
    "check_listen_security",
    "is_loopback",
    "split_host_port",
]

#: Environment variables a ``grpcs://`` client reads its certificate paths from.
CLIENT_TLS_ENV = {
    "ca": "MEDGEMMA_DEPLOY_TLS_CA",
    "cert": "MEDGEMMA_DEPLOY_TLS_CERT",
    "key": "MEDGEMMA_DEPLOY_TLS_KEY",
    "server_name": "MEDGEMMA_DEPLOY_TLS_SERVER_NAME",
}


@dataclass(frozen=True)
class ServerTLS:
    """The worker's certificate and key, and the CA its clients must be signed by (mTLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        """gRPC server credentials; client certificates required when ``client_ca`` is set.

        Raises
        ------
        UsageError
            A file is missing or is not PEM.
        """
        key = _read_pem(self.key, "--tls-key")
        cert = _read_pem(self.cert, "--tls-cert")
        client_ca = _read_pem(self.client_ca, "--client-ca") if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )


@dataclass(frozen=True)
class ClientTLS:
    """What a ``grpcs://`` client trusts and presents.

    ``ca`` None means the system's trust store. ``server_name`` overrides the name checked against
    the worker's certificate (for a worker reached by IP whose certificate names a DNS name).
    """

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ClientTLS:
        env = os.environ if environ is None else environ
        values = {name: env.get(variable) or None for name, variable in CLIENT_TLS_ENV.items()}
        return cls(
            ca=Path(values["ca"]) if values["ca"] else None,
            cert=Path(values["cert"]) if values["cert"] else None,
            key=Path(values["key"]) if values["key"] else None,
            server_name=values["server_name"],
        )

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials.

        Raises
        ------
        UsageError
            Only one of cert/key is given, or a file is missing or not PEM.
        """
        if (self.cert is None) != (self.key is None):
            raise UsageError(
                f"client TLS needs both a certificate and a key ({CLIENT_TLS_ENV['cert']}, "
                f"{CLIENT_TLS_ENV['key']}); got only one"
            )
        return grpc.ssl_channel_credentials(
            root_certificates=_read_pem(self.ca, CLIENT_TLS_ENV["ca"]) if self.ca else None,
            private_key=_read_pem(self.key, CLIENT_TLS_ENV["key"]) if self.key else None,
            certificate_chain=_read_pem(self.cert, CLIENT_TLS_ENV["cert"]) if self.cert else None,
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def split_host_port(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) → (host, port).

    Raises
    ------
    UsageError
        No port, or a port outside 0–65535.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise UsageError(f"address {address!r} is not HOST:PORT")
    try:
        number = int(port)
    except ValueError:
        raise UsageError(f"address {address!r}: port {port!r} is not a number") from None
    if not 0 <= number <= 65535:
        raise UsageError(f"address {address!r}: port {number} is outside 0-65535")
    return host.strip("[]"), number


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen_security(listen: str, tls: ServerTLS | None, allow_insecure: bool) -> None:
    """Refuse plaintext on a non-loopback address unless explicitly allowed.

    Raises
    ------
    UsageError
        ``listen`` is not loopback, no TLS is configured, and ``allow_insecure`` is false.
    """
    host, _ = split_host_port(listen)
    if tls is None and not allow_insecure and not is_loopback(host):
        raise UsageError(
            f"--listen {listen}: plaintext gRPC is only allowed on a loopback address; give --tls-cert and "
            "--tls-key (and --client-ca for mutual TLS), or --allow-insecure inside a trusted network"
        )


def _read_pem(path: Path | None, option: str) -> bytes:
    assert path is not None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot be read ({exc.strerror or exc})") from exc
    if b"-----BEGIN" not in data:
        raise UsageError(f"{option} {path}: not a PEM file (no -----BEGIN line)")
    return data
