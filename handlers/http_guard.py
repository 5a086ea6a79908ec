"""The payload-URL guard of http.request: a socket factory for aiohttp that refuses loopback,
private, link-local and other non-public addresses at connect time, after DNS resolution."""

from __future__ import annotations

import contextvars
import errno
import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any


class RefusedAddress(OSError):
    """A payload URL about to connect to an address it may not reach. An OSError, so that
    aiohttp treats it as that address failing to connect (and tries the next one)."""


@dataclass
class Connecting:
    """What the guard saw while one request connected (the addresses refused, the count let
    through), so that a refusal becomes a permanent failure rather than a retried one."""

    refused: list[str] = field(default_factory=list)
    allowed: int = 0


# Per request: aiohttp connects inside the request's task (or tasks copied from its context).
connecting: contextvars.ContextVar[Connecting | None] = contextvars.ContextVar(
    "stoker_http_connecting", default=None
)


def guarded_socket(addr_info: tuple[Any, ...]) -> socket.socket:
    """aiohttp's socket factory for payload URLs: it sees each address after DNS resolution
    (or an IP literal, which aiohttp never resolves) just before it is connected to, so DNS
    rebinding cannot slip a private address past the allowlist."""
    family, kind, proto, _, sockaddr = addr_info
    ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
    reason = refused_range(ip)
    mapped = getattr(ip, "ipv4_mapped", None)
    address = f"::ffff:{mapped}" if mapped else str(ip)
    attempt = connecting.get()
    if reason is not None:
        if attempt is not None:
            attempt.refused.append(f"{address} ({reason})")
        raise RefusedAddress(errno.EACCES, f"{address} ({reason}) may not be reached")
    if attempt is not None:
        attempt.allowed += 1
    return socket.socket(family, kind, proto)


NAT64 = ipaddress.ip_network("64:ff9b::/96")


def refused_range(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Which non-public range the address is in, or None for a public address. IPv6 forms
    that carry an IPv4 address (mapped, NAT64, 6to4) are judged by that address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return refused_range(ip.ipv4_mapped)
        if ip in NAT64:
            return refused_range(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.sixtofour is not None:
            return refused_range(ip.sixtofour)
    ranges = (
        ("loopback", ip.is_loopback),
        ("unspecified", ip.is_unspecified),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
    )
    for name, inside in ranges:
        if inside:
            return name
    return None if ip.is_global else "not globally routable"
