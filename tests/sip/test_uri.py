"""SIP URIs parsed strictly, other schemes kept opaque, and their limits."""

from __future__ import annotations

import pytest

from proxy.sip.params import Params
from proxy.sip.syntax import SipParseError
from proxy.sip.uri import MAX_URI, AbsoluteUri, SipUri, parse_uri


def test_sip_uri_parts_and_serialization() -> None:
    text = "sips:alice:secret@Example.COM:5061;transport=tls;lr;maddr=239.255.255.1?subject=x&h=y"
    uri = parse_uri(text)
    assert uri == SipUri(
        "Example.COM",
        "alice",
        "secret",
        5061,
        Params((("transport", "tls"), ("lr", None), ("maddr", "239.255.255.1"))),
        "subject=x&h=y",
        "sips",
    )
    assert str(uri) == text
    assert isinstance(uri, SipUri)
    assert uri.transport == "tls"
    assert str(uri.without_param("lr").with_param("ob")) == (
        "sips:alice:secret@Example.COM:5061;transport=tls;maddr=239.255.255.1;ob?subject=x&h=y"
    )


def test_user_part_may_hold_semicolons_and_escapes() -> None:
    uri = parse_uri("sip:user;par=u%40example.net@example.com")
    assert isinstance(uri, SipUri)
    assert (uri.user, uri.host, len(uri.params)) == ("user;par=u%40example.net", "example.com", 0)


def test_other_schemes_are_kept_opaque() -> None:
    assert parse_uri("tel:+4930123456;phone-context=example.com") == AbsoluteUri(
        "tel", "+4930123456;phone-context=example.com"
    )


@pytest.mark.parametrize(
    "text",
    [
        "sip:",
        "sip:@example.com",
        "sip:a b@example.com",
        "sip:a@exa mple.com",
        "sip:a@example.com:port",
        "sip:a@example.com:70000",
        "sip:a@-example.com",
        "sip:a@1.2.3",
        "sip:a@example.com;%zz",
        "sip:a%4@example.com",
        "<sip:a@example.com>",
        "no-scheme",
        "sip:a@[::1",
    ],
)
def test_bad_uris_are_rejected(text: str) -> None:
    with pytest.raises(SipParseError):
        parse_uri(text)


def test_an_overlong_uri_is_rejected_with_414() -> None:
    with pytest.raises(SipParseError) as err:
        parse_uri("sip:" + "a" * MAX_URI + "@example.com")
    assert err.value.status == 414
