"""The stand-ins in a process of their own (`push.fakes.process`): `serve`'s app with
`PushSettings` endpoints pointed at them wakes phones through the real aioapns and
firebase-admin clients, starts no stand-ins of its own, and the parent learns of each
accepted push on the machine's monotonic clock; the child ends when told."""

from __future__ import annotations

import asyncio
import pstats
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from privacy.clock import SystemClock
from privacy.keys import Keyring
from privacy.policy import load_policy
from push.apns import ApnsProvider
from push.apps import ApnsCredentials, AppCredentials, PushSettings
from push.fakes.process import StandInsProcess
from push.wake import Delivered, Reason, Service, WakeRequest
from softrelay.app import PUSH, STAND_INS, Services, build_app
from tests.limits import LONGEST_WAIT

APP_ID = "com.example.softphone"
APNS_TOKEN = "0123abcd" * 8
FCM_TOKEN = "fcm-registration-token-4711:APA91bH"


@pytest.fixture
async def stand_ins() -> AsyncIterator[StandInsProcess]:
    process = await StandInsProcess.start([APP_ID], extra_keys=1, uvloop=False)
    try:
        yield process
    finally:
        await process.stop()


def _request(service: Service, token: str) -> WakeRequest:
    return WakeRequest(service, token, APP_ID, Reason.INCOMING_CALL, time.time() + 10, "call-1")


class _Heard:
    """The pushes the child reported, and an event per count reached."""

    def __init__(self) -> None:
        self.pushes: list[tuple[str, str, float]] = []
        self.changed = asyncio.Event()

    def __call__(self, service: str, token: str, at: float) -> None:
        self.pushes.append((service, token, at))
        self.changed.set()

    async def until(self, count: int) -> None:
        async with asyncio.timeout(LONGEST_WAIT):
            while len(self.pushes) < count:
                self.changed.clear()
                await self.changed.wait()


async def test_serve_wakes_through_the_stand_ins_in_their_own_process(
    stand_ins: StandInsProcess, tmp_path: Path
) -> None:
    push = PushSettings(
        apps=stand_ins.apps,
        max_in_flight=10,
        max_attempts=1,
        embedded_app_id=APP_ID,
        apns_endpoint=stand_ins.apns_endpoint,
        fcm_endpoint=stand_ins.fcm_endpoint,
    )
    clock = SystemClock()
    app = build_app(
        Services(load_policy("auerproxy"), Keyring.generate(), tmp_path, clock, 3600, push)
    )
    server = TestServer(app)
    await server.start_server()
    try:
        assert STAND_INS not in app  # configured apps: nothing embedded
        heard = _Heard()
        unsubscribe = stand_ins.subscribe(heard)
        before = time.monotonic()
        ios = await app[PUSH].wake(_request(Service.APNS, APNS_TOKEN))
        android = await app[PUSH].wake(_request(Service.FCM, FCM_TOKEN))
        await heard.until(2)
        after = time.monotonic()
        unsubscribe()
    finally:
        await server.close()
    assert ios.outcome == Delivered()
    assert android.outcome == Delivered()
    assert [(service, token) for service, token, _ in heard.pushes] == [
        ("apns", APNS_TOKEN),
        ("fcm", FCM_TOKEN),
    ]
    # The child's clock is this process's: each push was accepted between our readings.
    assert all(before <= at <= after for _, _, at in heard.pushes)


async def test_an_extra_key_pushes_to_the_first_apps_topic(stand_ins: StandInsProcess) -> None:
    (key,) = stand_ins.extra_keys
    other = AppCredentials(
        APP_ID, apns=ApnsCredentials(APP_ID, key.team_id, key.key_id, key.key_pem)
    )
    provider = await ApnsProvider.create([other], stand_ins.apns_endpoint)
    try:
        outcome = await provider.send(_request(Service.APNS, APNS_TOKEN), LONGEST_WAIT)
    finally:
        await provider.close()
    assert outcome == Delivered()


async def test_the_child_ends_when_stopped(stand_ins: StandInsProcess) -> None:
    await stand_ins.stop()
    assert stand_ins.proc.returncode == 0


async def test_the_child_profiles_only_between_the_two_signals(tmp_path: Path) -> None:
    """`profile(True)` starts the child's cProfile, `profile(False)` returns once it wrote
    its file: the push sent in between is in it, the one before is not."""
    path = tmp_path / "stand-ins.prof"
    process = await StandInsProcess.start([APP_ID], uvloop=False, profile=path)
    heard = _Heard()
    process.subscribe(heard)
    provider = await ApnsProvider.create(process.apps, process.apns_endpoint)
    try:
        before = await provider.send(_request(Service.APNS, APNS_TOKEN), LONGEST_WAIT)
        await heard.until(1)
        assert not path.exists()
        await process.profile(True)
        during = await provider.send(_request(Service.APNS, APNS_TOKEN), LONGEST_WAIT)
        await process.profile(False)
    finally:
        await provider.close()
        await process.stop()
    assert (before, during) == (Delivered(), Delivered())
    table = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]  # untyped in pstats
    served = [calls for (file, _, name), (_, calls, *_) in table.items() if name == "_respond"]
    assert served == [1]
