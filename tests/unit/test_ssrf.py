"""The SSRF guard (trace_core.ssrf): every refused address form, literal hosts written any way a
resolver reads them, the allow-list, and whole-host checks."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trace_core import errors
from trace_core.ssrf import (
    AllowList,
    check_addresses,
    embedded_ipv4,
    parse_ip_literal,
    refusal,
)


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


REFUSED = [
    # IPv4
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("10.0.0.1", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("169.254.1.1", "link-local"),
    ("169.254.169.254", "metadata"),
    ("169.254.170.2", "metadata"),
    ("100.100.100.200", "metadata"),
    ("192.0.0.192", "metadata"),
    ("100.64.0.1", "cgnat"),
    ("100.127.255.255", "cgnat"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("255.255.255.255", "broadcast"),
    ("240.0.0.1", "reserved"),
    ("192.0.0.8", "reserved"),
    ("198.18.0.1", "reserved"),
    ("192.0.2.1", "documentation"),
    ("198.51.100.1", "documentation"),
    ("203.0.113.1", "documentation"),
    # IPv6
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("fd00:ec2::254", "metadata"),
    ("fc00::1", "private"),
    ("fd12:3456::1", "private"),
    ("fec0::1", "private"),
    ("fe80::1", "link-local"),
    ("ff02::1", "multicast"),
    ("ff05::2", "multicast"),
    ("2001:db8::1", "documentation"),
    ("100::1", "reserved"),
    ("2001::1", "teredo"),
    # IPv4 inside IPv6
    ("::ffff:127.0.0.1", "ipv4-embedded loopback"),
    ("::ffff:7f00:1", "ipv4-embedded loopback"),
    ("::ffff:10.0.0.1", "ipv4-embedded private"),
    ("::ffff:169.254.169.254", "metadata"),
    ("::ffff:100.64.0.1", "ipv4-embedded cgnat"),
    ("::ffff:0.0.0.0", "ipv4-embedded unspecified"),
    ("::127.0.0.1", "ipv4-embedded loopback"),
    ("::10.0.0.1", "ipv4-embedded private"),
    ("::169.254.169.254", "metadata"),
    ("::8.8.8.8", "reserved"),  # the deprecated compatible form is never used
    ("64:ff9b::127.0.0.1", "nat64"),
    ("64:ff9b::a9fe:a9fe", "nat64"),
    ("64:ff9b::8.8.8.8", "nat64"),
    ("64:ff9b:1::1", "nat64"),
    ("2002:7f00:1::", "ipv4-embedded loopback"),
    ("2002:a00:1::1", "ipv4-embedded private"),
    ("2002:a9fe:a9fe::", "metadata"),
]

ALLOWED = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8"]


@pytest.mark.parametrize(("address", "reason"), REFUSED)
def test_refused(address: str, reason: str) -> None:
    assert refusal(ip(address)) == reason


@pytest.mark.parametrize("address", ALLOWED)
def test_public_allowed(address: str) -> None:
    assert refusal(ip(address)) is None


# Hosts written as addresses in forms a resolver reads: each is the address it spells.
LITERALS = [
    ("127.0.0.1", "127.0.0.1"),
    ("127.1", "127.0.0.1"),
    ("127.0.1", "127.0.0.1"),
    ("2130706433", "127.0.0.1"),
    ("0x7f000001", "127.0.0.1"),
    ("0x7f.0.0.1", "127.0.0.1"),
    ("0x7F.1", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"),
    ("017700000001", "127.0.0.1"),
    ("0", "0.0.0.0"),
    ("0x", "0.0.0.0"),  # inet_aton reads a bare 0x as 0
    ("0.0.0.0", "0.0.0.0"),
    ("169.254.169.254", "169.254.169.254"),
    ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
    ("0251.0376.0251.0376", "169.254.169.254"),
    ("2852039166", "169.254.169.254"),
    ("0xA9FEA9FE", "169.254.169.254"),
    ("169.254.43518", "169.254.169.254"),
    ("10.1", "10.0.0.1"),
    ("100.64.0.1.", "100.64.0.1"),
    ("[::1]", "::1"),
    ("::1", "::1"),
    ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1"),
    ("[fe80::1%eth0]", "fe80::1"),
    ("[64:ff9b::7f00:1]", "64:ff9b::7f00:1"),
    ("[fd00:ec2::254]", "fd00:ec2::254"),
]


@pytest.mark.parametrize(("host", "address"), LITERALS)
def test_literal_hosts(host: str, address: str) -> None:
    parsed = parse_ip_literal(host)
    assert parsed == ip(address)
    assert refusal(parsed) is not None


@pytest.mark.parametrize(
    "host",
    ["example.com", "localhost", "receiver.test", "1.2.3.4.5", "256.1.1.1", "1.2.3.256",
     "08.0.0.1", "1.2.3.0x1g", "[not-v6]", "", "1..2", "1.16777216"],
)  # fmt: skip
def test_names_are_not_literals(host: str) -> None:
    assert parse_ip_literal(host) is None


def test_embedded_ipv4() -> None:
    assert embedded_ipv4(ipaddress.IPv6Address("::ffff:1.2.3.4")) == ip("1.2.3.4")
    assert embedded_ipv4(ipaddress.IPv6Address("::1.2.3.4")) == ip("1.2.3.4")
    assert embedded_ipv4(ipaddress.IPv6Address("2002:102:304::")) == ip("1.2.3.4")
    assert embedded_ipv4(ipaddress.IPv6Address("::1")) is None
    assert embedded_ipv4(ipaddress.IPv6Address("::")) is None
    assert embedded_ipv4(ipaddress.IPv6Address("2606:4700::1")) is None


def test_allow_list_admits_listed_networks_but_never_metadata() -> None:
    allow = AllowList.of(["127.0.0.1/32", "::1/128", "169.254.0.0/16"])
    assert refusal(ip("127.0.0.1"), allow=allow) is None
    assert refusal(ip("::1"), allow=allow) is None
    assert refusal(ip("::ffff:127.0.0.1"), allow=allow) is None
    assert refusal(ip("127.0.0.2"), allow=allow) == "loopback"
    assert refusal(ip("10.0.0.1"), allow=allow) == "private"
    assert refusal(ip("169.254.169.254"), allow=allow) == "metadata"
    assert refusal(ip("::ffff:169.254.169.254"), allow=allow) == "metadata"
    assert refusal(ip("169.254.1.1"), allow=allow) is None
    with pytest.raises(errors.ValidationFailed) as exc:
        AllowList.of(["not-a-net"])
    assert exc.value.field == "allow"


def test_check_addresses_refuses_the_host_on_any_bad_address() -> None:
    good = [ip("8.8.8.8"), ip("2606:4700:4700::1111")]
    assert check_addresses("hook.example", good) == good
    with pytest.raises(errors.ValidationFailed) as exc:
        check_addresses("hook.example", [ip("8.8.8.8"), ip("10.0.0.5")])
    assert exc.value.field == "url"
    assert "10.0.0.5" in exc.value.message and "private" in exc.value.message
    with pytest.raises(errors.ValidationFailed, match="no address"):
        check_addresses("hook.example", [])


@given(st.ip_addresses())
def test_refusal_agrees_with_ipaddress_on_non_global(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    # whatever the stdlib does not call global is refused (ours refuses more, never less)
    if not address.is_global:
        assert refusal(address) is not None


@given(st.integers(0, 2**32 - 1))
def test_every_ipv4_spelling_parses_to_itself(value: int) -> None:
    address = ipaddress.IPv4Address(value)
    a, b, c, d = address.packed
    for spelled in (str(value), hex(value), f"{a}.{(b << 16) | (c << 8) | d}",
                    f"0{a:o}.0{b:o}.0{c:o}.0{d:o}", f"{a}.{b}.{(c << 8) | d}"):  # fmt: skip
        assert parse_ip_literal(spelled) == address
        mapped = ipaddress.IPv6Address(f"::ffff:{address}")
        inner = refusal(address)
        outer = refusal(mapped)
        assert (inner is None) == (outer is None)
