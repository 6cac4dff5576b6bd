"""The stand-ins' delivery feed: mock phones in another process learn of their pushes."""

from __future__ import annotations

import aiohttp
import pytest

from mockphone.pbx import MockPbx
from mockphone.phone import Kind, MockPhone, PhoneSpec
from mockphone.pushes import PushInbox
from softrelay.embedded import EmbeddedRelay


@pytest.mark.parametrize("kind", [Kind.IOS, Kind.ANDROID])
async def test_a_phone_woken_through_the_feed_takes_its_call(
    softrelay: EmbeddedRelay, mock_pbx: MockPbx, kind: Kind
) -> None:
    async with aiohttp.ClientSession() as session:
        inbox = await PushInbox.from_feed(softrelay.address.http_url, session)
        mock_pbx.add_user("remote1", "pw-remote1")
        phone = MockPhone(
            PhoneSpec("remote1", "pw-remote1", kind),
            softrelay.address,
            serial=mock_pbx.serial,
            domain=softrelay.domain,
            inbox=inbox,
        )
        try:
            phone.pace.speed = float("inf")
            assert await phone.start() == 200
            await phone.sleep()
            result = await mock_pbx.call("remote1")
            assert result.connected, result
            assert result.woken
            assert inbox.received == 1
        finally:
            await phone.stop()
            await inbox.close()
