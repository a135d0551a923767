"""The DICOM nodes dicomgate talks to, and how a caller is recognised as one of them."""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

log = logging.getLogger(__name__)

PEER_KINDS = ("modality", "pacs", "workstation", "other")
ANY_SERVICE = "*"


def check_ae_title(value: str) -> str:
    """Return the AE title as it is compared (no padding), or raise ValueError.

    PS3.5: 1 to 16 characters of the default repertoire, no backslash or control
    characters, and not only spaces.
    """
    title = value.strip()
    if not title:
        raise ValueError("an AE title cannot be empty")
    if len(title) > 16:
        raise ValueError(f"AE title {value!r} is longer than 16 characters")
    if not all(" " <= ch <= "~" and ch != "\\" for ch in title):
        raise ValueError(f"AE title {value!r} has a character DICOM does not allow")
    return title


def _ae_title(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    check_ae_title(value)


def one_of(*allowed: str):
    """An attrs validator whose message lists the allowed values."""
    def check(instance: Any, attribute: attrs.Attribute, value: str) -> None:
        if value not in allowed:
            raise ValueError(f"{attribute.name} {value!r} is not one of {', '.join(allowed)}")
    return check


def _port(instance: Any, attribute: attrs.Attribute, value: int | None) -> None:
    if value is not None and not 0 < value < 65536:
        raise ValueError(f"{attribute.name} {value} is not a TCP port (1-65535)")


@attrs.frozen
class Peer:
    """A configured DICOM node: a modality, a PACS or a viewer workstation.

    ``host`` restricts the addresses a caller with this AE title may come from
    (``None``: any); ``port`` is where dicomgate reaches the peer as an SCU.
    ``allow`` names the services the peer may use (``"*"``: all). ``settings``
    holds the per-peer sections of plugins, keyed by plugin name, each already
    validated into the class the plugin registered.
    """

    ae_title: str = attrs.field(converter=str.strip, validator=_ae_title)
    host: str | None = None
    port: int | None = attrs.field(default=None, validator=_port)
    kind: str = attrs.field(default="modality", validator=one_of(*PEER_KINDS))
    description: str = ""
    allow: tuple[str, ...] = attrs.field(default=(ANY_SERVICE,), converter=tuple)
    settings: Mapping[str, Any] = attrs.field(factory=dict, eq=False)

    def may_use(self, service_name: str) -> bool:
        return ANY_SERVICE in self.allow or service_name in self.allow

    def plugin_settings(self, plugin: str) -> Any | None:
        """This peer's section for ``plugin``, or None when it has none."""
        return self.settings.get(plugin)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _addresses_of(host: str) -> frozenset[str]:
    """Every IP address ``host`` stands for; a name is resolved once, at start."""
    try:
        return frozenset({str(ipaddress.ip_address(host))})
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        log.warning("peer host %r does not resolve (%s): its calls will be refused", host, exc)
        return frozenset()
    return frozenset(str(ipaddress.ip_address(info[4][0])) for info in infos)


class PeerDirectory:
    """Finds the configured peer behind an incoming association."""

    def __init__(self, peers: Iterable[Peer], accept_unknown: bool):
        self.peers = tuple(peers)
        self.accept_unknown = accept_unknown
        self._by_title: dict[str, list[tuple[Peer, frozenset[str] | None]]] = {}
        for peer in self.peers:
            addresses = None if peer.host is None else _addresses_of(peer.host)
            self._by_title.setdefault(peer.ae_title, []).append((peer, addresses))

    def identify(self, calling_ae: str, address: str) -> Peer | None:
        """The peer that ``calling_ae`` calling from ``address`` is, if any."""
        normalised = _normalise_address(address)
        for peer, addresses in self._by_title.get(calling_ae.strip(), ()):
            if addresses is None or normalised in addresses:
                return peer
        return None

    def named(self, name: str) -> Peer | None:
        """A peer by AE title, for commands such as ``dicomgate echo CT1``."""
        candidates = self._by_title.get(name.strip(), [])
        return candidates[0][0] if candidates else None


def _normalise_address(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ip)
