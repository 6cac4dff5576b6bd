"""A ciphertext opens only in the record it was written for: one copied into another
row (by someone who can write the database) does not decrypt, and reads report that
cleanly (the record is left out and the service log names category and field) instead
of failing or showing the moved value. Databases written before the row binding
(version-1 ciphertexts) still read, and `Store.reseal` brings them to version 2."""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dsr.service import DsrSettings
from privacy.clock import ManualClock
from privacy.crypto import FieldCipher
from privacy.database import StoreSettings
from privacy.keys import Keyring, load_keyring
from privacy.policy import load_policy
from privacy.store import Store, Value
from push.apps import PushSettings
from softrelay.app import STORE, Services, build_app
from softrelay.cli import main as cli_main
from tests.rawdb import RawDatabase

SERIAL = "0042137"
ADMIN_TOKEN = "admin-token-row-binding-0123456789"
ENCRYPTED = ("sip_username", "instance", "phone_ip", "pbx_ip", "push_token")
PUSH = PushSettings(apps=(), max_in_flight=10, max_attempts=2, embedded_app_id="com.example.t")
# Each test with a store runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_backends


def registration(user: str, token: str) -> dict[str, Value]:
    return {
        "pbx_serial": SERIAL,
        "sip_username": user,
        "instance": f"urn:uuid:{user}-phone",
        "phone_ip": "198.51.100.23",
        "phone_port": 40001,
        "pbx_ip": "203.0.113.99",
        "pbx_port": 5061,
        "push_provider": "apns",
        "push_token": token,
        "push_app_id": "com.example.phone.voip",
        "expires_at": 1_795_000_000,
    }


def copy_columns(
    raw: RawDatabase, table: str, columns: tuple[str, ...], src: int, dst: int
) -> None:
    """What an attacker with write access to the database does."""
    raw.execute(
        *(
            f"UPDATE {table} SET {column} = (SELECT {column} FROM {table} WHERE id = {src}) "
            f"WHERE id = {dst}"
            for column in columns
        )
    )


def column(raw: RawDatabase, table: str, name: str) -> list[bytes]:
    return raw.blobs(f"SELECT {name} FROM {table} ORDER BY id")


async def test_a_token_copied_into_another_registration_does_not_open_there(
    store: Store, raw_db: RawDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    alice = await store.put("registration", registration("alice", "alice-token-1111"))
    bob = await store.put("registration", registration("bob", "bob-token-2222"))
    # Bob's token, with its blind index, moved into Alice's row: a wake for Alice would
    # push Bob's phone, were the value believed.
    copy_columns(raw_db, "c_registration", ("push_token", "push_token__bidx"), bob, alice)

    with caplog.at_level(logging.WARNING, logger="softrelay.privacy"):
        found = await store.find("registration", pbx_serial=SERIAL)

    assert [r.fields["sip_username"] for r in found] == ["bob"]
    (warning,) = [r for r in caplog.records if r.getMessage() == "store.record_unreadable"]
    assert warning.fields == {  # type: ignore[attr-defined]
        "category": "registration",
        "error": "field push_token does not open",
    }
    # The blind index moved too, yet a look-up by Bob's token finds Bob alone.
    assert await store.find("registration", push_token="bob-token-2222") == found
    assert "bob-token" not in caplog.text


async def test_a_crash_report_moved_with_its_row_id_into_another_row_does_not_open(
    store: Store, raw_db: RawDatabase
) -> None:
    """A category without a record key binds to a random row id and the subject: copying
    the row id along does not help across subjects, and without it nothing opens."""
    first = await store.put("crash_report", {"project": "1", "event_id": "e1", "event": {"a": 1}})
    second = await store.put("crash_report", {"project": "1", "event_id": "e2", "event": {"b": 2}})
    copy_columns(raw_db, "c_crash_report", ("event",), first, second)
    assert [r.fields["event_id"] for r in await store.find("crash_report")] == ["e1"]

    debug = {"pbx_serial": SERIAL, "destination_name": "Carol Canary"}
    mine = await store.put("debug", {**debug, "sip_username": "alice"})
    theirs = await store.put("debug", {**debug, "sip_username": "bob"})
    copy_columns(raw_db, "c_debug", ("destination_name", "rid"), mine, theirs)
    found = await store.find("debug", pbx_serial=SERIAL)
    assert [r.fields["sip_username"] for r in found] == ["alice"]


@pytest.fixture
async def relay(
    tmp_path: Path,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
    store_settings: StoreSettings,
) -> AsyncIterator[tuple[str, Store]]:
    """The app `serve` builds, with the operator's admin token for the DSR API."""
    monkeypatch.setenv("SOFTRELAY_TEST_ADMIN", ADMIN_TOKEN)
    services = Services(
        load_policy("auerproxy"),
        Keyring.generate(),
        tmp_path,
        clock,
        sweep_interval=3600,
        push=PUSH,
        dsr=DsrSettings(admin_token="env:SOFTRELAY_TEST_ADMIN"),
        store=store_settings,
    )
    app = build_app(services)
    async with TestServer(app, host="127.0.0.1") as server:
        yield str(server.make_url("")).rstrip("/"), app[STORE]


async def test_an_export_of_a_tampered_record_answers_without_it_not_500(
    relay: tuple[str, Store], raw_db: RawDatabase
) -> None:
    base, store = relay
    alice = await store.put("registration", registration("alice", "alice-token-1111"))
    bob = await store.put("registration", registration("bob", "bob-token-2222"))
    copy_columns(raw_db, "c_registration", ("push_token",), bob, alice)

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{base}/dsr/v1/export",
            json={"sip_username": "alice", "pbx_serial": SERIAL},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as answer,
    ):
        status, text = answer.status, await answer.text()

    assert status == 200, text
    assert "bob-token-2222" not in text
    assert "alice-token-1111" not in text


