"""Container health probes for the medgemma-deploy images (Docker HEALTHCHECK, compose, exec probes).

Two checks, one per image:

``grpc HOST:PORT [--service NAME] [--ca F [--cert F --key F] [--server-name NAME]]``
    The worker: a ``grpc.health.v1.Health/Check`` call; healthy only when the answer is SERVING
    (the worker reports SERVING once its models are loaded). With ``--ca`` the call uses TLS (and
    mutual TLS with ``--cert``/``--key``), for workers started with ``--tls-cert``; Kubernetes'
    built-in gRPC probe cannot do TLS, so TLS deployments probe with this script instead. Each TLS
    option defaults to the variable a ``grpcs://`` client reads (``MEDGEMMA_DEPLOY_TLS_CA``,
    ``_CERT``, ``_KEY``, ``_SERVER_NAME``), so an image's HEALTHCHECK follows the container's TLS
    set-up without being rewritten.
``echo AET@HOST:PORT [--calling-aet AET]``
    The listener: a DICOM C-ECHO (Verification, PS3.4 Annex A); healthy on status 0x0000.

Exit codes follow Docker's HEALTHCHECK contract: 0 healthy, 1 unhealthy (one line on stderr saying
why). A usage error exits 2. Every check has a deadline, so a probe never hangs.

The gRPC check encodes the two tiny health messages itself instead of importing the generated
``grpc_health`` stubs: a probe must keep working when the image's protobuf runtime and the stubs'
generated code drift apart (protobuf refuses to load gencode newer than its runtime), which is
exactly when an operator needs the probe to tell "worker down" from "probe broken".
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

__all__ = ["check_dicom_echo", "check_grpc_health", "main"]

logger = logging.getLogger(__name__)

#: grpc.health.v1.HealthCheckResponse.ServingStatus (grpc/health/v1/health.proto).
#: The variables a ``grpcs://`` client of the worker reads (medgemma_deploy.backends.tls), reused here
#: so the probe and the clients share one TLS configuration. Copied, not imported: the probe must
#: run without the package.
TLS_ENV = {
    "ca": "MEDGEMMA_DEPLOY_TLS_CA",
    "cert": "MEDGEMMA_DEPLOY_TLS_CERT",
    "key": "MEDGEMMA_DEPLOY_TLS_KEY",
    "server_name": "MEDGEMMA_DEPLOY_TLS_SERVER_NAME",
}
#: The probe's TLS flags: (flag, its check_grpc_health keyword, the TLS_ENV key of the variable that
#: gives its default, help).
_TLS_OPTIONS = (
    ("--ca", "ca_file", "ca", "CA certificate (PEM): use TLS, verify the worker (env {env})"),
    ("--cert", "cert_file", "cert", "client certificate (PEM) for mutual TLS (env {env})"),
    ("--key", "key_file", "key", "client private key (PEM) for mutual TLS (env {env})"),
    (
        "--server-name",
        "server_name",
        "server_name",
        "name the worker certificate is for (default: HOST; env {env})",
    ),
)
SERVING_STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
_SERVING = 1
_HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"


class ProbeError(Exception):
    """The probed service is not healthy; the message says why in one line."""


def _encode_health_request(service: str) -> bytes:
    """``HealthCheckRequest{service}``: field 1, wire type 2 (length-delimited), omitted when empty."""
    data = service.encode()
    if not data:
        return b""
    return b"\x0a" + _encode_varint(len(data)) + data


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _decode_health_status(payload: bytes) -> int:
    """The ``status`` (field 1, varint) of a ``HealthCheckResponse``; 0 (UNKNOWN) when absent."""
    pos, status = 0, 0
    while pos < len(payload):
        key, pos = _decode_varint(payload, pos)
        field, wire_type = key >> 3, key & 0x7
        if wire_type == 0:
            value, pos = _decode_varint(payload, pos)
            if field == 1:
                status = value
        elif wire_type == 2:
            length, pos = _decode_varint(payload, pos)
            pos += length
        else:
            raise ProbeError(f"health response has unexpected protobuf wire type {wire_type}")
    return status


def _decode_varint(payload: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(payload):
            raise ProbeError("health response is truncated")
        byte = payload[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def check_grpc_health(
    address: str,
    *,
    service: str = "",
    timeout: float = 5.0,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    server_name: str | None = None,
) -> str:
    """Call ``grpc.health.v1.Health/Check`` on ``address`` (``HOST:PORT``).

    Plaintext unless ``ca_file`` is given: then TLS, verifying the server against that CA (and
    against ``server_name`` instead of the host of ``address``); ``cert_file``/``key_file`` add a
    client certificate for workers that require one (``--client-ca``).

    Returns
    -------
    str
        ``"SERVING"``.

    Raises
    ------
    ProbeError
        The call failed or timed out (with the gRPC status code), or the status is not SERVING.
    ValueError
        Only one of ``cert_file``/``key_file``, or a client certificate without ``ca_file``.
    OSError
        A certificate or key file cannot be read.
    """
    import grpc

    if (cert_file is None) != (key_file is None):
        raise ValueError("--cert and --key go together (the client certificate and its key)")
    if cert_file is not None and ca_file is None:
        raise ValueError("--cert/--key need --ca (a client certificate is only sent over TLS)")
    if ca_file is None:
        channel = grpc.insecure_channel(address)
    else:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read_bytes(ca_file),
            private_key=_read_bytes(key_file) if key_file else None,
            certificate_chain=_read_bytes(cert_file) if cert_file else None,
        )
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        channel = grpc.secure_channel(address, credentials, options=options)
    with channel:
        check = channel.unary_unary(
            _HEALTH_CHECK_METHOD,
            request_serializer=None,
            response_deserializer=None,
        )
        try:
            payload = check(_encode_health_request(service), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code().name if exc.code() is not None else "UNKNOWN"
            raise ProbeError(f"gRPC health check of {address} failed: {code}: {exc.details()}") from exc
    status = _decode_health_status(payload)
    name = SERVING_STATUS_NAMES.get(status, f"status {status}")
    if status != _SERVING:
        what = f"service {service!r}" if service else "the server"
        raise ProbeError(f"{address}: {what} is {name}, not SERVING")
    return name


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def check_dicom_echo(target: str, *, calling_aet: str = "HEALTHCHECK", timeout: float = 5.0) -> str:
    """C-ECHO ``target`` (``AET@HOST:PORT``) and return ``"0x0000"`` on success.

    Raises
    ------
    ProbeError
        The target is malformed, the association is rejected or times out, or the status is not
        Success.
    """
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    called_aet, host, port = _parse_dicom_target(target)
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established:
        raise ProbeError(f"{target}: association rejected, aborted or timed out")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if not status or int(status.Status) != 0:
        found = f"0x{int(status.Status):04X}" if status else "no response"
        raise ProbeError(f"{target}: C-ECHO returned {found}, expected 0x0000")
    return "0x0000"


def _parse_dicom_target(target: str) -> tuple[str, str, int]:
    aet, sep, address = target.partition("@")
    host, colon, port = address.rpartition(":")
    if not sep or not colon or not aet or not host or not port.isdigit():
        raise ValueError(f"DICOM target {target!r} must look like AET@HOST:PORT")
    return aet, host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one probe; 0 healthy, 1 unhealthy, 2 usage error."""
    parser = argparse.ArgumentParser(prog="healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds before giving up (default 5)")
    sub = parser.add_subparsers(dest="check", required=True)
    grpc_parser = sub.add_parser("grpc", help="grpc.health.v1 Check; healthy when SERVING")
    grpc_parser.add_argument("address", help="HOST:PORT of the worker")
    grpc_parser.add_argument("--service", default="", help="service name to check (default: the server)")
    for flag, dest, setting, help_text in _TLS_OPTIONS:
        variable = TLS_ENV[setting]
        grpc_parser.add_argument(
            flag, dest=dest, default=os.environ.get(variable) or None, help=help_text.format(env=variable)
        )
    echo_parser = sub.add_parser("echo", help="DICOM C-ECHO; healthy on status 0x0000")
    echo_parser.add_argument("target", help="AET@HOST:PORT of the listener")
    echo_parser.add_argument("--calling-aet", default="HEALTHCHECK")
    args = parser.parse_args(argv)
    try:
        if args.check == "grpc":
            tls = {dest: getattr(args, dest) for _, dest, _, _ in _TLS_OPTIONS}
            result = check_grpc_health(args.address, service=args.service, timeout=args.timeout, **tls)
        else:
            result = check_dicom_echo(args.target, calling_aet=args.calling_aet, timeout=args.timeout)
    except (ValueError, OSError) as exc:
        print(f"healthcheck: error: {exc}", file=sys.stderr)
        return 2
    except ProbeError as exc:
        print(f"healthcheck: unhealthy: {exc}", file=sys.stderr)
        return 1
    print(f"healthy: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
