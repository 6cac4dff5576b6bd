"""RFC 4475 torture tests, and random or mutated input that must end in SipParseError.

Valid messages (RFC 4475 3.1.1) parse, pass `validate()`, and re-serialize, untouched
or after the mutations a proxy makes, to octets that parse to the same routing fields.
Invalid ones (3.1.2) raise SipParseError, except where the RFC lets a proxy accept
the message and we do (documented below).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sip.headers import CSeq, ViaHeader
from proxy.sip.message import Request, Response
from proxy.sip.parser import parse
from proxy.sip.responses import error_response, make_response
from proxy.sip.syntax import SipParseError
from proxy.sip.uri import SipUri

TORTURE = Path(__file__).parent / "torture"
VALID = {p.stem: p.read_bytes() for p in sorted((TORTURE / "valid").glob("*.dat"))}
INVALID = {p.stem: p.read_bytes() for p in sorted((TORTURE / "invalid").glob("*.dat"))}

# RFC 4475 3.1.2.12: rejecting a bad Date is acceptable, but an element "shouldn't do
# that unless the contents of the Date header field were actually important to its
# processing". A proxy never reads Date, so we forward it untouched.
ACCEPTED_INVALID = {"baddate"}


def load(data: bytes) -> Request | Response:
    message = parse(data)
    message.validate()
    return message


def routing_fields(m: Request | Response) -> tuple[object, ...]:
    start: tuple[object, ...] = (
        (m.method, m.uri) if isinstance(m, Request) else (m.status, m.reason)
    )
    return (
        *start,
        m.call_id,
        m.cseq,
        m.vias,
        m.from_,
        m.to,
        m.contact_star,
        m.contacts,
        m.routes,
        m.record_routes,
        m.paths,
        m.max_forwards,
        m.expires,
        m.body,
    )


def test_corpus_has_every_message_of_sections_3_1_1_and_3_1_2() -> None:
    assert len(VALID) == 13
    assert len(INVALID) == 19


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_message_parses_and_round_trips(name: str) -> None:
    m = load(VALID[name])
    fields = routing_fields(m)
    assert routing_fields(load(m.serialize())) == fields
    # Touching one header makes serialize() rebuild the message from its lines.
    m.add("X-Touched", "1")
    rebuilt = load(m.serialize())
    assert rebuilt.get("x-touched") == "1"
    assert routing_fields(rebuilt) == fields


@pytest.mark.parametrize("name", sorted(name for name in VALID if name != "dblreq"))
def test_untouched_valid_message_serializes_to_its_octets(name: str) -> None:
    assert load(VALID[name]).serialize() == VALID[name]


@pytest.mark.parametrize("name", sorted(n for n, d in VALID.items() if d[:4] != b"SIP/"))
def test_valid_request_survives_what_a_proxy_does_to_it(name: str) -> None:
    m = load(VALID[name])
    assert isinstance(m, Request)
    before = routing_fields(m)
    hops = m.max_forwards
    m.prepend_via(ViaHeader.new("TCP", "relay.example.net", None, "z9hG4bKrelay"))
    m.prepend("Record-Route", "<sip:relay.example.net;lr>")
    m.decrement_max_forwards()
    out = load(m.serialize())
    assert isinstance(out, Request)
    assert out.top_via.branch == "z9hG4bKrelay"
    assert out.vias[1:] == before[4]  # the original Vias, in order
    assert out.max_forwards == (70 if hops is None else hops - 1)
    assert out.record_routes[0].uri == SipUri(
        "relay.example.net", params=out.record_routes[0].uri.params
    )
    # A response to it, routed back: our Via comes off and the rest is the original.
    response = make_response(out, 200)
    assert response.pop_via().host == "relay.example.net"
    back = load(response.serialize())
    assert back.vias == before[4]
    assert back.cseq == out.cseq


def test_what_the_valid_messages_mean() -> None:
    """Spot checks of RFC 4475 3.1.1's points, beyond 'it parses'."""
    wsinv = load(VALID["wsinv"])
    assert isinstance(wsinv, Request)
    assert [(v.transport, v.host, v.branch) for v in wsinv.vias] == [
        ("UDP", "192.0.2.2", "390skdjuw"),
        ("TCP", "spindle.example.com", "z9hG4bK9ikj8"),
        ("UDP", "192.168.255.111", "z9hG4bK30239"),
    ]
    assert (wsinv.max_forwards, wsinv.cseq) == (68, CSeq(9, "INVITE"))
    assert wsinv.from_.display == 'J Rosenberg \\"'
    assert (wsinv.from_.tag, wsinv.to.tag) == ("98asjd8", "1918181833n")
    assert wsinv.get("UnknownHeaderWithUnusualValue") == ";;,,;;,;"
    assert wsinv.get("NewFangledHeader") == "newfangled value continued newfangled value"
    assert wsinv.get("Subject") == ""
    assert wsinv.contacts[0].display == 'Quoted string ""'
    assert wsinv.contacts[0].q == "0.33"
    assert len(wsinv.body) == 150

    intmeth = load(VALID["intmeth"])
    assert isinstance(intmeth, Request)
    assert intmeth.method == "!interesting-Method0123456789_*+`.%indeed'~"
    uri = intmeth.uri
    assert isinstance(uri, SipUri)
    assert uri.user == "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
    assert uri.password == "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"
    assert intmeth.to.display == "BEL:\x07 NUL:\x00 DEL:\x7f"
    raw = intmeth.from_.params.get("fromParam''~+*_!.-%")
    assert raw is not None
    assert raw.encode("latin-1").decode("utf-8") == "работающий"

    esc02 = load(VALID["esc02"])
    assert [str(c.uri) for c in esc02.contacts] == [
        "sip:alias1@host1.example.com",
        "sip:alias3@host3.example.com",
    ]
    assert esc02.get("C%6Fntact") == "<sip:alias2@host2.example.com>"
    assert [str(c.uri) for c in load(VALID["escnull"]).contacts] == [
        "sip:%00@host5.example.com",
        "sip:%00%00@host5.example.com",
    ]
    assert load(VALID["lwsdisp"]).from_.display == "caller"
    longreq = load(VALID["longreq"])
    assert len(longreq.vias) == 34
    assert longreq.vias[-1].received == "192.0.2.5"
    dblreq = load(VALID["dblreq"])
    assert isinstance(dblreq, Request)
    assert (dblreq.method, dblreq.body) == ("REGISTER", b"")
    semiuri = load(VALID["semiuri"])
    assert isinstance(semiuri, Request)
    assert isinstance(semiuri.uri, SipUri)
    assert semiuri.uri.user == "user;par=u%40example.net"
    assert len(semiuri.values("Accept")) == 6
    transports = load(VALID["transports"])
    assert [v.transport for v in transports.vias] == ["UDP", "SCTP", "TLS", "UNKNOWN", "TCP"]
    mpart01 = load(VALID["mpart01"])
    assert len(mpart01.body) == 553
    assert b"\x00" in mpart01.body
    assert mpart01.top_via.wants_rport
    unreason = load(VALID["unreason"])
    assert isinstance(unreason, Response)
    assert unreason.reason.encode("latin-1").decode("utf-8") == (
        "= 2**3 * 5**2 но сто девяносто девять - простое"
    )
    noreason = load(VALID["noreason"])
    assert isinstance(noreason, Response)
    assert (noreason.status, noreason.reason) == (100, "")


