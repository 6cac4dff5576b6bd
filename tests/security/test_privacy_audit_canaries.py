"""`softrelay audit --canary` sees through encryption and reads captured output.

A crash report stored by a real `serve` (Sentry envelope over HTTP) is encrypted on
disk, so no file shows its text; the audit decrypts every encrypted field with the
keyring and finds a canary in it, naming category and field only. After a subject's
erasure (`softrelay dsr erase`), a canary of their registration is found nowhere.
`--also FILE` searches captured stdout and stderr too, and names the file."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from privacy.audit import format_hits, scan_sealed
from privacy.clock import ManualClock, SystemClock
from privacy.database import StoreSettings
from privacy.keys import load_keyring
from privacy.policy import load_policy
from privacy.store import Store, Value
from softrelay.cli import main as cli_main
from tests.peers import STEP_TIMEOUT, Server, _drain, run_cli, spawn_serve
from tests.rawdb import RawDatabase

SERIAL = "0042137"
CRASH_KEY = "0123456789abcdef0123456789abcdef"
# Kept by the scrubber on purpose (an exception type is the stack trace's, not a
# person's): the canary is stored, encrypted, by design, and only decryption finds it.
CRASH_CANARY = "QuokkaCanaryZebraError"
CONTEXT = "surrounding-plaintext-words"  # stored beside the canary; never printed
TOKEN_CANARY = "canary-push-token-7e11c0de"
INSTANCE_CANARY = "urn:uuid:canary-instance-5a5a"
# Each test with a store runs on SQLite and on PostgreSQL (tests/conftest.py): the
# decrypting scan reads the store, wherever it keeps its rows.
pytestmark = pytest.mark.both_backends


@contextlib.asynccontextmanager
async def serve(tmp_path: Path, store_toml: str) -> AsyncIterator[tuple[Server, str]]:
    """`softrelay serve` with a crash project, its store as `store_toml` says; its HTTP
    base. Stopped (SIGTERM) at the end."""
    (tmp_path / "pbx.secret").write_text(secrets.token_hex(8) + "\n", encoding="utf-8")
    config = tmp_path / "softrelay.toml"
    config.write_text(
        store_toml + '[sip]\ndomain = "relay.test"\n\n'
        f'[[sip.pbx]]\nserial = "{SERIAL}"\nsecret = "file:{tmp_path / "pbx.secret"}"\n\n'
        f'[[crashreports.project]]\nid = "1"\nkey = "{CRASH_KEY}"\n',
        encoding="utf-8",
    )
    proc = await spawn_serve(tmp_path / "var", "--config", str(config))
    assert proc.stdout is not None
    assert proc.stderr is not None
    server = Server(proc, config, tmp_path / "var", "", {})
    server.drains.append(asyncio.create_task(_drain(proc.stderr, server.output)))
    try:
        while True:
            line = (await asyncio.wait_for(proc.stdout.readline(), STEP_TIMEOUT)).decode()
            assert line, f"serve ended before listening:\n{server.log()}"
            server.output.append(line)
            if line.startswith("softrelay: profile"):
                break
        server.drains.append(asyncio.create_task(_drain(proc.stdout, server.output)))
        yield server, f"http://127.0.0.1:{server.http_port()}"
        assert await server.stop() == 0, server.log()
    finally:
        await server.kill()


async def send_crash_report(base: str) -> None:
    """What a stock Sentry SDK sends: an envelope with one event, the user opted in."""
    event = {
        "event_id": uuid.uuid4().hex,
        "platform": "python",
        "level": "error",
        "message": CONTEXT,
        "tags": {"softrelay.opt_in": "yes"},
        "exception": {"values": [{"type": CRASH_CANARY, "value": "boom"}]},
    }
    payload = orjson.dumps(event)
    body = b"{}\n" + orjson.dumps({"type": "event", "length": len(payload)}) + b"\n" + payload
    auth = f"Sentry sentry_key={CRASH_KEY}, sentry_version=7, sentry_client=sentry.python/2.0"
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{base}/api/1/envelope/", data=body, headers={"X-Sentry-Auth": auth}
        ) as answer,
    ):
        assert answer.status == 200, await answer.text()


async def register_alice(data_dir: Path, settings: StoreSettings) -> None:
    """Alice's binding, as the relay stores it when her phone registers."""
    fields: dict[str, Value] = {
        "pbx_serial": SERIAL,
        "sip_username": "alice",
        "instance": INSTANCE_CANARY,
        "phone_ip": "198.51.100.23",
        "phone_port": 40001,
        "pbx_ip": "203.0.113.99",
        "pbx_port": 5061,
        "push_provider": "apns",
        "push_token": TOKEN_CANARY,
        "push_app_id": "com.example.phone.voip",
        "expires_at": 1_795_000_000,
    }
    policy = load_policy("auerproxy")
    keyring = load_keyring("", data_dir)
    store = await Store.create(policy, keyring, data_dir, SystemClock(), settings)
    try:
        await store.put("registration", fields)
    finally:
        await store.close()


async def audit(server: Server, *args: str) -> tuple[int, str]:
    return await run_cli(
        "audit", "--config", str(server.config), "--data-dir", str(server.data_dir), *args
    )


