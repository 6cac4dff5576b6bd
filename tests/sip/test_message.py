"""SIP messages: header access, the structured views routing reads, the changes a proxy
makes and how they serialize, and building a new message."""

from __future__ import annotations

import pytest

from proxy.sip.headers import NameAddr, PushParams, ViaHeader
from proxy.sip.message import Request, Response
from proxy.sip.params import Params
from proxy.sip.parser import parse
from proxy.sip.responses import make_response
from proxy.sip.syntax import SipParseError
from proxy.sip.uri import SipUri
from tests.sip.samples import BASE, invite, msg, request

# --- header access, compact forms, folding, lists ---


def test_compact_forms_are_the_long_headers() -> None:
    data = msg(
        "INVITE sip:a@b.example SIP/2.0",
        "v: SIP/2.0/TCP h.example;branch=z9hG4bK1",
        "t: <sip:a@b.example>",
        "f: <sip:c@d.example>;tag=1",
        "i: abc@d",
        "CSeq: 1 INVITE",
        "m: <sip:c@10.0.0.1>",
        "k: path, outbound",
        "c: application/sdp",
        "s: hello",
        "o: dialog",
        "u: presence",
        "r: <sip:x@y.example>",
        "x: 1800",
        "a: *;+sip.instance",
        body=b"v=0\r\n",
    )
    m = request(data.replace(b"Content-Length", b"l"))
    assert m.get("Via") == m.get("v") == "SIP/2.0/TCP h.example;branch=z9hG4bK1"
    assert m.call_id == "abc@d"
    assert m.contacts[0].uri == SipUri("10.0.0.1", user="c")
    assert m.values("Supported") == ["path", "outbound"]
    for long_name in (
        "Content-Type",
        "Subject",
        "Event",
        "Allow-Events",
        "Refer-To",
        "Session-Expires",
        "Accept-Contact",
        "Content-Length",
    ):
        assert m.has(long_name), long_name
    assert m.headers[0] == ("v", "SIP/2.0/TCP h.example;branch=z9hG4bK1")


def test_header_names_are_case_insensitive() -> None:
    m = request(invite("mAx-FoRwArDs: 5").replace(b"Max-Forwards: 70\r\n", b""))
    assert m.get("max-forwards") == m.get("MAX-FORWARDS") == "5"
    assert m.max_forwards == 5


def test_folded_header_lines_are_unfolded_and_kept_byte_exact() -> None:
    data = invite("Subject: first\r\n second\r\n\t third", "Route:\r\n  <sip:p.example;lr>")
    m = request(data)
    assert m.get("Subject") == "first second third"
    assert m.routes == [NameAddr(SipUri("p.example", params=Params((("lr", None),))))]
    m.add("X-Added", "1")
    assert b"Subject: first\r\n second\r\n\t third\r\n" in m.serialize()


def test_multiple_values_are_joined_across_lines_in_order() -> None:
    m = request(
        invite("Route: <sip:r1.example;lr>, <sip:r2.example;lr>", "Route: <sip:r3.example>")
    )
    assert [str(r.uri) for r in m.routes] == [
        "sip:r1.example;lr",
        "sip:r2.example;lr",
        "sip:r3.example",
    ]


def test_unknown_headers_are_never_split() -> None:
    m = request(invite("X-Odd: ;;,,;;,;"))
    assert m.values("X-Odd") == [";;,,;;,;"]


# --- views ---


def test_top_via_parses_only_the_first_value() -> None:
    m = request(invite().replace(b"rport\r\n", b"rport, SIP/2.0/UDP broken;;\r\n"))
    assert m.top_via.branch == "z9hG4bK776asdhds"
    with pytest.raises(SipParseError, match="Bad Via header"):
        _ = m.vias


def test_ipv6_hosts_in_uris_vias_and_contacts() -> None:
    data = msg(
        "REGISTER sip:[2001:db8::10]:5070 SIP/2.0",
        "To: sip:user@example.com",
        "From: sip:user@example.com;tag=81x2",
        "Via: SIP/2.0/UDP [2001:db8::9:1];branch=z9hG4bKas3-111",
        "Call-ID: SSG9559905523997077@hlau_4100",
        'Contact: "Caller" <sip:caller@[2001:db8::1]>',
        "CSeq: 98176 REGISTER",
    )
    m = request(data)
    m.validate()
    assert m.uri == SipUri("2001:db8::10", port=5070)
    assert str(m.uri) == "sip:[2001:db8::10]:5070"
    assert m.top_via.host == "2001:db8::9:1"
    assert m.contacts[0].uri == SipUri("2001:db8::1", user="caller")
    # RFC 5118 4.2: an IPv6 address without brackets is not a host.
    with pytest.raises(SipParseError, match="Request-URI"):
        parse(data.replace(b"sip:[2001:db8::10]:5070", b"sip:2001:db8::10"))