@pytest.mark.parametrize("name", sorted(set(INVALID) - ACCEPTED_INVALID))
def test_invalid_message_is_rejected(name: str) -> None:
    with pytest.raises(SipParseError):
        load(INVALID[name])


@pytest.mark.parametrize("name", sorted(ACCEPTED_INVALID))
def test_invalid_message_a_proxy_may_accept_is_forwarded_untouched(name: str) -> None:
    assert load(INVALID[name]).serialize() == INVALID[name]


def test_baddn_is_rejected_for_its_display_names_too() -> None:
    with pytest.raises(SipParseError, match="Bad From header"):
        load(INVALID["baddn"] + b"\r\n")


# Which rejected requests can still be answered (the relay sends 400, or 505 for
# badvers, when the transport allows): a response needs Via, From, To, Call-ID, CSeq.
ANSWERABLE = {
    "badaspec": 400,
    "badinv01": 400,
    "badvers": 505,
    "clerr": 400,
    "escruri": 400,
    "ltgtruri": 400,
    "lwsruri": 400,
    "lwsstart": 400,
    "mismatch01": 400,
    "mismatch02": 400,
    "ncl": 400,
    "quotbal": 400,
    "regbadct": 400,
    "scalar02": 400,
    "trws": 400,
}


@pytest.mark.parametrize("name", sorted(set(INVALID) - ACCEPTED_INVALID))
def test_rejection_says_whether_and_how_to_answer(name: str) -> None:
    with pytest.raises(SipParseError) as err:
        load(INVALID[name])
    assert err.value.can_respond == (name in ANSWERABLE)
    answer = error_response(err.value)
    assert (answer is not None) == err.value.can_respond
    if answer is not None:
        assert isinstance(err.value.partial, Request)
        assert err.value.status == ANSWERABLE[name]
        out = answer.serialize()
        assert out.startswith(f"SIP/2.0 {err.value.status} ".encode())
        # The response echoes the request's fields as they were, even a bad CSeq.
        assert f"\r\nCall-ID: {err.value.partial.call_id}\r\n".encode() in out


