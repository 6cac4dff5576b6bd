"""Issue 14.4, variants: a PBX's digest proves its secret once, on its own connection,
with what was offered and nothing weaker.

- A nonce from a connection that dropped is no good on the PBX's next connection, be
  the REGISTER answered there before or not; on its own connection it is good once,
  whatever `nc` and `cnonce` say.
- Only the algorithms offered (SHA-256, MD5) and only `qop=auth`: `-sess` variants,
  other algorithms, `auth-int` or no qop at all are refused (403), never linked.
- Two Authorization headers, or one with a parameter twice: 400, nothing linked.
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from mockphone import digest
from privacy.clock import ManualClock
from privacy.store import Store
from proxy.sip.flow import Flow, Transport
from proxy.sip.relay import Relay
from proxy.sip.settings import PbxSettings, SipSettings
from tests.sip.test_relay import DOMAIN, PBX_SECRET, SERIAL, Wire, _flow, _pbx_register


@pytest.fixture
async def relay(store: Store, clock: ManualClock) -> Relay:
    return Relay(
        SipSettings(DOMAIN, (PbxSettings(SERIAL, PBX_SECRET),)), store, clock, CollectorRegistry()
    )


def _nonce(wire: Wire) -> str:
    challenge = wire.response()
    assert challenge.status == 401
    return (challenge.get("WWW-Authenticate") or "").split('nonce="')[1].split('"')[0]


def _authorization(
    nonce: str,
    *,
    algorithm: str = "SHA-256",
    qop: str = "auth",
    nc: str = "00000001",
    cnonce: str = "ab",
    extra: str = "",
) -> str:
    # The right secret, answered as SHA-256 or MD5 with qop=auth, whatever the header then
    # claims: only what it claims can make it refused.
    # The mock parties' digest, not the relay's: a bug shared by both could not show.
    known = algorithm if algorithm.upper() in ("MD5", "SHA-256") else "SHA-256"
    answer = digest.response(
        algorithm=known,
        username=SERIAL,
        realm=DOMAIN,
        password=PBX_SECRET,
        method="REGISTER",
        uri=f"sip:{DOMAIN}",
        nonce=nonce,
        qop="auth",
        nc=nc,
        cnonce=cnonce,
    )
    header = (
        f'Digest username="{SERIAL}", realm="{DOMAIN}", nonce="{nonce}", uri="sip:{DOMAIN}", '
        f'response="{answer}", algorithm={algorithm}'
    )
    if qop:
        header += f', qop={qop}, nc={nc}, cnonce="{cnonce}"'
    return header + extra


async def _challenged(relay: Relay) -> tuple[Flow, Wire, str]:
    flow, wire = _flow(Transport.TCP, ("203.0.113.9", 40000))
    await relay.handle(_pbx_register(), flow)
    return flow, wire, _nonce(wire)


async def test_a_nonce_of_a_dropped_connection_is_no_good_on_the_next(relay: Relay) -> None:
    first, first_wire, answered = await _challenged(relay)
    await relay.handle(_pbx_register(_authorization(answered)), first)
    assert first_wire.response().status == 200
    await relay.handle(_pbx_register(), first)
    unanswered = _nonce(first_wire)  # a second challenge, never answered
    first.close()
    assert relay.pbx_flow(SERIAL) is None
    second, second_wire = _flow(Transport.TCP, ("203.0.113.9", 40000))  # same address
    for nonce in (answered, unanswered):
        await relay.handle(_pbx_register(_authorization(nonce, nc="00000002")), second)
        refused = second_wire.response()
        assert refused.status == 401
        assert "stale=true" in (refused.get("WWW-Authenticate") or "")
    assert relay.pbx_flow(SERIAL) is None
    # The fresh challenge it got, answered on this connection, links it.
    await relay.handle(_pbx_register(_authorization(_nonce(second_wire))), second)
    assert second_wire.response().status == 200
    assert relay.pbx_flow(SERIAL) is second


@pytest.mark.parametrize(
    ("nc", "cnonce"), [("00000001", "ab"), ("00000002", "ab"), ("00000002", "cd")]
)
async def test_a_nonce_is_good_once_whatever_nc_and_cnonce_say(
    relay: Relay, nc: str, cnonce: str
) -> None:
    flow, wire, nonce = await _challenged(relay)
    await relay.handle(_pbx_register(_authorization(nonce)), flow)
    assert wire.response().status == 200
    await relay.handle(_pbx_register(_authorization(nonce, nc=nc, cnonce=cnonce)), flow)
    assert wire.response().status == 401


@pytest.mark.parametrize("algorithm", ["MD5", "md5", "SHA-256"])
async def test_the_algorithms_offered_link(relay: Relay, algorithm: str) -> None:
    flow, wire, nonce = await _challenged(relay)
    await relay.handle(_pbx_register(_authorization(nonce, algorithm=algorithm)), flow)
    assert wire.response().status == 200


@pytest.mark.parametrize(
    ("algorithm", "qop"),
    [
        ("MD5-sess", "auth"),
        ("SHA-256-sess", "auth"),
        ("SHA-512-256", "auth"),
        ("SHA256", "auth"),
        ("SHA-256", "auth-int"),
        ("SHA-256", ""),  # RFC 2069, without qop: not what we offered
        ("MD5", ""),
    ],
)
async def test_what_was_not_offered_is_refused(relay: Relay, algorithm: str, qop: str) -> None:
    flow, wire, nonce = await _challenged(relay)
    if qop == "":
        # A correct RFC 2069 answer (no qop), so only the missing qop can refuse it.
        answer = digest.response(
            algorithm=algorithm,
            username=SERIAL,
            realm=DOMAIN,
            password=PBX_SECRET,
            method="REGISTER",
            uri=f"sip:{DOMAIN}",
            nonce=nonce,
        )
        header = (
            f'Digest username="{SERIAL}", realm="{DOMAIN}", nonce="{nonce}", '
            f'uri="sip:{DOMAIN}", response="{answer}", algorithm={algorithm}'
        )
    else:
        header = _authorization(nonce, algorithm=algorithm, qop=qop)
    await relay.handle(_pbx_register(header), flow)
    assert wire.response().status == 403
    assert relay.pbx_flow(SERIAL) is None


async def test_two_authorization_headers_get_400(relay: Relay) -> None:
    flow, wire, nonce = await _challenged(relay)
    good = _authorization(nonce)
    register = _pbx_register(good).replace(
        b"Authorization:",
        f"Authorization: {_authorization(nonce, cnonce='x')}\r\nAuthorization:".encode(),
    )
    await relay.handle(register, flow)
    refused = wire.response()
    assert (refused.status, refused.reason) == (400, "One Authorization Only")
    assert relay.pbx_flow(SERIAL) is None
    # The nonce was not used up by the refusal: the single answer still links.
    await relay.handle(_pbx_register(good), flow)
    assert wire.response().status == 200


@pytest.mark.parametrize("twice", ['response="' + "0" * 64 + '"', "algorithm=MD5", 'nonce="x"'])
async def test_a_parameter_given_twice_gets_400(relay: Relay, twice: str) -> None:
    flow, wire, nonce = await _challenged(relay)
    await relay.handle(_pbx_register(_authorization(nonce, extra=f", {twice}")), flow)
    refused = wire.response()
    assert (refused.status, refused.reason) == (400, "Malformed Authorization")
    assert relay.pbx_flow(SERIAL) is None
