"""The Storage SCP: Verification (PS3.4 Annex A) and image Storage (PS3.4 Annex B) on pynetdicom.

The C-STORE handler answers Success only after the instance is in the spool (fsync'd) and in the
job store (committed). Everything else gets a named status from :class:`StoreStatus`, with an
``ErrorComment``: a non-image SOP class is refused (0x0122), a full disk is out of resources
(0xA700), a data set that contradicts its SOP class is 0xA900, one that cannot be decoded is stored
in the quarantine and answered "cannot understand" (0xC000). Handlers get their collaborators
through ``evt_handlers`` arguments (no globals) and do no processing: studies are processed off
the association threads by the worker loop.

Calling AEs are checked in two places: the TCP peer address when the connection opens (unknown
addresses are closed before any PDU), the calling AE title in the A-ASSOCIATE-RQ (unknown titles get
an A-ASSOCIATE-RJ, "calling AE title not recognized"). A known title from a known address that the
allow-list does not pair gets every request refused with 0x0124 (not authorized).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

from pydicom import uid
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.sop_class import _STORAGE_CLASSES, Verification
from pynetdicom.transport import ThreadedAssociationServer

from medgemma_deploy.listener.allowlist import AllowList
from medgemma_deploy.listener.receiver import InstanceReceiver, StoreRequest, StoreStatus

__all__ = ["IMAGE_STORAGE_SOP_CLASSES", "STORAGE_TRANSFER_SYNTAXES", "StorageSCP"]

logger = logging.getLogger(__name__)

#: Image Storage SOP classes (PS3.4 B.5) the listener processes; other storage classes get 0x0122.
IMAGE_STORAGE_SOP_CLASSES: frozenset[str] = frozenset(
    sop_class
    for name, sop_class in _STORAGE_CLASSES.items()
    if "Image" in name or name == "EnhancedUSVolumeStorage"
)

#: Maximum P-DATA PDU length we accept (PS3.8 D.1): the sender may send up to this much per PDU.
MAX_PDU_BYTES = 1024 * 1024

#: Transfer syntaxes accepted for storage, in order of preference: pynetdicom accepts the first of
#: these that the requestor proposes. Lossless compressed ones come first, so a sender holding
#: (say) JPEG 2000 lossless files never has to decompress them (dcmtk's storescu cannot, and fails);
#: lossy ones come after the uncompressed ones, so we never make a sender compress lossily.
STORAGE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    uid.JPEG2000Lossless,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.JPEGLSLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLossless,
    uid.RLELossless,
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLSNearLossless,
    uid.JPEG2000,
    uid.HTJ2K,
)


class _AddressCheckingServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, closing connections from addresses off the allow-list."""

    def __init__(self, *args: Any, address_allowed: Callable[[str], bool], **kwargs: Any) -> None:
        self._address_allowed = address_allowed
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept a connection, as pynetdicom does, with two changes (see the comments)."""
        client_socket, address = self.socket.accept()
        # No Nagle: a C-STORE response is a few small PDUs, and Nagle's algorithm against the
        # peer's delayed ACK would hold each one back ~40 ms, capping an association near 20/s.
        client_socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The TLS handshake runs in the accept loop: bound it, so a silent client cannot stall it.
        client_socket.settimeout(self.ae.network_timeout)
        if self.ssl_context:
            client_socket = self.ssl_context.wrap_socket(client_socket, server_side=True)
        return client_socket, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        return self._address_allowed(host)


class StorageSCP:
    """The listener's DICOM server.

    Parameters
    ----------
    ae_title:
        Our AE title (called AE title is checked: associations to another title are rejected).
    receiver:
        Stores instances durably (spool + job store) and answers the status.
    allow_list:
        Calling AE titles/addresses allowed; an empty list accepts everyone (logged as a warning).
    ssl_context:
        DICOM TLS (PS3.15 B.1); with a CA loaded and ``CERT_REQUIRED`` clients need a certificate.
    max_associations:
        Simultaneous associations; more are rejected (transient, local limit exceeded).
    timeout_s:
        ACSE/DIMSE/network timeouts; a silent peer is dropped after this long.
    """

    def __init__(
        self,
        ae_title: str,
        receiver: InstanceReceiver,
        *,
        allow_list: AllowList | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_associations: int = 32,
        timeout_s: float = 60.0,
    ) -> None:
        self.ae_title = ae_title
        self.receiver = receiver
        self.allow_list = allow_list or AllowList([])
        self.ssl_context = ssl_context
        self.max_associations = max_associations
        self.timeout_s = timeout_s
        self._server: _AddressCheckingServer | None = None
        self._thread: threading.Thread | None = None
        self._unpaired: set[int] = set()
        self._counts: dict[int, int] = {}
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the SCP is not running")
        return int(self._server.server_address[1])

    def start(self, host: str, port: int) -> None:
        """Bind ``host:port`` (port 0 picks a free one, see :attr:`port`) and serve in a thread."""
        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = self.max_associations
        # Larger P-DATA PDUs: pynetdicom decodes each PDU in Python, so a 0.5 MB CT slice in
        # 16 KB PDUs (its default) costs 32 decodes and joins; in 1 MiB PDUs, one.
        ae.maximum_pdu_size = MAX_PDU_BYTES
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.require_called_aet = True
        ae.require_calling_aet = self.allow_list.required_titles()
        ae.add_supported_context(Verification, [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian])
        # Every storage class is negotiated, so a non-image one gets a proper 0x0122 status
        # instead of a silently rejected presentation context.
        for sop_class in sorted(_STORAGE_CLASSES.values()):
            ae.add_supported_context(sop_class, list(STORAGE_TRANSFER_SYNTAXES))
        handlers = [
            (evt.EVT_C_ECHO, _handle_echo, [self]),
            (evt.EVT_C_STORE, _handle_store, [self]),
            (evt.EVT_ESTABLISHED, _on_established, [self]),
            (evt.EVT_REJECTED, _on_rejected, [self]),
            (evt.EVT_RELEASED, _on_closed, [self, "association-released"]),
            (evt.EVT_ABORTED, _on_closed, [self, "association-aborted"]),
        ]
        server = ae.make_server(
            (host, port),
            ssl_context=self.ssl_context,
            evt_handlers=handlers,
            server_class=_AddressCheckingServer,
            address_allowed=self._address_allowed,
        )
        # start_server() does this too: AssociationServer.shutdown() removes itself from the list.
        ae._servers.append(server)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="dicom-scp", daemon=True)
        self._thread.start()
        if not self.allow_list:
            logger.warning("no --allow list: associations from any AE title and address are accepted")
        logger.info(
            "DICOM listener %s on %s:%d%s",
            self.ae_title,
            host,
            self.port,
            " (TLS)" if self.ssl_context else "",
        )

    def stop(self) -> None:
        """Stop accepting associations and close the socket (open associations finish)."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    # -- allow-list -----------------------------------------------------------------------------

    def _address_allowed(self, host: str) -> bool:
        if self.allow_list.allows_address(host):
            return True
        logger.warning("refused connection from %s: address not on the allow-list", host)
        self.receiver.audit.event("association-refused", address=host, reason="address not on the allow-list")
        self.receiver.metrics.association("refused-address")
        return False


