"""Text messages for SIPIS accounts through a real provider (Kamailio) and the whole
app (tests/sipis/calls_world.py): a MESSAGE for a sleeping app is accepted (202),
pushed as "new message" only, kept encrypted, delivered when the app connects and then
gone from the store; an app already connected gets it directly, nothing stored."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

from proxy.sip.message import Request
from sipis.accounts import MESSAGES
from tests.kamailio import Kamailio
from tests.rawdb import SQLiteRaw
from tests.sipis.calls_world import (
    CALLER_NAME,
    WAIT,
    App,
    Caller,
    answer,
    kamailio,
    make_world,
)

__all__ = ["kamailio"]  # the fixture


async def test_text_waits_encrypted_then_reaches_the_app_and_is_deleted(
    kamailio: Kamailio, tmp_path: Path
) -> None:
    text = f"Text canary {secrets.token_hex(6)} - grüße"
    async with make_world(kamailio, tmp_path) as world:
        # An iPhone app: the text's alert push goes to its ordinary token, not the VoIP one.
        account, secret = await world.account(alert_token=secrets.token_hex(32))
        token = account.push.alert_token
        assert token is not None
        assert kamailio.port is not None
        async with Caller.open(kamailio.port) as caller:
            caller.text(text)
            await caller.inbox.response(202, "MESSAGE")
        (push,) = await asyncio.wait_for(world.stand_ins.deliveries.wait_for(token), WAIT)
        assert push.payload["event"] == "new_message"
        assert push.headers.get("apns-push-type") == "alert"  # no VoIP push for a text
        shown = repr(push.payload)
        for bit in ("carol", CALLER_NAME, "other.test", "canary"):
            assert bit not in shown
        (stored,) = await world.store.find(MESSAGES, account_id=account.account_id)
        assert stored.fields["sender"] == "sip:carol@other.test"  # no display name
        assert stored.fields["body"] == text
        dump = SQLiteRaw(tmp_path).dump()
        assert "canary" not in dump
        assert "carol" not in dump
        async with App.registered(world.sip_port, account.account_id, secret) as app:
            delivered = await app.inbox.request("MESSAGE")
            assert delivered.body.decode() == text
            assert str(delivered.from_.uri) == "sip:carol@other.test"
            assert str(delivered.uri) == app.contact.strip("<>")
            assert await world.store.find(MESSAGES, account_id=account.account_id) != []
            app.send(app_answer(delivered))
            await asyncio.wait_for(world.messages.idle(account.account_id), WAIT)
            assert await world.store.find(MESSAGES, account_id=account.account_id) == []
            delivered_count = world.registry.get_sample_value(
                "softrelay_sipis_messages_total", {"outcome": "delivered"}
            )
            assert delivered_count == 1


async def test_text_for_a_connected_app_goes_straight_to_it(
    kamailio: Kamailio, tmp_path: Path
) -> None:
    async with make_world(kamailio, tmp_path) as world:
        account, secret = await world.account()
        assert kamailio.port is not None
        async with (
            App.registered(world.sip_port, account.account_id, secret) as app,
            Caller.open(kamailio.port) as caller,
        ):
            caller.text("hello")
            delivered = await app.inbox.request("MESSAGE")
            assert delivered.body == b"hello"
            app.send(app_answer(delivered))
            await caller.inbox.response(200, "MESSAGE")
            assert 202 not in caller.inbox.statuses("MESSAGE")
        assert await world.store.find(MESSAGES, account_id=account.account_id) == []
        assert world.stand_ins.deliveries.for_token(account.push.token) == []


def app_answer(request: Request) -> bytes:
    return answer(request, 200, "OK", tag=secrets.token_hex(4))
