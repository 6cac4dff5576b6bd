"""IP anonymisation at write: the full address never reaches storage.

IPv4 is cut to its /24 and IPv6 to its /48, the prefixes the privacy notice promises;
an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, as a dual-stack socket reports an IPv4
peer) is an IPv4 address and is cut to /24, not /48, which would keep all of it.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

IPV4_PREFIX = 24
IPV6_PREFIX = 48

_BRACKETED = re.compile(r"^\[([^\]]+)\](?::(\d{1,5}))?$")
_V4_WITH_PORT = re.compile(r"^([0-9.]+):(\d{1,5})$")


def anonymise_ip(text: str) -> str:
    """'203.0.113.77' -> '203.0.113.0', '[2001:db8:abcd:12::1]:5060' -> '2001:db8:abcd::'.

    A port (and the brackets around an IPv6 address) is accepted and dropped. Any other
    text raises ValueError, whose message does not repeat the input (it may be personal).
    """
    address = _parse(text)
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if isinstance(address, IPv4Address):
        return str(IPv4Network((address, IPV4_PREFIX), strict=False).network_address)
    # The network address carries no zone id (`%eth0`), so none is written either.
    return str(IPv6Network((address, IPV6_PREFIX), strict=False).network_address)


def _parse(text: str) -> IPv4Address | IPv6Address:
    if not isinstance(text, str):
        # ip_address() would take an int as an address; only text is an address here.
        raise TypeError("expected the address as text")
    host, port = text.strip(), None
    if (match := _BRACKETED.match(host)) or (match := _V4_WITH_PORT.match(host)):
        host, port = match.group(1), match.group(2)
    if port is not None and int(port) > 65535:
        raise ValueError("not an IP address: port out of range")
    try:
        address = ip_address(host)
    except ValueError:
        # ipaddress repeats the input in its message; `from None` keeps it out of tracebacks.
        raise ValueError("not an IP address") from None
    if text.strip().startswith("[") and not isinstance(address, IPv6Address):
        raise ValueError("not an IP address: brackets are for IPv6 only")
    return address
