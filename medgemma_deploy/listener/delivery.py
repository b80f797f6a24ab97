"""Delivery of results to the PACS: DICOM C-STORE (PS3.4 Annex B) and DICOMweb STOW-RS (PS3.18 §10.5).

A destination sends a job's objects and reports each acknowledged one through ``on_delivered`` as
soon as it is acknowledged, so progress survives a crash. Failures come back as a
:class:`TransientDeliveryError` (destination down, association refused, out of resources, HTTP 5xx:
retry later) or a :class:`PermanentDeliveryError` (the destination refuses these objects: retrying
would not help). The objects' SOP Instance UIDs are stable per study version, so a retry after a
crash between "sent" and "recorded" stores the same instance again, never a duplicate.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Protocol

import pydicom
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

__all__ = [
    "CStoreDestination",
    "DeliveryError",
    "DeliveryItem",
    "Destination",
    "DicomNode",
    "PermanentDeliveryError",
    "StowDestination",
    "TransientDeliveryError",
]

logger = logging.getLogger(__name__)

#: C-STORE response statuses that mean "stored" (PS3.4 B.2.3): success and the three warnings.
_STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


class DeliveryError(Exception):
    """Delivery did not complete; ``transient`` says whether a later retry may succeed."""

    transient = True


class TransientDeliveryError(DeliveryError):
    """The destination is unreachable or busy (connection refused, A-ASSOCIATE-RJ, 0xA7xx, HTTP 5xx)."""


class PermanentDeliveryError(DeliveryError):
    """The destination refused the objects themselves (0xA9xx, 0xCxxx, 0x0122, HTTP 4xx)."""

    transient = False


@dataclass(frozen=True)
class DeliveryItem:
    """One file to deliver."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str


class Destination(Protocol):
    """Where results go. ``name`` is stable across restarts (it keys the delivery records)."""

    @property
    def name(self) -> str: ...

    def deliver(self, items: Sequence[DeliveryItem], on_delivered: Callable[[list[str]], None]) -> None: ...


