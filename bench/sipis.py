"""SIPIS mode against a real Kamailio registrar on this machine, in one process.

    .venv/bin/python bench/sipis.py [--quick] [--accounts 1000,10000] [--calls 50]
        [--out bench/results/sipis.json]

1. Registering on behalf (`sipis/registrar.py`, the engine `serve` runs): for each
   account count N, a Kamailio with N HA1-only subscribers starts; the engine (600 s
   Expires, the configured start spread and rate per registrar) is given all N
   accounts as at a start, and the run waits until every one is registered ("first
   start"); then the engine is closed and a new one started with the same accounts
   while Kamailio still holds their bindings ("restart"). Each round gives its wall
   time, the CPU seconds of this process (getrusage: user + system) per REGISTER sent
   and per account, and Kamailio's answers by outcome (`softrelay_sipis_registers`:
   a 5xx is `server_error`). A refresh is the same exchange as a registration here
   (Kamailio challenges each REGISTER anew: 401, then 200), so the accounts one core
   keeps registered at a 600 s refresh (85%: every 510 s) is 510 s / the CPU per
   account, an upper bound derived from the measured cost, not a 10-minute run.
2. INVITE to push and INVITE to delivery, a SIPIS call against a relay-mode call in the
   same run (`softrelay simulate`'s embedded world: softrelay, the push stand-ins,
   Kamailio as the SIPIS apps' provider, a mock PBX for the relay-mode phone): one call
   at a time, alternating, to a sleeping app that reconnects at once when pushed. t0 is
   the caller sending its INVITE; "push" is the stand-in's delivery reaching the app's
   inbox; "delivery" the app answering the delivered INVITE with 180. The SIPIS call's
   INVITE crosses Kamailio (caller -> Kamailio -> softrelay); the relay-mode call's
   comes straight from the PBX's link; the app's reconnect is TCP plus one REGISTER
   (Bearer for SIPIS; digest through the PBX for relay mode).

`--quick`: 1,000 accounts and 20 calls of each kind.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import platform
import resource
import secrets
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvloop
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import nearest_rank, write_result
from mockphone.delays import Delay
from mockphone.pbx import MockPbx
from mockphone.phone import Kind, MockPhone, PhoneSpec
from mockphone.pushes import Push
from mockphone.simulate import SimSettings
from mockphone.sipis import ProviderCaller, SipisPhone
from privacy.clock import SystemClock
from sipis.account import Account, Credential, SipTransport
from sipis.account import Push as AccountPush
from sipis.registrar import open_registrations
from sipis.settings import SipisSettings
from softrelay.simulate import embedded_world
from tests.kamailio import DOMAIN, Kamailio, Subscriber

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "sipis.json"
ROUND_LIMIT = 600.0  # s for one registration round
NOW = Delay.fixed(0)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _sample(registry: CollectorRegistry, name: str, labels: dict[str, str]) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def _outcomes(registry: CollectorRegistry) -> dict[str, int]:
    found: dict[str, int] = {}
    for metric in registry.collect():
        if metric.name != "softrelay_sipis_registers":
            continue
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.value:
                found[sample.labels["outcome"]] = int(sample.value)
    return found


async def _round(accounts: list[Account], settings: SipisSettings) -> dict[str, Any]:
    """All accounts added as at a start; until every one is registered (or failing)."""
    registry = CollectorRegistry()
    n = len(accounts)
    async with open_registrations(settings, SystemClock(), registry) as registrations:
        cpu, started = _cpu(), time.monotonic()
        for account in accounts:
            registrations.add(account, spread=True)
        deadline = started + ROUND_LIMIT
        registered = 0.0
        while time.monotonic() < deadline:
            registered = _sample(registry, "softrelay_sipis_accounts", {"state": "registered"})
            failing = _sample(registry, "softrelay_sipis_accounts", {"state": "failing"})
            if registered + failing >= n:
                break
            await asyncio.sleep(0.1)  # a bench's poll of its own gauge, not a test's wait
        wall = time.monotonic() - started
        used = _cpu() - cpu
        outcomes = _outcomes(registry)
    sent = sum(outcomes.values())
    return {
        "accounts": n,
        "registered": int(registered),
        "wall_seconds": round(wall, 2),
        "cpu_seconds": round(used, 3),
        "registers_sent": sent,
        "cpu_ms_per_register": round(1000 * used / sent, 4) if sent else None,
        "cpu_ms_per_account": round(1000 * used / n, 4),
        "answers": outcomes,
        "server_errors": outcomes.get("server_error", 0),
    }


async def registrations(n: int, spread: int, rate: int) -> dict[str, Any]:
    subscribers = [Subscriber(f"u{i}", secrets.token_hex(8)) for i in range(n)]
    kamailio = Kamailio(subscribers)
    port = await asyncio.to_thread(kamailio.start)
    try:
        accounts = [
            Account(
                account_id=f"bench{i}",
                registrar_host="127.0.0.1",
                registrar_port=port,
                transport=SipTransport.UDP,
                domain=DOMAIN,
                user=sub.user,
                credential=Credential(sub.user, DOMAIN, ha1_md5=sub.ha1()),
                push=AccountPush("apns", secrets.token_hex(32), "com.example.softphone"),
            )
            for i, sub in enumerate(subscribers)
        ]
        settings = SipisSettings(
            enabled=True, expires=600, start_spread=spread, rate_per_registrar=rate
        )
        first = await _round(accounts, settings)
        restart = await _round(accounts, settings)
    finally:
        await asyncio.to_thread(kamailio.close)
    per_account = restart["cpu_ms_per_account"] / 1000
    refresh_every = 600 * settings.refresh
    return {
        "accounts": n,
        "start_spread_s": spread,
        "rate_per_registrar": rate,
        "first_start": first,
        "restart": restart,
        # One core's worth of refreshes, every 510 s, at the measured cost per account.
        "accounts_per_core_at_600s": int(refresh_every / per_account) if per_account else None,
    }


async def latencies(calls: int) -> dict[str, Any]:
    settings = SimSettings(phones=2, mix={Kind.IOS: 1, Kind.SIPIS: 1})
    world = await embedded_world(settings, None)
    pushed: dict[str, float] = {}
    delivered: dict[str, float] = {}

    def on_push(token: str, _: Push) -> None:
        pushed.setdefault(token, time.monotonic())

    world.inbox.on_push.append(on_push)
    provider = world.provider
    assert provider is not None
    (account,) = provider.accounts
    serial, secret = next(iter(world.pbx_secrets.items()))
    pbx = await MockPbx.connect(
        world.address, serial=serial, secret=secret, domain=world.domain, users={}
    )
    relay_phone = MockPhone(
        PhoneSpec("ios1", "pw-" + secrets.token_hex(8), Kind.IOS, wake_delay=NOW, keepalive=0),
        world.address,
        serial=serial,
        domain=world.domain,
        inbox=world.inbox,
    )
    pbx.add_user("ios1", relay_phone.spec.password)
    app = SipisPhone(
        PhoneSpec(account.user, account.password, Kind.SIPIS, wake_delay=NOW, keepalive=0),
        world.address,
        account=account,
        relay_domain=world.domain,
        session=world.session,
        inbox=world.inbox,
    )

    def on_wake(phone: MockPhone, _: float) -> None:
        delivered.setdefault(phone.token or "", time.monotonic())

    relay_phone.on_wake = app.on_wake = on_wake
    samples: dict[str, dict[str, list[float]]] = {
        kind: {"push": [], "delivery": []} for kind in ("sipis", "relay")
    }
    failed: dict[str, int] = {"sipis": 0, "relay": 0}
    try:
        assert await relay_phone.start() == 200
        await relay_phone.sleep()
        assert await app.start() == 200
        async with ProviderCaller.open(provider.host, provider.port, provider.domain) as caller:
            for _ in range(calls):
                for kind, phone in (("sipis", app), ("relay", relay_phone)):
                    pushed.clear()
                    delivered.clear()
                    t0 = time.monotonic()
                    if kind == "sipis":
                        result = await caller.call(account.user)
                    else:
                        result = await pbx.call("ios1")
                    token = phone.token or ""
                    if not result.connected or token not in pushed or token not in delivered:
                        failed[kind] += 1
                    else:
                        samples[kind]["push"].append(pushed[token] - t0)
                        samples[kind]["delivery"].append(delivered[token] - t0)
                    await phone.sleep()
    finally:
        await app.stop()
        await relay_phone.stop()
        await pbx.close()
        await world.close()
    return {
        kind: {
            "calls": calls,
            "failed": failed[kind],
            "invite_to_push_ms": _ms(values["push"]),
            "invite_to_delivery_ms": _ms(values["delivery"]),
        }
        for kind, values in samples.items()
    }


def _ms(values: list[float]) -> dict[str, float | None]:
    ordered = sorted(values)

    def at(q: float) -> float | None:
        value = nearest_rank(ordered, q)
        return None if math.isnan(value) else round(1000 * value, 2)

    return {"p50": at(0.5), "p99": at(0.99), "n": len(ordered)}


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    counts = [1000] if args.quick else [int(n) for n in args.accounts.split(",")]
    calls = 20 if args.quick else args.calls
    result: dict[str, Any] = {
        "bench": "sipis",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "cpus": _cpus()},
        "registrations": [],
    }
    for n in counts:
        spread = max(5, n // 200)  # 1,000: 5 s; 10,000: 50 s
        # The rate counts every REGISTER sent: two per account (the 401, then the 200).
        rate = max(200, 2 * n // spread)
        row = await registrations(n, spread, rate)
        result["registrations"].append(row)
        print(_registration_line(row), flush=True)
    result["latency"] = await latencies(calls)
    for kind, row in result["latency"].items():
        print(
            f"{kind:5}  INVITE->push p50 {row['invite_to_push_ms']['p50']} ms "
            f"p99 {row['invite_to_push_ms']['p99']} ms | INVITE->delivery p50 "
            f"{row['invite_to_delivery_ms']['p50']} ms p99 {row['invite_to_delivery_ms']['p99']}"
            f" ms ({row['calls'] - row['failed']} of {row['calls']} calls)",
            flush=True,
        )
    return result


def _registration_line(row: dict[str, Any]) -> str:
    first, restart = row["first_start"], row["restart"]
    return (
        f"{row['accounts']:>6} accounts (spread {row['start_spread_s']} s, rate "
        f"{row['rate_per_registrar']}/s): first start {first['wall_seconds']} s, restart "
        f"{restart['wall_seconds']} s ({restart['registered']} registered, "
        f"{restart['server_errors']} 5xx); CPU {restart['cpu_ms_per_register']} ms/REGISTER, "
        f"{restart['cpu_ms_per_account']} ms/account; ~{row['accounts_per_core_at_600s']} "
        "accounts per core at a 600 s refresh"
    )


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 accounts, 20 calls each")
    parser.add_argument("--accounts", default="1000,10000", help="account counts, e.g. 1000")
    parser.add_argument("--calls", type=int, default=50, help="calls of each kind")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(bench(args))
    write_result(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
