"""How a SIPIS incoming call ends other than answered, through a real provider
(Kamailio) and the whole app (tests/sipis/calls_world.py): CANCEL while parked, no app
within the wake timeout, the app declining, and an app whose device secret is wrong or
stale, which changes nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sipis.calls import CallSettings
from tests.kamailio import Kamailio
from tests.sipis.calls_world import (
    CALLER_NAME,
    SDP_CANARY,
    WAIT,
    App,
    Caller,
    World,
    kamailio,
    make_world,
)

__all__ = ["kamailio"]  # the fixture


def ends(world: World, end: str) -> float:
    value = world.registry.get_sample_value("softrelay_sipis_calls_total", {"end": end})
    return value or 0.0


async def parked_call(world: World, caller: Caller, token: str) -> None:
    """The caller's INVITE parked, the app pushed, 180 Push-Status at the caller."""
    caller.invite()
    ringing = await caller.inbox.response(180)
    assert ringing.get("Push-Status") == "delivered"
    await asyncio.wait_for(world.stand_ins.deliveries.wait_for(token), WAIT)


async def test_cancel_while_parked_is_487_and_a_cancel_push(
    kamailio: Kamailio, tmp_path: Path
) -> None:
    async with make_world(kamailio, tmp_path) as world:
        account, secret = await world.account()
        token = account.push.token
        assert kamailio.port is not None
        async with Caller.open(kamailio.port) as caller:
            await parked_call(world, caller, token)
            caller.cancel()
            await caller.inbox.response(200, "CANCEL")
            await caller.inbox.response(487)
            wake, cancelled = await asyncio.wait_for(
                world.stand_ins.deliveries.wait_for(token, 2), WAIT
            )
            assert cancelled.payload["event"] == "call_cancelled"
            assert cancelled.payload["call_id"] == wake.payload["call_id"]  # one CallKit call
            for bit in ("carol", CALLER_NAME, SDP_CANARY):
                assert bit not in repr(cancelled.payload)
            assert world.calls.parked_for(account.account_id) == 0
            assert ends(world, "cancelled") == 1
            # The app wakes too late: nothing is delivered.
            async with App.registered(world.sip_port, account.account_id, secret) as app:
                assert (await app.register(account.account_id, secret, cseq=2)).status == 200
                assert app.inbox.requests("INVITE") == []
            assert ends(world, "delivered") == 0


async def test_no_app_within_the_wake_timeout_is_480_with_a_reason(
    kamailio: Kamailio, tmp_path: Path
) -> None:
    async with make_world(kamailio, tmp_path) as world:
        account, _ = await world.account()
        assert kamailio.port is not None
        async with Caller.open(kamailio.port) as caller:
            await parked_call(world, caller, account.push.token)
            world.clock.advance(CallSettings().wake_timeout - 1)
            assert await world.calls.expire() == 0
            world.clock.advance(1)
            assert await world.calls.expire() == 1
            unavailable = await caller.inbox.response(480)
            assert unavailable.get("Reason") == 'SIP;cause=480;text="wake timeout"'
            assert world.calls.parked_for(account.account_id) == 0
            assert ends(world, "timeout") == 1


async def test_the_app_declining_gives_the_caller_its_answer(
    kamailio: Kamailio, tmp_path: Path
) -> None:
    async with make_world(kamailio, tmp_path) as world:
        account, secret = await world.account()
        assert kamailio.port is not None
        async with Caller.open(kamailio.port) as caller:
            await parked_call(world, caller, account.push.token)
            async with App.registered(world.sip_port, account.account_id, secret) as app:
                invite = await app.inbox.request("INVITE")
                app.reply(invite, 486, "Busy Here")
                busy = await caller.inbox.response(486)
                assert busy.reason == "Busy Here"
                ack = await app.inbox.request("ACK")  # softrelay ends the app's transaction
                assert ack.top_via.branch == invite.top_via.branch
                assert 200 not in caller.inbox.statuses()


async def test_a_wrong_or_stale_device_secret_changes_nothing(
    kamailio: Kamailio, tmp_path: Path
) -> None:
    async with make_world(kamailio, tmp_path) as world:
        account, stale = await world.account()
        fresh = await world.accounts.new_secret(account.account_id)
        assert fresh is not None
        assert kamailio.port is not None
        async with Caller.open(kamailio.port) as caller:
            await parked_call(world, caller, account.push.token)
            async with App.connect(world.sip_port) as app:
                missing = await app.register(account.account_id, None, cseq=1)
                assert missing.status == 401
                assert missing.get("WWW-Authenticate") == 'Bearer realm="sipis.relay.test"'
                assert (await app.register(account.account_id, "not-the-secret", 2)).status == 403
                assert (await app.register(account.account_id, stale, cseq=3)).status == 403
                assert (await app.register("A" * 22, fresh, cseq=4)).status == 403  # another id
                # Malformed or foreign schemes: a 401 challenge or a 403, never a 5xx.
                malformed = {
                    "Bearer": 401,
                    "Bearer    ": 401,
                    f'Digest username="{account.account_id}", realm="x", nonce="n"': 401,
                    "Basic YWxpY2U6cHc=": 401,
                    "Bearer " + "x" * 4000: 403,
                    'Bearer "quoted", extra=1': 403,
                }
                for number, (value, status) in enumerate(malformed.items(), start=10):
                    answer = await app.register(account.account_id, "", number, value)
                    assert answer.status == status, (value[:40], answer.status)
                assert app.inbox.requests("INVITE") == []
                assert world.calls.parked_for(account.account_id) == 1
                assert ends(world, "delivered") == 0
                assert (await app.register(account.account_id, fresh, cseq=5)).status == 200
                await app.inbox.request("INVITE")
                assert ends(world, "delivered") == 1
