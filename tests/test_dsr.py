"""Data-subject rights on the store: export of every category, rectification, erasure
(with its receipt and Art. 17(3) exceptions), objection, the trail, and the lifecycle
rule of both profiles on an injected clock."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dsr.service import EXPORT_FORMAT, DataSubjectRights, DsrSettings, InvalidRequest
from privacy.clock import ManualClock
from privacy.database import StoreSettings
from privacy.keys import load_keyring
from privacy.policy import Storage, load_policy
from privacy.retention import Sweeper
from privacy.store import Store, Subject, Value
from softrelay.cli import main
from tests.conftest import PROFILES, StoreFactory
from tests.rawdb import RawDatabase

pytestmark = pytest.mark.both_backends

ALICE = Subject("alice-7f3e9", "0042137")
BOB = Subject("bob-11aa2", "0042137")


def _registration(subject: Subject, marker: str) -> dict[str, Value]:
    return {
        "pbx_serial": subject.pbx_serial,
        "sip_username": subject.sip_username,
        "instance": f"urn:uuid:{marker}-instance",
        "phone_ip": f"198.51.100.{len(marker)}",
        "phone_port": 40001,
        "pbx_ip": "203.0.113.99",
        "pbx_port": 5061,
        "push_provider": "apns",
        "push_token": f"tok-{marker}-c0ffee",
        "push_app_id": "com.example.phone.voip",
        "expires_at": 1_795_000_000,
    }


async def _populate(store: Store) -> None:
    await store.put("registration", _registration(ALICE, "alice"))
    await store.put(
        "debug",
        {"pbx_serial": "0042137", "sip_username": ALICE.sip_username, "destination_name": "Bob"},
    )
    await store.put("registration", _registration(BOB, "bobby"))


@pytest.mark.parametrize("profile", PROFILES)
async def test_export_lists_every_category_of_the_policy(
    open_store: StoreFactory, profile: str
) -> None:
    """Walks the policy: a category added later that the export cannot answer for fails."""
    store = await open_store(profile)
    await _populate(store)
    export = await DataSubjectRights(store).export(ALICE, "operator")
    assert export["format"] == EXPORT_FORMAT
    by_name = {c["category"]: c for c in export["categories"]}
    assert list(by_name) == list(store.policy.categories)
    for name, cat in store.policy.categories.items():
        entry = by_name[name]
        for key in ("purpose", "legal_basis", "recipients", "retention", "source", "location"):
            assert entry[key], f"{name}: {key} missing"
        if cat.subject or name == "account":
            assert entry["included"], name
        else:
            assert not entry["included"], name
            assert len(entry["reason"]) > 20, name
        if cat.storage is not Storage.DATABASE:
            assert not entry["included"], name
    (registration,) = by_name["registration"]["records"]
    assert registration["fields"]["push_token"] == "tok-alice-c0ffee"
    assert len(by_name["debug"]["records"]) == 1
    assert by_name["account"]["records"][0]["last_used_at"].startswith("2026-03-01")


async def test_rectify_changes_mutable_fields_only_and_is_recorded(store: Store) -> None:
    await _populate(store)
    rights = DataSubjectRights(store)
    receipt = await rights.rectify(ALICE, {"push_token": "tok-new-0001"}, "subject")
    assert receipt.counts == {"registration": 1}
    (record,) = (await store.find_subject(ALICE))["registration"]
    assert record.fields["push_token"] == "tok-new-0001"
    (bob,) = (await store.find_subject(BOB))["registration"]
    assert bob.fields["push_token"] == "tok-bobby-c0ffee"
    for bad in ({"phone_ip": "10.0.0.1"}, {}, {"push_token": ""}):
        with pytest.raises(InvalidRequest):
            await rights.rectify(ALICE, bad, "subject")
    (entry, *_) = await rights.trail()
    assert (entry.type, entry.counts) == ("rectify", {"registration": 1})


async def test_erasure_is_idempotent_with_a_receipt_and_keeps_others(store: Store) -> None:
    await _populate(store)
    await store.restrict(ALICE, True)
    rights = DataSubjectRights(store)
    first = await rights.erase(ALICE, "subject")
    assert first.counts["registration"] == 1
    assert first.counts["debug"] == 1
    assert not await store.is_restricted(ALICE)
    again = await rights.erase(ALICE, "subject")
    assert set(again.counts.values()) == {0}
    assert (await store.find_subject(ALICE))["registration"] == []
    assert len((await store.find_subject(BOB))["registration"]) == 1


async def test_erasure_exceptions_are_kept_and_named_in_the_receipt(store: Store) -> None:
    await _populate(store)
    ground = "Art. 17(3)(e): defence of a legal claim"
    settings = DsrSettings(erasure_exceptions={"debug": ground})
    receipt = await DataSubjectRights(store, settings).erase(ALICE, "operator")
    assert "debug" not in receipt.counts
    assert receipt.as_json()["kept"] == [{"category": "debug", "ground": ground}]
    assert receipt.counts["registration"] == 1
    assert (await store.stats())["debug"].rows == 1


async def test_objection_does_not_apply_to_contract_processing(store: Store) -> None:
    receipt = await DataSubjectRights(store).object(ALICE, "subject")
    answers = {a["category"]: a for a in receipt.detail["categories"]}
    assert not answers["registration"]["applies"]
    assert "Art. 6(1)(b)" in answers["registration"]["reason"]
    assert "does not apply" in answers["registration"]["reason"]
    assert answers["debug"]["applies"]  # legitimate interests: objection is possible


async def test_trail_holds_no_personal_data(store: Store, raw_db: RawDatabase) -> None:
    await _populate(store)
    rights = DataSubjectRights(store)
    await rights.export(ALICE, "subject")
    await rights.erase(ALICE, "operator")
    await rights.refused("erase", "unproved", "refused")
    entries = await rights.trail()
    assert [e.type for e in entries] == ["erase", "erase", "export"] or len(entries) == 3
    text = raw_db.text("SELECT * FROM dsr_requests")
    assert raw_db.count("dsr_requests") == 3
    assert "erase" in text, "the text shows the trail's rows"
    for personal in (ALICE.sip_username, "tok-alice", "198.51.100"):
        assert personal not in text


@pytest.mark.parametrize("profile", PROFILES)
async def test_lifecycle_removes_an_inactive_subject_entirely(
    open_store: StoreFactory, clock: ManualClock, tmp_path: Path, profile: str
) -> None:
    """Cloud Softphone: 7 days after the last use; Auerproxy: 12 months."""
    store = await open_store(profile)
    limit = {"cloudsoftphone": 7 * 86400, "auerproxy": 365 * 86400}[profile]
    assert store.policy.categories["account"].retention.seconds == limit
    await _populate(store)
    sweeper = Sweeper(store, tmp_path)
    clock.advance(limit - 3600)
    (bob,) = (await store.find_subject(BOB))["registration"]
    await store.touch("registration", bob.id)  # Bob keeps using the service

    clock.advance(3600 - 1)
    await sweeper.run_once()
    assert len((await store.find_subject(ALICE))["registration"]) == 1

    clock.advance(2)
    runs = {r.category: r for r in await sweeper.run_once()}
    assert runs["account"].deleted == 1
    found = await store.find_subject(ALICE)
    assert {"registration", "debug"} <= set(found)  # and every other subject category
    assert all(records == [] for records in found.values()), found
    assert len((await store.find_subject(BOB))["registration"]) == 1
    last = {r.category: r for r in await store.backend.last_runs()}
    assert last["account"].deleted == 1


def test_cli_erase_leaves_no_canary_and_other_subjects_intact(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    store_settings: StoreSettings,
    store_toml: str,
) -> None:
    """`softrelay dsr erase`, then `softrelay audit --canary` with Alice's user name,
    token, IP and instance finds nothing, while Bob's record is still there."""
    data = tmp_path / "data"
    config = tmp_path / "softrelay.toml"
    config.write_text(store_toml, encoding="utf-8")  # [store] of the test's backend
    common = ["--config", str(config), "--data-dir", str(data)]
    assert main(["sweep", *common]) == 0  # creates the keyring under the data directory

    async def with_store(check_bob: bool) -> int:
        clock = ManualClock(1_772_366_400.0)
        keyring = load_keyring("", data)
        store = await Store.create(load_policy("auerproxy"), keyring, data, clock, store_settings)
        try:
            if not check_bob:
                await _populate(store)
            return len((await store.find_subject(BOB))["registration"])
        finally:
            await store.close()

    asyncio.run(with_store(False))
    alice = ["--user", ALICE.sip_username, "--serial", "0042137"]
    capsys.readouterr()
    assert main(["dsr", "export", *common, *alice]) == 0
    assert "tok-alice-c0ffee" in capsys.readouterr().out
    assert main(["dsr", "erase", *common, *alice]) == 0
    assert '"registration": 1' in capsys.readouterr().out
    canaries = [ALICE.sip_username, "tok-alice-c0ffee", "urn:uuid:alice-instance"]
    # Bob's phone has the same address, stored (encrypted) in his record: in the clear nowhere.
    in_the_clear = "--clear-canary=198.51.100.5"
    assert main(["audit", *common, *(f"--canary={c}" for c in canaries), in_the_clear]) == 0
    report = capsys.readouterr().out
    # The canary part of the report: no file or field named, and the count says none.
    assert report.rstrip().splitlines()[-1] == "no canary found", report
    assert not [c for c in [*canaries, "198.51.100.5"] if c in report], report
    assert asyncio.run(with_store(True)) == 1
    bob = ["--user", BOB.sip_username, "--serial", "0042137"]
    assert main(["dsr", "rectify", *common, *bob, "--set", "phone_ip=10.1.2.3"]) == 2
    assert "phone_ip" in capsys.readouterr().err
