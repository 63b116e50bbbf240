"""Where webhooks may go: http(s) URLs on ports 80 and 443 whose every address is public.

A webhook URL is checked when a job is submitted and again at each delivery,
against the address actually connected to (a name may resolve elsewhere by
then: DNS rebinding). Loopback, private, link-local (cloud metadata included),
multicast, reserved and other non-global addresses are refused unless they lie
in a configured allowlist (``webhooks.allow_cidrs``). An IPv6 address that
carries an IPv4 address (IPv4-mapped, -compatible or -translated, NAT64, 6to4,
Teredo) is judged by the IPv4 address it carries. Other ports are refused unless
``webhooks.allow_ports`` lists them. A refusal never says what a name resolved to.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Container, Iterable, Sequence
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: (host, port) → the addresses the host resolves to.
Resolve = Callable[[str, int], Awaitable[list[str]]]

# Metadata services some clouds run outside the link-local range.
_METADATA = frozenset(
    ipaddress.ip_address(a) for a in ("100.100.100.200", "fd00:ec2::254", "169.254.169.254")
)
# IPv6 ranges whose last 32 bits are an IPv4 address: NAT64's well-known prefix
# (RFC 6052), IPv4-translated (RFC 2765) and the deprecated IPv4-compatible form.
_CARRY_LAST_32 = tuple(
    ipaddress.IPv6Network(n) for n in ("64:ff9b::/96", "::ffff:0:0:0/96", "::/96")
)
# NAT64 for local use (RFC 8215): where the IPv4 address sits depends on the
# operator's prefix length, and the range is never public; refused as a whole.
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
#: Ports webhook URLs may use unless ``webhooks.allow_ports`` lists more.
WEB_PORTS = frozenset((80, 443))
#: The longest part of a client's URL quoted back in a refusal.
_QUOTED_MAX = 100


class BlockedURL(ValueError):
    """The URL may not be called; the message says why."""


class Ports:
    """The ports webhook URLs may use: 80, 443 and the configured ones.

    ``extra`` holds port numbers and ranges (``"8000-8999"``); raises
    :class:`ValueError` for anything else.
    """

    def __init__(self, extra: Iterable[int | str] = ()) -> None:
        ranges: list[tuple[int, int]] = []
        for item in extra:
            low, _, high = str(item).partition("-")
            try:
                first, last = int(low), int(high or low)
            except ValueError:
                raise ValueError(f"not a port or a port range: {item!r}") from None
            if not 1 <= first <= last <= 65535:
                raise ValueError(f"not a port or a port range in 1-65535: {item!r}")
            ranges.append((first, last))
        self._ranges = tuple(ranges)

    def __contains__(self, port: object) -> bool:
        if port in WEB_PORTS:
            return True
        return isinstance(port, int) and any(lo <= port <= hi for lo, hi in self._ranges)


def networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses an IPv6 address carries (Teredo: server and client), if any."""
    if address.ipv4_mapped is not None:
        return (address.ipv4_mapped,)
    if address.sixtofour is not None:
        return (address.sixtofour,)
    if address.teredo is not None:
        return address.teredo
    if any(address in net for net in _CARRY_LAST_32):
        return (ipaddress.IPv4Address(int(address) & 0xFFFFFFFF),)
    return ()


def address_allowed(address: IPAddress, allow: Sequence[Network]) -> bool:
    if any(address.version == net.version and address in net for net in allow):
        return True
    if isinstance(address, ipaddress.IPv6Address):
        if address in _NAT64_LOCAL:
            return False
        carried = embedded_ipv4(address)
        if carried:
            return all(address_allowed(v4, allow) for v4 in carried)
    return address.is_global and not address.is_multicast and address not in _METADATA


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _quoted(text: str) -> str:
    return repr(text if len(text) <= _QUOTED_MAX else text[:_QUOTED_MAX] + "…")


def split_url(url: str, ports: Container[int] = WEB_PORTS) -> tuple[str, int]:
    """The host and port of an http(s) URL on an allowed port; raises :class:`BlockedURL`
    otherwise."""
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
    port = port or (443 if parts.scheme == "https" else 80)
    if port not in ports:
        raise BlockedURL(
            f"webhook_url port {port} is not allowed: webhooks go to ports 80 and 443 "
            "unless webhooks.allow_ports lists others"
        )
    return parts.hostname, port


async def system_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return [str(info[4][0]) for info in infos]


def check_addresses(host: str, addresses: Iterable[str], allow: Sequence[Network]) -> None:
    """Raise :class:`BlockedURL` unless every address is allowed; the message names the
    host as given, never the address a name resolved to."""
    for text in addresses:
        address = ipaddress.ip_address(text.split("%", 1)[0])
        if not address_allowed(address, allow):
            raise BlockedURL(
                f"webhook_url host {_quoted(host)} is not a public address, or resolves to "
                "one that is not (loopback, private, link-local, multicast and metadata "
                "addresses are refused unless allowed in webhooks.allow_cidrs)"
            )


async def check_url(
    url: str,
    allow: Sequence[Network],
    resolve: Resolve = system_resolve,
    *,
    ports: Container[int] = WEB_PORTS,
) -> list[str]:
    """Check ``url`` and return the addresses its host resolves to (all of them allowed)."""
    host, port = split_url(url, ports)
    if is_ip(host):
        addresses = [host]
    else:
        try:
            addresses = await resolve(host, port)
        except OSError as e:
            raise BlockedURL(f"webhook_url host {_quoted(host)} does not resolve") from e
        if not addresses:
            raise BlockedURL(f"webhook_url host {_quoted(host)} does not resolve")
    check_addresses(host, addresses, allow)
    return addresses