def test_contact_with_rfc8599_push_params_in_the_uri() -> None:
    contact = (
        "Contact: <sip:alice@192.168.1.20:50544;transport=tls;pn-provider=apns.dev;"
        "pn-prid=00fc13adff78512;pn-param=ABCD1234.org.example.voip>;"
        '+sip.instance="<urn:uuid:5b6e52c4-1a2b-4c3d-8e9f-a0b1c2d3e4f5>";reg-id=1;expires=3600'
    )
    m = request(invite(contact))
    (c,) = m.contacts
    assert c.push == PushParams("apns.dev", "00fc13adff78512", "ABCD1234.org.example.voip")
    assert c.instance == "<urn:uuid:5b6e52c4-1a2b-4c3d-8e9f-a0b1c2d3e4f5>"
    assert c.params.raw("+sip.instance") == '"<urn:uuid:5b6e52c4-1a2b-4c3d-8e9f-a0b1c2d3e4f5>"'
    assert (c.reg_id, c.expires) == (1, 3600)
    assert isinstance(c.uri, SipUri)
    assert c.uri.transport == "tls"
    assert c.uri.params.get("pn-prid") == "00fc13adff78512"


def test_contact_star_and_overlarge_expires() -> None:
    star = request(invite("Contact: *", "Expires: 0"))
    assert star.contact_star
    assert star.contacts == []
    assert star.expires == 0
    big = request(
        invite("Contact: <sip:a@b.example>;expires=99999999999999", "Expires: 5000000000")
    )
    assert big.contacts[0].expires == 2**32 - 1
    assert big.expires == 2**32 - 1
    with pytest.raises(SipParseError, match="Contact"):
        _ = request(invite("Contact: *, <sip:a@b.example>")).contacts
    with pytest.raises(SipParseError, match="Contact"):
        _ = request(invite("Contact: <sip:a@b.example>;expires=soon")).contacts


def test_routes_need_angle_brackets() -> None:
    with pytest.raises(SipParseError, match="Route"):
        _ = request(invite("Record-Route: sip:p.example;lr")).record_routes
    m = request(invite("Path: <sip:edge.example;lr;ob>", "Record-Route: <sip:p.example;lr>"))
    assert m.paths[0].uri == SipUri("edge.example", params=Params((("lr", None), ("ob", None))))
    assert m.record_routes[0].uri.params.get("lr") is None
    assert "lr" in m.record_routes[0].uri.params


@pytest.mark.parametrize("value", ["256", "-1", "ten", "1 0"])
def test_bad_max_forwards_is_rejected(value: str) -> None:
    m = request(invite().replace(b"Max-Forwards: 70", f"Max-Forwards: {value}".encode()))
    with pytest.raises(SipParseError, match="Max-Forwards") as err:
        m.validate()
    assert err.value.partial is m


def test_too_many_values_in_a_list_header_are_rejected() -> None:
    vias = ", ".join(["SIP/2.0/UDP h.example"] * 200)
    with pytest.raises(SipParseError):
        request(invite(f"Via: {vias}")).validate()


# --- mutation and serialization ---


def test_untouched_message_serializes_to_its_own_octets() -> None:
    data = invite("Subject:  odd   spacing ", body=b"v=0\r\n")
    m = parse(data)
    _ = m.vias, m.from_, m.contacts
    assert m.serialize() is data


def test_proxy_mutations_keep_other_lines_byte_exact() -> None:
    data = invite("x-custom :  kept as is", "l: 5", body=b"v=0\r\n").replace(
        b"Content-Length: 5\r\n", b""
    )
    m = request(data)
    m.prepend_via(ViaHeader.new("tcp", "relay.example.net", 5060, "z9hG4bKrelay1"))
    m.prepend("Record-Route", "<sip:relay.example.net;lr>")
    assert m.decrement_max_forwards() == 69
    m.uri = SipUri("10.0.0.2", user="alice", port=5062)
    out = m.serialize()
    assert out.startswith(
        b"INVITE sip:alice@10.0.0.2:5062 SIP/2.0\r\n"
        b"Record-Route: <sip:relay.example.net;lr>\r\n"
        b"Via: SIP/2.0/TCP relay.example.net:5060;branch=z9hG4bKrelay1;rport\r\n"
        b"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK776asdhds;rport\r\n"
        b"Max-Forwards: 69\r\n"
    )
    assert b"\r\nx-custom :  kept as is\r\nl: 5\r\n\r\nv=0\r\n" in out
    again = request(out)
    assert [v.host for v in again.vias] == ["relay.example.net", "192.0.2.10"]
    assert again.top_via.branch == "z9hG4bKrelay1"


def test_pop_via_keeps_the_other_values_of_its_line() -> None:
    data = msg(
        "SIP/2.0 200 OK",
        "Via: SIP/2.0/TCP relay.example;branch=z9hG4bKr, SIP/2.0/UDP 10.0.0.2;branch=z9hG4bKa",
        *BASE[1:],
        "CSeq: 1 INVITE",
    )
    m = parse(data)
    assert m.pop_via().host == "relay.example"
    assert [v.host for v in m.vias] == ["10.0.0.2"]
    assert m.pop_via().branch == "z9hG4bKa"
    assert m.vias == []
    with pytest.raises(SipParseError):
        m.pop_via()


