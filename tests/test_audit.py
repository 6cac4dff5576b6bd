"""The audit finds data kept past its retention or outside the policy, and the canary
scan finds marker values in any file under the data directory, in any common encoding."""

from __future__ import annotations

import base64
import binascii
import json
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path

import orjson
import pytest

from privacy.audit import (
    PURGE_PREFIX,
    CanaryHit,
    CategoryVerdict,
    audit,
    format_hits,
    format_report,
    human_duration,
    scan_for_canaries,
)
from privacy.clock import ManualClock, parse_instant
from privacy.keys import load_keyring
from privacy.logs import day_of, log_dir
from privacy.policy import Storage, load_policy
from privacy.retention import Sweeper
from privacy.store import DATABASE_FILE, Store, Value, stored_categories
from tests.conftest import sample_fields
from tests.rawdb import RawDatabase

# Each test with a store runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_backends
LOGS_ONLY = pytest.mark.sqlite_only("log files under the data directory: no backend in play")

DAY = 86400
NOON = parse_instant("2026-03-01T12:00:00Z")
REGISTRATION: dict[str, Value] = {
    "pbx_serial": "0042137",
    "sip_username": "canary-user-8f3a",
    "instance": "urn:uuid:canary-instance-77e1",
    "phone_ip": "198.51.100.77",
    "phone_port": 40001,
    "pbx_ip": "203.0.113.99",
    "pbx_port": 5061,
    "push_provider": "apns",
    "push_token": "canary-token-c0ffee-4242",
    "push_app_id": "com.example.phone.voip",
}
# Every field the policy declares encrypted: none may show in any file.
ENCRYPTED = ("sip_username", "instance", "phone_ip", "pbx_ip", "push_token")


@pytest.fixture
def clock() -> ManualClock:
    """Noon UTC: today's log file began 12 hours ago (the conftest store uses this clock)."""
    return ManualClock(NOON)


def by_category(verdicts: Sequence[CategoryVerdict]) -> dict[str, CategoryVerdict]:
    return {v.category: v for v in verdicts}


def violations(verdicts: Sequence[CategoryVerdict]) -> list[CategoryVerdict]:
    return [v for v in verdicts if v.verdict == "violation"]


def write_log(data_dir: Path, category: str, day: str, name: str | None = None) -> Path:
    directory = log_dir(data_dir, category)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (name or f"{day}.jsonl")
    path.write_bytes(b'{"event":"push.sent","provider":"apns"}\n')
    return path


# --- retention verdicts -------------------------------------------------------------


async def test_fresh_records_and_todays_logs_are_all_within_their_limits(
    store: Store, tmp_path: Path, clock: ManualClock
) -> None:
    for cat in stored_categories(store.policy):
        await store.put(cat.name, sample_fields(cat))
    write_log(tmp_path, "push_log", day_of(clock.now()))

    verdicts = await audit(store, tmp_path)

    found = by_category(verdicts)
    # One row each, in policy order; then how deleted rows leave the files (test_store_vacuum).
    categories = [name for name in found if not name.startswith(PURGE_PREFIX)]
    assert categories == list(store.policy.categories)
    memory = {c.name for c in store.policy.stored(Storage.MEMORY)}
    assert memory == {"relay", "location", "cluster_limits"}
    assert {found[name].verdict for name in memory} == {"memory only"}
    assert {v.verdict for v in verdicts if v.category not in memory} == {"ok"}
    assert found["registration"].records == 1
    assert found["registration"].oldest_age_seconds == 0
    assert found["registration"].detail == "oldest record expires in 365d"
    assert found["account"].records == 1  # registration and debug name the same subject
    assert found["push_log"].oldest_age_seconds == 12 * 3600
    assert found["push_log"].records is None
    assert found["push_log"].detail == "1 file, oldest expires in 6d 12h"
    assert found["troubleshooting_log"].detail == "no log files"


@pytest.mark.parametrize("category", ["provisioning_log", "registration", "debug"])
async def test_a_record_past_its_retention_is_a_violation_until_the_sweeper_runs(
    store: Store, tmp_path: Path, clock: ManualClock, category: str
) -> None:
    cat = store.policy.category(category)
    await store.put(category, sample_fields(cat))
    clock.advance(cat.retention.seconds + 3 * DAY)

    verdict = by_category(await audit(store, tmp_path))[category]
    assert verdict.verdict == "violation"
    assert verdict.records == 1
    assert verdict.oldest_age_seconds == cat.retention.seconds + 3 * DAY
    assert verdict.limit_seconds == cat.retention.seconds
    assert verdict.detail == "oldest record is 3d older than the limit"

    await Sweeper(store, tmp_path).run_once()
    after = await audit(store, tmp_path)
    assert violations(after) == []
    assert by_category(after)[category].records == 0


