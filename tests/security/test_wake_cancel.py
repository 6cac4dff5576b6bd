"""Issue 14, points 2 and 3, variants: a parked or woken call is its caller's alone, and
one user's bindings are not another's.

- Only the flow whose INVITE was parked, its PBX, can CANCEL it, or CANCEL and ACK it
  once it was delivered to the woken phone: not another linked PBX (of another serial)
  presenting the same Call-ID, branch and Route, nor a phone.
- Mallory, with an account on the same PBX, registers under her own name a Contact
  with Bob's push token, Bob's contact URI and Bob's instance: her un-REGISTER
  (`Expires: 0` or `Contact: *`) deletes nothing of Bob's, and her binding does not
  stand in for Bob's refresh push.

The world is `serve`'s app on a manual clock with the PBXs of two serials linked over
in-memory flows, so each step's effect is read back at once.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from privacy.clock import ManualClock
from privacy.keys import Keyring
from privacy.logs import setup_logging
from privacy.policy import load_policy
from proxy.sip.flow import Flow
from proxy.sip.message import Request
from proxy.sip.settings import PbxSettings, SipSettings
from proxy.sip.wake import WakeSettings
from push.apps import PushSettings
from softrelay.app import REGISTRY, RELAY, STAND_INS, STORE, Services, build_app
from tests.security import wake_world as ww
from tests.security.test_sip_routes import OTHER_SERIAL, _link_other_pbx
from tests.security.wake_world import BOB_INSTANCE, TOKEN, Linked, contact, register, requests
from tests.sip import test_wake as wake
from tests.sip.test_relay import DOMAIN, PBX_SECRET, SERIAL, _request

linked = ww.linked


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[wake.World]:
    """tests/sip/test_wake's world, with a second PBX (OTHER_SERIAL) configured."""
    clock = ManualClock(time.time())  # the stand-ins check provider tokens against it
    policy = load_policy("auerproxy")
    logs = setup_logging(policy, tmp_path, clock)
    pbxs = (PbxSettings(SERIAL, PBX_SECRET), PbxSettings(OTHER_SERIAL, PBX_SECRET))
    sip = SipSettings(DOMAIN, pbxs, wake=WakeSettings())
    push = PushSettings(apps=(), max_in_flight=10, max_attempts=2, embedded_app_id=wake.APP_ID)
    app = build_app(Services(policy, Keyring.generate(), tmp_path, clock, 3600, push, sip))
    server = TestServer(app)
    await server.start_server()
    try:
        yield wake.World(app[RELAY], app[STORE], app[STAND_INS], clock, tmp_path, app[REGISTRY])
    finally:
        await server.close()
        logs.close()


async def _other_pbx(linked: Linked) -> tuple[Flow, wake.Wire]:
    other, _ = await _link_other_pbx(linked.world.relay)
    wire = wake.Wire()
    other.sender = wire
    return other, wire


async def _bob_parked(linked: Linked) -> Request:
    """Bob registered with push parameters and slept; PBX A's call to him is parked.
    The REGISTER as the PBX got it (its Contact and Path are what a CANCEL names)."""
    bob, _, registered = await register(linked, user="bob", contact=contact("bob"), cseq=1)
    bob.close()
    await linked.world.relay.handle(wake._invite(registered, user="bob"), linked.pbx)
    await linked.pbx_wire.response(180)
    assert len(linked.world.relay.parking) == 1
    return registered


def _ack(register: Request, call: str = "call-1") -> bytes:
    """The ACK of the call's INVITE as its caller sends it (same Call-ID and branch)."""
    return wake._cancel(register, call).replace(b"CANCEL", b"ACK")


async def test_another_pbx_cannot_cancel_a_parked_call(linked: Linked) -> None:
    registered = await _bob_parked(linked)
    other, other_wire = await _other_pbx(linked)
    await linked.world.relay.handle(wake._cancel(registered), other)
    assert other_wire.statuses() == [480], "no such call from here"
    assert len(linked.world.relay.parking) == 1, "Bob's call still waits"
    assert 487 not in linked.pbx_wire.statuses()
    # Its own PBX can.
    await linked.world.relay.handle(wake._cancel(registered), linked.pbx)
    await linked.pbx_wire.response(487)
    assert len(linked.world.relay.parking) == 0


