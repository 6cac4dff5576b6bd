"""The mock PBX and mock phones against an embedded softrelay, one behaviour each."""

from __future__ import annotations

import pytest

from mockphone.pbx import MockPbx, PbxRefused
from mockphone.sip import Transport
from proxy.sip.message import Request
from softrelay.app import RELAY
from softrelay.embedded import EmbeddedRelay
from softrelay.pytest_plugin import SERIAL, PhoneFactory


async def test_a_pbx_with_a_wrong_secret_is_refused(softrelay: EmbeddedRelay) -> None:
    with pytest.raises(PbxRefused) as refused:
        await MockPbx.connect(
            softrelay.address, serial=SERIAL, secret="wrong", domain=softrelay.domain, users={}
        )
    assert refused.value.status == 403


@pytest.mark.parametrize("transport", ["udp", "tcp", "ws"])
async def test_an_awake_desktop_phone_takes_a_call_on_each_transport(
    mock_pbx: MockPbx, mock_phones: PhoneFactory, transport: str
) -> None:
    (phone,) = await mock_phones(1, kind="desktop", transport=transport)
    (binding,) = mock_pbx.live_bindings(phone.spec.user)
    assert binding.paths, "the relay added a Path to the phone's flow"
    assert binding.contact.push is None
    result = await mock_pbx.call(phone.spec.user)
    assert result.connected, result
    assert not result.woken
    assert phone.counters.answered == 1


async def test_a_wrong_password_is_refused_by_the_pbx(
    mock_pbx: MockPbx, mock_phones: PhoneFactory
) -> None:
    (phone,) = await mock_phones(1, kind="desktop", register=False)
    mock_pbx.add_user(phone.spec.user, "not-the-phones-password")
    assert await phone.start() == 401
    assert mock_pbx.live_bindings(phone.spec.user) == []


async def test_a_sleeping_android_phone_is_woken_by_fcm(
    mock_pbx: MockPbx, mock_phones: PhoneFactory, softrelay: EmbeddedRelay
) -> None:
    (phone,) = await mock_phones(1, kind="android")
    assert phone.token is not None
    await phone.sleep()
    result = await mock_pbx.call(phone.spec.user)
    assert result.connected, result
    assert result.woken
    (push,) = softrelay.stand_ins.deliveries.for_token(phone.token)
    assert push.service == "fcm"
    assert phone.counters.wakes == 1
    assert len(mock_pbx.live_bindings(phone.spec.user)) == 1, "the re-REGISTER replaced it"


async def test_a_declining_phone_gives_603(mock_pbx: MockPbx, mock_phones: PhoneFactory) -> None:
    (phone,) = await mock_phones(1, kind="ios", answer="decline")
    await phone.sleep()
    result = await mock_pbx.call(phone.spec.user)
    assert result.status == 603
    assert result.woken


async def test_an_ignored_call_rings_out_and_is_cancelled(
    mock_pbx: MockPbx, mock_phones: PhoneFactory
) -> None:
    (phone,) = await mock_phones(1, kind="desktop", answer="ignore")
    mock_pbx.ring_timeout = 0.3  # real seconds: the one timer this test must see run out
    result = await mock_pbx.call(phone.spec.user)
    assert result.status == 408, result
    assert phone.counters.cancelled == 1


async def test_a_phone_calls_through_the_relay_and_the_pbx_answers(
    mock_pbx: MockPbx, mock_phones: PhoneFactory
) -> None:
    (phone,) = await mock_phones(1, kind="ios", transport=Transport.WS)
    call = await phone.call("echo")
    assert call.connected, call
    assert mock_pbx.counters.calls_in == 1


async def test_a_phone_that_lost_its_network_comes_back(
    mock_pbx: MockPbx, mock_phones: PhoneFactory
) -> None:
    (phone,) = await mock_phones(1, kind="desktop")
    await phone.lose_network()
    lost = await mock_pbx.call(phone.spec.user)
    assert lost.status == 480, "its flow is gone and it has no push to wake it"
    assert await phone.come_back() == 200
    result = await mock_pbx.call(phone.spec.user)
    assert result.connected, result


async def test_a_woken_phone_refused_503_registers_again_after_retry_after(
    mock_pbx: MockPbx,
    mock_phones: PhoneFactory,
    softrelay: EmbeddedRelay,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A woken app whose REGISTER gets 503 with Retry-After (a node shedding load that
    does not hold its call) tries again, and the call is delivered."""
    (phone,) = await mock_phones(1, kind="ios")
    await phone.sleep()
    relay = softrelay.app[RELAY]
    refused: list[str] = []
    refusal = relay._refusal

    def shed_first_register(request: Request) -> str | None:
        if request.method == "REGISTER" and not refused:
            refused.append(request.call_id)
            return "overload"
        return refusal(request)

    monkeypatch.setattr(relay, "_refusal", shed_first_register)
    result = await mock_pbx.call(phone.spec.user)
    assert result.connected, result
    assert result.woken
    assert len(refused) == 1
    assert phone.last_register == 200
    assert phone.retry_after is None
    assert (phone.counters.wake_retries, phone.counters.wake_failures) == (1, 0)
    assert phone.counters.wakes == 1