async def test_an_inactive_subject_is_an_account_violation(
    store: Store, tmp_path: Path, clock: ManualClock
) -> None:
    await store.put("registration", REGISTRATION)
    clock.advance(365 * DAY + 2 * 3600)

    account = by_category(await audit(store, tmp_path))["account"]
    assert account.verdict == "violation"
    assert account.detail == "oldest subject is 2h older than the limit"

    await Sweeper(store, tmp_path).run_once()
    assert by_category(await audit(store, tmp_path))["account"].records == 0


async def test_a_record_is_a_violation_from_the_instant_reads_treat_it_as_expired(
    store: Store, tmp_path: Path, clock: ManualClock
) -> None:
    cat = store.policy.category("provisioning_log")
    await store.put(cat.name, sample_fields(cat))

    clock.advance(cat.retention.seconds - 1)
    verdict = by_category(await audit(store, tmp_path))[cat.name]
    assert (verdict.verdict, verdict.detail) == ("ok", "oldest record expires in 1s")
    assert await store.find(cat.name) != []

    clock.advance(1)
    assert await store.find(cat.name) == []
    assert by_category(await audit(store, tmp_path))[cat.name].verdict == "violation"


@LOGS_ONLY
async def test_a_log_file_is_a_violation_once_its_day_start_plus_retention_has_passed(
    store: Store, tmp_path: Path
) -> None:
    # Now is 2026-03-01 12:00 UTC; push_log keeps 7 days.
    kept = write_log(tmp_path, "push_log", "2026-02-23")  # gone at 2026-03-02 00:00
    assert by_category(await audit(store, tmp_path))["push_log"].verdict == "ok"

    write_log(tmp_path, "push_log", "2026-02-22")  # gone since 2026-03-01 00:00
    verdict = by_category(await audit(store, tmp_path))["push_log"]
    assert verdict.verdict == "violation"
    assert verdict.oldest_age_seconds == 7 * DAY + 12 * 3600
    assert verdict.detail == "2 files; oldest file is 12h older than the limit"

    await Sweeper(store, tmp_path).run_once()
    assert by_category(await audit(store, tmp_path))["push_log"].verdict == "ok"
    assert kept.exists()


@LOGS_ONLY
async def test_a_log_file_not_named_by_its_day_is_a_violation_as_no_sweep_removes_it(
    store: Store, tmp_path: Path, clock: ManualClock
) -> None:
    write_log(tmp_path, "troubleshooting_log", day_of(clock.now()))
    write_log(tmp_path, "troubleshooting_log", "", name="2026-02-30.jsonl")
    write_log(tmp_path, "troubleshooting_log", "", name="old.jsonl.1")

    verdict = by_category(await audit(store, tmp_path))["troubleshooting_log"]

    assert verdict.verdict == "violation"
    assert verdict.detail == (
        "3 files; not named by its day, so never swept: 2026-02-30.jsonl, old.jsonl.1"
    )


async def test_an_undeclared_column_with_values_is_a_violation_of_its_own(
    store: Store, tmp_path: Path, raw_db: RawDatabase
) -> None:
    await store.put("registration", REGISTRATION)
    # Behind the store's back, as a careless migration would.
    raw_db.execute(
        "ALTER TABLE c_registration ADD COLUMN secret_note TEXT",
        "ALTER TABLE c_registration ADD COLUMN empty_note TEXT",  # only NULLs: holds nothing
        "UPDATE c_registration SET secret_note = 'met at the fair'",
    )

    verdicts = await audit(store, tmp_path)

    (extra,) = violations(verdicts)
    assert extra.category == "registration"
    assert extra.records == 1
    assert extra.detail == (
        "column 'secret_note' of c_registration is not declared by the policy and holds 1 value"
    )
    # The retention verdict stays, and the column's verdict follows it.
    rows = [v for v in verdicts if v.category == "registration"]
    assert [v.verdict for v in rows] == ["ok", "violation"]


async def test_a_table_or_a_file_of_a_memory_only_category_is_a_violation(
    store: Store, tmp_path: Path, clock: ManualClock, raw_db: RawDatabase
) -> None:
    assert by_category(await audit(store, tmp_path))["relay"].verdict == "memory only"
    raw_db.execute("CREATE TABLE c_relay (id INTEGER PRIMARY KEY)")
    write_log(tmp_path, "relay", day_of(clock.now()))

    relay = by_category(await audit(store, tmp_path))["relay"]

    assert relay.verdict == "violation"
    assert relay.storage is Storage.MEMORY
    assert relay.detail == (
        "kept in memory only, yet found on disk: table c_relay, 1 file under log/relay/"
    )


