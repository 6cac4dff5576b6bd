"""Waking sleeping phones: the relay of `serve`'s app, its push service and the
embedded APNs and FCM stand-ins (the real aioapns and firebase-admin clients over
loopback), with SIP flows in memory so each step is seen in order."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from privacy.audit import scan_for_canaries
from privacy.clock import ManualClock
from privacy.keys import Keyring
from privacy.logs import setup_logging
from privacy.policy import load_policy
from privacy.retention import Sweeper
from privacy.store import Store, Subject
from proxy.sip.flow import Flow, Transport
from proxy.sip.message import Request, Response
from proxy.sip.parser import parse
from proxy.sip.relay import Relay
from proxy.sip.service import SIP_SERVICE, SipService
from proxy.sip.settings import PbxSettings, SipSettings
from proxy.sip.wake import WakeSettings
from push.apps import PushSettings
from push.embedded import StandIns
from push.fakes.script import Respond
from softrelay.app import REGISTRY, RELAY, STAND_INS, STORE, Services, build_app
from tests.sip.test_relay import DOMAIN, PBX_SECRET, SERIAL, _link_pbx, _reply, _request

APP_ID = "com.example.softphone"
TOKEN = "f00dfeed" * 8
CALLER_NAME = "Carol Caller-canary"
SDP_CANARY = "o=carol 4711 4711 IN IP4 sdp-canary.example"
STEP = 10.0  # seconds: a bound on each wait, never a pause


class Wire:
    """One end of an in-memory flow, whose messages a test can wait for."""

    def __init__(self) -> None:
        self.messages: list[Request | Response] = []
        self._changed = asyncio.Condition()

    async def send(self, data: bytes) -> None:
        async with self._changed:
            self.messages.append(parse(data))
            self._changed.notify_all()

    def close(self) -> None:
        pass

    async def wait(self, match: Callable[[Request | Response], bool]) -> Request | Response:
        async with asyncio.timeout(STEP), self._changed:
            await self._changed.wait_for(lambda: any(match(m) for m in self.messages))
            return next(m for m in self.messages if match(m))

    async def response(self, status: int, method: str = "INVITE") -> Response:
        found = await self.wait(
            lambda m: isinstance(m, Response) and m.status == status and m.cseq.method == method
        )
        assert isinstance(found, Response)
        return found

    async def request(self, method: str) -> Request:
        found = await self.wait(lambda m: isinstance(m, Request) and m.method == method)
        assert isinstance(found, Request)
        return found

    def statuses(self) -> list[int]:
        return [m.status for m in self.messages if isinstance(m, Response)]


def _flow(remote: tuple[str, int], transport: Transport = Transport.TCP) -> tuple[Flow, Wire]:
    wire = Wire()
    return Flow(transport, remote, ("127.0.0.1", 5060), wire), wire


@dataclass
class World:
    relay: Relay
    store: Store
    stand_ins: StandIns
    clock: ManualClock
    data_dir: Path
    registry: CollectorRegistry
    sip: SipService | None = None  # the app's SIP lifecycle, where a test needs it


@pytest.fixture
async def world(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[World]:
    # Real time to start with: the stand-ins check provider tokens against it.
    clock = ManualClock(time.time())
    policy = load_policy("auerproxy")
    logs = setup_logging(policy, tmp_path, clock)
    wake, in_flight = getattr(request, "param", (WakeSettings(), 10))
    sip = SipSettings(DOMAIN, (PbxSettings(SERIAL, PBX_SECRET),), wake=wake)
    push = PushSettings(apps=(), max_in_flight=in_flight, max_attempts=2, embedded_app_id=APP_ID)
    app = build_app(Services(policy, Keyring.generate(), tmp_path, clock, 3600, push, sip))
    server = TestServer(app)
    await server.start_server()
    try:
        yield World(
            app[RELAY], app[STORE], app[STAND_INS], clock, tmp_path, app[REGISTRY], app[SIP_SERVICE]
        )
    finally:
        await server.close()
        logs.close()


def _contact(token: str = TOKEN, user: str = "alice", port: int = 5062) -> str:
    return (
        f"<sip:{user}@10.0.0.5:{port};transport=tcp;pn-provider=apns;pn-prid={token};"
        f"pn-param=ABCDE12345.{APP_ID}.voip>"
    )


async def _register(
    world: World,
    pbx: Flow,
    pbx_wire: Wire,
    *,
    cseq: int,
    contact: str | None = None,
    user: str = "alice",
    expires: int = 3600,
    transport: Transport = Transport.TCP,
) -> tuple[Flow, Wire, Request]:
    """A phone REGISTERs on a new flow, the PBX says 200: the forwarded REGISTER."""
    phone, phone_wire = _flow(("198.51.100.23", 40000 + cseq), transport)
    await world.relay.handle(
        _request(
            "REGISTER",
            f"sip:{SERIAL}.{DOMAIN}",
            f"Via: SIP/2.0/TCP 10.0.0.5:5062;branch=z9hG4bKreg{user}{cseq}",
            f"From: <sip:{user}@{SERIAL}.{DOMAIN}>;tag=r{cseq}",
            f"To: <sip:{user}@{SERIAL}.{DOMAIN}>",
            f"Call-ID: reg-{user}",
            f"CSeq: {cseq} REGISTER",
            "Max-Forwards: 70",
            f"Contact: {contact or _contact(user=user)}",
            f"Expires: {expires}",
        ),
        phone,
    )
    forwarded = next(
        m for m in reversed(pbx_wire.messages) if isinstance(m, Request) and m.method == "REGISTER"
    )
    await world.relay.handle(_reply(forwarded, 200, "OK"), pbx)
    await world.relay.drain()
    return phone, phone_wire, forwarded


def _invite(register: Request, call: str = "call-1", user: str = "alice") -> bytes:
    """The PBX's INVITE to a registered Contact, along the Path it was given."""
    contact = register.contacts[0]
    return _request(
        "INVITE",
        str(contact.uri),
        f"Via: SIP/2.0/TCP 203.0.113.9:40000;branch=z9hG4bK{call}",
        f"Route: {register.paths[0]}",
        f'From: "{CALLER_NAME}" <sip:carol@{SERIAL}.{DOMAIN}>;tag=c1',
        f'To: "Alice Callee" <sip:{user}@{SERIAL}.{DOMAIN}>',
        f"Call-ID: {call}",
        "CSeq: 1 INVITE",
        "Max-Forwards: 70",
        "Contact: <sip:carol@203.0.113.9:40000;transport=tcp>",
        "Content-Type: application/sdp",
        body=f"v=0\r\n{SDP_CANARY}\r\ns=-\r\n",
    )


