"""Push tokens of SIPIS accounts, through the whole app, a real Kamailio and the push
stand-ins (tests/sipis/calls_world.py):

- a token the push service declares dead (APNs 410 Unregistered, FCM UNREGISTERED) is
  cleared from the account, as the relay clears a binding's: the caller gets 480 with a
  reason, the next call is not pushed at all, the app reads `push.state: "invalid"` in
  its status, and a PATCH with a new token makes it valid again;
- an iPhone app's incoming call goes as a VoIP (PushKit) push to `token`, its "new
  message" as an alert push to `push.alert_token`; without one (or once APNs declared
  it dead) a text gets no push and the status says `texts: "not_pushed"`, while calls
  still go to the VoIP token;
- the API takes `alert_token` for APNs only, keeps it encrypted, and never shows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from proxy.sip.message import Response
from push.fakes.script import Delivery, Respond
from sipis.account import Account, Push
from sipis.accounts import CATEGORY, MESSAGES
from tests.kamailio import Kamailio
from tests.rawdb import RawDatabase, SQLiteRaw
from tests.sipis.calls_world import (
    APP_ID,
    WAIT,
    App,
    Caller,
    World,
    kamailio,
    make_world,
)
from tests.sipis.test_api import ACCOUNT
from tests.sipis.test_api import World as ApiWorld
from tests.sipis.test_api import world as api_world
from tests.sipis.test_messages_kamailio import app_answer

__all__ = ["api_world", "kamailio"]  # the fixtures

DEAD = {
    "apns": Respond.error(410, "Unregistered"),
    "fcm": Respond.error(404, "UNREGISTERED"),
}


def new_token(provider: str) -> str:
    """A token the stand-ins take: APNs hex (64 digits), FCM printable ASCII."""
    return secrets.token_hex(32) if provider == "apns" else f"fcm-{secrets.token_hex(16)}"


def event_of(delivery: Delivery) -> str:
    """What a push says: APNs `event` in its JSON, FCM `reason` in the message's data."""
    payload = delivery.payload
    return str(payload["event"] if delivery.service == "apns" else payload["data"]["reason"])


async def api(
    world: World, method: str, account_id: str, secret: str, body: Any = None
) -> tuple[int, Any]:
    url = f"{world.http}sipis/v1/accounts/{account_id}"
    headers = {"Authorization": f"Bearer {secret}"}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, json=body, headers=headers) as answer,
    ):
        return answer.status, await answer.json()


async def final(caller: Caller, status: int) -> Response:
    response = await caller.inbox.response(status)
    assert 180 not in caller.inbox.statuses()  # no ringing: nothing was pushed
    return response


@contextlib.asynccontextmanager
async def calling(kamailio: Kamailio) -> AsyncIterator[Caller]:
    assert kamailio.port is not None
    async with Caller.open(kamailio.port) as caller:
        yield caller


def observed(
    hook: Callable[[Account, str], Awaitable[None]] | None,
) -> tuple[Callable[[Account, str], Awaitable[None]], asyncio.Event]:
    """The app's dead-token hook, wrapped to tell the test once it has run."""
    assert hook is not None
    done = asyncio.Event()

    async def wrapped(account: Account, token: str) -> None:
        try:
            await hook(account, token)
        finally:
            done.set()

    return wrapped, done


