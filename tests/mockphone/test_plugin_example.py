"""The pytest plugin's promise: a vendor's "sleeping iPhone gets a call" in a few lines.

The fixtures (`mock_pbx`, `mock_phones`) come from `softrelay.pytest_plugin`, loaded
through softrelay's `pytest11` entry point, as in a vendor's own test suite.
"""

from __future__ import annotations

from mockphone.pbx import MockPbx
from softrelay.pytest_plugin import PhoneFactory


async def test_a_sleeping_iphone_gets_a_call(mock_pbx: MockPbx, mock_phones: PhoneFactory) -> None:
    (phone,) = await mock_phones(1, kind="ios")
    await phone.sleep()
    result = await mock_pbx.call(phone.spec.user)
    assert result.connected, result
    assert result.woken, "the relay parked the call and pushed"
    assert result.push_status == "delivered"