def _cancel(register: Request, call: str = "call-1") -> bytes:
    return _request(
        "CANCEL",
        str(register.contacts[0].uri),
        f"Via: SIP/2.0/TCP 203.0.113.9:40000;branch=z9hG4bK{call}",
        f"Route: {register.paths[0]}",
        f'From: "{CALLER_NAME}" <sip:carol@{SERIAL}.{DOMAIN}>;tag=c1',
        f"To: <sip:alice@{SERIAL}.{DOMAIN}>",
        f"Call-ID: {call}",
        "CSeq: 1 CANCEL",
        "Max-Forwards: 70",
    )


async def _asleep(world: World) -> tuple[Flow, Wire, Request]:
    """A linked PBX and a phone that registered with push parameters, then slept."""
    pbx, _, status = await _link_pbx(world.relay)
    assert status == 200
    pbx_wire = Wire()
    pbx.sender = pbx_wire
    phone, _, register = await _register(world, pbx, pbx_wire, cseq=1)
    phone.close()  # the app went to the background: its connection is gone
    return pbx, pbx_wire, register


async def test_sleeping_phone_is_woken_and_the_call_is_delivered_on_reregister(
    world: World,
) -> None:
    pbx, pbx_wire, register = await _asleep(world)
    await world.relay.handle(_invite(register), pbx)
    await pbx_wire.response(100)
    (push,) = await asyncio.wait_for(world.stand_ins.deliveries.wait_for(TOKEN), STEP)
    assert push.headers["apns-push-type"] == "voip"
    assert push.app == f"{APP_ID}.voip"
    assert CALLER_NAME not in str(push.payload), "no caller name leaves in a push"
    ringing = await pbx_wire.response(180)
    assert ringing.get("Push-Status") == "delivered"
    assert len(world.relay.parking) == 1

    # The push woke the app: it connects again and registers with the same token.
    phone, phone_wire, _ = await _register(world, pbx, pbx_wire, cseq=2)
    ok = await phone_wire.response(200, "REGISTER")
    assert '+sip.pns="apns,apns.dev,fcm"' in (ok.get("Feature-Caps") or "")
    invite = await phone_wire.request("INVITE")
    assert SDP_CANARY in invite.body.decode()
    assert invite.get("Record-Route") is not None
    assert len(world.relay.parking) == 0

    # The phone answers; its 200 reaches the caller.
    await world.relay.handle(_reply(invite, 200, "OK"), phone)
    final = await pbx_wire.response(200)
    assert final.call_id == "call-1"
    assert world.registry.get_sample_value("softrelay_wake_calls_total", {"end": "delivered"}) == 1

    # With debug mode off, nothing of the caller or the call reached the disk.
    await world.store.close()
    assert scan_for_canaries(world.data_dir, [CALLER_NAME, SDP_CANARY, "Alice Callee"]) == []


