"""parse(): the start line, Content-Length framing, the header block, the fields every
message needs, and the size limits. Whatever is wrong ends in SipParseError, with the
status to answer and, once the header lines are split, the request to answer."""

from __future__ import annotations

import pytest

from proxy.sip.headers import CSeq
from proxy.sip.message import MAX_MESSAGE_SIZE, Response
from proxy.sip.parser import MAX_HEADERS, parse
from proxy.sip.syntax import SipParseError
from proxy.sip.uri import SipUri
from tests.sip.samples import BASE, invite, msg, request

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


def test_headers_are_not_allowed_in_the_request_uri() -> None:
    data = invite().replace(b"relay.example.net SIP/2.0", b"relay.example.net?Route=x SIP/2.0")
    with pytest.raises(SipParseError, match="Headers in Request-URI"):
        parse(data)


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


# --- header block and required fields ---


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


def test_a_folded_first_header_line_is_rejected() -> None:
    with pytest.raises(SipParseError, match="Folded"):
        parse(invite().replace(b"SIP/2.0\r\nVia", b"SIP/2.0\r\n Via"))


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
