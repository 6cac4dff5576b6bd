"""make_response: what a response copies from its request (RFC 3261 8.2.6), and its To
tag."""

from __future__ import annotations

import pytest

from proxy.sip.message import Response
from proxy.sip.parser import parse
from proxy.sip.responses import error_response, make_response
from proxy.sip.syntax import SipParseError
from tests.sip.samples import BASE, invite, request


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


def test_copied_lines_go_back_as_the_request_wrote_them() -> None:
    """A folded, oddly spaced Via is copied line for line: the client matches its own."""
    via = b"Via:   SIP/2.0/UDP 192.0.2.10:5060\r\n ;branch=z9hG4bK776asdhds;rport"
    req = request(invite().replace(BASE[0].encode(), via))
    out = make_response(req, 200, to_tag="t1").serialize()
    assert out.startswith(b"SIP/2.0 200 OK\r\n" + via + b"\r\nTo: ")


def test_the_reason_phrase_follows_the_status_and_a_bad_one_is_refused() -> None:
    req = request(invite())
    assert make_response(req, 555).reason == "Push Notification Service Not Supported"
    assert make_response(req, 499).reason == ""
    with pytest.raises(ValueError, match="bad status"):
        make_response(req, 700)
    with pytest.raises(ValueError, match="CR/LF"):
        make_response(req, 400, "Bad\r\nVia: x")
    with pytest.raises(ValueError, match="invalid header"):
        make_response(req, 400, headers=[("Warning", "399 x\r\nVia: y")])


def test_a_request_that_failed_to_parse_is_answered_with_the_errors_status() -> None:
    unknown_version = invite().replace(b"SIP/2.0\r\nVia", b"SIP/3.0\r\nVia", 1)
    with pytest.raises(SipParseError) as err:
        parse(unknown_version)
    answer = error_response(err.value)
    assert answer is not None
    assert answer.serialize().startswith(b"SIP/2.0 505 Version Not Supported\r\nVia: ")
    assert answer.call_id == "a84b4c76e66710@pc33.example.com"


@pytest.mark.parametrize(
    "data",
    [
        invite().replace(b"INVITE", b"ACK").replace(b"SIP/2.0\r\nVia", b"SIP/3.0\r\nVia", 1),
        invite().replace(b"Call-ID: a84b4c76e66710@pc33.example.com\r\n", b""),
        invite().replace(b"INVITE sip:alice@s1234.relay.example.net SIP/2.0", b"SIP/2.0 99 Low"),
    ],
    ids=["ack", "no-call-id", "response"],
)
def test_an_ack_a_response_or_a_request_without_call_id_is_not_answered(data: bytes) -> None:
    with pytest.raises(SipParseError) as err:
        parse(data)
    assert error_response(err.value) is None