async def test_no_reregister_within_the_wake_timeout_gets_480(world: World) -> None:
    pbx, pbx_wire, register = await _asleep(world)
    await world.relay.handle(_invite(register), pbx)
    await pbx_wire.response(180)
    world.clock.advance(29)
    assert await world.relay.parking.expire() == 0
    world.clock.advance(2)
    assert await world.relay.parking.expire() == 1
    late = await pbx_wire.response(480)
    assert "wake timeout" in (late.get("Reason") or "")
    assert len(world.relay.parking) == 0


async def test_cancel_while_parked_gets_487_and_the_call_cancelled_push(world: World) -> None:
    pbx, pbx_wire, register = await _asleep(world)
    await world.relay.handle(_invite(register), pbx)
    await pbx_wire.response(180)
    await world.relay.handle(_cancel(register), pbx)
    assert (await pbx_wire.response(200, "CANCEL")).status == 200
    assert (await pbx_wire.response(487)).status == 487
    first, cancelled = await asyncio.wait_for(world.stand_ins.deliveries.wait_for(TOKEN, 2), STEP)
    # iOS needs the follow-up VoIP push for the same call, to end its CallKit report.
    assert cancelled.headers["apns-push-type"] == "voip"
    assert cancelled.payload != first.payload
    assert len(world.relay.parking) == 0
    # A re-register afterwards delivers nothing.
    _, phone_wire, _ = await _register(world, pbx, pbx_wire, cseq=2)
    assert not any(isinstance(m, Request) for m in phone_wire.messages)


async def test_dead_token_fails_the_call_fast_and_leaves_the_binding(world: World) -> None:
    world.stand_ins.script.push(TOKEN, Respond.error(410, "Unregistered"))
    pbx, pbx_wire, register = await _asleep(world)
    await world.relay.handle(_invite(register), pbx)
    failed = await pbx_wire.response(480)
    assert "no longer valid" in (failed.get("Reason") or "")
    assert 180 not in pbx_wire.statuses()
    (binding,) = await world.store.find("registration", pbx_serial=SERIAL)
    assert binding.fields["push_token"] is None


async def test_provider_refusal_gives_an_immediate_final_answer(world: World) -> None:
    world.stand_ins.script.push(TOKEN, Respond.error(400, "TopicDisallowed"))
    pbx, pbx_wire, register = await _asleep(world)
    await world.relay.handle(_invite(register), pbx)
    refused = await pbx_wire.response(480)
    assert "push refused" in (refused.get("Reason") or "")
    assert len(world.relay.parking) == 0


async def test_shutdown_answers_every_parked_call(world: World) -> None:
    pbx, pbx_wire, register = await _asleep(world)
    for call in ("call-1", "call-2"):
        await world.relay.handle(_invite(register, call), pbx)
    await world.relay.parking.close()
    answers = [m for m in pbx_wire.messages if isinstance(m, Response) and m.status == 503]
    assert sorted(m.call_id for m in answers) == ["call-1", "call-2"]
    assert all(m.get("Retry-After") == "5" for m in answers)
    assert len(world.relay.parking) == 0