@pytest.mark.parametrize("provider", ["apns", "fcm"])
async def test_a_dead_token_is_cleared_not_pushed_again_and_shown_to_the_app(
    kamailio: Kamailio, tmp_path: Any, provider: str
) -> None:
    async with make_world(kamailio, tmp_path) as world:
        token = new_token(provider)
        alert = new_token("apns") if provider == "apns" else None
        account, secret = await world.account(push=Push(provider, token, APP_ID, alert))
        status, view = await api(world, "GET", account.account_id, secret)
        assert (status, view["push"]["state"], view["push"]["texts"]) == (200, "valid", "pushed")

        world.stand_ins.script.push(token, DEAD[provider])
        async with calling(kamailio) as caller:
            caller.invite()
            refused = await final(caller, 480)
        assert refused.get("Reason") == 'SIP;cause=480;text="push token no longer valid"'
        assert world.stand_ins.deliveries.for_token(token) == []
        dead = world.registry.get_sample_value(
            "softrelay_push_total",
            {"provider": provider, "app": APP_ID, "outcome": "token_dead"},
        )
        assert dead == 1

        # Cleared in the store (the alert token, another token, is kept) ...
        (record,) = await world.store.find(CATEGORY, account_id=account.account_id)
        assert record.fields["push_token"] is None
        assert record.fields["push_alert_token"] == alert
        assert token not in SQLiteRaw(tmp_path).dump()
        # ... and shown to the app; texts: FCM's one token is gone, APNs' alert one is not.
        status, view = await api(world, "GET", account.account_id, secret)
        assert view["push"]["state"] == "invalid"
        assert view["push"]["texts"] == ("pushed" if provider == "apns" else "not_pushed")

        # The next call is not pushed: the stand-in would have delivered it (its script
        # is used up), and the push service counts no second attempt.
        async with calling(kamailio) as caller:
            caller.invite()
            refused = await final(caller, 480)
        assert refused.get("Reason") == 'SIP;cause=480;text="push token no longer valid"'
        assert world.stand_ins.deliveries.for_token(token) == []
        assert (
            world.registry.get_sample_value(
                "softrelay_push_total",
                {"provider": provider, "app": APP_ID, "outcome": "token_dead"},
            )
            == 1
        )

        # A new token from the app: valid again, and the next call is pushed to it.
        fresh = new_token(provider)
        target = {"provider": provider, "token": fresh, "app_id": APP_ID}
        status, view = await api(world, "PATCH", account.account_id, secret, {"push": target})
        assert (status, view["push"]["state"]) == (200, "valid")
        async with calling(kamailio) as caller:
            caller.invite()
            ringing = await caller.inbox.response(180)
            assert ringing.get("Push-Status") == "delivered"
            (push,) = await asyncio.wait_for(world.stand_ins.deliveries.wait_for(fresh), WAIT)
            assert event_of(push) == "incoming_call"
            caller.cancel()
            await caller.inbox.response(487)


async def test_an_iphone_app_gets_calls_as_voip_and_texts_as_alert_to_its_alert_token(
    kamailio: Kamailio, tmp_path: Any
) -> None:
    voip, alert = new_token("apns"), new_token("apns")
    async with make_world(kamailio, tmp_path) as world:
        account, secret = await world.account(push=Push("apns", voip, APP_ID, alert))
        async with calling(kamailio) as caller:
            caller.text("hello from carol")
            await caller.inbox.response(202, "MESSAGE")
            (text_push,) = await asyncio.wait_for(world.stand_ins.deliveries.wait_for(alert), WAIT)
            assert text_push.headers.get("apns-push-type") == "alert"
            assert text_push.headers.get("apns-topic") == APP_ID
            assert text_push.payload["event"] == "new_message"

            caller.invite()
            await caller.inbox.response(180)
            (call_push,) = await asyncio.wait_for(world.stand_ins.deliveries.wait_for(voip), WAIT)
            assert call_push.headers.get("apns-push-type") == "voip"
            assert call_push.headers.get("apns-topic") == f"{APP_ID}.voip"
            assert call_push.payload["event"] == "incoming_call"
            caller.cancel()
            await caller.inbox.response(487)
        # Each token got its own kind only (the cancel push is VoIP, to the VoIP token).
        assert [d.payload["event"] for d in world.stand_ins.deliveries.for_token(alert)] == [
            "new_message"
        ]
        assert "new_message" not in {
            d.payload["event"] for d in world.stand_ins.deliveries.for_token(voip)
        }
        status, view = await api(world, "GET", account.account_id, secret)
        assert (status, view["push"]["state"], view["push"]["texts"]) == (200, "valid", "pushed")
        assert alert not in str(view)
        assert voip not in str(view)


async def test_without_an_alert_token_an_iphone_text_waits_unpushed_and_the_app_is_told(
    kamailio: Kamailio, tmp_path: Any
) -> None:
    voip = new_token("apns")
    async with make_world(kamailio, tmp_path) as world:
        account, secret = await world.account(push=Push("apns", voip, APP_ID))
        status, view = await api(world, "GET", account.account_id, secret)
        assert (status, view["push"]["state"], view["push"]["texts"]) == (
            200,
            "valid",
            "not_pushed",
        )
        async with calling(kamailio) as caller:
            caller.text("unpushed text")
            await caller.inbox.response(202, "MESSAGE")
            # A call after it is pushed (VoIP): by then the text was handled long before,
            # and no push of any kind went out for it, to any token.
            caller.invite()
            await caller.inbox.response(180)
            caller.cancel()
            await caller.inbox.response(487)
        events = [d.payload["event"] for d in world.stand_ins.deliveries.items]
        assert "new_message" not in events
        assert "incoming_call" in events
        # The text still waits, and reaches the app when it connects.
        assert len(await world.store.find(MESSAGES, account_id=account.account_id)) == 1
        async with App.registered(world.sip_port, account.account_id, secret) as app:
            delivered = await app.inbox.request("MESSAGE")
            assert delivered.body == b"unpushed text"
            app.send(app_answer(delivered))
            await asyncio.wait_for(world.messages.idle(account.account_id), WAIT)
        assert await world.store.find(MESSAGES, account_id=account.account_id) == []