async def test_a_phone_cannot_cancel_a_parked_call(linked: Linked) -> None:
    """Along Bob's Path (refused: the token is the PBX's), or straight to the PBX's
    domain (then it is the PBX's business, with a branch of our own)."""
    registered = await _bob_parked(linked)
    phone, phone_wire = wake._flow(("198.51.100.66", 40666))
    await linked.world.relay.handle(wake._cancel(registered), phone)
    direct = wake._cancel(registered).replace(
        str(registered.contacts[0].uri).encode(), f"sip:bob@{SERIAL}.{DOMAIN}".encode()
    )
    direct = b"\r\n".join(line for line in direct.split(b"\r\n") if not line.startswith(b"Route"))
    await linked.world.relay.handle(direct, phone)
    assert phone_wire.statuses() == [403]
    assert len(linked.world.relay.parking) == 1
    assert 487 not in linked.pbx_wire.statuses()


async def test_another_pbx_cannot_cancel_or_ack_a_delivered_call(linked: Linked) -> None:
    registered = await _bob_parked(linked)
    other, other_wire = await _other_pbx(linked)
    _, bob_wire, _ = await register(linked, user="bob", contact=contact("bob"), cseq=2)
    await bob_wire.request("INVITE")
    for message in (wake._cancel(registered), _ack(registered)):
        await linked.world.relay.handle(message, other)
    assert [m.method for m in requests(bob_wire)] == ["INVITE"], "nothing of the other PBX's"
    assert other_wire.statuses() == [480], "the CANCEL refused; an ACK gets no answer"
    # The caller's own PBX: its CANCEL follows the call to Bob's new flow.
    await linked.world.relay.handle(wake._cancel(registered), linked.pbx)
    assert (await bob_wire.request("CANCEL")).call_id == "call-1"


def _unregister(user: str, contact_value: str, cseq: int) -> bytes:
    return _request(
        "REGISTER",
        f"sip:{SERIAL}.{DOMAIN}",
        f"Via: SIP/2.0/TCP 10.0.0.5:5099;branch=z9hG4bKunreg{cseq}",
        f"From: <sip:{user}@{SERIAL}.{DOMAIN}>;tag=u{cseq}",
        f"To: <sip:{user}@{SERIAL}.{DOMAIN}>",
        f"Call-ID: unreg-{user}",
        f"CSeq: {cseq} REGISTER",
        "Max-Forwards: 70",
        f"Contact: {contact_value}",
        "Expires: 0",
    )


@pytest.mark.parametrize("how", ["expires-0", "star"])
async def test_mallorys_unregister_deletes_none_of_bobs_bindings(linked: Linked, how: str) -> None:
    bobs = contact("bob", instance=BOB_INSTANCE)
    await register(linked, user="bob", contact=bobs, cseq=1)
    # Mallory's binding: Bob's contact URI, token and instance, under her own user.
    mallorys = bobs.replace("sip:bob@", "sip:mallory@")
    mallory, mallory_wire, _ = await register(linked, user="mallory", contact=mallorys, cseq=2)
    store = linked.world.store
    assert len(await store.find("registration", push_token=TOKEN)) == 2
    # She un-REGISTERs, and her PBX accepts (it is her own account).
    value = "*" if how == "star" else f"{bobs};expires=0"
    await linked.world.relay.handle(_unregister("mallory", value, 3), mallory)
    forwarded = linked.pbx_wire.messages[-1]
    assert isinstance(forwarded, Request)
    await ww.pbx_answers(linked, forwarded, 200, "OK")
    await mallory_wire.response(200, "REGISTER")
    left = await store.find("registration", push_token=TOKEN)
    assert [r.fields["sip_username"] for r in left] == ["bob"]


async def test_mallorys_binding_with_bobs_token_does_not_stand_in_for_bobs_refresh(
    linked: Linked,
) -> None:
    """Both bindings name Bob's token and expire together: each is pushed for its own
    expiry. Keyed by token, Mallory's push would have counted as Bob's."""
    await register(linked, user="mallory", contact=contact("mallory", port=5099), cseq=1)
    await register(linked, user="bob", contact=contact("bob"), cseq=2)
    linked.world.clock.advance(3600 - 600)
    assert await linked.world.relay.parking.reregister_due() == 2
    assert await linked.world.relay.parking.reregister_due() == 0
