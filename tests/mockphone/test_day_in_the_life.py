"""A day in the life of 50 phones, with the pytest plugin's fixtures.

iOS, Android and desktop phones over TCP, WebSocket and (desktops) UDP register
through one PBX, each with its own password and push token; they are used and ping
usage; most mobile phones go to sleep. Every phone then gets a call (the sleeping ones
are woken by their push) or places one, while a few crash, some of their users having
opted in to crash reports. Afterwards, with the relay stopped and its store closed:
the billing report counts every install, only the opted-in crashes were stored and
those scrubbed, `softrelay audit` passes and `softrelay audit --canary` finds none of
the phones' passwords, push tokens or callers' names anywhere under the data directory.

No time passes on purpose: the plugin's `phone_pace` wakes phones at once.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

import aiohttp
import orjson

from mockphone.pbx import CallResult, MockPbx
from mockphone.phone import Kind, MockPhone, OutgoingCall, State
from mockphone.simulate import send_crash
from softrelay.embedded import TENANT, EmbeddedRelay
from softrelay.pytest_plugin import SERIAL, PhoneFactory
from tests.peers import run_cli
from usage.client import UsageClient
from usage.period import period_of

# kind, transport, how many: 18 iOS, 17 Android, 15 desktops. A mobile app on UDP
# could not be told asleep (its flow looks alive), so UDP is for desktops.
FLEET = [
    ("ios", "tcp", 10),
    ("ios", "ws", 8),
    ("android", "tcp", 10),
    ("android", "ws", 7),
    ("desktop", "udp", 6),
    ("desktop", "tcp", 5),
    ("desktop", "ws", 4),
]
CRASHES = 10  # every fifth phone crashes; every other crashing user opted in


async def _ping_usage(softrelay: EmbeddedRelay, phones: list[MockPhone], state: Path) -> list[int]:
    async def ping(session: aiohttp.ClientSession, phone: MockPhone) -> int:
        client = await asyncio.to_thread(
            UsageClient,
            state / f"{phone.spec.user}.json",
            tenant=TENANT,
            tenant_key=softrelay.tenant_key,
            platform=phone.spec.kind.platform,
            app_version="1.0.0",
        )
        status = await client.used(session, softrelay.address.http_url, time.time())
        return status or 0

    async with aiohttp.ClientSession() as session:
        return await asyncio.gather(*(ping(session, p) for p in phones))


async def test_fifty_phones_live_a_day_and_leave_nothing_behind(
    softrelay: EmbeddedRelay, mock_pbx: MockPbx, mock_phones: PhoneFactory, tmp_path: Path
) -> None:
    phones: list[MockPhone] = []
    for kind, transport, count in FLEET:
        phones += await mock_phones(count, kind=kind, transport=transport)
    assert len(phones) == 50
    assert len({p.spec.password for p in phones}) == 50, "each phone has its own password"
    tokens = [p.token for p in phones if p.token is not None]
    assert len(set(tokens)) == 35, "each iOS and Android phone has its own push token"

    # Every install is used once today and pings usage.
    statuses = await _ping_usage(softrelay, phones, tmp_path / "usage-state")
    assert statuses == [202] * 50

    # Two in three mobile phones go to the background.
    mobile = [p for p in phones if p.spec.kind is not Kind.DESKTOP]
    asleep = mobile[::3] + mobile[1::3]
    for phone in asleep:
        await phone.sleep()
    awake = [p for p in phones if p.state is State.AWAKE]
    assert len(asleep) == 24
    assert len(awake) == 26

    # The PBX calls every sleeping phone and every desktop, each from a caller of its
    # own; the awake mobile phones call out. All at once.
    callers = {p.spec.user: f"Caller {secrets.token_hex(5)}" for p in phones}
    desktops = [p for p in awake if p.spec.kind is Kind.DESKTOP]
    outgoing = [p for p in awake if p.spec.kind is not Kind.DESKTOP]
    incoming = asleep + desktops
    results = await asyncio.gather(
        *(mock_pbx.call(p.spec.user, caller_name=callers[p.spec.user]) for p in incoming),
        *(p.call("echo") for p in outgoing),
    )
    to_phones: list[CallResult] = [r for r in results if isinstance(r, CallResult)]
    from_phones = [r for r in results if isinstance(r, OutgoingCall)]
    assert [r.user for r in to_phones if not r.connected] == [], to_phones
    assert [r for r in from_phones if not r.connected] == []
    assert len(from_phones) == 11
    woken = {r.user for r in to_phones if r.woken}
    assert woken == {p.spec.user for p in asleep}, "every call to a sleeping phone woke it"
    assert {r.push_status for r in to_phones if r.woken} == {"delivered"}
    assert all(p.counters.wakes == 1 for p in asleep)
    assert mock_pbx.counters.calls_in == 11

    # Some apps crash; only the reports of users who opted in may be kept, scrubbed.
    crashed = phones[::5]
    assert len(crashed) == CRASHES
    sent: dict[str, bool] = {}  # event id -> opted in
    for i, phone in enumerate(crashed):
        event_id = await asyncio.to_thread(
            send_crash,
            softrelay.dsn,
            phone.spec.kind,
            i % 2 == 0,
            message=(
                f"call from sip:{phone.spec.user}@{phone.domain} failed; "
                f"push token {phone.token or 'none'}"
            ),
            extra={"sip_password": phone.spec.password, "caller": callers[phone.spec.user]},
        )
        assert event_id is not None
        sent[event_id] = i % 2 == 0
    reports = await softrelay.store.find("crash_report")
    assert {str(r.fields["event_id"]) for r in reports} == {
        event_id.replace("-", "") for event_id, opted_in in sent.items() if opted_in
    }, "the opted-in reports were stored, the others were not"
    for report in reports:
        text = orjson.dumps(report.fields["event"]).decode()
        assert "sip:[sip-user]@" in text, text
        for phone in crashed:
            for secret in (phone.spec.password, phone.token, f"sip:{phone.spec.user}@"):
                assert secret is None or secret not in text, (secret, text)

    # The day ends: phones and PBX go, the relay stops and its store is closed.
    for phone in phones:
        await phone.stop()
    await mock_pbx.close()
    await softrelay.stop()

    config = ("--config", str(softrelay.config_file), "--data-dir", str(softrelay.data_dir))
    period = period_of(time.time())
    status, out = await run_cli("billing", "--month", period, "--format", "json", *config)
    assert status == 0, out
    billing = orjson.loads(out)
    assert billing["tenants"] == [
        {
            "tenant": TENANT,
            "active_installs": 50,
            "suppressed": False,
            "contract": None,
            "over_contract": False,
        }
    ], billing

    status, out = await run_cli("audit", *config)
    assert status == 0, out

    canaries = [p.spec.password for p in phones] + list(callers.values())
    # --canary=VALUE: a password or an FCM token may begin with "-". The push tokens are
    # stored, encrypted: in the clear nowhere.
    status, out = await run_cli(
        "audit",
        *config,
        *(f"--canary={canary}" for canary in canaries),
        *(f"--clear-canary={token}" for token in tokens),
    )
    assert status == 0, out
    assert "no canary found" in out
    # ...and the scan does read the stored data: the PBX serial is kept in plain.
    status, out = await run_cli("audit", *config, "--canary", SERIAL)
    assert status == 1, out
    assert repr(SERIAL) in out
