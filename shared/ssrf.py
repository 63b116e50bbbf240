"""Where webhooks may go: http(s) URLs whose every address is public.

A webhook URL is checked when a job is submitted and again at each delivery,
against the address actually connected to (a name may resolve elsewhere by
then: DNS rebinding). Loopback, private, link-local (cloud metadata included),
multicast, reserved and other non-global addresses are refused unless they lie
in a configured allowlist.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: (host, port) → the addresses the host resolves to.
Resolve = Callable[[str, int], Awaitable[list[str]]]

# Metadata services some clouds run outside the link-local range.
_METADATA = frozenset(
    ipaddress.ip_address(a) for a in ("100.100.100.200", "fd00:ec2::254", "169.254.169.254")
)


class BlockedURL(ValueError):
    """The URL may not be called; the message says why."""


def networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def address_allowed(address: IPAddress, allow: Sequence[Network]) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in net for net in allow):
        return True
    return address.is_global and not address.is_multicast and address not in _METADATA


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def split_url(url: str) -> tuple[str, int]:
    """The host and port of an http(s) URL; raises :class:`BlockedURL` otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise BlockedURL(f"webhook_url is not a valid URL: {e}") from e
    if parts.scheme not in ("http", "https"):
        raise BlockedURL("webhook_url must be an http or https URL")
    if not parts.hostname:
        raise BlockedURL("webhook_url has no host")
    if parts.username or parts.password:
        raise BlockedURL("webhook_url must not carry credentials")
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


async def system_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return [str(info[4][0]) for info in infos]


def check_addresses(host: str, addresses: Iterable[str], allow: Sequence[Network]) -> None:
    for text in addresses:
        address = ipaddress.ip_address(text.split("%", 1)[0])
        if not address_allowed(address, allow):
            raise BlockedURL(
                f"webhook_url host {host!r} resolves to {address}, which is not a public "
                "address (loopback, private, link-local, multicast and metadata addresses "
                "are refused unless allowed in webhooks.allow_cidrs)"
            )


async def check_url(
    url: str, allow: Sequence[Network], resolve: Resolve = system_resolve
) -> list[str]:
    """Check ``url`` and return the addresses its host resolves to (all of them allowed)."""
    host, port = split_url(url)
    if is_ip(host):
        addresses = [host]
    else:
        try:
            addresses = await resolve(host, port)
        except OSError as e:
            raise BlockedURL(f"webhook_url host {host!r} does not resolve: {e}") from e
        if not addresses:
            raise BlockedURL(f"webhook_url host {host!r} does not resolve")
    check_addresses(host, addresses, allow)
    return addresses
