"""Incoming calls of SIPIS accounts through a real provider (Kamailio): the whole app
(SIPIS mode, the real registrar engine, SIP on loopback, the embedded push stand-ins),
a foreign caller sending through Kamailio, another subscriber of that Kamailio (bob,
whom it challenges), and a Python SIPIS app on TCP."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sipis.appleg import MARK
from tests.kamailio import DOMAIN, Kamailio
from tests.sipis.calls_world import (
    BOB,
    CALLER_NAME,
    SDP,
    SDP_CANARY,
    WAIT,
    App,
    Caller,
    KamailioUser,
    ack_then_app_hangs_up,
    ack_then_caller_hangs_up,
    kamailio,
    make_world,
)

__all__ = ["kamailio"]  # the fixture


async def test_call_reaches_the_sleeping_app_after_a_push_and_completes(
    kamailio: Kamailio, tmp_path: Path
) -> None:
    async with make_world(kamailio, tmp_path) as world:
        account, secret = await world.account()
        token = account.push.token
        assert kamailio.port is not None
        async with Caller.open(kamailio.port) as caller:
            caller.invite()
            ringing = await caller.inbox.response(180)
            assert ringing.get("Push-Status") == "delivered"
            (push,) = await asyncio.wait_for(world.stand_ins.deliveries.wait_for(token), WAIT)
            shown = repr(push.payload) + repr(push.headers)
            for secret_bit in ("carol", CALLER_NAME, "other.test", SDP_CANARY):
                assert secret_bit not in shown
            assert push.payload["event"] == "incoming_call"
            assert world.calls.parked_for(account.account_id) == 1
            async with App.connect(world.sip_port) as app:
                registered = await app.register(account.account_id, secret)
                assert registered.status == 200
                invite = await app.inbox.request("INVITE")
                assert world.calls.parked_for(account.account_id) == 0
                assert str(invite.uri) == app.contact.strip("<>")
                assert invite.body.decode() == SDP
                top_route = invite.values("Record-Route")[0]
                assert MARK in top_route
                app.reply(invite, 180, "Ringing")
                await caller.inbox.response(180)
                app.reply(invite, 200, "OK", body=SDP)
                ok = await caller.inbox.response(200)
                # The provider reaches the call at the Contact softrelay registered.
                contact = world.registrations.contact(account.account_id)
                assert contact is not None
                assert ok.get("Contact") == contact
                assert not any(MARK in v for v in ok.values("Record-Route"))
                await ack_then_app_hangs_up(caller, app, invite, ok)
        assert world.calls.parked_for(account.account_id) == 0


async def test_caller_hangs_up_a_delivered_call(kamailio: Kamailio, tmp_path: Path) -> None:
    async with make_world(kamailio, tmp_path) as world:
        account, secret = await world.account()
        assert kamailio.port is not None
        async with (
            App.registered(world.sip_port, account.account_id, secret) as app,
            Caller.open(kamailio.port) as caller,
        ):
            caller.invite()
            invite = await app.inbox.request("INVITE")  # awake: no push, at once
            assert world.stand_ins.deliveries.for_token(account.push.token) == []
            app.reply(invite, 200, "OK", body=SDP)
            ok = await caller.inbox.response(200)
            assert 180 not in caller.inbox.statuses()
            await ack_then_caller_hangs_up(caller, app, ok)


@pytest.mark.parametrize("hangs_up", ["bob", "app"])
async def test_call_from_another_kamailio_user_reaches_the_sleeping_app_and_completes(
    kamailio: Kamailio, tmp_path: Path, hangs_up: str
) -> None:
    """bob, a subscriber of the same provider, answers its 407 with his password as a
    real UA does; his call is parked and pushed like a foreign caller's, with nothing
    of bob in the push, and delivered once the woken app registers with its secret."""
    async with make_world(kamailio, tmp_path) as world:
        account, secret = await world.account()
        token = account.push.token
        assert kamailio.port is not None
        async with KamailioUser.registered(kamailio.port) as bob:
            await bob.call()
            await bob.inbox.response(100)
            ringing = await bob.inbox.response(180)
            assert ringing.get("Push-Status") == "delivered"
            (push,) = await asyncio.wait_for(world.stand_ins.deliveries.wait_for(token), WAIT)
            shown = repr(push.payload) + repr(push.headers)
            for secret_bit in ("bob", BOB.password, bob.call_id, str(bob.port), SDP_CANARY):
                assert secret_bit not in shown
            assert push.payload["event"] == "incoming_call"
            assert world.calls.parked_for(account.account_id) == 1
            async with App.connect(world.sip_port) as app:
                assert (await app.register(account.account_id, secret)).status == 200
                invite = await app.inbox.request("INVITE")
                assert world.calls.parked_for(account.account_id) == 0
                assert str(invite.uri) == app.contact.strip("<>")
                # bob's authenticated INVITE (the second), his credentials left at Kamailio.
                assert str(invite.from_.uri) == f"sip:bob@{DOMAIN}"
                assert invite.cseq.number == 2
                assert not invite.has("Proxy-Authorization")
                assert invite.body.decode() == SDP
                assert MARK in invite.values("Record-Route")[0]
                app.reply(invite, 180, "Ringing")
                ringing_app = await bob.inbox.nth_response(2, 180)
                assert not ringing_app.has("Push-Status")
                app.reply(invite, 200, "OK", body=SDP)
                ok = await bob.inbox.response(200)
                assert ok.get("CSeq") == "2 INVITE"
                assert ok.body.decode() == SDP
                assert ok.get("Contact") == world.registrations.contact(account.account_id)
                assert not any(MARK in v for v in ok.values("Record-Route"))
                if hangs_up == "bob":
                    await ack_then_caller_hangs_up(bob, app, ok)
                else:
                    await ack_then_app_hangs_up(bob, app, invite, ok)
        assert world.calls.parked_for(account.account_id) == 0
        assert len(world.stand_ins.deliveries.for_token(token)) == 1
