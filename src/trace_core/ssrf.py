"""Which addresses a webhook may be sent to: the SSRF guard of the Delivery Service.

Theory of operation
-------------------
A destination URL names a host. The Delivery Service resolves it once, passes every address
through ``refusal`` and connects to an address that was checked (never resolving again), so
a name that resolves to a public address at one moment and to ``127.0.0.1`` the next cannot
reach an internal service. The same check runs when a destination is created and before every
send.

``refusal(address)`` names why an address is refused, or returns ``None`` for a public one.
Refused: loopback, private (RFC 1918, IPv6 unique-local), link-local, CGNAT (100.64.0.0/10),
multicast, unspecified and ``0.0.0.0/8``, broadcast, documentation, benchmarking and reserved
ranges, cloud metadata endpoints, and every IPv6 form that carries an IPv4 address (mapped
``::ffff:a.b.c.d``, compatible ``::a.b.c.d``, NAT64 ``64:ff9b::/96`` and ``64:ff9b:1::/48``,
6to4 ``2002::/16``, Teredo ``2001::/32``) -- the embedded IPv4 address is checked, and NAT64 and
Teredo are refused outright (the gateway decides where they go). Anything Python's
``ipaddress`` does not call global is refused as well.

``parse_ip_literal`` reads a host that is an address written any way a resolver accepts
(``127.1``, ``2130706433``, ``0x7f.0.0.1``, ``0177.0.0.1``, ``[::1]``), so such a host is
checked as the address it is rather than looked up as a name.

An ``AllowList`` (tests: the local receiver on loopback) admits listed networks; cloud
metadata addresses are never admitted.

Pure: only ``ipaddress`` -- no sockets, no DNS.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final

import attrs

from trace_core import errors

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _nets(*cidrs: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


#: Cloud metadata endpoints (AWS/GCP/Azure/OpenStack, AWS IPv6, ECS task metadata, Alibaba,
#: Oracle): refused even when an allow-list covers them.
METADATA: Final = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",
        "169.254.170.2",
        "fd00:ec2::254",
        "100.100.100.200",
        "192.0.0.192",
    )
)

#: ``(reason, networks)``, checked in order; the first match names the refusal.
_V4_RULES: Final[tuple[tuple[str, tuple[Network, ...]], ...]] = (
    ("unspecified", _nets("0.0.0.0/8")),
    ("loopback", _nets("127.0.0.0/8")),
    ("private", _nets("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")),
    ("link-local", _nets("169.254.0.0/16")),
    ("cgnat", _nets("100.64.0.0/10")),
    ("multicast", _nets("224.0.0.0/4")),
    ("broadcast", _nets("255.255.255.255/32")),
    ("reserved", _nets("240.0.0.0/4", "192.0.0.0/24", "192.88.99.0/24", "198.18.0.0/15")),
    ("documentation", _nets("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")),
)
_V6_RULES: Final[tuple[tuple[str, tuple[Network, ...]], ...]] = (
    ("unspecified", _nets("::/128")),
    ("loopback", _nets("::1/128")),
    ("nat64", _nets("64:ff9b::/96", "64:ff9b:1::/48")),
    ("teredo", _nets("2001::/32")),
    ("private", _nets("fc00::/7", "fec0::/10")),
    ("link-local", _nets("fe80::/10")),
    ("multicast", _nets("ff00::/8")),
    ("reserved", _nets("100::/64", "2001:10::/28", "2001:20::/28", "::/8")),
    ("documentation", _nets("2001:db8::/32", "3fff::/20")),
)
_MAPPED: Final = ipaddress.ip_network("::ffff:0:0/96")
_SIX_TO_FOUR: Final = ipaddress.ip_network("2002::/16")


@attrs.frozen
class AllowList:
    """Networks admitted although they would be refused (never a metadata address)."""

    networks: tuple[Network, ...] = ()

    @classmethod
    def of(cls, cidrs: Iterable[str]) -> AllowList:
        """From CIDR strings. Raises ``ValidationFailed`` (``field="allow"``)."""
        nets: list[Network] = []
        for cidr in cidrs:
            try:
                nets.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError as exc:
                raise errors.ValidationFailed(f"not a network: {cidr!r}", field="allow") from exc
        return cls(tuple(nets))

    def admits(self, address: Address) -> bool:
        return any(address.version == n.version and address in n for n in self.networks)


NOTHING_ALLOWED: Final = AllowList()


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries: mapped, compatible (``::a.b.c.d``, except
    ``::`` and ``::1``) or 6to4; ``None`` for any other."""
    if address in _MAPPED:
        return address.ipv4_mapped
    packed = int(address)
    if packed >> 32 == 0 and packed > 1:
        return ipaddress.IPv4Address(packed & 0xFFFFFFFF)
    if address in _SIX_TO_FOUR:
        return address.sixtofour
    return None


