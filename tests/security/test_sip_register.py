"""Issue 14.4 and 14.9 in process: a PBX's digest is answered once, on the flow it was
issued on; `Contact: *` removes every binding of the phone once the PBX accepts it; and
an Authorization with anything but ASCII in it gets a 400, never a handler error."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from privacy.clock import ManualClock
from privacy.store import Store
from proxy.sip.flow import Transport
from proxy.sip.relay import Relay
from proxy.sip.settings import PbxSettings, SipSettings
from tests.sip.test_relay import (
    DOMAIN,
    PBX_SECRET,
    SERIAL,
    _flow,
    _link_pbx,
    _pbx_register,
    _reply,
    _request,
)


@pytest.fixture
async def relay(store: Store, clock: ManualClock) -> Relay:
    return Relay(
        SipSettings(DOMAIN, (PbxSettings(SERIAL, PBX_SECRET),)), store, clock, CollectorRegistry()
    )


def _register(user: str, contact: str, branch: str, expires: int = 600) -> bytes:
    return _request(
        "REGISTER",
        f"sip:{SERIAL}.{DOMAIN}",
        f"Via: SIP/2.0/TCP 10.0.0.5:5062;branch=z9hG4bK{branch}",
        f"From: <sip:{user}@{SERIAL}.{DOMAIN}>;tag={branch}",
        f"To: <sip:{user}@{SERIAL}.{DOMAIN}>",
        f"Call-ID: {branch}",
        "CSeq: 1 REGISTER",
        "Max-Forwards: 70",
        f"Contact: {contact}",
        f"Expires: {expires}",
    )


def _instance(n: int) -> str:
    return f'+sip.instance="<urn:uuid:00000000-0000-0000-0000-00000000000{n}>"'


async def test_contact_star_removes_every_binding_of_the_phone_once_the_pbx_accepts(
    relay: Relay, store: Store
) -> None:
    pbx, pbx_wire, _ = await _link_pbx(relay)
    phone, phone_wire = _flow(Transport.TCP, ("198.51.100.23", 40001))
    for n, user in ((1, "alice"), (2, "alice"), (3, "bob")):
        contact = f"<sip:{user}@10.0.0.5:506{n};transport=tcp>;{_instance(n)}"
        await relay.handle(_register(user, contact, f"reg{n}"), phone)
        await relay.handle(_reply(pbx_wire.request(), 200, "OK"), pbx)
    await relay.drain()
    assert len(await store.find("registration", sip_username="alice")) == 2

    # The PBX challenges the un-REGISTER first: nothing is removed on a 401.
    await relay.handle(_register("alice", "*", "unreg1", expires=0), phone)
    await relay.handle(_reply(pbx_wire.request(), 401, "Unauthorized"), pbx)
    await relay.drain()
    assert phone_wire.response().status == 401
    assert len(await store.find("registration", sip_username="alice")) == 2

    await relay.handle(_register("alice", "*", "unreg2", expires=0), phone)
    forwarded = pbx_wire.request()
    assert forwarded.contact_star, "the PBX gets the * as the phone sent it"
    await relay.handle(_reply(forwarded, 200, "OK"), pbx)
    await relay.drain()
    assert phone_wire.response().status == 200
    assert await store.find("registration", sip_username="alice") == []
    assert len(await store.find("registration", sip_username="bob")) == 1

    # Registering again right after is written, not coalesced with the forgotten write.
    contact = f"<sip:alice@10.0.0.5:5061;transport=tcp>;{_instance(1)}"
    await relay.handle(_register("alice", contact, "reg4"), phone)
    await relay.handle(_reply(pbx_wire.request(), 200, "OK"), pbx)
    await relay.drain()
    assert len(await store.find("registration", sip_username="alice")) == 1


NON_ASCII = ["response", "username", "realm", "nonce", "uri", "cnonce", "qop", "scheme"]


@pytest.mark.parametrize("where", NON_ASCII)
async def test_a_non_ascii_authorization_gets_400_and_links_nothing(
    relay: Relay, where: str
) -> None:
    flow, wire = _flow(Transport.TCP, ("203.0.113.9", 40000))
    await relay.handle(_pbx_register(), flow)
    challenge = wire.response().get("WWW-Authenticate") or ""
    nonce = challenge.split('nonce="')[1].split('"')[0]
    params = {
        "username": SERIAL,
        "realm": DOMAIN,
        "nonce": nonce,
        "uri": f"sip:{DOMAIN}",
        "response": "0" * 64,
        "cnonce": "ab",
        "qop": "auth",
    }
    scheme = "Digest"
    if where == "scheme":
        scheme = "Digést"
    else:
        params[where] = params[where][:-1] + "é"  # é: one latin-1 octet on the wire
    auth = f"{scheme} " + ", ".join(f'{k}="{v}"' for k, v in params.items()) + ", nc=00000001"
    await relay.handle(_pbx_register(auth).replace(b"\xc3\xa9", b"\xe9"), flow)
    refused = wire.response()
    assert (refused.status, refused.reason) == (400, "Malformed Authorization")
    assert relay.pbx_flow(SERIAL) is None
