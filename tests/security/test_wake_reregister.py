"""Issue 14, point 10: the re-register push follows RFC 8599.

A suspended app is pushed to refresh its binding before it expires (5.4): with
`reregister_before` (600 s) of lead, but never more than half its registration, so one
registered for 300 s is pushed at 150 s, not the moment it is stored. `+sip.pnsreg`
goes, as 5.6.1 and 11.3 define it, only to a phone whose Contact says it can refresh
on its own, with the lead that fits its registration; such a phone is pushed only if
its refresh is late. Every step moves the injected clock; nothing waits on time.
"""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from proxy.sip.wake import Parking, WakeSettings
from tests.security import wake_world as ww
from tests.security.wake_world import TOKEN, Linked, binding, contact, register
from tests.sip import test_wake as wake

world = ww.world
linked = ww.linked


async def _due(linked: Linked) -> int:
    return await linked.world.relay.parking.reregister_due()


@pytest.mark.parametrize(("expires", "lead"), [(300, 150), (1000, 500), (3600, 600)])
async def test_the_refresh_push_comes_at_most_half_a_registration_before_expiry(
    linked: Linked, expires: int, lead: int
) -> None:
    await register(linked, user="alice", contact=contact("alice"), cseq=1, expires=expires)
    assert await _due(linked) == 0, "a binding just stored is not pushed"
    linked.world.clock.advance(expires - lead - 1)
    assert await _due(linked) == 0
    linked.world.clock.advance(1)
    assert await _due(linked) == 1
    assert await _due(linked) == 0, "once per expiry"
    (push,) = await asyncio.wait_for(linked.world.stand_ins.deliveries.wait_for(TOKEN), wake.STEP)
    assert push.headers["apns-push-type"] == "background", "never a VoIP push"


@pytest.mark.parametrize(
    ("refreshes_itself", "expires", "pnsreg"),
    [(False, 3600, None), (False, 300, None), (True, 3600, "600"), (True, 300, "150")],
)
async def test_pnsreg_goes_only_to_a_phone_that_refreshes_itself_with_a_lead_that_fits(
    linked: Linked, refreshes_itself: bool, expires: int, pnsreg: str | None
) -> None:
    _, phone_wire, _ = await register(
        linked,
        user="alice",
        contact=contact("alice", refreshes_itself=refreshes_itself),
        cseq=1,
        expires=expires,
    )
    ok = await phone_wire.response(200, "REGISTER")
    caps = ok.get("Feature-Caps") or ""
    assert '+sip.pns="apns,apns.dev,fcm"' in caps, "we wake it"
    if pnsreg is None:
        assert "pnsreg" not in caps
    else:
        assert f'+sip.pnsreg="{pnsreg}"' in caps


async def test_a_phone_that_refreshes_itself_is_pushed_only_when_its_refresh_is_late(
    linked: Linked,
) -> None:
    alice = contact("alice", refreshes_itself=True)
    await register(linked, user="alice", contact=alice, cseq=1, expires=3600)
    clock = linked.world.clock
    clock.advance(3600 - 600)
    assert await _due(linked) == 0, "told +sip.pnsreg=600: the refresh is its own job"
    clock.advance(600 - 121)
    assert await _due(linked) == 0
    clock.advance(1)
    assert await _due(linked) == 1, "120 s left and no REGISTER (RFC 8599 5.4): push"


async def test_a_refresh_the_store_did_not_write_earns_no_push(linked: Linked) -> None:
    alice = contact("alice")
    await register(linked, user="alice", contact=alice, cseq=1, expires=3600)
    stored = (await binding(linked, "alice")).fields["expires_at"]
    clock = linked.world.clock
    # Refreshed just before half-time: the stored expiry still covers half the new one,
    # so the relay spares the store the write.
    clock.advance(1799)
    await register(linked, user="alice", contact=alice, cseq=2, expires=3600)
    assert (await binding(linked, "alice")).fields["expires_at"] == stored, "not written"
    clock.advance(1201)  # 600 s left of the stored expiry, 2,399 s of the real one
    assert await _due(linked) == 0
    clock.advance(1798)
    assert await _due(linked) == 0
    clock.advance(1)  # 600 s left of the real one
    assert await _due(linked) == 1


async def test_after_a_restart_the_lead_comes_from_the_stored_registration(
    linked: Linked,
) -> None:
    await register(linked, user="alice", contact=contact("alice"), cseq=1, expires=300)
    world = linked.world
    # A new process: nothing in memory, the binding as stored.
    parking = Parking(
        WakeSettings(), world.relay, linked.push, world.store, world.clock, CollectorRegistry()
    )
    assert await parking.reregister_due() == 0, "a 300 s binding is not pushed at once"
    world.clock.advance(149)
    assert await parking.reregister_due() == 0
    world.clock.advance(1)
    assert await parking.reregister_due() == 1
    await parking.close()