@dataclass(frozen=True)
class DicomNode:
    """A DICOM application entity on the network: ``AET@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> DicomNode:
        """Parse ``AET@HOST:PORT`` (``HOST`` may be an IPv6 address in brackets).

        Raises
        ------
        ValueError
            Not of that form, an AE title that is empty or longer than 16 characters (PS3.5 AE VR),
            or a port outside 1–65535.
        """
        aet, at, address = str(text).partition("@")
        host, colon, port_text = address.rpartition(":")
        host = host.strip("[]")
        if not at or not colon or not aet or not host:
            raise ValueError(f"{text!r} is not AET@HOST:PORT")
        if len(aet) > 16 or "\\" in aet:
            raise ValueError(f"{text!r}: AE title {aet!r} must be 1-16 characters without backslash")
        try:
            port = int(port_text)
        except ValueError as exc:
            raise ValueError(f"{text!r}: port {port_text!r} is not a number") from exc
        if not 0 < port < 65536:
            raise ValueError(f"{text!r}: port {port} is outside 1-65535")
        return cls(aet, host, port)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class CStoreDestination:
    """C-STORE SCU to one PACS node; one association per delivery, contexts from the files.

    Parameters
    ----------
    node:
        The PACS.
    calling_aet:
        Our AE title on the association.
    timeout_s:
        ACSE, DIMSE and network timeouts.
    ssl_context:
        DICOM TLS (PS3.15 Annex B.1) towards the PACS, or ``None`` for plain TCP.
    """

    node: DicomNode
    _: KW_ONLY
    calling_aet: str
    timeout_s: float = 30.0
    ssl_context: ssl.SSLContext | None = None

    @property
    def name(self) -> str:
        return f"dicom:{self.node}"

    def deliver(self, items: Sequence[DeliveryItem], on_delivered: Callable[[list[str]], None]) -> None:
        from pynetdicom import AE

        if not items:
            return
        contexts: dict[tuple[str, str], None] = {}
        for item in items:
            syntax = str(read_file_meta_info(item.path).TransferSyntaxUID)
            contexts[(item.sop_class_uid, syntax)] = None
        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.connection_timeout = self.timeout_s
        for sop_class in sorted({sop for sop, _ in contexts}):
            syntaxes = [ts for sop, ts in contexts if sop == sop_class]
            for fallback in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
                if fallback not in syntaxes and all(not pydicom.uid.UID(ts).is_compressed for ts in syntaxes):
                    syntaxes.append(fallback)
            ae.add_requested_context(sop_class, syntaxes)
        tls_args = (self.ssl_context, self.node.host) if self.ssl_context is not None else None
        assoc = ae.associate(self.node.host, self.node.port, ae_title=self.node.ae_title, tls_args=tls_args)
        if not assoc.is_established:
            how = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
            raise TransientDeliveryError(
                f"{self.node}: association {how} (is the PACS up and are we allowed?)"
            )
        _no_delay(assoc)
        refused: list[str] = []
        try:
            for item in items:
                status = assoc.send_c_store(item.path)
                code = int(status.Status) if "Status" in status else None
                if code is None:
                    raise TransientDeliveryError(
                        f"{self.node}: no C-STORE response for {item.sop_instance_uid} "
                        "(connection lost or timeout)"
                    )
                if code in _STORED_STATUSES:
                    on_delivered([item.sop_instance_uid])
                elif 0xA700 <= code <= 0xA7FF:
                    raise TransientDeliveryError(f"{self.node}: out of resources (0x{code:04X})")
                else:
                    comment = str(status.get("ErrorComment", "")).strip()
                    refused.append(f"{item.sop_instance_uid} 0x{code:04X}{' ' + comment if comment else ''}")
        finally:
            if assoc.is_established:
                assoc.release()
        if refused:
            raise PermanentDeliveryError(
                f"{self.node} refused {len(refused)} object(s): {'; '.join(refused)}"
            )


class StowDestination:
    """STOW-RS to a DICOMweb service (``dicomweb-client``), all of a job's objects in one request.

    Parameters
    ----------
    url:
        The DICOMweb root (``…/dicom-web``); instances are POSTed to ``{url}/studies``.
    token:
        A bearer token for the ``Authorization`` header (read from the environment by the CLI, never
        from the command line).
    timeout_s:
        HTTP timeout.
    """

    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self.name = f"stow:{self.url}"

    def deliver(self, items: Sequence[DeliveryItem], on_delivered: Callable[[list[str]], None]) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient

        if not items:
            return
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        client = DICOMwebClient(url=self.url, headers=headers, timeout=self.timeout_s)
        client.set_http_retry_params(retry=False)  # the job store's backoff does the retrying
        datasets = [pydicom.dcmread(item.path) for item in items]
        try:
            response = client.store_instances(datasets)
        except requests.exceptions.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else 0
            message = f"{self.url}: STOW-RS answered HTTP {code}"
            if code >= 500 or code in (408, 429):
                raise TransientDeliveryError(message) from exc
            raise PermanentDeliveryError(message) from exc
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise TransientDeliveryError(f"{self.url}: STOW-RS unreachable ({type(exc).__name__})") from exc
        failed = {
            str(entry.get("ReferencedSOPInstanceUID", "")): entry.get("FailureReason")
            for entry in response.get("FailedSOPSequence", [])
        }
        stored = [item.sop_instance_uid for item in items if item.sop_instance_uid not in failed]
        if stored:
            on_delivered(stored)
        if failed:
            detail = "; ".join(f"{uid} reason {reason}" for uid, reason in failed.items())
            raise PermanentDeliveryError(f"{self.url}: STOW-RS refused {len(failed)} object(s): {detail}")


def _no_delay(assoc: object) -> None:
    """Nagle off on the association's socket: small PDUs otherwise wait ~40 ms for delayed ACKs."""
    raw = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if raw is not None:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