async def test_a_dead_alert_token_stops_text_pushes_only(kamailio: Kamailio, tmp_path: Any) -> None:
    voip, alert = new_token("apns"), new_token("apns")
    async with make_world(kamailio, tmp_path) as world:
        account, secret = await world.account(push=Push("apns", voip, APP_ID, alert))
        world.messages.dead_token, cleared = observed(world.messages.dead_token)
        world.stand_ins.script.push(alert, DEAD["apns"])
        async with calling(kamailio) as caller:
            caller.text("first")
            await caller.inbox.response(202, "MESSAGE")
            await asyncio.wait_for(cleared.wait(), WAIT)
            (record,) = await world.store.find(CATEGORY, account_id=account.account_id)
            assert (record.fields["push_token"], record.fields["push_alert_token"]) == (voip, None)
            status, view = await api(world, "GET", account.account_id, secret)
            assert (status, view["push"]["state"], view["push"]["texts"]) == (
                200,
                "valid",
                "not_pushed",
            )
            # Calls still go to the VoIP token.
            caller.invite()
            await caller.inbox.response(180)
            caller.cancel()
            await caller.inbox.response(487)
        assert world.stand_ins.deliveries.for_token(alert) == []
        first = world.stand_ins.deliveries.for_token(voip)[0]
        assert event_of(first) == "incoming_call"


# --- the API ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("push", "detail"),
    [
        (
            {"provider": "fcm", "token": "t-1", "app_id": "com.example.phone", "alert_token": "a"},
            "field 'push.alert_token': for apns only (an FCM token takes every push)",
        ),
        (
            {"provider": "apns", "token": "t-1", "app_id": "com.example.phone", "alert_token": ""},
            "field 'push.alert_token' must be 1-4096 letters, digits or : _ . -",
        ),
        (
            {"provider": "apns", "token": "t-1", "app_id": "com.example.phone", "alert_token": 7},
            "field 'push.alert_token' must be 1-4096 letters, digits or : _ . -",
        ),
    ],
)
async def test_a_bad_alert_token_is_refused_naming_the_field(
    api_world: ApiWorld, push: dict[str, Any], detail: str
) -> None:
    status, data, _ = await api_world.call("POST", "", body=ACCOUNT | {"push": push})
    assert (status, data) == (400, {"error": "bad_field", "detail": detail})


async def test_the_alert_token_is_kept_encrypted_and_never_shown(
    api_world: ApiWorld, raw_db: RawDatabase
) -> None:
    voip, alert = "apns-voip-canary-5d2e", "apns-alert-canary-77a1"
    push = {"provider": "apns", "token": voip, "app_id": "com.example.phone"}
    status, created, _ = await api_world.call(
        "POST", "", body=ACCOUNT | {"push": push | {"alert_token": alert}}
    )
    assert status == 201
    assert created["push"] == {
        "provider": "apns",
        "app_id": "com.example.phone",
        "state": "valid",
        "texts": "pushed",
    }
    account_id, secret = created["account_id"], created["device_secret"]
    (record,) = await api_world.store.find(CATEGORY, account_id=account_id)
    assert record.fields["push_alert_token"] == alert
    assert alert not in raw_db.dump()  # encrypted at rest
    _, view, _ = await api_world.call("GET", f"/{account_id}", secret)
    assert alert not in str(view)
    assert alert not in str(created)
    # A new push target without one: gone from the store, and the app is told.
    _, view, _ = await api_world.call("PATCH", f"/{account_id}", secret, {"push": push})
    assert view["push"]["texts"] == "not_pushed"
    (record,) = await api_world.store.find(CATEGORY, account_id=account_id)
    assert record.fields["push_alert_token"] is None
