"""The store enforces the policy on every write and protects fields as declared."""

from __future__ import annotations

from pathlib import Path

import pytest

from privacy.clock import ManualClock
from privacy.crypto import DecryptionError, FieldCipher
from privacy.database import StoreSettings
from privacy.keys import Keyring
from privacy.policy import PolicyViolation, load_policy
from privacy.store import DATABASE_FILE, JsonText, Store, Subject, Value
from tests.conftest import StoreFactory, sample_fields
from tests.pgserver import PostgresServer
from tests.rawdb import RawDatabase

pytestmark = pytest.mark.both_backends

REGISTRATION: dict[str, Value] = {
    "pbx_serial": "0042137",
    "sip_username": "alice-7f3e9",
    "instance": "urn:uuid:9b1c0e4e-canary",
    "phone_ip": "198.51.100.23",
    "phone_port": 40001,
    "pbx_ip": "203.0.113.99",
    "pbx_port": 5061,
    "push_provider": "apns",
    "push_token": "tok-c0ffee-deadbeef-4242",
    "push_app_id": "com.example.phone.voip",
    "expires_at": 1_795_000_000,
}
# The encrypted values of REGISTRATION: in no file of any backend.
SECRETS = ("alice-7f3e9", "tok-c0ffee-deadbeef-4242", "198.51.100.23", "203.0.113.99", "canary")


@pytest.mark.parametrize("field", ["password", "authorization", "digest_response", "sip_body"])
async def test_never_stored_field_is_refused_and_nothing_written(
    store: Store, raw_db: RawDatabase, field: str
) -> None:
    with pytest.raises(PolicyViolation, match=f"'{field}' must never be stored"):
        await store.put("registration", {**REGISTRATION, field: "hunter2"})
    assert raw_db.count("c_registration") == 0


@pytest.mark.parametrize("profile", ["auerproxy", "cloudsoftphone"])
async def test_password_and_undeclared_fields_are_refused_in_every_category(
    open_store: StoreFactory, profile: str
) -> None:
    store = await open_store(profile)
    for name in store.policy.categories:
        category = store.policy.categories[name]
        fields = sample_fields(category)
        for bad in ("password", "favourite_colour"):
            with pytest.raises(PolicyViolation, match=f"'{bad}'|not in the store"):
                await store.put(name, {**fields, bad: "hunter2"})
    for stats in (await store.stats()).values():
        assert stats.rows == 0


async def test_memory_and_log_categories_are_never_written_to_the_store(store: Store) -> None:
    for name in ("relay", "push_log", "troubleshooting_log", "account"):
        with pytest.raises(PolicyViolation, match="not in the store"):
            await store.put(name, {})


async def test_unknown_category_is_refused(store: Store) -> None:
    with pytest.raises(PolicyViolation, match="not declared"):
        await store.put("shopping_list", {"item": "milk"})


async def test_wrong_type_is_refused(store: Store, raw_db: RawDatabase) -> None:
    with pytest.raises(PolicyViolation, match="'phone_port' is declared int"):
        await store.put("registration", {**REGISTRATION, "phone_port": "40001"})
    assert raw_db.count("c_registration") == 0


async def test_registration_round_trips_and_is_found_by_encrypted_fields(store: Store) -> None:
    record_id = await store.put("registration", REGISTRATION)
    (found,) = await store.find("registration", sip_username="alice-7f3e9", pbx_serial="0042137")
    assert found.id == record_id
    assert found.fields == REGISTRATION
    (by_token,) = await store.find("registration", push_token="tok-c0ffee-deadbeef-4242")
    assert by_token.id == record_id
    assert await store.find("registration", sip_username="bob") == []


async def test_searching_an_encrypted_field_without_blind_index_is_refused(store: Store) -> None:
    with pytest.raises(PolicyViolation, match="without lookup"):
        await store.find("registration", phone_ip="198.51.100.23")


async def test_same_key_replaces_the_record_and_keeps_its_creation(
    store: Store, clock: ManualClock
) -> None:
    first = await store.put("registration", REGISTRATION)
    clock.advance(60)
    second = await store.put("registration", {**REGISTRATION, "phone_port": 40002})
    assert first == second
    (record,) = await store.find("registration", pbx_serial="0042137")
    assert record.fields["phone_port"] == 40002
    assert record.last_used_at - record.created_at == 60


