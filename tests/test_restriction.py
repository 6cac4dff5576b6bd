"""The restriction mark (GDPR Art. 18): data kept, processing stopped until lifted."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

import privacy.store as store_module
from privacy.clock import ManualClock
from privacy.keys import Keyring
from privacy.policy import load_policy
from privacy.store import Store, Subject
from proxy.sip.flow import Transport
from proxy.sip.relay import Relay
from proxy.sip.settings import PbxSettings, SipSettings
from tests.sip.test_relay import DOMAIN, PBX_SECRET, SERIAL, _flow, _link_pbx, _phone_register
from tests.test_store import REGISTRATION

ALICE = Subject("alice-7f3e9", "0042137")
CAROL = Subject("carol", "0042137")


async def test_restriction_is_set_lifted_and_names_only_its_subject(store: Store) -> None:
    assert not await store.is_restricted(ALICE)
    assert await store.restrict(ALICE, True)
    assert not await store.restrict(ALICE, True)  # already restricted: no change
    assert await store.is_restricted(ALICE)
    assert not await store.is_restricted(CAROL)
    assert not await store.is_restricted(Subject("alice-7f3e9", "0099999"))
    assert await store.restrict(ALICE, False)
    assert not await store.restrict(ALICE, False)
    assert not await store.is_restricted(ALICE)


async def test_restriction_keeps_the_data_and_is_not_a_use(
    store: Store, clock: ManualClock
) -> None:
    await store.put("registration", REGISTRATION)
    clock.advance(3600)
    await store.restrict(ALICE, True)
    [record] = (await store.find_subject(ALICE))["registration"]
    assert record.fields["push_token"] == REGISTRATION["push_token"]
    assert record.last_used_at == record.created_at


async def test_restriction_survives_a_restart(tmp_path: Path, clock: ManualClock) -> None:
    keyring, policy = Keyring.generate(), load_policy("auerproxy")
    first = await Store.create(policy, keyring, tmp_path, clock)
    await first.restrict(ALICE, True)
    await first.close()
    second = await Store.create(policy, keyring, tmp_path, clock)
    try:
        assert await second.is_restricted(ALICE)
    finally:
        await second.close()


async def test_a_mark_set_by_another_process_is_seen_within_the_freshness(
    tmp_path: Path, clock: ManualClock
) -> None:
    """The marks are read as a whole and trusted for RESTRICTIONS_FRESH seconds of the
    store's clock, so a REGISTER costs no query; the `dsr` CLI's mark still takes effect
    that soon. A clock set back does not stretch that trust."""
    keyring, policy = Keyring.generate(), load_policy("auerproxy")
    serve = await Store.create(policy, keyring, tmp_path, clock)
    cli = await Store.create(policy, keyring, tmp_path, clock)
    try:
        assert not await serve.is_restricted(ALICE)
        await cli.restrict(ALICE, True)
        clock.advance(store_module.RESTRICTIONS_FRESH - 0.1)
        assert not await serve.is_restricted(ALICE), "the read is still fresh"
        clock.advance(0.2)
        assert await serve.is_restricted(ALICE)
        await cli.restrict(ALICE, False)
        clock.advance(-60.0)  # the system clock stepped back
        assert not await serve.is_restricted(ALICE), "a read from the future is stale"
    finally:
        await serve.close()
        await cli.close()


async def test_erasure_removes_the_mark_with_the_data(store: Store) -> None:
    await store.put("registration", REGISTRATION)
    await store.restrict(ALICE, True)
    await store.delete_subject(ALICE)
    assert not await store.is_restricted(ALICE)


async def test_restricted_phone_register_gets_403_and_lifting_restores_it(
    store: Store, clock: ManualClock
) -> None:
    relay = Relay(
        SipSettings(DOMAIN, (PbxSettings(SERIAL, PBX_SECRET),)), store, clock, CollectorRegistry()
    )
    _, pbx_wire, linked = await _link_pbx(relay)
    assert linked == 200
    phone, phone_wire = _flow(Transport.TCP, ("198.51.100.23", 40001))
    await store.restrict(Subject("alice", SERIAL), True)
    sent_to_pbx = len(pbx_wire.raw)
    await relay.handle(_phone_register(), phone)
    refused = phone_wire.response()
    assert (refused.status, refused.reason) == (403, "Restricted by Data Subject Request")
    assert len(pbx_wire.raw) == sent_to_pbx  # the PBX never saw it

    await store.restrict(Subject("alice", SERIAL), False)
    await relay.handle(_phone_register(cseq=2), phone)
    assert pbx_wire.request().method == "REGISTER"
