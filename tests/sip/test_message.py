"""SIP message parsing, views, mutation, serialization and responses."""

from __future__ import annotations

import pytest

from proxy.sip.headers import CSeq, NameAddr, PushParams, ViaHeader, parse_name_addr, parse_via
from proxy.sip.message import MAX_MESSAGE_SIZE, Request, Response
from proxy.sip.params import Params
from proxy.sip.parser import MAX_HEADERS, parse
from proxy.sip.responses import make_response
from proxy.sip.syntax import SipParseError, split_commas
from proxy.sip.uri import MAX_URI, AbsoluteUri, SipUri, parse_uri


def msg(*lines: str, body: bytes = b"", length: bool = True) -> bytes:
    """A message from header lines; Content-Length is added unless `length` is False."""
    head = list(lines)
    if length:
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


BASE = (
    "Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK776asdhds;rport",
    "Max-Forwards: 70",
    "To: <sip:alice@s1234.relay.example.net>",
    'From: "Bob" <sip:bob@pbx.example.com>;tag=1928301774',
    "Call-ID: a84b4c76e66710@pc33.example.com",
)


def invite(*extra: str, body: bytes = b"") -> bytes:
    return msg(
        "INVITE sip:alice@s1234.relay.example.net SIP/2.0",
        *BASE,
        "CSeq: 314159 INVITE",
        *extra,
        body=body,
    )


def request(data: bytes) -> Request:
    message = parse(data)
    assert isinstance(message, Request)
    return message


# --- start line and framing ---


def test_request_line_and_mandatory_fields_are_parsed() -> None:
    m = request(invite())
    assert m.method == "INVITE"
    assert m.uri == SipUri("s1234.relay.example.net", user="alice")
    assert m.call_id == "a84b4c76e66710@pc33.example.com"
    assert m.cseq == CSeq(314159, "INVITE")
    assert m.max_forwards == 70


def test_status_line_is_parsed_with_an_empty_reason() -> None:
    data = msg("SIP/2.0 180 ", *BASE, "CSeq: 1 INVITE")
    m = parse(data)
    assert isinstance(m, Response)
    assert (m.status, m.reason) == (180, "")


@pytest.mark.parametrize(
    "first",
    [
        "SIP/2.0 99 Too Small",
        "SIP/2.0 700 Too Big",
        "SIP/2.0 2000 OK",
        "SIP/2.0 ²00 OK",  # a non-ASCII digit
        "INVITE sip:a@b.example SIP/2.0 extra",
        "INV ITE sip:a@b.example SIP/2.0",
        "INVITE\tsip:a@b.example SIP/2.0",
        "<INVITE> sip:a@b.example SIP/2.0",
    ],
)
def test_malformed_start_lines_are_rejected(first: str) -> None:
    with pytest.raises(SipParseError):
        parse(msg(first, *BASE, "CSeq: 1 INVITE"))


def test_unknown_version_asks_for_505() -> None:
    with pytest.raises(SipParseError) as err:
        parse(msg("INVITE sip:a@b.example SIP/3.0", *BASE, "CSeq: 1 INVITE"))
    assert err.value.status == 505
    assert err.value.can_respond


def test_body_is_framed_by_content_length_and_trailing_octets_are_ignored() -> None:
    m = parse(invite(body=b"v=0\r\n") + b"garbage after the body")
    assert m.body == b"v=0\r\n"
    assert m.serialize() == invite(body=b"v=0\r\n")


def test_datagram_without_content_length_takes_the_rest_as_body() -> None:
    data = msg("OPTIONS sip:a@b.example SIP/2.0", *BASE, "CSeq: 2 OPTIONS", length=False)
    assert parse(data + b"hello").body == b"hello"


@pytest.mark.parametrize(
    ("length", "reason"),
    [
        ("Content-Length: 10", "Body shorter than Content-Length"),
        ("Content-Length: -1", "Bad Content-Length"),
        ("Content-Length: five", "Bad Content-Length"),
        ("Content-Length: 99999999999", "Bad Content-Length"),
    ],
)
def test_bad_content_length_is_rejected_but_still_answerable(length: str, reason: str) -> None:
    data = msg("INVITE sip:a@b.example SIP/2.0", *BASE, "CSeq: 1 INVITE", length, length=False)
    with pytest.raises(SipParseError) as err:
        parse(data + b"v=0\r\n")
    assert err.value.reason == reason
    assert err.value.can_respond


def test_conflicting_content_lengths_are_rejected() -> None:
    data = msg("INVITE sip:a@b.example SIP/2.0", *BASE, "CSeq: 1 INVITE", "l: 3")
    with pytest.raises(SipParseError, match="Conflicting"):
        parse(data)


def test_leading_crlfs_before_the_start_line_are_ignored() -> None:
    assert parse(b"\r\n\r\n\r\n" + invite()).serialize() == invite()


@pytest.mark.parametrize(
    "broken",
    [
        invite().replace(b"\r\nMax-Forwards", b"\nMax-Forwards"),
        invite().replace(b"\r\nMax-Forwards", b"\rMax-Forwards"),
        invite().replace(b"70", b"7\x000"),
        invite().replace(b"Max-Forwards:", b"Max Forwards:"),
        invite().replace(b"Max-Forwards:", b"Max-Forwards"),
        invite()[:-4],
    ],
    ids=["bare-lf", "bare-cr", "nul", "space-in-name", "no-colon", "no-blank-line"],
)
def test_malformed_header_block_is_rejected(broken: bytes) -> None:
    with pytest.raises(SipParseError):
        parse(broken)


def test_escaped_control_characters_are_allowed_in_quoted_strings() -> None:
    m = request(invite('Subject: "BEL:\\\x07 NUL:\\\x00"'))
    assert m.get("subject") == '"BEL:\\\x07 NUL:\\\x00"'