async def test_once_sip_stops_accepting_new_calls_get_503_and_calls_under_way_go_on(
    world: World,
) -> None:
    """SipService.stop_accepting (aiohttp's on_shutdown): the parked call gets its 503
    with the shutdown's reason; a new INVITE gets a bare 503 with Retry-After (no 100,
    nothing parked, nobody pushed); a CANCEL, which finishes a call, is still routed."""
    pbx, pbx_wire, register = await _asleep(world)
    await world.relay.handle(_invite(register, "call-1"), pbx)
    await pbx_wire.response(180)
    assert world.sip is not None
    await world.sip.stop_accepting()
    (answered,) = [m for m in pbx_wire.messages if isinstance(m, Response) and m.status == 503]
    assert answered.call_id == "call-1"
    assert "relay shutting down" in (answered.get("Reason") or "")

    await world.relay.handle(_invite(register, "call-2"), pbx)
    new = [m for m in pbx_wire.messages if isinstance(m, Response) and m.call_id == "call-2"]
    assert [m.status for m in new] == [503]
    assert new[0].get("Retry-After") == "5"
    assert len(world.relay.parking) == 0
    assert (
        world.registry.get_sample_value("softrelay_sip_errors_total", {"reason": "stopping"}) == 1
    )
    assert len(world.stand_ins.deliveries.for_token(TOKEN)) == 1, "call-2 woke nobody"

    await world.relay.handle(_cancel(register, "call-3"), pbx)
    # Routed along its Path, not refused: the phone's flow is gone, so 480 Flow Gone.
    routed = [m for m in pbx_wire.messages if m.call_id == "call-3"]
    assert [(m.status, m.reason) for m in routed if isinstance(m, Response)] == [(480, "Flow Gone")]
    assert (
        world.registry.get_sample_value("softrelay_sip_errors_total", {"reason": "stopping"}) == 1
    )


def _shed(relay: Relay) -> None:
    """The overload guard sees the loop lag, probe after probe, until it sheds."""
    while not relay.overload.shedding:
        relay.overload.observe(1.0)


async def _phone_register(world: World, contact: str, cseq: int) -> tuple[Flow, Wire]:
    phone, phone_wire = _flow(("198.51.100.23", 41000 + cseq))
    await world.relay.handle(
        _request(
            "REGISTER",
            f"sip:{SERIAL}.{DOMAIN}",
            f"Via: SIP/2.0/TCP 10.0.0.5:5062;branch=z9hG4bKshed{cseq}",
            f"From: <sip:alice@{SERIAL}.{DOMAIN}>;tag=r{cseq}",
            f"To: <sip:alice@{SERIAL}.{DOMAIN}>",
            "Call-ID: reg-alice",
            f"CSeq: {cseq} REGISTER",
            "Max-Forwards: 70",
            f"Contact: {contact}",
            "Expires: 3600",
        ),
        phone,
    )
    return phone, phone_wire


async def test_while_shedding_a_woken_phone_still_registers_and_takes_its_call(
    world: World,
) -> None:
    """The overload guard refuses new work, but a REGISTER that brings back a phone with
    a call parked for it finishes work already taken on: it goes through, and the call
    is delivered. Another phone's REGISTER, or this one's once nothing waits, is shed."""
    pbx, pbx_wire, register = await _asleep(world)
    await world.relay.handle(_invite(register), pbx)
    await pbx_wire.response(180)
    _shed(world.relay)

    other = _contact(token="0dd" * 20, user="alice", port=5070)
    _, stranger = await _phone_register(world, other, cseq=2)
    assert stranger.statuses() == [503]
    forwarded = [m for m in pbx_wire.messages if isinstance(m, Request) and m.method == "REGISTER"]
    assert len(forwarded) == 1, "only the first registration reached the PBX"

    _, phone_wire = await _phone_register(world, _contact(), cseq=3)
    assert phone_wire.statuses() == []
    again = await pbx_wire.wait(
        lambda m: isinstance(m, Request) and m.method == "REGISTER" and m.cseq.number == 3
    )
    assert isinstance(again, Request)
    await world.relay.handle(_reply(again, 200, "OK"), pbx)
    await phone_wire.response(200, "REGISTER")
    invite = await phone_wire.request("INVITE")
    assert invite.call_id == "call-1"
    assert len(world.relay.parking) == 0

    # Nothing is parked for it now: the same phone's next REGISTER is shed like any.
    _, later = await _phone_register(world, _contact(), cseq=4)
    assert later.statuses() == [503]
    assert (
        world.registry.get_sample_value("softrelay_sip_errors_total", {"reason": "overload"}) == 2
    )