def test_pop_value_removes_the_top_route() -> None:
    m = request(invite("Route: <sip:us.example;lr>, <sip:next.example;lr>"))
    assert m.pop_value("Route") == "<sip:us.example;lr>"
    assert [str(r.uri) for r in m.routes] == ["sip:next.example;lr"]
    assert m.pop_value("Route") == "<sip:next.example;lr>"
    assert m.routes == []
    assert m.pop_value("Route") is None


def test_set_and_remove_headers() -> None:
    m = request(invite("X-A: 1", "X-B: 2", "x-a: 3"))
    m.set("X-A", "9")
    assert m.get_all("x-a") == ["9"]
    assert m.headers[-3:] == [("X-A", "9"), ("X-B", "2"), ("Content-Length", "0")]
    assert m.remove("x-b") == 1
    assert m.remove("x-b") == 0
    m.set("X-New", "n")
    assert m.get("x-new") == "n"
    with pytest.raises(ValueError, match="invalid header"):
        m.add("X-Evil", "a\r\nVia: injected")
    with pytest.raises(ValueError, match="invalid header"):
        m.add("Bad Name", "x")


def test_content_length_follows_the_body() -> None:
    m = request(invite(body=b"v=0\r\n"))
    m.body = b"v=0\r\ns=-\r\n"
    out = m.serialize()
    assert out.endswith(b"Content-Length: 10\r\n\r\nv=0\r\ns=-\r\n")
    assert parse(out).body == b"v=0\r\ns=-\r\n"
    m.remove("Content-Length")
    assert m.serialize().endswith(b"Content-Length: 10\r\n\r\nv=0\r\ns=-\r\n")


def test_max_forwards_absent_becomes_70_and_zero_is_too_many_hops() -> None:
    m = request(invite().replace(b"Max-Forwards: 70\r\n", b""))
    assert m.decrement_max_forwards() == 70
    zero = request(invite().replace(b"Max-Forwards: 70", b"Max-Forwards: 0"))
    with pytest.raises(SipParseError) as err:
        zero.decrement_max_forwards()
    assert err.value.status == 483
    assert make_response(zero, err.value.status).serialize().startswith(b"SIP/2.0 483 Too Many")


# --- new messages ---


def test_build_a_request() -> None:
    r = Request(
        "OPTIONS",
        SipUri("pbx.example", port=5060),
        [
            ("Via", str(ViaHeader.new("udp", "relay.example", None, "z9hG4bKo1"))),
            ("From", "<sip:relay.example>;tag=1"),
            ("To", "<sip:pbx.example>"),
            ("Call-ID", "o1@relay.example"),
            ("CSeq", "1 OPTIONS"),
        ],
    )
    again = request(r.serialize())
    again.validate()
    assert again.uri == SipUri("pbx.example", port=5060)
    assert again.content_length == 0


@pytest.mark.parametrize(
    ("header", "error"),
    [
        (("X-Evil", "a\r\nVia: injected"), "invalid header field"),
        (("Bad Name", "x"), "invalid header field"),
        (("X-Snow", "\u2603"), "latin-1"),
    ],
    ids=["crlf-in-value", "space-in-name", "not-latin-1"],
)
def test_a_new_message_refuses_a_header_the_wire_cannot_carry(
    header: tuple[str, str], error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        Request("OPTIONS", SipUri("pbx.example"), [header])
    with pytest.raises(ValueError, match=error):
        Response(200, "OK", [header])


@pytest.mark.parametrize(
    ("status", "reason", "error"),
    [
        (99, "Low", "bad status"),
        (700, "High", "bad status"),
        (200, "OK\r\nVia: x", "CR/LF"),
        (200, "\u2603", "latin-1"),
    ],
)
def test_a_response_refuses_a_status_or_reason_the_wire_cannot_carry(
    status: int, reason: str, error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        Response(status, reason)


def test_a_new_response_is_written_from_its_parts_and_parses_back() -> None:
    headers = [line.split(": ", 1) for line in (BASE[0], *BASE[2:], "CSeq: 314159 INVITE")]
    r = Response(180, "Ringing", [(name, value) for name, value in headers], b"v=0\r\n")
    out = r.serialize()
    assert out == (
        b"SIP/2.0 180 Ringing\r\n"
        b"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK776asdhds;rport\r\n"
        b"To: <sip:alice@s1234.relay.example.net>\r\n"
        b'From: "Bob" <sip:bob@pbx.example.com>;tag=1928301774\r\n'
        b"Call-ID: a84b4c76e66710@pc33.example.com\r\n"
        b"CSeq: 314159 INVITE\r\n"
        b"Content-Length: 5\r\n\r\nv=0\r\n"
    )
    back = parse(out)
    assert isinstance(back, Response)
    assert (back.status, back.reason, back.start_line) == (180, "Ringing", "SIP/2.0 180 Ringing")
    assert back.headers == [*r.headers, ("Content-Length", "5")]
    assert back.serialize() is out
