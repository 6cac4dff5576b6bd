"""The mock parties' own SIP writer/reader and digest, on their own: against the RFCs'
examples and messages written out by hand, never against the relay's code."""

from __future__ import annotations

import pytest

from mockphone import digest
from mockphone.pbx import LinkRegistration
from mockphone.sipwire import (
    Keepalive,
    Request,
    Response,
    SipWireError,
    StreamFramer,
    make_response,
    parse,
)
from tests import digest_vectors
from tests.digest_vectors import Vector


@pytest.mark.parametrize("vector", digest_vectors.ALL, ids=lambda v: v.source)
def test_digest_response_matches_the_rfc_examples(vector: Vector) -> None:
    assert (
        digest.response(
            algorithm=vector.algorithm,
            username=vector.username,
            realm=vector.realm,
            password=vector.password,
            method=vector.method,
            uri=vector.uri,
            nonce=vector.nonce,
            qop=vector.qop,
            nc=vector.nc,
            cnonce=vector.cnonce,
        )
        == vector.response
    )


@pytest.mark.parametrize("vector", digest_vectors.ALL, ids=lambda v: v.source)
def test_answer_to_the_rfc_challenge_is_the_rfc_answer(vector: Vector) -> None:
    """From the example's challenge and its client nonce: the example's response, and an
    Authorization header whose parameters are the example's."""
    answer = digest.answer(
        vector.challenge,
        username=vector.username,
        password=vector.password,
        method=vector.method,
        uri=vector.uri,
        cnonce=vector.cnonce or None,
    )
    assert answer.response == vector.response
    given, expected = digest.params(answer.header), digest.params(vector.authorization)
    assert given == {**expected, "algorithm": vector.algorithm}


@pytest.mark.parametrize("vector", digest_vectors.ALL, ids=lambda v: v.source)
def test_the_rfc_answer_proves_the_password_and_nothing_else_does(vector: Vector) -> None:
    def proves(header: str, password: str) -> bool:
        return digest.proves(
            header, username=vector.username, password=password, method=vector.method
        )

    assert proves(vector.authorization, vector.password)
    assert not proves(vector.authorization, vector.password + "x")
    other_method = digest.proves(
        vector.authorization, username=vector.username, password=vector.password, method="PUT"
    )
    assert not other_method
    assert not proves(vector.authorization.replace(vector.response[:6], "000000"), vector.password)


@pytest.mark.parametrize("header", ["Basic abc", "Digest username=", 'Digest a="unclosed'])
def test_a_header_that_is_not_a_digest_proves_nothing(header: str) -> None:
    with pytest.raises(digest.DigestSyntaxError):
        digest.params(header)
    assert not digest.proves(header, username="u", password="p", method="REGISTER")


INVITE = (
    b"INVITE sip:alice@0042137.relay.test;transport=tcp SIP/2.0\r\n"
    b"v: SIP/2.0/TCP 10.0.0.1:5060;branch=z9hG4bKa1,SIP/2.0/UDP 10.0.0.2;branch=z9hG4bKb2\r\n"
    b"Record-Route: <sip:relay.test;lr;ft=x>, <sip:edge.test;lr>\r\n"
    b'f: "Bob, the caller" <sip:bob@relay.test>;tag=b1\r\n'
    b"t: sip:alice@relay.test\r\n"
    b"i: call-1\r\n"
    b"CSeq: 7 INVITE\r\n"
    b'm: <sip:alice@10.0.0.5:5062;pn-provider=apns;pn-prid=ab12>;+sip.instance="<urn:x>"\r\n'
    b"Max-Forwards: 69\r\n"
    b"l: 5\r\n"
    b"\r\n"
    b"v=0\r\n"
)