def _rule(address: Address) -> str | None:
    rules = _V4_RULES if address.version == 4 else _V6_RULES
    for reason, nets in rules:
        if any(address in n for n in nets):
            return reason
    if not address.is_global:
        return "not global"
    return None


def refusal(address: Address, *, allow: AllowList = NOTHING_ALLOWED) -> str | None:
    """Why ``address`` may not be sent to (e.g. ``"loopback"``, ``"metadata"``,
    ``"ipv4-mapped loopback"``), or ``None`` when it may."""
    inner = embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else None
    for candidate in (address, inner):
        if candidate is not None and candidate in METADATA:
            return "metadata"
    if allow.admits(address) or (inner is not None and allow.admits(inner)):
        return None
    if inner is not None:
        inner_reason = _rule(inner)
        if inner_reason is not None:
            return f"ipv4-embedded {inner_reason}"
        if address in _MAPPED:
            return None  # a mapped public IPv4 address is that address
    return _rule(address)


def _ipv4_part(text: str) -> int | None:
    """One part of an ``inet_aton`` address: decimal, octal (leading 0) or hex (0x)."""
    if not text:
        return None
    try:
        if text[:2].lower() == "0x":
            return int(text[2:], 16) if text[2:] else 0
        if len(text) > 1 and text[0] == "0":
            return int(text[1:], 8)
        return int(text, 10) if text.isdigit() else None
    except ValueError:
        return None


def _inet_aton(host: str) -> ipaddress.IPv4Address | None:
    parts = host.split(".")
    if host.endswith("."):
        parts = parts[:-1]
    if not 1 <= len(parts) <= 4:
        return None
    values = [_ipv4_part(p) for p in parts]
    if any(v is None for v in values):
        return None
    nums = [v for v in values if v is not None]
    # a.b.c.d, a.b.c (c: 16 bits), a.b (b: 24 bits), a (32 bits)
    last_bits = 8 * (5 - len(nums))
    if any(v > 0xFF for v in nums[:-1]) or nums[-1] >= 1 << last_bits:
        return None
    value = 0
    for v in nums[:-1]:
        value = (value << 8) | v
    value = (value << last_bits) | nums[-1]
    return ipaddress.IPv4Address(value)


def parse_ip_literal(host: str) -> Address | None:
    """The address ``host`` spells (any form a resolver would read as an address, IPv6 in
    brackets or not, with a zone id dropped), or ``None`` for a DNS name."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        try:
            return ipaddress.IPv6Address(text.split("%", 1)[0])
        except ValueError:
            return None
    return _inet_aton(text)


def check_addresses(
    host: str, addresses: Iterable[Address], *, allow: AllowList = NOTHING_ALLOWED
) -> list[Address]:
    """The addresses ``host`` resolved to, once all are allowed. One refused address refuses
    the host (a name with a private record is not used even through its public ones).

    Raises ``ValidationFailed`` (``field="url"``) naming the host, the address and why, or
    that it resolved to nothing.
    """
    checked = list(addresses)
    if not checked:
        raise errors.ValidationFailed(f"{host} resolves to no address", field="url")
    for address in checked:
        reason = refusal(address, allow=allow)
        if reason is not None:
            raise errors.ValidationFailed(
                f"{host} resolves to {address}, which is refused ({reason})", field="url"
            )
    return checked


__all__ = [
    "METADATA",
    "NOTHING_ALLOWED",
    "Address",
    "AllowList",
    "check_addresses",
    "embedded_ipv4",
    "parse_ip_literal",
    "refusal",
]
