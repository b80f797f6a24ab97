"""Which calling AEs may send to the listener: ``AET``, ``AET@HOST``, ``*@HOST`` entries.

``HOST`` is an IP address, a network in CIDR form (``10.1.0.0/16``) or a host name (resolved once,
when the list is built). ``AET`` alone allows that title from anywhere; ``*@HOST`` allows any title
from that host. An empty list allows everyone (the listener warns at start-up).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["AllowEntry", "AllowList"]

logger = logging.getLogger(__name__)

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AllowEntry:
    """One allow-list entry: an AE title (``None`` = any) and networks (empty = any address)."""

    ae_title: str | None
    networks: tuple[_Network, ...]
    text: str

    @classmethod
    def parse(cls, text: str) -> AllowEntry:
        """Parse ``AET``, ``AET@HOST`` or ``*@HOST``.

        Raises
        ------
        ValueError
            Empty or over-long AE title (PS3.5: at most 16 characters), or a host that is neither an
            address, a network nor a resolvable name.
        """
        title, at, host = str(text).strip().partition("@")
        if not title or len(title) > 16 or "\\" in title:
            raise ValueError(f"allow-list entry {text!r}: AE title must be 1-16 characters (or '*')")
        if at and not host:
            raise ValueError(f"allow-list entry {text!r}: nothing after '@'")
        return cls(None if title == "*" else title, _networks(host, text) if host else (), str(text).strip())

    def matches_address(self, address: str) -> bool:
        if not self.networks:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.networks)


class AllowList:
    """The listener's allow-list of calling AEs (see the module docstring)."""

    def __init__(self, entries: Iterable[str | AllowEntry]) -> None:
        self.entries = tuple(e if isinstance(e, AllowEntry) else AllowEntry.parse(e) for e in entries)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def allows_address(self, address: str) -> bool:
        """Whether any entry admits connections from ``address`` (checked when the socket opens)."""
        return not self.entries or any(entry.matches_address(address) for entry in self.entries)

    def allows(self, ae_title: str, address: str) -> bool:
        """Whether ``ae_title`` may send from ``address``."""
        if not self.entries:
            return True
        return any(
            (entry.ae_title is None or entry.ae_title == ae_title) and entry.matches_address(address)
            for entry in self.entries
        )

    def required_titles(self) -> list[str]:
        """Titles for pynetdicom's ``require_calling_aet`` (empty when a ``*`` entry admits any)."""
        if not self.entries or any(entry.ae_title is None for entry in self.entries):
            return []
        return sorted({entry.ae_title for entry in self.entries if entry.ae_title is not None})


def _networks(host: str, text: str) -> tuple[_Network, ...]:
    host = host.strip("[]")
    try:
        return (ipaddress.ip_network(host, strict=False),)
    except ValueError:
        pass  # not an address or a network: a host name
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise ValueError(f"allow-list entry {text!r}: cannot resolve host {host!r} ({exc})") from exc
    addresses = sorted({info[4][0] for info in infos})
    logger.info("allow-list entry %s: %s resolves to %s", text, host, ", ".join(addresses))
    return tuple(ipaddress.ip_network(address) for address in addresses)