def v1_ciphertext(keyring: Keyring, plaintext: bytes, context: bytes) -> bytes:
    """What the store wrote before the row binding: key id, nonce, AES-GCM(field only)."""
    nonce = os.urandom(12)
    key = keyring.encryption[keyring.active]
    return (
        struct.pack(">H", keyring.active) + nonce + AESGCM(key).encrypt(nonce, plaintext, context)
    )


async def test_version_1_ciphertexts_still_read_and_reseal_binds_them_to_their_rows(
    tmp_path: Path, clock: ManualClock, store_settings: StoreSettings, raw_db: RawDatabase
) -> None:
    keyring = Keyring.generate()
    policy = load_policy("auerproxy")
    store = await Store.create(policy, keyring, tmp_path, clock, store_settings)
    try:
        alice = await store.put("registration", registration("alice", "alice-token-1111"))
        crash = await store.put("crash_report", {"project": "1", "event_id": "e1", "event": {}})
    finally:
        await store.close()
    # Rewrite both rows as a database from before the change holds them.
    old_token = v1_ciphertext(keyring, b"alice-token-1111", b"registration.push_token")
    old_event = v1_ciphertext(keyring, b'{"old":true}', b"crash_report.event")
    raw_db.execute(
        f"UPDATE c_registration SET push_token = {raw_db.blob(old_token)} WHERE id = {alice}",
        f"UPDATE c_crash_report SET event = {raw_db.blob(old_event)}, rid = NULL "
        f"WHERE id = {crash}",
    )

    rotated = keyring.rotated()
    store = await Store.create(policy, rotated, tmp_path, clock, store_settings)
    try:
        (record,) = await store.find("registration", sip_username="alice", pbx_serial=SERIAL)
        assert record.fields["push_token"] == "alice-token-1111"
        (report,) = await store.find("crash_report")
        assert report.fields["event"] == {"old": True}

        assert await store.reseal() == 2
        assert await store.reseal() == 0, "nothing left to reseal"

        (record,) = await store.find("registration", sip_username="alice", pbx_serial=SERIAL)
        assert record.fields["push_token"] == "alice-token-1111"
        (report,) = await store.find("crash_report")
        assert report.fields["event"] == {"old": True}
    finally:
        await store.close()
    for table, name in (("c_registration", "push_token"), ("c_crash_report", "event")):
        (blob,) = column(raw_db, table, name)
        assert (FieldCipher.version(blob), FieldCipher.key_id(blob)) == (2, rotated.active)
    (rid,) = column(raw_db, "c_crash_report", "rid")
    assert len(rid) == 16


async def test_keys_rotate_then_reseal_leaves_every_ciphertext_row_bound_under_the_new_key(
    tmp_path: Path,
    clock: ManualClock,
    capsys: pytest.CaptureFixture[str],
    store_settings: StoreSettings,
    store_toml: str,
    raw_db: RawDatabase,
) -> None:
    keyring = load_keyring("", tmp_path)
    store = await Store.create(load_policy("auerproxy"), keyring, tmp_path, clock, store_settings)
    try:
        alice = await store.put("registration", registration("alice", "alice-token-1111"))
    finally:
        await store.close()
    old_token = v1_ciphertext(keyring, b"alice-token-1111", b"registration.push_token")
    raw_db.execute(
        f"UPDATE c_registration SET push_token = {raw_db.blob(old_token)} WHERE id = {alice}"
    )
    config = tmp_path / "softrelay.toml"
    config.write_text(store_toml, encoding="utf-8")  # [store] of the test's backend
    common = ["--config", str(config), "--data-dir", str(tmp_path)]

    assert await asyncio.to_thread(cli_main, ["keys", "rotate", *common]) == 0
    assert "keys reseal" in capsys.readouterr().out
    assert await asyncio.to_thread(cli_main, ["keys", "reseal", *common]) == 0
    assert "1 records rewritten" in capsys.readouterr().out

    blobs = [b for name in ENCRYPTED for b in column(raw_db, "c_registration", name)]
    assert blobs
    assert {(FieldCipher.version(b), FieldCipher.key_id(b)) for b in blobs if b} == {(2, 2)}
    store = await Store.create(
        load_policy("auerproxy"), load_keyring("", tmp_path), tmp_path, clock, store_settings
    )
    try:
        (record,) = await store.find("registration", pbx_serial=SERIAL)
    finally:
        await store.close()
    assert record.fields["push_token"] == "alice-token-1111"