# --- property-based: nothing but SipParseError escapes ---


def exercise(data: bytes) -> None:
    """Everything the relay may do with received octets; only SipParseError may raise."""
    try:
        message = parse(data)
    except SipParseError as exc:
        answer = error_response(exc)
        if answer is not None:
            answer.serialize()
        return
    try:
        message.validate()
        fields = routing_fields(message)
        for contact in message.contacts:
            _ = contact.push, contact.instance, contact.reg_id, contact.expires
        _ = message.top_via.rport, message.top_via.received
    except SipParseError as exc:
        answer = error_response(exc)
        if answer is not None:
            answer.serialize()
        message.serialize()
        return
    # A message that passed validate() re-parses to the same thing, untouched or rebuilt.
    assert routing_fields(load(message.serialize())) == fields
    message.add("X-Touched", "1")
    assert routing_fields(load(message.serialize())) == fields
    if isinstance(message, Response):
        message.pop_via()
        message.serialize()
        return
    make_response(message, 200).serialize()
    if message.max_forwards == 0:
        with pytest.raises(SipParseError, match="Too Many Hops"):
            message.decrement_max_forwards()
    else:
        message.decrement_max_forwards()
    message.prepend_via(ViaHeader.new("TCP", "relay.example", None, "z9hG4bKrelay"))
    message.pop_value("Route")
    assert load(message.serialize()).top_via.branch == "z9hG4bKrelay"


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.binary(max_size=2000))
def test_random_octets_raise_nothing_but_sip_parse_error(data: bytes) -> None:
    exercise(data)


PIECES = [
    "INVITE ", "SIP/2.0", " ", "\r\n", "\r\n ", ":", ";", ",", "<", ">", '"', "\\", "=",
    "sip:", "@", "[", "]", "%", "Via: SIP/2.0/UDP h", "CSeq: 1 INVITE", "Call-ID: x",
    "From: <sip:a@b>", "To: c", "l: 0", "a", "1", "\x00", "\xff", "tag", "\r\n\r\n",
]  # fmt: skip
sip_ish = st.lists(st.sampled_from(PIECES), max_size=60).map(lambda p: "".join(p).encode("latin-1"))


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(sip_ish)
def test_sip_shaped_noise_raises_nothing_but_sip_parse_error(data: bytes) -> None:
    exercise(data)


SEEDS = [*VALID.values(), *INVALID.values()]
SPECIALS = [
    b"\r\n",
    b"\r\n ",
    b",",
    b";",
    b'"',
    b"\\",
    b"<",
    b">",
    b":",
    b"%",
    b"@",
    b"[",
    b"]",
    b"=",
    b" ",
    b"\x00",
    b"\xff",
    b"sip:",
    b"SIP/2.0",
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        if not data:
            break
        pos = draw(st.integers(min_value=0, max_value=len(data) - 1))
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "duplicate"]))
        if op == "flip":
            data[pos] ^= draw(st.integers(min_value=1, max_value=255))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.sampled_from(SPECIALS) | st.binary(min_size=1, max_size=6))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(min_value=1, max_value=16))]
        else:  # duplicate a header line, e.g. a second CSeq, To or Content-Length
            head, _, body = bytes(data).partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            if len(lines) > 1:
                line = lines[draw(st.integers(min_value=1, max_value=len(lines) - 1))]
                lines.insert(draw(st.integers(min_value=1, max_value=len(lines))), line)
                data = bytearray(b"\r\n".join(lines) + b"\r\n\r\n" + body)
    return bytes(data)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(mutated())
def test_mutated_torture_messages_raise_nothing_but_sip_parse_error(data: bytes) -> None:
    exercise(data)
