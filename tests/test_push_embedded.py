"""The embedded default end to end: `serve`'s app starts APNs and FCM stand-ins, the
real aioapns and firebase-admin clients wake phones through them, a dead token leaves
the registration store, and nothing under the data directory holds a token."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from privacy.audit import scan_for_canaries
from privacy.clock import SystemClock
from privacy.keys import Keyring
from privacy.logs import setup_logging
from privacy.policy import load_policy
from push.apps import PushSettings
from push.fakes.script import Respond
from push.wake import Delivered, Reason, Service, TokenDead, WakeRequest
from softrelay.app import PUSH, STAND_INS, STORE, Services, build_app
from tests.conftest import sample_fields

APP_ID = "com.example.softphone"
APNS_TOKEN = "f00dfeed" * 8
FCM_TOKEN = "fcm-registration-token-4711:APA91bH-canary"


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[web.Application]:
    clock = SystemClock()
    policy = load_policy("auerproxy")
    logs = setup_logging(policy, tmp_path, clock)
    push = PushSettings(apps=(), max_in_flight=10, max_attempts=2, embedded_app_id=APP_ID)
    application = build_app(Services(policy, Keyring.generate(), tmp_path, clock, 3600, push))
    server = TestServer(application)
    await server.start_server()
    try:
        yield application
    finally:
        await server.close()
        logs.close()


def _request(service: Service, token: str, reason: Reason = Reason.INCOMING_CALL) -> WakeRequest:
    return WakeRequest(service, token, APP_ID, reason, SystemClock().now() + 10, "call-1")


async def test_wakes_an_iphone_and_an_android_phone_through_the_stand_ins(
    app: web.Application,
) -> None:
    push, stand_ins = app[PUSH], app[STAND_INS]
    ios = await push.wake(_request(Service.APNS, APNS_TOKEN))
    android = await push.wake(_request(Service.FCM, FCM_TOKEN))
    assert ios.outcome == Delivered()
    assert android.outcome == Delivered()
    (apns_push,) = stand_ins.deliveries.for_token(APNS_TOKEN)
    assert apns_push.headers["apns-push-type"] == "voip"
    assert apns_push.app == f"{APP_ID}.voip"
    (fcm_push,) = stand_ins.deliveries.for_token(FCM_TOKEN)
    assert fcm_push.payload["android"]["priority"] == "high"


async def test_dead_token_is_forgotten_and_no_token_reaches_the_disk(
    app: web.Application, tmp_path: Path
) -> None:
    store, push, stand_ins = app[STORE], app[PUSH], app[STAND_INS]
    fields = sample_fields(store.policy.categories["registration"])
    fields.update(push_token=APNS_TOKEN, push_provider="apns", push_app_id=APP_ID)
    await store.put("registration", fields)
    stand_ins.script.push(APNS_TOKEN, Respond.error(410, "Unregistered"))
    result = await push.wake(_request(Service.APNS, APNS_TOKEN))
    assert result.outcome == TokenDead("Unregistered")
    assert await store.find("registration", push_token=APNS_TOKEN) == []
    await push.wake(_request(Service.FCM, FCM_TOKEN))
    assert scan_for_canaries(tmp_path, [APNS_TOKEN, FCM_TOKEN]) == []
    log_lines = "".join(p.read_text() for p in (tmp_path / "log" / "push_log").glob("*"))
    assert log_lines.count('"token_fp"') == 2
