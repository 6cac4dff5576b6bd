"""10,000 mock phones against one `softrelay serve` process, the phones in another.

    .venv/bin/python bench/simulate.py [--phones 10000] [--rates 25,50,100,150,200,300]
        [--step 8] [--out bench/results/simulate.json]

`serve` runs as `make run` starts it (uvloop, SQLite in a fresh temporary directory, the
embedded APNs and FCM stand-ins), from a configuration with one PBX and no per-IP
connection limit. This process (uvloop too) plays the PBX and the phones with the
shipped mock parties (`mockphone/`): 45% iOS, 35% Android, 20% desktop, all over TCP,
each phone from its own loopback address (127.1.x.y). The phones receive their pushes
through the stand-ins' delivery feed, as `softrelay simulate` does across processes.
Both processes raise their soft `RLIMIT_NOFILE` to the hard limit (20,000 here).

1. **Held:** every phone registers through the PBX (digest); then 90% of the mobile
   phones go to sleep (their flows close; the PBX keeps their bindings). A REGISTER
   answered 503 by the relay's overload guard is retried after 1-5 s. Reported: the
   phones registered, the flows the relay holds, registrations per second, and the
   relay's VmRSS (`/proc/<pid>/status`) before the first phone and after the last, per
   phone.
2. **Load:** the call rate steps up (`--rates`, calls per second, each for `--step`
   seconds, arrivals evenly spread): 80% from the PBX to a random idle phone (most are
   asleep: parked, pushed, woken, delivered; a woken phone goes back to sleep after its
   call), 20% from an awake phone to the PBX. A woken phone re-registers at once (no
   simulated wake delay), answers at once and the caller hangs up at once, so what is
   measured is the relay, its push path and the stand-ins, not users. A step's success
   rate is its connected calls over its attempted ones; calls still under way at the
   step's end are waited for (the PBX rings for at most 10 s). Stepping stops at the
   first step under 99.9%.

Printed and written to `--out` (JSON): phones held, memory per phone at the relay,
calls per second handled (the highest step at or above 99.9%, and the connected calls
per second it achieved), wake latency p50/p99 per step (INVITE to the woken phone's
180), and the load where the success rate first drops below 99.9%. The machine is
shared: other engineers' runs compete for its 2 cores, and the mock parties need about
as much CPU as the relay, so the figures are a lower bound of the relay alone.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import random
import re
import resource
import secrets
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (
    Processes,
    Softrelay,
    cpu_seconds,
    raise_nofile,
    start_softrelay,
    status_kib,
    write_result,
)
from mockphone.delays import Pace
from mockphone.pbx import CallResult, MockPbx
from mockphone.phone import Kind, MockPhone, PhoneSpec, State
from mockphone.pushes import PushInbox
from mockphone.simulate import latency_summary
from mockphone.sip import RelayAddress, Transport

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "simulate.json"
SERIAL = "bench-0001"
DOMAIN = "relay.test"
TARGET = 0.999
SETUP_CONCURRENCY = 200
RING_TIMEOUT = 10.0
STOP_TIMEOUT = 60.0  # s for serve to end after SIGTERM: 10,000 phones' flows to close


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def source(i: int) -> str:
    return f"127.{1 + i // 62_500}.{i // 250 % 250}.{1 + i % 250}"


@dataclass
class Server:
    """`softrelay serve` as the harness started it, and the secret of its one PBX."""

    serve: Softrelay
    procs: Processes
    secret: str = field(repr=False)

    @property
    def proc(self) -> asyncio.subprocess.Process:
        return self.serve.proc

    @property
    def http_url(self) -> str:
        return self.serve.http_url

    @property
    def sip_port(self) -> int:
        return self.serve.ports["tcp"]  # the phones and the PBX use TCP

    async def stop(self) -> int:
        return await self.serve.stop(self.procs, STOP_TIMEOUT)

    async def flows(self, session: aiohttp.ClientSession) -> int:
        async with session.get(self.http_url + "/metrics") as response:
            text = await response.text()
        return sum(
            int(float(m.group(1)))
            for m in re.finditer(r"(?m)^softrelay_sip_flows\{[^}]*\} ([0-9.e+]+)$", text)
        )


async def start_server(procs: Processes, work: Path) -> Server:
    secret = secrets.token_urlsafe(24)
    fd = os.open(work / "pbx.secret", os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    (work / "softrelay.toml").write_text(
        "[logging]\nconsole = false\n"
        f'[sip]\ndomain = "{DOMAIN}"\n'
        "[sip.limits]\nmax_connections_per_ip = 0\n"
        f'[[sip.pbx]]\nserial = "{SERIAL}"\nsecret = "file:{work / "pbx.secret"}"\n',
        encoding="utf-8",
    )
    serve = await start_softrelay(procs, work, work / "softrelay.toml")
    return Server(serve, procs, secret)


@dataclass
class Step:
    rate: float
    seconds: float
    attempted: int = 0
    connected: int = 0
    woken: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    wakes: list[float] = field(default_factory=list)
    wall: float = 0.0
    relay_cpu: float = 0.0
    mock_cpu: float = 0.0  # this process: the PBX and the phones

    @property
    def success(self) -> float:
        return self.connected / self.attempted if self.attempted else 1.0

    def summary(self) -> dict[str, Any]:
        wake = latency_summary(self.wakes)
        return {
            "rate": self.rate,
            "seconds": self.seconds,
            "attempted": self.attempted,
            "connected": self.connected,
            "success": round(self.success, 5),
            "connected_per_second": round(self.connected / self.wall, 1) if self.wall else 0,
            "woken": self.woken,
            "wake_p50_ms": None if wake["p50"] is None else round(float(wake["p50"]) * 1000, 1),
            "wake_p99_ms": None if wake["p99"] is None else round(float(wake["p99"]) * 1000, 1),
            "failed": dict(self.failed),
            "relay_cpu_share": round(self.relay_cpu / self.wall, 2) if self.wall else 0,
            "mock_cpu_share": round(self.mock_cpu / self.wall, 2) if self.wall else 0,
        }


class Bench:
    def __init__(self, server: Server, n: int, seed: int) -> None:
        self.server = server
        self.n = n
        self.rng = random.Random(seed)  # load draws, no secrets
        self.pace = Pace(math.inf, self.rng)
        self.address = RelayAddress("127.0.0.1", server.sip_port, server.http_url)
        self.phones: list[MockPhone] = []
        self.busy: set[int] = set()
        self.pbx: MockPbx | None = None
        self.inbox: PushInbox | None = None

    async def hold(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        self.inbox = await PushInbox.from_feed(self.server.http_url, session)
        self.pbx = await MockPbx.connect(
            self.address,
            serial=SERIAL,
            secret=self.server.secret,
            domain=DOMAIN,
            users={},
            ring_timeout=RING_TIMEOUT,
        )
        pid = self.server.proc.pid
        rss_before = status_kib(pid, "VmRSS")
        kinds = [Kind.IOS] * 45 + [Kind.ANDROID] * 35 + [Kind.DESKTOP] * 20
        for i in range(self.n):
            kind = kinds[i % len(kinds)]
            user = f"{kind.value}{i}"
            password = secrets.token_urlsafe(12)
            self.pbx.add_user(user, password)
            spec = PhoneSpec(user, password, kind, Transport.TCP, keepalive=0, local_host=source(i))
            self.phones.append(
                MockPhone(
                    spec,
                    self.address,
                    serial=SERIAL,
                    domain=DOMAIN,
                    inbox=self.inbox,
                    pace=self.pace,
                )
            )
        gate = asyncio.Semaphore(SETUP_CONCURRENCY)
        failed: Counter[str] = Counter()
        retried = [0]

        async def start(phone: MockPhone) -> None:
            async with gate:
                status = await phone.start()
                for _ in range(5):  # 503: the relay's overload guard; retry as apps do
                    if status != 503:
                        break
                    retried[0] += 1
                    await asyncio.sleep(self.rng.uniform(1.0, 5.0))
                    status = await phone.wake()
                if status != 200:
                    failed[str(status)] += 1
                elif phone.spec.kind.pushes and self.rng.random() < 0.9:
                    await phone.sleep()

        started = time.monotonic()
        await asyncio.gather(*(start(p) for p in self.phones))
        took = time.monotonic() - started
        await asyncio.sleep(1.0)  # the relay closes the sleeping phones' flows
        rss_after = status_kib(pid, "VmRSS")
        registered = sum(1 for p in self.phones if p.last_register == 200)
        asleep = sum(1 for p in self.phones if p.state is State.ASLEEP)
        return {
            "phones": self.n,
            "registered": registered,
            "register_failed": dict(failed),
            "register_retried_after_503": retried[0],
            "asleep": asleep,
            "awake_flows_at_relay": await self.server.flows(session),
            "registrations_per_second": round(registered / took, 1),
            "relay_rss_before_kib": rss_before,
            "relay_rss_after_kib": rss_after,
            "relay_bytes_per_phone": round((rss_after - rss_before) * 1024 / max(1, registered)),
        }

    async def step(self, rate: float, seconds: float) -> Step:
        step = Step(rate, seconds)
        tasks: set[asyncio.Task[None]] = set()
        pid = self.server.proc.pid
        cpu0 = cpu_seconds([pid])
        own0 = _own_cpu()
        started = time.monotonic()
        count = int(rate * seconds)
        for k in range(count):
            due = started + k / rate
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            task = asyncio.create_task(self._one(step))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=RING_TIMEOUT + 20)
        for task in tasks:
            task.cancel()
        step.wall = time.monotonic() - started
        step.relay_cpu = cpu_seconds([pid]) - cpu0
        step.mock_cpu = _own_cpu() - own0
        return step

    async def _one(self, step: Step) -> None:
        assert self.pbx is not None
        outgoing = self.rng.random() < 0.2
        idle = [
            i
            for i in self.rng.sample(range(self.n), 40)
            if i not in self.busy
            and self.phones[i].last_register == 200
            and (not outgoing or self.phones[i].state is State.AWAKE)
        ]
        if not idle:
            return  # nobody to call this time: not an attempt
        i = idle[0]
        phone = self.phones[i]
        self.busy.add(i)
        step.attempted += 1
        try:
            if outgoing:
                call = await phone.call("echo")
                ok, reason = call.connected, f"{call.status} {call.reason}"
            else:
                result: CallResult = await self.pbx.call(phone.spec.user)
                ok, reason = result.connected, f"{result.status} {result.reason}"
                if result.woken:
                    step.woken += 1
                    if result.wake_seconds is not None and ok:
                        step.wakes.append(result.wake_seconds)
                    if phone.state is State.AWAKE:
                        await phone.sleep()
            if ok:
                step.connected += 1
            else:
                step.failed[reason] += 1
        except Exception as exc:  # a failure of the mock side counts as a failed call
            step.failed[type(exc).__name__] += 1
        finally:
            self.busy.discard(i)

    async def close(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.phones), return_exceptions=True)
        if self.pbx is not None:
            await self.pbx.close()
        if self.inbox is not None:
            await self.inbox.close()


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    nofile, _ = raise_nofile()  # to the hard limit
    procs = Processes()
    with tempfile.TemporaryDirectory(prefix="softrelay-bench-simulate-") as tmp:
        server = await start_server(procs, Path(tmp))
        try:
            async with aiohttp.ClientSession() as session:
                b = Bench(server, args.phones, args.seed)
                try:
                    held = await b.hold(session)
                    print(
                        f"held {held['registered']:,} phones ({held['asleep']:,} asleep, "
                        f"{held['awake_flows_at_relay']:,} flows at the relay), "
                        f"{held['registrations_per_second']:,} registrations/s, "
                        f"{held['relay_bytes_per_phone']:,} B per phone at the relay",
                        flush=True,
                    )
                    steps: list[Step] = []
                    for rate in args.rates:
                        step = await b.step(rate, args.step)
                        steps.append(step)
                        s = step.summary()
                        print(
                            f"{rate:>6g} calls/s: {s['connected']}/{s['attempted']} "
                            f"({s['success']:.2%}), {s['connected_per_second']} connected/s, "
                            f"wake p50/p99 {s['wake_p50_ms']}/{s['wake_p99_ms']} ms, "
                            f"CPU relay {s['relay_cpu_share']:.0%} mock {s['mock_cpu_share']:.0%}, "
                            f"failed {s['failed']}",
                            flush=True,
                        )
                        if step.success < TARGET:
                            break
                finally:
                    await b.close()
        finally:
            status = await server.stop()
            await procs.close()
    passing = [s for s in steps if s.success >= TARGET]
    best = passing[-1] if passing else None
    first_drop = next((s for s in steps if s.success < TARGET), None)
    return {
        "benchmark": "simulate",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "nofile_soft": nofile,
            "shared": "other engineers' runs share the machine",
        },
        "held": held,
        "steps": [s.summary() for s in steps],
        "calls_per_second_handled": None if best is None else best.summary(),
        "wake_p99_ms_at_handled": None if best is None else best.summary()["wake_p99_ms"],
        "first_below_99_9": None if first_drop is None else first_drop.summary(),
        "serve_exit": status,
    }


def _rates(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phones", type=int, default=10_000)
    parser.add_argument("--rates", type=_rates, default=[25, 50, 100, 150, 200, 300])
    parser.add_argument("--step", type=float, default=8.0, help="seconds per rate")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(bench(args))
    write_result(args.out, result)
    held = result["held"]
    handled = result["calls_per_second_handled"]
    drop = result["first_below_99_9"]
    print()
    print(f"phones held                 {held['registered']:,} of {held['phones']:,}")
    print(f"memory per phone at relay   {held['relay_bytes_per_phone']:,} B (VmRSS delta)")
    if handled is not None:
        print(
            f"calls per second handled    {handled['rate']:g} offered, "
            f"{handled['connected_per_second']} connected/s at {handled['success']:.2%}"
        )
        print(f"wake p99                    {handled['wake_p99_ms']} ms")
    else:
        print("calls per second handled    none at 99.9%")
    if drop is not None:
        print(f"success first below 99.9%   at {drop['rate']:g} calls/s ({drop['success']:.2%})")
    else:
        print("success first below 99.9%   not reached up to the highest rate")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