def test_a_request_written_by_hand_reads_back_field_by_field() -> None:
    message = parse(INVITE + b"trailing octets of a datagram")
    assert isinstance(message, Request)
    assert (message.method, str(message.uri)) == (
        "INVITE",
        "sip:alice@0042137.relay.test;transport=tcp",
    )
    assert [(v.transport, v.sent_by, v.branch) for v in message.vias] == [
        ("TCP", "10.0.0.1:5060", "z9hG4bKa1"),
        ("UDP", "10.0.0.2", "z9hG4bKb2"),
    ]
    assert [str(r.uri) for r in message.record_routes] == [
        "sip:relay.test;lr;ft=x",
        "sip:edge.test;lr",
    ]
    assert message.from_.display == '"Bob, the caller"'
    assert message.from_.tag == "b1"
    assert (message.to.uri.user, message.to.uri.host, message.to.tag) == (
        "alice",
        "relay.test",
        None,
    )
    assert (message.call_id, message.cseq.number, message.cseq.method) == ("call-1", 7, "INVITE")
    (contact,) = message.contacts
    assert (contact.uri.host, contact.uri.port, contact.instance) == ("10.0.0.5", 5062, "<urn:x>")
    assert contact.push is not None
    assert (contact.push.provider, contact.push.prid) == ("apns", "ab12")
    assert message.max_forwards == 69
    assert message.body == b"v=0\r\n"  # Content-Length counts, not the datagram's end


def test_a_response_copies_the_dialog_fields_and_tags_the_to() -> None:
    request = parse(INVITE)
    assert isinstance(request, Request)
    answer = make_response(request, 180, headers=[("Contact", "<sip:alice@10.0.0.5>")], to_tag="a9")
    wire = answer.serialize()
    assert wire == (
        b"SIP/2.0 180 Ringing\r\n"
        b"v: SIP/2.0/TCP 10.0.0.1:5060;branch=z9hG4bKa1,SIP/2.0/UDP 10.0.0.2;branch=z9hG4bKb2\r\n"
        b'f: "Bob, the caller" <sip:bob@relay.test>;tag=b1\r\n'
        b"t: sip:alice@relay.test;tag=a9\r\n"
        b"i: call-1\r\n"
        b"CSeq: 7 INVITE\r\n"
        b"Contact: <sip:alice@10.0.0.5>\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    again = parse(wire)
    assert isinstance(again, Response)
    assert (again.status, again.reason, again.to.tag) == (180, "Ringing", "a9")


@pytest.mark.parametrize(
    "data",
    [b"HELLO\r\n\r\n", b"INVITE sip:a@b SIP/2.0\r\nno colon here\r\n\r\n", b"SIP/2.0 200 OK"],
)
def test_what_is_not_a_message_is_refused(data: bytes) -> None:
    with pytest.raises(SipWireError):
        parse(data)


def test_the_framer_splits_messages_and_keepalives_however_the_octets_arrive() -> None:
    stream = b"\r\n\r\n" + INVITE + b"\r\n\r\n" + INVITE
    for size in (1, 3, 7, len(stream)):
        framer = StreamFramer()
        items = [
            item for i in range(0, len(stream), size) for item in framer.feed(stream[i : i + size])
        ]
        assert items == [Keepalive.PING, INVITE, Keepalive.PING, INVITE], size


def test_a_lone_crlf_is_a_pong_only_after_our_ping() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\r\n") == []  # half of a ping, perhaps
    framer = StreamFramer()
    framer.pinged += 1
    assert framer.feed(b"\r\n") == [Keepalive.PONG]
    assert framer.pinged == 0


def test_the_link_registration_answers_with_the_serials_secret() -> None:
    registration = LinkRegistration("0042137", "relay.test", "<sip:0042137@10.0.0.9:5060>")
    first = registration.request("SIP/2.0/TCP 10.0.0.9:5060;branch=z9hG4bKr1")
    challenge = 'Digest realm="relay.test", nonce="n0nce", algorithm=SHA-256, qop="auth"'
    header = registration.answer(challenge, "s3cret")
    second = registration.request("SIP/2.0/TCP 10.0.0.9:5060;branch=z9hG4bKr2", header)
    assert [r.cseq.number for r in (first, second)] == [1, 2]
    assert first.call_id == second.call_id
    assert (str(second.uri), second.to.uri.user, second.get("Authorization")) == (
        "sip:relay.test",
        "0042137",
        header,
    )
    assert digest.proves(header, username="0042137", password="s3cret", method="REGISTER")
    assert not digest.proves(header, username="0042137", password="guess", method="REGISTER")