async def test_a_call_that_would_be_parked_after_close_gets_503_at_once(world: World) -> None:
    """A handler in flight may reach `park` after the parked calls were answered: the
    call is refused then and there, not parked for nobody to answer."""
    pbx, pbx_wire, register = await _asleep(world)
    assert await world.relay.parking.close() == 0
    await world.relay.handle(_invite(register, "call-1"), pbx)
    assert pbx_wire.statuses() == [503]
    (refused,) = [m for m in pbx_wire.messages if isinstance(m, Response)]
    assert "relay shutting down" in (refused.get("Reason") or "")
    assert refused.get("Retry-After") == "5"
    assert len(world.relay.parking) == 0


@pytest.mark.parametrize("world", [(WakeSettings(max_per_binding=1), 10)], indirect=True)
async def test_parked_calls_per_binding_are_bounded(world: World) -> None:
    pbx, pbx_wire, register = await _asleep(world)
    await world.relay.handle(_invite(register, "call-1"), pbx)
    await world.relay.handle(_invite(register, "call-2"), pbx)
    refused = await pbx_wire.response(503)
    assert refused.call_id == "call-2"
    assert refused.get("Retry-After") == "5"
    assert len(world.relay.parking) == 1


async def test_invite_retransmission_while_parked_pushes_once(world: World) -> None:
    pbx, pbx_wire, register = await _asleep(world)
    await world.relay.handle(_invite(register), pbx)
    await world.relay.handle(_invite(register), pbx)
    await pbx_wire.response(180)
    assert len(world.stand_ins.deliveries.for_token(TOKEN)) == 1


async def test_invite_retransmission_while_the_first_is_being_parked_pushes_once(
    world: World,
) -> None:
    pbx, pbx_wire, register = await _asleep(world)
    invite = _invite(register)
    await asyncio.gather(world.relay.handle(invite, pbx), world.relay.handle(invite, pbx))
    await pbx_wire.response(180)
    assert len(world.relay.parking) == 1
    assert len(world.stand_ins.deliveries.for_token(TOKEN)) == 1


async def test_fork_to_a_desk_app_and_a_sleeping_mobile_first_answer_wins(
    world: World,
) -> None:
    pbx, pbx_wire, mobile = await _asleep(world)
    desk_contact = "<sip:alice@10.0.0.6:5070;transport=tcp>"
    desk, desk_wire, desk_register = await _register(
        world, pbx, pbx_wire, cseq=7, contact=desk_contact
    )
    # The PBX forks the call to both bindings, each along its own Path.
    await world.relay.handle(_invite(desk_register, "fork-1"), pbx)
    await world.relay.handle(_invite(mobile, "fork-1m"), pbx)
    at_desk = await desk_wire.request("INVITE")
    await pbx_wire.response(180)  # the mobile's push went out
    # The desk answers first; the PBX cancels the mobile's branch.
    await world.relay.handle(_reply(at_desk, 200, "OK"), desk)
    answered = await pbx_wire.response(200)
    assert answered.call_id == "fork-1"
    await world.relay.handle(_cancel(mobile, "fork-1m"), pbx)
    assert (await pbx_wire.response(487)).call_id == "fork-1m"
    await asyncio.wait_for(world.stand_ins.deliveries.wait_for(TOKEN, 2), STEP)
    # The mobile wakes late: nothing is delivered to it.
    _, late_wire, _ = await _register(world, pbx, pbx_wire, cseq=8)
    assert not any(isinstance(m, Request) for m in late_wire.messages)


async def test_cancel_after_delivery_follows_the_call_to_its_new_flow(world: World) -> None:
    pbx, pbx_wire, register = await _asleep(world)
    await world.relay.handle(_invite(register), pbx)
    await pbx_wire.response(180)
    _, phone_wire, _ = await _register(world, pbx, pbx_wire, cseq=2)
    await phone_wire.request("INVITE")
    await world.relay.handle(_cancel(register), pbx)
    cancel = await phone_wire.request("CANCEL")
    assert cancel.call_id == "call-1"


async def test_restricted_subject_is_never_woken(world: World) -> None:
    pbx, pbx_wire, register = await _asleep(world)
    await world.store.restrict(Subject("alice", SERIAL), True)
    await world.relay.handle(_invite(register), pbx)
    await pbx_wire.response(480)
    assert world.stand_ins.deliveries.for_token(TOKEN) == []
    await world.store.restrict(Subject("alice", SERIAL), False)
    await world.relay.handle(_invite(register, "call-2"), pbx)
    await pbx_wire.response(180)
    assert len(world.stand_ins.deliveries.for_token(TOKEN)) == 1