async def test_tables_and_logs_of_categories_the_policy_does_not_declare_are_violations(
    store: Store, tmp_path: Path, clock: ManualClock, raw_db: RawDatabase
) -> None:
    raw_db.execute("CREATE TABLE c_shopping (id INTEGER PRIMARY KEY)")
    write_log(tmp_path, "registration", day_of(clock.now()))  # a database category
    (tmp_path / "log" / "stray.jsonl").write_bytes(b"{}\n")
    (tmp_path / "log" / "empty").mkdir()  # a directory without files holds nothing

    found = violations(await audit(store, tmp_path))

    assert [(v.category, v.storage, v.detail) for v in found] == [
        (
            "shopping",
            Storage.DATABASE,
            "table c_shopping belongs to no database category of the policy",
        ),
        ("registration", Storage.LOG, "1 file under log/registration/, no log category"),
        ("stray.jsonl", Storage.LOG, "log/stray.jsonl lies outside every category's directory"),
    ]


# --- canary scan --------------------------------------------------------------------


# SQLite only (it opens no store_backend): the files of an embedded store, its WAL among
# them, under the data directory; a PostgreSQL database keeps no file there.
async def test_encrypted_fields_leave_no_plaintext_in_any_file_open_or_closed(
    tmp_path: Path, clock: ManualClock
) -> None:
    # The embedded keyring lives under the data directory and is scanned like the rest.
    keyring = load_keyring("", tmp_path)
    canaries = [str(REGISTRATION[name]) for name in ENCRYPTED]
    # Controls that prove the scan reads the database and the keyring: a plain field and a key.
    serial = str(REGISTRATION["pbx_serial"])
    index_key = base64.b64encode(keyring.index).decode()
    store = await Store.create(load_policy("auerproxy"), keyring, tmp_path, clock)
    try:
        await store.put("registration", REGISTRATION)
        assert (tmp_path / f"{DATABASE_FILE}-wal").stat().st_size > 0
        assert scan_for_canaries(tmp_path, canaries) == []
        open_hits = scan_for_canaries(tmp_path, [serial, index_key])
    finally:
        await store.close()
    assert scan_for_canaries(tmp_path, canaries) == []
    closed_hits = scan_for_canaries(tmp_path, [serial, index_key])

    for hits in (open_hits, closed_hits):
        assert {h.value for h in hits if h.path.name.startswith(DATABASE_FILE)} == {serial}
        assert CanaryHit(index_key, tmp_path / "secrets" / "keyring.json", "utf-8") in hits


async def test_a_leaked_value_is_found_in_each_encoding_and_an_absent_one_is_not(
    tmp_path: Path,
) -> None:
    value = "canary.mail+8f3a@example.org"
    planted = tmp_path / "crash"
    planted.mkdir()
    (planted / "utf16.bin").write_bytes(b"\xff\xfe" + f"user={value};".encode("utf-16-le"))
    (planted / "event.b64").write_bytes(base64.b64encode(b'{"user": "' + value.encode() + b'"}'))
    (planted / "request.log").write_text(f"GET /?email={urllib.parse.quote(value, safe='')} 200\n")

    hits = scan_for_canaries(tmp_path, [value, "never-written-9c1d"])

    assert hits == [
        CanaryHit(value, planted / "event.b64", "base64"),
        CanaryHit(value, planted / "request.log", "url"),
        CanaryHit(value, planted / "utf16.bin", "utf-16-le"),
    ]


Encode = Callable[[str], bytes]
ENCODINGS: list[tuple[str, str, Encode]] = [
    ("utf-8", "Canary-Phone-4711", lambda v: v.upper().encode()),  # case-insensitive
    ("utf-16-le", "canary-phone-4711", lambda v: v.encode("utf-16-le")),
    ("utf-16-be", "canary-phone-4711", lambda v: v.encode("utf-16-be")),
    ("url", "canary phone/4711", lambda v: urllib.parse.quote(v, safe="").encode()),
    ("hex", "canary-phone-4711", lambda v: binascii.hexlify(v.encode())),
    ("hex-upper", "canary-phone-4711", lambda v: binascii.hexlify(v.encode()).upper()),
    ("base64", "canary??>>~~", lambda v: base64.b64encode(v.encode())),
    ("base64url", "canary??>>~~", lambda v: base64.urlsafe_b64encode(v.encode())),
    ("json", 'canary "quoted"\nphone', lambda v: orjson.dumps({"name": v})),
    ("json-ascii", "canary-müller-4711", lambda v: json.dumps({"name": v}).encode()),
]


@pytest.mark.parametrize(("encoding", "value", "encode"), ENCODINGS, ids=[e[0] for e in ENCODINGS])
def test_each_encoding_is_found_under_its_own_name(
    tmp_path: Path, encoding: str, value: str, encode: Encode
) -> None:
    (tmp_path / "leak").write_bytes(b"prefix " + encode(value) + b" suffix")

    assert scan_for_canaries(tmp_path, [value]) == [CanaryHit(value, tmp_path / "leak", encoding)]


