"""Issue 14, hostile SIP: whatever an Authorization, a Route or a Via holds, the relay
answers with a 4xx, forwards, or drops and counts; its handler never raises (which
`transport.dispatch` would log as `sip.handler_failed`).

Inputs are made by hypothesis (derandomized, bounded) from the characters and pieces
that make these headers: separators, quotes, escapes, brackets, our own token
parameters with random values, non-ASCII, and plain noise. Each input goes through the
relay in process, on the flow that reaches the code reading it: a PBX's REGISTER for
Authorization (the digest check), a phone's REGISTER and INVITE and the PBX's INVITE
for Route (our own entries, Path and dialog tokens), a phone's INVITE and the PBX's
responses for Via (branch seals, flow tokens).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from privacy.clock import ManualClock
from privacy.store import Store
from proxy.sip.flow import Flow, Transport
from proxy.sip.message import Response
from proxy.sip.parser import parse
from proxy.sip.relay import Relay
from proxy.sip.settings import PbxSettings, SipSettings
from tests.sip.test_relay import (
    DOMAIN,
    PBX_SECRET,
    SERIAL,
    Wire,
    _flow,
    _link_pbx,
    _pbx_register,
    _phone_register,
    _request,
)

EXAMPLES = 250
NOISE = st.text(
    alphabet=st.sampled_from(
        list(' \t,;="\\<>:@[]/?&%.-_+*~') + list("abcDEFsipz019") + ["é", "\u2603", "\x7f", "\x00"]
    ),
    max_size=120,
)
TOKEN = st.text(alphabet=st.sampled_from(list("abcdefz234567ABC=%-_.!")), max_size=40)
QUOTED = st.builds(lambda t: f'"{t}"', NOISE)
HOST = st.one_of(
    st.sampled_from(
        [
            "127.0.0.1",
            "[::1]",
            "[::ffff:127.0.0.1]",
            DOMAIN,
            f"{SERIAL}.{DOMAIN}",
            "x",
            "[",
            "1.2.3",
        ]
    ),
    TOKEN,
)
PORT = st.one_of(st.just(""), st.builds(lambda p: f":{p}", st.integers(-1, 99999)), NOISE)
PARAMS = st.lists(
    st.tuples(
        st.sampled_from(["lr", "ft", "dt", "transport", "branch", "rport", "received", "ob"])
        | TOKEN,
        st.one_of(st.none(), TOKEN, QUOTED),
    ),
    max_size=5,
).map(lambda items: "".join(f";{k}" if v is None else f";{k}={v}" for k, v in items))

DIGEST_KEYS = ["username", "realm", "nonce", "uri", "response", "algorithm", "qop", "nc", "cnonce"]
AUTHORIZATION = st.one_of(
    NOISE,
    st.builds(
        lambda scheme, pairs, sep: scheme + " " + sep.join(f"{k}={v}" for k, v in pairs),
        st.sampled_from(["Digest", "digest", "Basic", "", "Digest\t"]),
        st.lists(st.tuples(st.sampled_from(DIGEST_KEYS) | TOKEN, TOKEN | QUOTED), max_size=12),
        st.sampled_from([", ", ",", " ", ",,"]),
    ),
)
ROUTE = st.one_of(
    NOISE,
    st.builds(
        lambda scheme, host, port, params, brackets: (
            f"<{scheme}:{host}{port}{params}>" if brackets else f"{scheme}:{host}{port}{params}"
        ),
        st.sampled_from(["sip", "SIP", "sips", "tel", "x"]),
        HOST,
        PORT,
        PARAMS,
        st.booleans(),
    ),
)
VIA = st.one_of(
    NOISE,
    st.builds(
        lambda proto, host, port, params: f"{proto} {host}{port}{params}",
        st.sampled_from(["SIP/2.0/UDP", "SIP/2.0/TCP", "SIP/2.0/WS", "SIP/3.0/TCP", "SIP/2.0"]),
        HOST,
        PORT,
        PARAMS,
    ),
)


def _examples(strategy: st.SearchStrategy[str]) -> list[str]:
    """EXAMPLES inputs of `strategy`, the same every run."""
    found: list[str] = []

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None)
    @given(strategy)
    def collect(value: str) -> None:
        if "\r" not in value and "\n" not in value:  # a line break is framing's business
            found.append(value)

    collect()
    return found


@pytest.fixture
async def relay(store: Store, clock: ManualClock) -> Relay:
    return Relay(
        SipSettings(DOMAIN, (PbxSettings(SERIAL, PBX_SECRET),)), store, clock, CollectorRegistry()
    )


def _dropped(relay: Relay) -> float:
    """SIP messages refused or dropped, of every reason, counted so far."""
    return sum(
        sample.value
        for family in relay.metrics.errors.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    )


async def _survives(relay: Relay, data: bytes, flow: Flow, wire: Wire, *others: Wire) -> None:
    """The relay handles `data` without raising, and answers it with a 4xx, forwards
    something, or counts a drop."""
    before = (len(wire.raw), *(len(w.raw) for w in others), _dropped(relay))
    await relay.handle(data, flow)
    after = (len(wire.raw), *(len(w.raw) for w in others), _dropped(relay))
    assert after != before, f"silently ignored: {data!r}"
    if len(wire.raw) > before[0]:
        answer = parse(wire.raw[-1])
        if isinstance(answer, Response) and answer.cseq.method == "REGISTER":
            assert 400 <= answer.status < 500, data


def _header(name: str, value: str) -> bytes:
    return f"{name}: {value}".encode("utf-8", "surrogateescape")


async def test_a_pbx_register_with_any_authorization_gets_a_4xx(relay: Relay) -> None:
    for value in _examples(AUTHORIZATION):
        flow, wire = _flow(Transport.TCP, ("203.0.113.9", 40000))
        await relay.handle(_pbx_register(), flow)  # a challenge first, as a PBX gets
        register = _pbx_register().replace(
            b"Expires:", _header("Authorization", value) + b"\r\nExpires:"
        )
        await _survives(relay, register, flow, wire)
        assert relay.pbx_flow(SERIAL) is None


def _invite(uri: str, *headers: bytes) -> bytes:
    return _request(
        "INVITE",
        uri,
        "Via: SIP/2.0/TCP 10.0.0.5:5062;branch=z9hG4bKfuzz",
        f"From: <sip:alice@{SERIAL}.{DOMAIN}>;tag=f1",
        f"To: <sip:carol@{SERIAL}.{DOMAIN}>",
        "Call-ID: fuzz",
        "CSeq: 1 INVITE",
        "Max-Forwards: 70",
    ).replace(b"Max-Forwards:", b"".join(h + b"\r\n" for h in headers) + b"Max-Forwards:")


async def test_any_route_is_followed_refused_or_counted(relay: Relay) -> None:
    pbx, pbx_wire, status = await _link_pbx(relay)
    assert status == 200
    phone, phone_wire = _flow(Transport.TCP, ("198.51.100.23", 40001))
    for value in _examples(ROUTE):
        route = _header("Route", value)
        register = _phone_register().replace(b"Max-Forwards:", route + b"\r\nMax-Forwards:")
        await _survives(relay, register, phone, phone_wire, pbx_wire)
        invite = _invite(f"sip:carol@{SERIAL}.{DOMAIN}", route)
        await _survives(relay, invite, phone, phone_wire, pbx_wire)
        # From the PBX, where Path and dialog tokens are opened.
        await _survives(relay, _invite("sip:alice@10.0.0.5:5062", route), pbx, pbx_wire, phone_wire)
        # As a strict-routed Request-URI.
        strict = _invite(value, _header("Route", "<sip:alice@10.0.0.5:5062>"))
        await _survives(relay, strict, pbx, pbx_wire, phone_wire)


async def test_any_via_is_forwarded_refused_or_counted(relay: Relay) -> None:
    pbx, pbx_wire, status = await _link_pbx(relay)
    assert status == 200
    phone, phone_wire = _flow(Transport.UDP, ("198.51.100.23", 40001))
    for value in _examples(VIA):
        invite = _invite(f"sip:carol@{SERIAL}.{DOMAIN}").replace(
            b"Via: SIP/2.0/TCP 10.0.0.5:5062;branch=z9hG4bKfuzz", _header("Via", value)
        )
        await _survives(relay, invite, phone, phone_wire, pbx_wire)
        # A response whose top Via is this: ours (a seal, a flow token) or not.
        answer = (
            b"SIP/2.0 200 OK\r\n"
            + _header("Via", value)
            + b"\r\nVia: SIP/2.0/UDP 10.0.0.5:5062;branch=z9hG4bKx\r\n"
            + f"From: <sip:a@{DOMAIN}>;tag=1\r\nTo: <sip:b@{DOMAIN}>;tag=2\r\n".encode()
            + b"Call-ID: fuzz\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
        )
        await _survives(relay, answer, pbx, pbx_wire, phone_wire)