async def test_canaries_inside_encrypted_fields_are_found_and_gone_after_erasure(
    tmp_path: Path, store_settings: StoreSettings, store_toml: str
) -> None:
    async with serve(tmp_path, store_toml) as (server, base):
        await send_crash_report(base)
    await register_alice(server.data_dir, store_settings)
    canaries = ("--canary", CRASH_CANARY, "--canary", TOKEN_CANARY, "--canary", INSTANCE_CANARY)

    status, out = await audit(server, *canaries)

    assert status == 1, out
    assert f"crash_report.event (encrypted, 1 record): {CRASH_CANARY!r} as utf-8" in out
    assert f"registration.push_token (encrypted, 1 record): {TOKEN_CANARY!r} as utf-8" in out
    assert f"registration.instance (encrypted, 1 record): {INSTANCE_CANARY!r} as utf-8" in out
    assert str(server.data_dir) not in out, "no file holds any of them in the clear"
    assert CONTEXT not in out, "the plaintext around a hit is never printed"
    assert "3 canary hits" in out

    status, out = await run_cli(
        "dsr", "erase", "--user", "alice", "--serial", SERIAL,
        "--config", str(server.config), "--data-dir", str(server.data_dir),
    )  # fmt: skip
    assert status == 0, out

    status, out = await audit(server, *canaries)
    assert status == 1, out  # the crash report is not the subject's: it stays
    assert "registration." not in out, out
    assert str(server.data_dir) not in out, "nor is any left in a file"
    assert f"crash_report.event (encrypted, 1 record): {CRASH_CANARY!r} as utf-8" in out
    assert "1 canary hit" in out


async def test_a_value_that_does_not_open_fails_the_scan_and_is_named(
    store: Store, raw_db: RawDatabase
) -> None:
    first = await store.put("crash_report", {"project": "1", "event_id": "a", "event": {}})
    second = await store.put("crash_report", {"project": "1", "event_id": "b", "event": {}})
    raw_db.execute(
        "UPDATE c_crash_report SET event = "
        f"(SELECT event FROM c_crash_report WHERE id = {first}) WHERE id = {second}"
    )

    sealed = await scan_sealed(store, ["anything"])

    assert (sealed.hits, sealed.searched, sealed.unopened) == ([], 1, {"crash_report.event": 1})
    report = format_hits([], sealed)
    assert "crash_report.event: 1 encrypted value did not open" in report
    assert report.endswith("no canary found\n")


def write_captures(tmp_path: Path) -> tuple[Path, Path]:
    stdout = tmp_path / "serve.stdout"
    stderr = tmp_path / "serve.stderr"
    stdout.write_text("softrelay: http://127.0.0.1:8080 (healthz, metrics)\n", encoding="utf-8")
    stderr.write_text(
        "Error handling request from 127.0.0.9\nAuthorization: Bearer canary-bearer-0042\n",
        encoding="utf-8",
    )
    return stdout, stderr


def test_also_searches_captured_output_and_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], clock: ManualClock
) -> None:
    stdout, stderr = write_captures(tmp_path)
    data_dir = tmp_path / "var"
    args = ["audit", "--data-dir", str(data_dir), "--canary", "canary-bearer-0042"]

    assert cli_main([*args, "--also", str(stdout)]) == 0
    assert capsys.readouterr().out.endswith("no canary found\n\n")

    assert cli_main([*args, "--also", str(stdout), str(stderr)]) == 1
    out = capsys.readouterr().out
    assert f"{stderr}: 'canary-bearer-0042' as utf-8" in out
    assert str(stdout) not in out

    # Another encoding, in a directory of captures given as a whole.
    (tmp_path / "captures").mkdir()
    (tmp_path / "captures" / "run.log").write_text(b"canary-bearer-0042".hex())
    assert cli_main([*args, "--also", str(tmp_path / "captures")]) == 1
    assert "run.log: 'canary-bearer-0042' as hex" in capsys.readouterr().out


def test_also_without_canaries_or_with_a_missing_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stdout, _ = write_captures(tmp_path)
    data_dir = str(tmp_path / "var")

    assert cli_main(["audit", "--data-dir", data_dir, "--also", str(stdout)]) == 2
    assert "--also: give the values to look for with --canary" in capsys.readouterr().err

    missing = tmp_path / "nope.log"
    args = ["audit", "--data-dir", data_dir, "--canary", "abcd", "--also", str(missing)]
    assert cli_main(args) == 2
    assert f"--also: no such file: {missing}" in capsys.readouterr().err


async def test_a_clear_canary_is_looked_for_in_files_only(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    store_settings: StoreSettings,
    store_toml: str,
) -> None:
    """For a value the policy keeps, encrypted: absent in the clear passes, while the same
    value as a --canary is found by decryption."""
    data_dir = tmp_path / "var"
    await register_alice(data_dir, store_settings)
    config = tmp_path / "softrelay.toml"
    config.write_text(store_toml, encoding="utf-8")  # [store] of the test's backend
    args = ["audit", "--config", str(config), "--data-dir", str(data_dir)]

    assert await asyncio.to_thread(cli_main, [*args, "--clear-canary", TOKEN_CANARY]) == 0
    out = capsys.readouterr().out
    assert "encrypted value" not in out, "nothing was decrypted for it"
    assert out.endswith("no canary found\n\n")

    assert await asyncio.to_thread(cli_main, [*args, "--canary", TOKEN_CANARY]) == 1
    assert "registration.push_token (encrypted, 1 record)" in capsys.readouterr().out