@pytest.mark.sqlite_only("surveys SQLite's database file and its WAL")
async def test_no_plaintext_username_token_or_ip_in_database_or_wal(
    store: Store, tmp_path: Path
) -> None:
    for i in range(20):
        await store.put("registration", {**REGISTRATION, "instance": f"urn:uuid:{i}"})
    files = [p for p in tmp_path.iterdir() if p.name.startswith(DATABASE_FILE)]
    assert any(p.name.endswith("-wal") for p in files), "the WAL must be scanned too"
    blob = b"".join(p.read_bytes() for p in files)
    for secret in SECRETS:
        assert secret.encode() not in blob, secret
    assert b"0042137" in blob  # the plain serial is stored, proving the scan sees the rows


async def test_no_plaintext_username_token_or_ip_in_postgresql_files_or_wal(
    postgres_server: PostgresServer, postgres_store_dsn: str, clock: ManualClock, tmp_path: Path
) -> None:
    """PostgreSQL's side of the test above: the database's table and index files, after a
    checkpoint wrote every page, and the server's WAL hold no encrypted value."""
    settings = StoreSettings(backend="postgresql", dsn=postgres_store_dsn)
    store = await Store.create(
        load_policy("auerproxy"), Keyring.generate(), tmp_path, clock, settings
    )
    try:
        for i in range(20):
            await store.put("registration", {**REGISTRATION, "instance": f"urn:uuid:{i}"})
    finally:
        await store.close()
    postgres_server.checkpoint()
    name = postgres_store_dsn.rsplit("/", 1)[1]
    for files in (postgres_server.database_files(name), postgres_server.wal_files()):
        blob = b"".join(p.read_bytes() for p in files)
        for secret in SECRETS:
            assert secret.encode() not in blob, secret
        assert b"0042137" in blob  # the plain serial is stored: the scan sees the rows


async def test_anonymised_field_never_reaches_storage_in_full(
    store: Store, raw_db: RawDatabase, store_settings: StoreSettings, tmp_path: Path
) -> None:
    await store.put("provisioning_log", {"ip_prefix": "198.51.100.23", "pbx_serial": "0042137"})
    (record,) = await store.find("provisioning_log", pbx_serial="0042137")
    assert record.fields["ip_prefix"] == "198.51.100.0"
    await store.close()
    dump = raw_db.dump()
    assert "198.51.100.0" in dump, "the dump shows the stored prefix"
    assert "198.51.100.23" not in dump
    if store_settings.backend == "sqlite":  # free pages too
        assert b"198.51.100.23" not in (tmp_path / DATABASE_FILE).read_bytes()


async def test_not_an_ip_in_an_anonymised_field_is_refused(store: Store) -> None:
    with pytest.raises(PolicyViolation, match="must be an IP address"):
        await store.put("provisioning_log", {"ip_prefix": "alice@example.com", "pbx_serial": "1"})


async def test_ciphertext_moved_to_another_column_does_not_decrypt() -> None:
    cipher = FieldCipher(Keyring.generate())
    sealed = cipher.encrypt(b"alice", b"registration.sip_username", row=b"row-1")
    assert cipher.decrypt(sealed, b"registration.sip_username", row=b"row-1") == b"alice"
    with pytest.raises(DecryptionError):
        cipher.decrypt(sealed, b"registration.push_token", row=b"row-1")
    with pytest.raises(DecryptionError):
        cipher.decrypt(sealed, b"registration.sip_username", row=b"row-2")


async def test_rotated_keyring_reads_old_records_and_writes_with_the_new_key(
    tmp_path: Path, clock: ManualClock, store_settings: StoreSettings, raw_db: RawDatabase
) -> None:
    policy = load_policy("auerproxy")
    keyring = Keyring.generate()
    store = await Store.create(policy, keyring, tmp_path, clock, store_settings)
    await store.put("registration", REGISTRATION)
    await store.close()
    rotated = keyring.rotated()
    store = await Store.create(policy, rotated, tmp_path, clock, store_settings)
    try:
        (old,) = await store.find("registration", pbx_serial="0042137")
        assert old.fields["sip_username"] == "alice-7f3e9"
        await store.put("registration", {**REGISTRATION, "instance": "second"})
    finally:
        await store.close()
    blobs = raw_db.blobs("SELECT sip_username FROM c_registration")
    assert sorted(FieldCipher.key_id(blob) for blob in blobs) == [1, 2]


async def test_update_changes_mutable_fields_but_not_the_key(store: Store) -> None:
    record_id = await store.put("registration", REGISTRATION)
    assert await store.update("registration", record_id, {"push_token": "new-token-1234"})
    (record,) = await store.find("registration", push_token="new-token-1234")
    assert record.id == record_id
    with pytest.raises(PolicyViolation, match="identifies the record"):
        await store.update("registration", record_id, {"sip_username": "mallory"})


