"""Header values: comma lists, Via, name-addr (From, To, Contact) and RFC 8599 push
parameters."""

from __future__ import annotations

import pytest

from proxy.sip.headers import NameAddr, PushParams, parse_name_addr, parse_via
from proxy.sip.params import Params
from proxy.sip.syntax import SipParseError, split_commas
from proxy.sip.uri import SipUri
from tests.sip.samples import invite, request


def test_commas_inside_quotes_and_angle_brackets_do_not_split() -> None:
    value = '"Doe, John" <sip:j,k@a.example>;q=0.5, <sip:k@b.example>, sip:l@c.example'
    assert split_commas(value) == [
        '"Doe, John" <sip:j,k@a.example>;q=0.5',
        "<sip:k@b.example>",
        "sip:l@c.example",
    ]
    m = request(invite(f"Contact: {value}"))
    assert [c.display for c in m.contacts] == ["Doe, John", None, None]
    assert m.contacts[0].q == "0.5"


def test_via_rport_flag_value_and_received() -> None:
    flag = parse_via("SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKa;rport")
    assert flag.wants_rport
    assert flag.rport is None
    filled = flag.with_param("rport", "40123").with_param("received", "198.51.100.7")
    assert filled.rport == 40123
    assert filled.received == "198.51.100.7"
    assert str(filled) == (
        "SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKa;rport=40123;received=198.51.100.7"
    )
    assert parse_via(str(filled)) == filled
    plain = parse_via("SIP/2.0/TLS h.example;branch=z9hG4bKb")
    assert not plain.wants_rport
    assert (plain.transport, plain.host, plain.port, plain.branch) == (
        "TLS",
        "h.example",
        None,
        "z9hG4bKb",
    )


def test_via_with_lws_and_an_ipv6_received() -> None:
    via = parse_via("SIP  /  2.0 / ws  [2001:db8::9:1] : 5060 ; received=2001:db8::9:255 ;rport")
    assert (via.transport, via.host, via.port) == ("WS", "2001:db8::9:1", 5060)
    assert via.received == "2001:db8::9:255"
    assert via.sent_by == "[2001:db8::9:1]:5060"
    bracketed = parse_via("SIP/2.0/UDP [2001:db8::9:1];received=[2001:db8::9:255]")
    assert bracketed.received == "2001:db8::9:255"


@pytest.mark.parametrize(
    "value",
    [
        "SIP/2.0/UDP",
        "SIP/3.0/UDP h.example",
        "SIP/2.0/UDP h.example;;branch=1",
        "SIP/2.0/UDP h.example;branch=",
        "SIP/2.0/UDP h.example:99999",
        "SIP/2.0/UDP h_x.example",
        "SIP/2.0/UDP 256.1.1.1",
        "SIP/2.0/UDP [2001:db8::zz]",
        "SIP/2.0/UDP h.example junk",
        "SIP/2.0/UDP h.example;rport=abc",
    ],
)
def test_bad_vias_are_rejected(value: str) -> None:
    def parse_fully() -> None:
        _ = parse_via(value).rport

    with pytest.raises(SipParseError):
        parse_fully()


def test_push_params_as_header_params_are_a_fallback() -> None:
    c = parse_name_addr("<sip:bob@10.0.0.3>;pn-provider=fcm;pn-prid=tok;expires=60")
    assert c.push == PushParams("fcm", "tok", None)
    assert parse_name_addr("<sip:bob@10.0.0.3>").push is None


def test_from_to_display_names_tags_and_addr_specs() -> None:
    m = request(invite().replace(b"To: <sip:alice@s1234.relay.example.net>", b"t: sip:x@y.z;tag=9"))
    assert m.from_.display == "Bob"
    assert m.from_.tag == "1928301774"
    assert m.to == NameAddr(SipUri("y.z", user="x"), None, Params((("tag", "9"),)))
    tokens = parse_name_addr("A. Bell  Jr <sip:a@b.example>")
    assert tokens.display == "A. Bell Jr"
    quoted = parse_name_addr('"say \\"hi\\"" <sip:a@b.example>')
    assert quoted.display == 'say "hi"'
    assert str(quoted) == '"say \\"hi\\"" <sip:a@b.example>'


@pytest.mark.parametrize(
    "value",
    [
        '"unterminated <sip:a@b.example>',
        "Bell, Alexander <sip:a@b.example>",
        "< sip:a@b.example >",
        "<sip:a@b.example",
        "sip:a@b.example?subject=x",
        "<sip:a@b.example>;;",
        "<sip:a@b.example> junk",
        "",
    ],
)
def test_bad_name_addrs_are_rejected(value: str) -> None:
    with pytest.raises(SipParseError):
        parse_name_addr(value)
