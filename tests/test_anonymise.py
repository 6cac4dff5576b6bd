"""IP anonymisation: IPv4 cut to /24, IPv6 to /48, ports dropped, anything else refused."""

from __future__ import annotations

import pytest

from privacy.anonymise import anonymise_ip


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("203.0.113.77", "203.0.113.0"),
        ("203.0.113.0", "203.0.113.0"),
        ("10.255.255.255", "10.255.255.0"),
        ("2001:db8:abcd:12::1", "2001:db8:abcd::"),
        ("2001:0db8:abcd:ffff:ffff:ffff:ffff:ffff", "2001:db8:abcd::"),
        ("::1", "::"),
        ("fe80::1%eth0", "fe80::"),
    ],
)
def test_cuts_ipv4_to_24_and_ipv6_to_48(text: str, expected: str) -> None:
    assert anonymise_ip(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("::ffff:203.0.113.77", "203.0.113.0"),
        ("::ffff:cb00:714d", "203.0.113.0"),
        ("[::ffff:203.0.113.77]:5060", "203.0.113.0"),
    ],
)
def test_ipv4_mapped_ipv6_is_cut_as_ipv4(text: str, expected: str) -> None:
    """A /48 of ::ffff:a.b.c.d would keep the whole IPv4 address."""
    assert anonymise_ip(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3.4:5060", "1.2.3.0"),
        ("[2001:db8::1]:5060", "2001:db8::"),
        ("[2001:db8:abcd:12::1]", "2001:db8:abcd::"),
        (" 203.0.113.77 ", "203.0.113.0"),
    ],
)
def test_port_and_brackets_are_accepted_and_dropped(text: str, expected: str) -> None:
    assert anonymise_ip(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "example.com",
        "example.com:5060",
        "alice@example.com",
        "1.2.3",
        "1.2.3.256",
        "01.2.3.4",
        "1.2.3.4:",
        "1.2.3.4:99999",
        "1.2.3.4:port",
        "[1.2.3.4]:5060",
        "2001:db8::1:5060:zz",
        "[2001:db8::1",
        "[2001:db8::1]:",
        "203.0.113.0/24",
    ],
)
def test_anything_else_raises_value_error_without_echoing_it(text: str) -> None:
    with pytest.raises(ValueError, match=r"^not an IP address") as info:
        anonymise_ip(text)
    if text.strip():
        assert text.strip() not in str(info.value)
    # ipaddress's own error repeats the input; it must not show in a traceback either.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_non_text_is_a_type_error() -> None:
    """ip_address() alone would read 3405803853 as 203.0.113.77."""
    with pytest.raises(TypeError):
        anonymise_ip(3405803853)  # type: ignore[arg-type]  # the wrong type is the point