@pytest.mark.parametrize("missing", ["Via", "To", "From", "Call-ID", "CSeq"])
def test_missing_mandatory_header_is_rejected_and_not_answerable(missing: str) -> None:
    lines = [line for line in invite().decode().split("\r\n") if not line.startswith(missing)]
    with pytest.raises(SipParseError, match=f"Missing {missing}") as err:
        parse("\r\n".join(lines).encode())
    assert err.value.partial is not None
    assert not err.value.can_respond


def test_cseq_method_must_match_the_request_method() -> None:
    with pytest.raises(SipParseError, match="mismatch"):
        parse(invite().replace(b"CSeq: 314159 INVITE", b"CSeq: 314159 BYE"))


@pytest.mark.parametrize("cseq", ["4294967296 INVITE", "12", "INVITE 1", "-1 INVITE"])
def test_bad_cseq_is_rejected(cseq: str) -> None:
    with pytest.raises(SipParseError, match="CSeq"):
        parse(invite().replace(b"314159 INVITE", cseq.encode()))


def test_no_response_to_an_ack_or_a_response() -> None:
    ack = msg("ACK sip:a@b.example SIP/2.0", *BASE, "CSeq: 1 ACK", "Contact: <sip:x")
    with pytest.raises(SipParseError) as err:
        request(ack).validate()
    assert err.value.partial is not None
    assert not err.value.can_respond
    with pytest.raises(SipParseError) as err:
        parse(msg("SIP/2.0 200 OK", *BASE, "CSeq: 1 BYE", "CSeq: 2 BYE"))
    assert err.value.partial is None
    assert not err.value.can_respond


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


def test_a_folded_first_header_line_is_rejected() -> None:
    with pytest.raises(SipParseError, match="Folded"):
        parse(invite().replace(b"SIP/2.0\r\nVia", b"SIP/2.0\r\n Via"))


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


def test_push_params_as_header_params_are_a_fallback() -> None:
    c = parse_name_addr("<sip:bob@10.0.0.3>;pn-provider=fcm;pn-prid=tok;expires=60")
    assert c.push == PushParams("fcm", "tok", None)
    assert parse_name_addr("<sip:bob@10.0.0.3>").push is None


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


# --- URIs ---


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


def test_headers_are_not_allowed_in_the_request_uri() -> None:
    data = invite().replace(b"relay.example.net SIP/2.0", b"relay.example.net?Route=x SIP/2.0")
    with pytest.raises(SipParseError, match="Headers in Request-URI"):
        parse(data)


# --- bounds ---


def test_oversized_message_is_rejected_with_513() -> None:
    data = invite(body=b"x" * MAX_MESSAGE_SIZE)
    with pytest.raises(SipParseError) as err:
        parse(data)
    assert err.value.status == 513


def test_too_many_headers_are_rejected() -> None:
    extra = [f"X-H{i}: {i}" for i in range(MAX_HEADERS)]
    with pytest.raises(SipParseError, match="Too many headers"):
        parse(invite(*extra))


def test_an_overlong_header_line_is_rejected() -> None:
    with pytest.raises(SipParseError, match="Header too long"):
        parse(invite("X-Long: " + "a" * 9000))
    with pytest.raises(SipParseError, match="Header too long"):
        parse(invite("X-Long: a" + "\r\n a" * 4600))


def test_an_overlong_uri_is_rejected_with_414() -> None:
    with pytest.raises(SipParseError) as err:
        parse_uri("sip:" + "a" * MAX_URI + "@example.com")
    assert err.value.status == 414


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


# --- responses ---


def test_response_copies_via_from_to_call_id_cseq_and_adds_a_to_tag() -> None:
    data = invite().replace(b"Via:", b"v: SIP/2.0/TCP relay.example;branch=z9hG4bKr\r\nVia:")
    req = request(data)
    resp = make_response(req, 486, headers=[("Retry-After", "30")], to_tag="t1")
    out = resp.serialize()
    assert out == (
        b"SIP/2.0 486 Busy Here\r\n"
        b"v: SIP/2.0/TCP relay.example;branch=z9hG4bKr\r\n"
        b"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK776asdhds;rport\r\n"
        b"To: <sip:alice@s1234.relay.example.net>;tag=t1\r\n"
        b'From: "Bob" <sip:bob@pbx.example.com>;tag=1928301774\r\n'
        b"Call-ID: a84b4c76e66710@pc33.example.com\r\n"
        b"CSeq: 314159 INVITE\r\n"
        b"Retry-After: 30\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    back = parse(out)
    assert isinstance(back, Response)
    assert back.to.tag == "t1"


def test_trying_gets_no_to_tag_and_an_existing_tag_is_kept() -> None:
    req = request(invite())
    assert make_response(req, 100).to.tag is None
    assert make_response(req, 180).to.tag is not None
    tagged = request(invite().replace(b"net>\r\n", b"net>;tag=abc\r\n", 1))
    assert make_response(tagged, 200, "Fine").to.tag == "abc"
    assert make_response(tagged, 200, "Fine").serialize().startswith(b"SIP/2.0 200 Fine\r\n")


def test_a_400_can_be_built_for_a_request_with_a_malformed_to() -> None:
    data = invite().replace(b"To: <sip:alice@s1234.relay.example.net>", b'To: "open <sip:a@b>')
    req = request(data)
    with pytest.raises(SipParseError) as err:
        req.validate()
    assert err.value.can_respond
    assert err.value.partial is req
    out = make_response(req, err.value.status, err.value.reason).serialize()
    assert out.startswith(b"SIP/2.0 400 Bad To header\r\n")
    assert b'To: "open <sip:a@b>;tag=' in out