async def test_binding_about_to_expire_gets_one_background_push(world: World) -> None:
    _, _, _ = await _asleep(world)
    parking = world.relay.parking
    assert await parking.reregister_due() == 0, "an hour left: not yet"
    world.clock.advance(3600 - 599)
    assert await parking.reregister_due() == 1
    assert await parking.reregister_due() == 0, "once per expiry"
    (push,) = await asyncio.wait_for(world.stand_ins.deliveries.wait_for(TOKEN), STEP)
    assert push.headers["apns-push-type"] == "background", "never a VoIP push"


@pytest.mark.parametrize(
    "world", [(WakeSettings(debug_serials=frozenset({SERIAL})), 10)], indirect=True
)
async def test_debug_mode_keeps_the_destination_name_for_four_weeks(world: World) -> None:
    pbx, pbx_wire, register = await _asleep(world)
    await world.relay.handle(_invite(register), pbx)
    await pbx_wire.response(180)
    (record,) = await world.store.find("debug", pbx_serial=SERIAL)
    assert record.fields["destination_name"] == "Alice Callee"
    sweeper = Sweeper(world.store, world.data_dir)
    world.clock.advance(28 * 86400 - 1)
    await sweeper.run_once()
    assert len(await world.store.find("debug", pbx_serial=SERIAL)) == 1
    world.clock.advance(2)
    await sweeper.run_once()
    assert await world.store.find("debug", pbx_serial=SERIAL) == []


async def test_phone_on_udp_that_leaves_an_invite_unanswered_is_woken(world: World) -> None:
    pbx, _, status = await _link_pbx(world.relay)
    assert status == 200
    pbx_wire = Wire()
    pbx.sender = pbx_wire
    # Asleep on UDP: its flow still looks alive, but its NAT binding is gone.
    _, udp_wire, register = await _register(world, pbx, pbx_wire, cseq=1, transport=Transport.UDP)
    await world.relay.handle(_invite(register), pbx)
    await udp_wire.request("INVITE")  # sent into the void
    world.clock.advance(1)
    await world.relay.parking.expire()
    assert world.stand_ins.deliveries.for_token(TOKEN) == [], "not before answer_timeout"
    world.clock.advance(1.5)
    await world.relay.parking.expire()
    assert (await pbx_wire.response(180)).get("Push-Status") == "delivered"
    # It wakes, registers over a new flow, and gets the call there.
    _, phone_wire, _ = await _register(world, pbx, pbx_wire, cseq=2)
    invite = await phone_wire.request("INVITE")
    assert invite.call_id == "call-1"


async def test_phone_on_udp_that_answers_is_not_pushed(world: World) -> None:
    pbx, _, status = await _link_pbx(world.relay)
    assert status == 200
    pbx_wire = Wire()
    pbx.sender = pbx_wire
    phone, udp_wire, register = await _register(
        world, pbx, pbx_wire, cseq=1, transport=Transport.UDP
    )
    await world.relay.handle(_invite(register), pbx)
    invite = await udp_wire.request("INVITE")
    await world.relay.handle(_reply(invite, 100, "Trying"), phone)
    world.clock.advance(5)
    await world.relay.parking.expire()
    assert world.stand_ins.deliveries.for_token(TOKEN) == []
    assert len(world.relay.parking) == 0


@pytest.mark.parametrize("world", [(WakeSettings(), 1)], indirect=True)
async def test_push_service_at_its_limit_answers_503_not_480(world: World) -> None:
    other = "beefcafe" * 8
    world.stand_ins.script.push(TOKEN, Respond.hanging())
    pbx, pbx_wire, register = await _asleep(world)
    bob, _, other_register = await _register(
        world, pbx, pbx_wire, cseq=2, contact=_contact(other, user="bob"), user="bob"
    )
    bob.close()
    await world.relay.handle(_invite(register, "call-1"), pbx)
    await pbx_wire.response(100)
    await world.relay.handle(_invite(other_register, "call-2", user="bob"), pbx)
    busy = await pbx_wire.response(503)
    assert busy.call_id == "call-2"
    assert busy.get("Retry-After") == "5"
    assert world.stand_ins.deliveries.for_token(other) == []
