"""`softrelay audit --canary` after a SIPIS run (issue 18): a real `softrelay serve` in
SIPIS mode, a real Kamailio, the push stand-ins, a caller through Kamailio and a
Python SIPIS app on TCP.

The run: an app stores its account over the API with an HA1 computed from a canary
password (the password itself never leaves the test) and a canary display name; it
registers at Kamailio on the app's behalf. A caller with a canary display name sends a
text with a canary body and then calls; the sleeping app is woken, connects with its
device secret, receives the text (deleted at its 200) and the call, which completes.

Then `softrelay audit`, which decrypts every encrypted field, over the data directory
and the service's captured stdout and stderr:

- finds nothing of the password, the caller's name, the text body, the call's SDP nor
  the device secret: not in any file (the database, its journal, the policy logs, the
  captured output) and not inside any encrypted field;
- finds the HA1 and the account's display name only where the policy declares them
  kept, encrypted: `sip_account.ha1_md5` and `sip_account.display_name`, one record
  each, and nowhere else; `--clear-canary` (files only, in the clear) finds neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.kamailio import DOMAIN, Kamailio, Subscriber
from tests.peers import STEP_TIMEOUT, Server, _drain, run_cli, spawn_serve
from tests.sipis.calls_world import (
    CALLER_NAME,
    SDP,
    SDP_CANARY,
    App,
    Caller,
    ack_then_app_hangs_up,
)
from tests.sipis.provider import running_kamailio
from tests.sipis.test_messages_kamailio import app_answer

PASSWORD = f"pw-canary-{secrets.token_hex(6)}"
ALICE = Subscriber("alice", PASSWORD)
DISPLAY_NAME = f"Alice Display-canary {secrets.token_hex(3)}"
TEXT = f"Text body canary {secrets.token_hex(6)}"


@pytest.fixture
def kamailio() -> Iterator[Kamailio]:
    with running_kamailio([ALICE]) as server:
        yield server


@contextlib.asynccontextmanager
async def serve(tmp_path: Path) -> AsyncIterator[Server]:
    """`softrelay serve` in SIPIS mode on the cloudsoftphone profile, logging at debug
    (the service log is mirrored on stderr: the test waits on its lines, and the audit
    searches all of them). Stopped with SIGTERM, which must end it cleanly."""
    config = tmp_path / "softrelay.toml"
    config.write_text(
        '[policy]\nprofile = "cloudsoftphone"\n\n'
        '[logging]\nlevel = "debug"\n\n'
        '[sip]\ndomain = "relay.test"\n\n'
        # Kamailio is on 127.0.0.1; the accounts load at once after a start.
        '[sipis]\nenabled = true\nallow_private_registrars = true\nstart_spread = "1s"\n',
        encoding="utf-8",
    )
    proc = await spawn_serve(tmp_path / "var", "--config", str(config))
    assert proc.stdout is not None
    assert proc.stderr is not None
    server = Server(proc, config, tmp_path / "var", "", {})
    server.drains.append(asyncio.create_task(_drain(proc.stderr, server.output, server.grew)))
    try:
        while True:
            line = (await asyncio.wait_for(proc.stdout.readline(), STEP_TIMEOUT)).decode()
            assert line, f"serve ended before listening:\n{server.log()}"
            server.output.append(line)
            if match := re.match(r"softrelay: sip (udp|tcp) 127\.0\.0\.1:(\d+)$", line.strip()):
                server.ports[match.group(1)] = int(match.group(2))
            if line.startswith("softrelay: profile"):
                break
        server.drains.append(asyncio.create_task(_drain(proc.stdout, server.output, server.grew)))
        yield server
        assert await server.stop() == 0, server.log()
    finally:
        await server.kill()


def embedded_app(server: Server) -> str:
    """The app id the in-process push stand-ins serve (serve prints it)."""
    for line in server.output:
        if match := re.search(r"push stand-ins in-process .* app (\S+)$", line.strip()):
            return match.group(1)
    raise AssertionError(f"no push stand-ins:\n{server.log()}")


async def store_account(server: Server, kamailio: Kamailio) -> tuple[str, str]:
    """POST the account as an app does: the HA1, never the password."""
    body = {
        "registrar": f"sip:127.0.0.1:{kamailio.port};transport=udp",
        "domain": DOMAIN,
        "user": ALICE.user,
        "realm": DOMAIN,
        "display_name": DISPLAY_NAME,
        "ha1_md5": ALICE.ha1(),
        "push": {
            "provider": "apns",
            "token": secrets.token_hex(32),
            "alert_token": secrets.token_hex(32),
            "app_id": embedded_app(server),
        },
    }
    url = f"http://127.0.0.1:{server.http_port()}/sipis/v1/accounts"
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as answer:
        created = await answer.json()
        assert answer.status == 201, created
    assert PASSWORD not in json.dumps(body)
    return created["account_id"], created["device_secret"]


async def run(server: Server, kamailio: Kamailio) -> str:
    """The whole SIPIS run (see the module doc); the device secret."""
    account_id, secret = await store_account(server, kamailio)
    await server.line(r"sipis\.registered")
    assert kamailio.port is not None
    async with Caller.open(kamailio.port) as caller:
        caller.text(TEXT)
        await caller.inbox.response(202, "MESSAGE")
        caller.invite()
        ringing = await caller.inbox.response(180)
        assert ringing.get("Push-Status") == "delivered"
        async with App.registered(server.ports["tcp"], account_id, secret) as app:
            text = await app.inbox.request("MESSAGE")
            assert text.body.decode() == TEXT
            app.send(app_answer(text))
            await server.line(r"sipis\.message_delivered")  # and deleted
            invite = await app.inbox.request("INVITE")
            assert CALLER_NAME in (invite.get("From") or "")  # the app sees who calls
            app.reply(invite, 180, "Ringing")
            app.reply(invite, 200, "OK", body=SDP)
            ok = await caller.inbox.response(200)
            await ack_then_app_hangs_up(caller, app, invite, ok)
    return secret


def hit_lines(report: str) -> list[str]:
    """The audit's canary lines (a file hit or an encrypted field's), nothing else."""
    return [
        line
        for line in report.splitlines()
        if " as " in line and ("(encrypted," in line or line.startswith("/"))
    ]


async def test_after_a_sipis_run_the_audit_finds_only_what_the_policy_keeps_encrypted(
    kamailio: Kamailio, tmp_path: Path
) -> None:
    async with serve(tmp_path) as server:
        secret = await run(server, kamailio)
    output = tmp_path / "serve-output.txt"  # stdout and stderr of the service
    output.write_text("".join(server.output), encoding="utf-8")
    assert any("sipis.registered" in line for line in server.output)  # it did log
    logs = list((server.data_dir / "log").rglob("*.jsonl"))
    assert logs  # the policy logs are there to be searched
    audit = ["audit", "--config", str(server.config), "--data-dir", str(server.data_dir)]
    also = ["--also", str(output)]

    # Never kept, never logged, never printed: found nowhere, decrypted or not.
    absent = [PASSWORD, CALLER_NAME, TEXT, SDP_CANARY, secret]
    status, report = await run_cli(*audit, *[a for v in absent for a in ("--canary", v)], *also)
    assert hit_lines(report) == [], report
    assert "no canary found" in report
    assert status == 0, report

    # Kept by design, encrypted, in the fields the policy declares for them: found by
    # decryption there and nowhere else, and nowhere in the clear.
    kept = [ALICE.ha1(), DISPLAY_NAME]
    status, report = await run_cli(*audit, *[a for v in kept for a in ("--canary", v)], *also)
    assert status == 1, report  # a canary hit fails the audit, as it must
    assert sorted(hit_lines(report)) == sorted(
        [
            f"sip_account.ha1_md5 (encrypted, 1 record): {ALICE.ha1()!r} as utf-8",
            f"sip_account.display_name (encrypted, 1 record): {DISPLAY_NAME!r} as utf-8",
        ]
    ), report
    status, report = await run_cli(*audit, *[a for v in kept for a in ("--clear-canary", v)], *also)
    assert hit_lines(report) == [], report
    assert status == 0, report