def _peer(event: evt.Event) -> tuple[str, str, int]:
    requestor = event.assoc.requestor
    return str(requestor.ae_title).strip(), str(requestor.address), int(requestor.port)


def _on_established(event: evt.Event, scp: StorageSCP) -> None:
    calling, address, port = _peer(event)
    paired = scp.allow_list.allows(calling, address)
    with scp._lock:
        scp._counts[id(event.assoc)] = 0
        if not paired:
            scp._unpaired.add(id(event.assoc))
    scp.receiver.metrics.association("accepted" if paired else "unpaired")
    scp.receiver.audit.event(
        "association-accepted" if paired else "association-refused",
        calling_aet=calling,
        called_aet=scp.ae_title,
        address=address,
        port=port,
        tls=scp.ssl_context is not None,
        association=id(event.assoc),
        reason=None if paired else "AE title not allowed from this address; every request refused (0x0124)",
    )


def _on_rejected(event: evt.Event, scp: StorageSCP) -> None:
    calling, address, port = _peer(event)
    logger.warning(
        "rejected association from %s at %s: calling AE title not allowed or limit reached", calling, address
    )
    scp.receiver.metrics.association("rejected")
    scp.receiver.audit.event(
        "association-refused",
        calling_aet=calling,
        address=address,
        port=port,
        reason="A-ASSOCIATE-RJ (calling/called AE title not recognized or too many associations)",
    )


def _on_closed(event: evt.Event, scp: StorageSCP, name: str) -> None:
    calling, address, _ = _peer(event)
    with scp._lock:
        count = scp._counts.pop(id(event.assoc), None)
        scp._unpaired.discard(id(event.assoc))
    if count is None:  # never established (rejected): already audited
        return
    scp.receiver.audit.event(
        name, calling_aet=calling, address=address, association=id(event.assoc), n_instances=count
    )


def _handle_echo(event: evt.Event, scp: StorageSCP) -> int:
    if id(event.assoc) in scp._unpaired:
        return int(StoreStatus.NOT_AUTHORIZED)
    return int(StoreStatus.SUCCESS)


def _handle_store(event: evt.Event, scp: StorageSCP) -> Dataset:
    calling, address, _ = _peer(event)
    request = StoreRequest(
        sop_class_uid=str(event.request.AffectedSOPClassUID),
        sop_instance_uid=str(event.request.AffectedSOPInstanceUID),
        transfer_syntax_uid=str(event.context.transfer_syntax),
        calling_aet=calling,
        address=address,
    )
    if id(event.assoc) in scp._unpaired:
        return scp.receiver.refuse(
            request, StoreStatus.NOT_AUTHORIZED, "calling AE not allowed from this address"
        )
    if request.sop_class_uid not in IMAGE_STORAGE_SOP_CLASSES:
        return scp.receiver.refuse(
            request, StoreStatus.SOP_CLASS_NOT_SUPPORTED, "not an image storage SOP class; nothing to process"
        )
    header = b"\x00" * 128 + b"DICM" + _encode_file_meta(event)
    result = scp.receiver.receive(request, header, event.encoded_dataset(include_meta=False))
    if result.Status == StoreStatus.SUCCESS:
        with scp._lock:
            if id(event.assoc) in scp._counts:
                scp._counts[id(event.assoc)] += 1
    return result


def _encode_file_meta(event: evt.Event) -> bytes:
    return encode_file_meta(event.file_meta)