@pytest.mark.parametrize("chunk_bytes", [1, 5, 1 << 20])
@pytest.mark.parametrize("order", ["utf-16-le", "utf-16-be"])
def test_utf16_text_is_named_by_its_byte_order_though_it_holds_the_other_one_byte_along(
    tmp_path: Path, order: str, chunk_bytes: int
) -> None:
    value = "canary-phone-4711"
    (tmp_path / "notes.txt").write_bytes(f"\ufeffuser={value};ok".encode(order))

    hits = scan_for_canaries(tmp_path, [value], chunk_bytes=chunk_bytes)

    assert hits == [CanaryHit(value, tmp_path / "notes.txt", order)]


@pytest.mark.parametrize("offset", [0, 1, 2])
@pytest.mark.parametrize("size", [6, 7, 8, 31])
def test_base64_is_found_whatever_the_alignment_of_the_value(
    tmp_path: Path, offset: int, size: int
) -> None:
    value = "canary-pin-0123456789abcdefghij"[:size]
    blob = b"\x01" * offset + value.encode() + b"\x02" * 5
    (tmp_path / "blob.b64").write_bytes(base64.b64encode(blob))

    assert [h.encoding for h in scan_for_canaries(tmp_path, [value])] == ["base64"]


@pytest.mark.parametrize("chunk_bytes", [1, 3, 7, 64])
def test_a_value_straddling_chunk_boundaries_is_found(tmp_path: Path, chunk_bytes: int) -> None:
    value = "canary-straddle-5e6f"
    for start in range(chunk_bytes + 1):
        (tmp_path / f"f{start:03}").write_bytes(b"." * start + value.encode() + b".")

    hits = scan_for_canaries(tmp_path, [value], chunk_bytes=chunk_bytes)

    assert len(hits) == chunk_bytes + 1
    assert {h.encoding for h in hits} == {"utf-8"}


def test_a_symlink_is_not_followed_out_of_the_data_directory(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("canary-outside-1a2b")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "link").symlink_to(outside / "secret")
    (data_dir / "dirlink").symlink_to(outside, target_is_directory=True)

    assert scan_for_canaries(data_dir, ["canary-outside-1a2b"]) == []
    assert len(scan_for_canaries(tmp_path, ["canary-outside-1a2b"])) == 1


@pytest.mark.parametrize("value", ["", "abc", "ü€x"])
def test_a_value_shorter_than_four_characters_is_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(ValueError, match="too short to be meaningful"):
        scan_for_canaries(tmp_path, ["long-enough-value", value])


# --- reports ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.9, "0s"),
        (45, "45s"),
        (60, "1m"),
        (3725, "1h 2m"),
        (3 * DAY + 30, "3d"),
        (3 * DAY + 4 * 3600 + 59, "3d 4h"),
        (-90, "-1m 30s"),
    ],
)
def test_human_duration_shows_the_largest_unit_and_the_next(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


def test_the_report_is_a_table_that_shows_violations_and_counts_them() -> None:
    verdicts = [
        CategoryVerdict("registration", Storage.DATABASE, 12, 368 * DAY, 365 * DAY, "violation",
                        "oldest record is 3d older than the limit"),
        CategoryVerdict("push_log", Storage.LOG, None, 12 * 3600, 7 * DAY, "ok",
                        "1 file, oldest expires in 6d 12h"),
        CategoryVerdict("relay", Storage.MEMORY, None, None, 0, "memory only", "nothing on disk"),
    ]  # fmt: skip

    lines = format_report(verdicts).splitlines()

    assert lines[0].split() == [
        "category",
        "storage",
        "records",
        "oldest",
        "limit",
        "verdict",
        "detail",
    ]
    assert lines[1].split()[:7] == [
        "registration",
        "database",
        "12",
        "368d",
        "365d",
        "VIOLATION",
        "oldest",
    ]
    assert lines[2].split()[:7] == ["push_log", "log", "-", "12h", "1w", "ok", "1"]
    assert lines[3].split() == [
        "relay",
        "memory",
        "-",
        "-",
        "-",
        "memory",
        "only",
        "nothing",
        "on",
        "disk",
    ]
    assert lines[1].index("VIOLATION") == lines[2].index("ok")  # columns line up
    assert lines[-1] == "1 violation"
    assert format_report(verdicts[1:]).splitlines()[-1] == "no violations"


def test_hits_are_listed_with_path_value_and_encoding(tmp_path: Path) -> None:
    hits = [CanaryHit("canary-user-8f3a", tmp_path / "softrelay.db-wal", "utf-16-le")]

    assert format_hits(hits) == (
        f"{tmp_path}/softrelay.db-wal: 'canary-user-8f3a' as utf-16-le\n\n1 canary hit\n"
    )
    assert format_hits([]) == "no canary found\n"
