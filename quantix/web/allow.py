"""Which clients may use a listener: configured networks, loopback and the control plane.

``None`` networks means everyone (the control plane sends no credentials, so the default must
stay open for compatibility); a list restricts to loopback, those networks and the addresses the
control-plane URL's host resolves to. Resolution is blocking: :func:`resolve_host` runs in a
thread, and :meth:`ClientAllowList.with_addresses` returns a new policy, so the check itself is
a pure, cheap lookup on the reactor.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

import attrs

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@attrs.frozen
class ClientAllowList:
    """A client policy; call it with the peer's address string."""

    networks: tuple[Network, ...] | None = None

    @classmethod
    def from_cidrs(cls, cidrs: Iterable[str] | None) -> ClientAllowList:
        """``None`` → open; otherwise each entry is an address or CIDR (ValueError names a bad one)."""
        if cidrs is None:
            return cls(None)
        networks = []
        for entry in cidrs:
            try:
                networks.append(ipaddress.ip_network(str(entry).strip(), strict=False))
            except ValueError:
                raise ValueError(f"not an address or CIDR: {entry!r}") from None
        return cls(tuple(networks))

    def with_addresses(self, addresses: Iterable[str]) -> ClientAllowList:
        """The same policy also allowing ``addresses`` (no-op when open)."""
        if self.networks is None:
            return self
        extra = [ipaddress.ip_network(a) for a in addresses if _address(a) is not None]
        return attrs.evolve(self, networks=self.networks + tuple(extra))

    def __call__(self, host: str) -> bool:
        if self.networks is None:
            return True
        addr = _address(host)
        if addr is None:
            return False
        return addr.is_loopback or any(addr in net for net in self.networks)


def resolve_host(url: str | None) -> list[str]:
    """Blocking (thread): the addresses ``url``'s host resolves to; ``[]`` on failure."""
    if not url:
        return []
    host = urlsplit(url).hostname
    if not host:
        return []
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return []
    return sorted({str(info[4][0]) for info in infos})
