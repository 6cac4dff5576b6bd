"""pytest fixtures: an embedded softrelay, a mock PBX linked to it, and mock phones.

Installed with softrelay (entry point `pytest11`), so a vendor's test reads:

    async def test_a_sleeping_iphone_gets_a_call(mock_pbx, mock_phones):
        (phone,) = await mock_phones(1, kind="ios")
        await phone.sleep()
        result = await mock_pbx.call(phone.spec.user)
        assert result.connected and result.woken

Fixtures (function scope, async: pytest-asyncio):

- `softrelay`: an `EmbeddedRelay` on loopback, free ports, with the embedded APNs and
  FCM stand-ins, its data under `tmp_path`;
- `mock_pbx`: a `MockPbx` linked to it over TCP as serial `0042137`;
- `mock_phones`: `await mock_phones(n, kind=..., transport=..., answer=..., ...)` starts
  `n` registered phones of its PBX; each gets a random password and push token;
- `push_inbox`: where the phones receive the stand-ins' pushes;
- `phone_pace`: how simulated delays pass (default: not at all, so that a woken phone
  re-registers at once; override the fixture to pace them).

Everything started is stopped after the test.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from mockphone.delays import Delay, Pace
from mockphone.pbx import MockPbx
from mockphone.phone import Answer, Kind, MockPhone, PhoneSpec
from mockphone.pushes import PushInbox
from mockphone.sip import Transport
from softrelay.embedded import EmbeddedRelay

if TYPE_CHECKING:
    from pytest_asyncio import fixture as async_fixture
else:
    try:
        from pytest_asyncio import fixture as async_fixture
    except ImportError:  # without pytest-asyncio, pytest does not run async fixtures
        async_fixture = pytest.fixture

SERIAL = "0042137"
# The type of the `mock_phones` fixture, for a test's annotation.
PhoneFactory = Callable[..., Awaitable[list[MockPhone]]]


@async_fixture
async def softrelay(tmp_path: Path) -> AsyncIterator[EmbeddedRelay]:
    relay = await EmbeddedRelay.start(tmp_path / "softrelay", serials=(SERIAL,))
    try:
        yield relay
    finally:
        await relay.stop()


@async_fixture
async def mock_pbx(softrelay: EmbeddedRelay) -> AsyncIterator[MockPbx]:
    pbx = await MockPbx.connect(
        softrelay.address,
        serial=SERIAL,
        secret=softrelay.pbx_secrets[SERIAL],
        domain=softrelay.domain,
        users={},
        ring_timeout=10.0,
    )
    try:
        yield pbx
    finally:
        await pbx.close()


@async_fixture
async def push_inbox(softrelay: EmbeddedRelay) -> AsyncIterator[PushInbox]:
    inbox = PushInbox.embedded(softrelay.stand_ins.deliveries)
    try:
        yield inbox
    finally:
        await inbox.close()


@pytest.fixture
def phone_pace() -> Pace:
    return Pace(speed=math.inf)


@async_fixture
async def mock_phones(
    softrelay: EmbeddedRelay, mock_pbx: MockPbx, push_inbox: PushInbox, phone_pace: Pace
) -> AsyncIterator[PhoneFactory]:
    started: list[MockPhone] = []

    async def start(
        n: int = 1,
        *,
        kind: str | Kind = Kind.IOS,
        transport: str | Transport = Transport.TCP,
        answer: str | Answer = Answer.ANSWER,
        answer_delay: Delay | None = None,
        wake_delay: Delay | None = None,
        register: bool = True,
    ) -> list[MockPhone]:
        phones = []
        for _ in range(n):
            user = f"{Kind(kind).value}{len(started) + 1}"
            password = secrets.token_urlsafe(12)
            mock_pbx.add_user(user, password)
            spec = PhoneSpec(user, password, Kind(kind), Transport(transport), Answer(answer))
            if answer_delay is not None:
                spec = dataclasses.replace(spec, answer_delay=answer_delay)
            if wake_delay is not None:
                spec = dataclasses.replace(spec, wake_delay=wake_delay)
            phone = MockPhone(
                spec,
                softrelay.address,
                serial=mock_pbx.serial,
                domain=softrelay.domain,
                inbox=push_inbox,
                pace=phone_pace,
            )
            started.append(phone)
            if register:
                status = await phone.start()
                assert status == 200, f"{user} could not register: {status}"
            phones.append(phone)
        return phones

    try:
        yield start
    finally:
        for phone in started:
            await phone.stop()