async def test_delete_subject_erases_every_category_naming_the_subject(store: Store) -> None:
    await store.put("registration", REGISTRATION)
    await store.put(
        "debug", {"pbx_serial": "0042137", "sip_username": "alice-7f3e9", "destination_name": "Bob"}
    )
    await store.put("registration", {**REGISTRATION, "sip_username": "carol"})
    counts = await store.delete_subject(Subject("alice-7f3e9", "0042137"))
    assert counts["registration"] == 1
    assert counts["debug"] == 1
    remaining = await store.find("registration", pbx_serial="0042137")
    assert [r.fields["sip_username"] for r in remaining] == ["carol"]


async def test_find_subject_collects_the_subjects_records(store: Store) -> None:
    await store.put("registration", REGISTRATION)
    found = await store.find_subject(Subject("alice-7f3e9", "0042137"))
    assert len(found["registration"]) == 1
    assert found["debug"] == []


# PostgreSQL keeps a deleted row until vacuum: its own test is the backend's vacuum.
@pytest.mark.sqlite_only("surveys SQLite's free pages and WAL (secure_delete)")
async def test_erased_values_do_not_linger_in_the_database_files(
    store: Store, tmp_path: Path
) -> None:
    await store.put("registration", REGISTRATION)
    await store.delete_subject(Subject("alice-7f3e9", "0042137"))
    blob = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith(DATABASE_FILE))
    # Plain fields of the erased record: neither in free pages nor in the WAL.
    assert b"0042137" not in blob
    assert b"com.example.phone.voip" not in blob


async def test_put_many_writes_all_or_refuses_all(store: Store) -> None:
    rows: list[dict[str, Value]] = [
        {"tenant": "acme", "period": "2026-11", "pid": f"{i:032x}"} for i in range(50)
    ]
    await store.put_many("usage", [*rows, rows[0]])  # the same key twice: one record
    assert len(await store.find("usage", tenant="acme")) == 50
    with pytest.raises(PolicyViolation):
        await store.put_many("usage", [{**rows[0], "pid": "f" * 32}, {**rows[1], "password": "x"}])
    assert len(await store.find("usage", tenant="acme")) == 50, "nothing of a refused batch"
    with pytest.raises(PolicyViolation):
        await store.put_many("registration", [REGISTRATION])  # has subjects: use put


async def test_put_many_of_a_large_batch_keeps_every_row_and_the_last_put_of_a_key(
    store: Store,
) -> None:
    """102 rows in one batch: every row lands with its own values, and of one key the
    last put wins, next to each other (t5) and 100 rows apart (t0)."""
    rows: list[dict[str, Value]] = [
        {"tenant": f"t{i}", "period": "2026-11", "active": i} for i in range(100)
    ]
    rows.insert(6, {"tenant": "t5", "period": "2026-11", "active": 505})
    rows.append({"tenant": "t0", "period": "2026-11", "active": 1000})
    await store.put_many("usage_count", rows)
    found = await store.find("usage_count", period="2026-11")
    assert {r.fields["tenant"]: r.fields["active"] for r in found} == {
        **{f"t{i}": i for i in range(100)},
        "t5": 505,
        "t0": 1000,
    }
    assert len(found) == 100


async def test_json_text_is_stored_as_given_and_checked_like_any_value(
    store: Store, raw_db: RawDatabase
) -> None:
    """Already-serialised JSON for a `json` field: sealed as given, read back decoded;
    undeclared fields, fields of another type and never-stored ones still refuse it."""
    event = b'{"message":"canary-json-text","n":[1,2]}'
    row: dict[str, Value | JsonText] = {
        "project": "1",
        "event_id": "a" * 32,
        "event": JsonText(event),
    }
    await store.put_many("crash_report", [row])
    (record,) = await store.find("crash_report", event_id="a" * 32)
    assert record.fields["event"] == {"message": "canary-json-text", "n": [1, 2]}
    dump = raw_db.dump()
    assert "c_crash_report" in dump
    assert "canary-json-text" not in dump, "an encrypted field is never plaintext"
    refused: list[dict[str, Value | JsonText]] = [
        {**row, "project": JsonText(b'"1"')},  # a text field
        {**row, "note": JsonText(b"{}")},  # undeclared
        {**row, "password": JsonText(b'"x"')},  # never stored
    ]
    for bad in refused:
        with pytest.raises(PolicyViolation):
            await store.put_many("crash_report", [bad])
    assert len(await store.find("crash_report", project="1")) == 1
