"""Sending one HL7 v2 message over MLLP and reading its acknowledgement.

MLLP (HL7 v2.5.1 Appendix C, "Minimal Lower Layer Protocol") frames a message as
``<VT> message <FS><CR>``; the receiver answers with an ACK in the same framing. A connection per
message keeps the client simple and matches what many interface engines (and hl7apy's own server)
do: they close after answering. TLS is the site's choice (``ssl_context``).

The ACK's MSA-1 decides what happens next (HL7 Table 0008):

======  =========================  ==============================================
code    meaning                    what the caller does
======  =========================  ==============================================
AA, CA  accepted                   done: record the delivery
AE, CE  application error          retry with backoff (the engine may recover)
AR, CR  application reject         retry with backoff, surfaced in ``jobs``
none    no answer, dropped socket  retry with backoff
======  =========================  ==============================================

Only the first row ends the delivery; everything else raises :class:`Hl7DeliveryError`, whose
message names the endpoint and the reason (never the message content: it holds patient data).
"""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message

__all__ = ["Hl7Ack", "Hl7DeliveryError", "Hl7Endpoint", "frame", "send_message"]

logger = logging.getLogger(__name__)

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\r"
#: An ACK is a few hundred bytes; anything far larger is not an ACK.
_MAX_ACK_BYTES = 1 << 20
_ACCEPTED = {"AA", "CA"}


class Hl7DeliveryError(Exception):
    """The message was not accepted: no answer, a broken connection, or an AE/AR ACK."""


@dataclass(frozen=True)
class Hl7Endpoint:
    """Where the site's interface engine listens for results (``--hl7 HOST:PORT``)."""

    host: str
    port: int
    ssl_context: ssl.SSLContext | None = None
    timeout_s: float = 30.0

    @classmethod
    def parse(cls, text: str, *, ssl_context: ssl.SSLContext | None = None) -> Hl7Endpoint:
        """``HOST:PORT`` (``[v6]:PORT`` for IPv6), as given on the command line."""
        host, sep, port = text.strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"HL7 endpoint {text!r} must be HOST:PORT with a port from 1 to 65535")
        return cls(host=host, port=int(port), ssl_context=ssl_context)

    def __str__(self) -> str:
        return f"{'mllps' if self.ssl_context else 'mllp'}://{self.host}:{self.port}"


@dataclass(frozen=True)
class Hl7Ack:
    """The receiver's answer: MSA-1 code, MSA-2 control id it acknowledges, MSA-3 text."""

    code: str
    control_id: str
    text: str


def frame(er7: str) -> bytes:
    """A message in MLLP framing, UTF-8 encoded (MSH-18 says ``UNICODE UTF-8``)."""
    return START_BLOCK + er7.encode("utf-8") + END_BLOCK


def send_message(endpoint: Hl7Endpoint, er7: str, control_id: str) -> Hl7Ack:
    """Send one message and return its ACK when it was accepted (AA/CA).

    Raises
    ------
    Hl7DeliveryError
        Connection refused or dropped, no ACK within the timeout, an ACK that does not parse or
        acknowledges another message, or an AE/AR/CE/CR ACK.
    """
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=endpoint.timeout_s) as raw:
            sock = (
                endpoint.ssl_context.wrap_socket(raw, server_hostname=endpoint.host)
                if endpoint.ssl_context
                else raw
            )
            sock.sendall(frame(er7))
            reply = _read_frame(sock)
    except (OSError, ssl.SSLError) as exc:
        raise Hl7DeliveryError(f"{endpoint}: {exc.strerror or exc}") from exc
    if reply is None:
        raise Hl7DeliveryError(f"{endpoint}: the connection closed without an acknowledgement")
    ack = _parse_ack(reply, endpoint)
    if ack.control_id != control_id:
        raise Hl7DeliveryError(
            f"{endpoint}: the acknowledgement is for message {ack.control_id!r}, not {control_id!r}"
        )
    if ack.code not in _ACCEPTED:
        raise Hl7DeliveryError(f"{endpoint}: {ack.code} acknowledgement: {ack.text or 'no reason given'}")
    logger.info("HL7 %s accepted by %s (%s)", control_id, endpoint, ack.code)
    return ack


def _read_frame(sock: socket.socket) -> str | None:
    buffer = b""
    while END_BLOCK not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buffer += chunk
        if len(buffer) > _MAX_ACK_BYTES:
            raise OSError("the answer is larger than any acknowledgement")
    start = buffer.find(START_BLOCK)
    end = buffer.find(END_BLOCK)
    if start < 0 or end < start:
        raise OSError("the answer is not MLLP-framed")
    return buffer[start + 1 : end].decode("utf-8", errors="replace")


def _parse_ack(text: str, endpoint: Hl7Endpoint) -> Hl7Ack:
    try:
        message = parse_message(text.replace("\n", "\r"), validation_level=VALIDATION_LEVEL.TOLERANT)
        msa = message.msa
        code = msa.msa_1.value
        control_id = msa.msa_2.value
        reason = msa.msa_3.value if msa.msa_3 else ""
    except (HL7apyException, AttributeError, IndexError) as exc:
        raise Hl7DeliveryError(f"{endpoint}: the answer is not an HL7 acknowledgement ({exc})") from exc
    return Hl7Ack(
        code=str(code or "").strip(), control_id=str(control_id or "").strip(), text=str(reason or "")
    )
