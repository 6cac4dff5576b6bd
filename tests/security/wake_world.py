"""The world of the wake tests in tests/security: `serve`'s app (relay, store, push
service, the embedded APNs and FCM stand-ins) on a manual clock, a linked PBX, and
phones on in-memory flows, so each step is seen in order and no test waits on time."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from privacy.store import Record
from proxy.sip.flow import Flow
from proxy.sip.message import Request
from push.service import PushService
from tests.sip import test_wake as wake
from tests.sip.test_relay import DOMAIN, SERIAL, _link_pbx, _reply, _request

TOKEN = wake.TOKEN
BOB_INSTANCE = "<urn:uuid:00000000-0000-4000-8000-00000000b0b0>"
OTHER_INSTANCE = "<urn:uuid:00000000-0000-4000-8000-0000000000ee>"


@dataclass
class Linked:
    """A world whose PBX has linked: the relay, its store and clock, the PBX's flow."""

    world: wake.World
    push: PushService
    pbx: Flow
    pbx_wire: wake.Wire


@pytest.fixture
async def linked(world: wake.World) -> Linked:
    pbx, _, status = await _link_pbx(world.relay)
    assert status == 200
    pbx_wire = wake.Wire()
    pbx.sender = pbx_wire
    # The app's push service, for a second Parking that shares it (a restart).
    push = world.relay.parking._push
    assert isinstance(push, PushService)
    return Linked(world, push, pbx, pbx_wire)


# The app and its stand-ins, as tests/sip/test_wake builds them (parametrizable the same
# way, with `(WakeSettings(...), max_in_flight)`).
world = wake.world


def contact(
    user: str,
    *,
    instance: str | None = None,
    token: str = TOKEN,
    port: int = 5062,
    refreshes_itself: bool = False,
) -> str:
    """A Contact with RFC 8599 push parameters; `+sip.instance` (RFC 5626) if given, and
    the `+sip.pnsreg` media feature tag of a phone that can refresh on its own."""
    value = wake._contact(token, user=user, port=port)
    if instance is not None:
        value += f';+sip.instance="{instance}"'
    if refreshes_itself:
        value += ";+sip.pnsreg"
    return value


async def send_register(
    linked: Linked, phone: Flow, *, user: str, contact: str, cseq: int, expires: int = 3600
) -> Request:
    """A phone's REGISTER on `phone`; what the relay forwarded to the PBX (unanswered)."""
    await linked.world.relay.handle(
        _request(
            "REGISTER",
            f"sip:{SERIAL}.{DOMAIN}",
            f"Via: SIP/2.0/TCP 10.0.0.5:5062;branch=z9hG4bKsec{user}{cseq}",
            f"From: <sip:{user}@{SERIAL}.{DOMAIN}>;tag=r{cseq}",
            f"To: <sip:{user}@{SERIAL}.{DOMAIN}>",
            f"Call-ID: sec-reg-{user}",
            f"CSeq: {cseq} REGISTER",
            "Max-Forwards: 70",
            f"Contact: {contact}",
            f"Expires: {expires}",
        ),
        phone,
    )
    forwarded = linked.pbx_wire.messages[-1]
    assert isinstance(forwarded, Request)
    assert forwarded.method == "REGISTER"
    assert forwarded.cseq.number == cseq
    return forwarded


async def pbx_answers(linked: Linked, forwarded: Request, status: int, reason: str) -> None:
    await linked.world.relay.handle(_reply(forwarded, status, reason), linked.pbx)
    await linked.world.relay.drain()


async def register(
    linked: Linked, *, user: str, contact: str, cseq: int, expires: int = 3600
) -> tuple[Flow, wake.Wire, Request]:
    """A phone REGISTERs on a new flow and its PBX accepts: the flow, its wire, and the
    REGISTER as the PBX got it (its Contact and Path are what the PBX calls)."""
    phone, phone_wire = wake._flow(("198.51.100.23", 40000 + cseq))
    forwarded = await send_register(
        linked, phone, user=user, contact=contact, cseq=cseq, expires=expires
    )
    await pbx_answers(linked, forwarded, 200, "OK")
    await phone_wire.response(200, "REGISTER")
    return phone, phone_wire, forwarded


def requests(wire: wake.Wire) -> list[Request]:
    return [m for m in wire.messages if isinstance(m, Request)]


async def binding(linked: Linked, user: str) -> Record:
    (record,) = await linked.world.store.find("registration", pbx_serial=SERIAL, sip_username=user)
    return record
