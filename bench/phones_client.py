"""One client process of `bench/phones.py`: a mock PBX and its share of the phones.

    .venv/bin/python bench/phones_client.py '<ClientSpec as JSON>'

It reads one command per line on stdin and answers each with one JSON line on stdout
(`bench/phones.py` drives it; nothing else should):

- `{"cmd": "grow", "to": N}`: hold N connected phones (the first time also the wake pool:
  phones that register, then sleep). Each phone has a loopback address of its own
  (`ClientSpec.first`), so the relay's per-address limits count phones, not processes.
- `{"cmd": "window", "seconds": S, "rate": R}`: S seconds of keep-alives, with calls at R
  per second when R > 0; answers what the window counted (`Window`).
- `{"cmd": "stop"}`: answers, then ends the process at once (`os._exit`): an orderly
  close of ~12,000 phones costs minutes, and the kernel closes their sockets at exit.

Keep-alives: every awake phone sends an RFC 5626 CRLF ping (double CRLF) every
`keepalive` seconds and waits for the single-CRLF pong (`SipLink.ping`), from a random
phase, so the pings of a process are spread evenly over the period. One scheduler per
process sends them (a heap of due times), not a task per phone: the count and the pong
latency of every ping are then known exactly. A ping left unanswered closes the flow, as
`MockPhone` does; the phone then connects and registers again (its redial).

Calls (`window` with a rate): 50% the PBX calls a connected phone (INVITE to 200: the
set-up), 30% the PBX calls a phone of the wake pool (parked at the relay, pushed through
the stand-ins of the worker that took the INVITE, the phone reconnects and registers at
once and answers: INVITE to the woken phone's 180 is the wake latency; it sleeps again
after), 20% a connected phone calls the PBX. Everyone answers and hangs up at once.

Pushes: with `serve --workers N`, each worker runs its own push stand-ins and serves
their delivery feed on the shared HTTP port, where a connection lands on a worker the
kernel picks. The worker that pushes is the one the sleeping phone last registered on
(the PBX's INVITE follows the phone's Path token to that node, which finds the flow gone,
parks the call and pushes), so every client needs a feed of every worker. It opens
`FEEDS_PER_ROUND` feeds per worker, then for each worker a probe phone registers until
its flow is on that worker (the node is the suffix of its Path token), sleeps, and the
PBX calls it: the feeds that carry the probe's push are that worker's. Rounds go on until
every worker has a feed; one per worker is kept, the others closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import math
import os
import random
import re
import resource
import ssl
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import raise_nofile, status_kib
from mockphone.delays import Pace
from mockphone.pbx import MockPbx
from mockphone.phone import NO_DELAY, Kind, MockPhone, PhoneSpec, State
from mockphone.pushes import FEED_PATH, PushInbox, push_of
from mockphone.sip import LinkClosed, RelayAddress, Transport

RING_TIMEOUT = 10.0  # s the PBX rings before it cancels
PING_TIMEOUT = 10.0  # s for a pong
SETUP_CONCURRENCY = 48  # registrations in flight per client (--setup-concurrency)
REGISTER_TRIES = 5  # a 503 (the overload guard) or a failed connect is tried again
FEEDS_PER_ROUND = 4  # per worker
FEED_ROUNDS = 4
PROBE_TRIES = 60  # registrations until a probe's flow is on the worker wanted
PROBE_WAIT = 3.0  # s for a probe's push to show on a feed
SLEEPER_BASE = 150_000  # address index of the first wake-pool phone (127.3.x.y on)
KINDS = [Kind.IOS] * 45 + [Kind.ANDROID] * 35 + [Kind.DESKTOP] * 20
MIX = (("in", 0.5), ("wake", 0.3), ("out", 0.2))


def source(i: int) -> str:
    """Loopback address number `i` (127.1.0.1 on, 250 per /24, 62,500 per /16)."""
    return f"127.{1 + i // 62_500}.{i // 250 % 250}.{1 + i % 250}"


@dataclass(frozen=True, slots=True)
class ClientSpec:
    index: int
    host: str
    tcp_port: int
    tls_port: int
    http_url: str
    ca_file: str
    serial: str
    secret_file: str
    domain: str
    first: int  # address index of its first connected phone
    sleepers: int  # phones of the wake pool
    tls_share: float  # of the phones, the share on TLS (the rest on TCP)
    keepalive: float
    seed: int
    workers: int
    node_base: str  # [cluster] node_id: worker i is <node_base>-<i>
    setup_concurrency: int = SETUP_CONCURRENCY


@dataclass(slots=True)
class CallCount:
    attempted: int = 0
    connected: int = 0
    failed: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class Window:
    """What one window counted in this process."""

    pings: int = 0
    pongs: int = 0
    ping_failures: Counter[str] = field(default_factory=Counter)
    pong_ms: list[float] = field(default_factory=list)
    calls: dict[str, CallCount] = field(default_factory=dict)
    wake_ms: list[float] = field(default_factory=list)
    setup_ms: list[float] = field(default_factory=list)


class KeepAlives:
    """Pings every awake phone every `every` seconds (module docstring)."""

    def __init__(self, every: float, rng: random.Random) -> None:
        self.every = every
        self.rng = rng
        self._due: list[tuple[float, int, MockPhone]] = []
        self._seq = 0
        self.window = Window()
        self._tasks: set[asyncio.Task[None]] = set()

    def add(self, phone: MockPhone) -> None:
        self._seq += 1
        heapq.heappush(
            self._due, (time.monotonic() + self.rng.uniform(0, self.every), self._seq, phone)
        )

    async def run(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            while self._due and self._due[0][0] <= now:
                due, seq, phone = heapq.heappop(self._due)
                heapq.heappush(self._due, (due + self.every, seq, phone))
                link = phone.link
                if phone.state is State.AWAKE and link is not None and not link.closed.is_set():
                    task = asyncio.create_task(self._ping(phone))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)

    async def _ping(self, phone: MockPhone) -> None:
        link = phone.link
        if link is None:
            return
        window = self.window
        window.pings += 1
        started = time.monotonic()
        try:
            await link.ping(PING_TIMEOUT)
        except (LinkClosed, TimeoutError, OSError) as exc:
            window.ping_failures[type(exc).__name__] += 1
            await link.close()  # as MockPhone's own keep-alive: the redial takes over
            return
        window.pongs += 1
        window.pong_ms.append((time.monotonic() - started) * 1000)


class Client:
    def __init__(self, spec: ClientSpec) -> None:
        self.spec = spec
        self.rng = random.Random(spec.seed)  # load draws, no secrets
        # Real time, so that a woken phone refused with 503 waits out its Retry-After as
        # an app does; the phones' own delays are none (a woken phone registers at once).
        self.pace = Pace(1.0, self.rng)
        context = ssl.create_default_context(cafile=spec.ca_file)
        self.relay = RelayAddress(
            spec.host, spec.tcp_port, spec.http_url, tls_port=spec.tls_port, tls_context=context
        )
        self.secret = Path(spec.secret_file).read_text(encoding="utf-8").strip()
        self.inbox = PushInbox()
        self.keepalives = KeepAlives(spec.keepalive, self.rng)
        self.phones: list[MockPhone] = []
        self.sleepers: list[MockPhone] = []
        self.busy: set[int] = set()  # id() of phones in a call
        self.pbx: MockPbx | None = None
        self.session: aiohttp.ClientSession | None = None
        self.feeds: dict[int, tuple[aiohttp.ClientWebSocketResponse, asyncio.Task[None]]] = {}
        self.feed_hits: dict[str, set[int]] = {}  # probe token -> feeds its push came on
        self.feed_hit = asyncio.Event()  # a probe's push came on a feed
        self.probes = 0
        self.register_failed: Counter[str] = Counter()
        self.retried = 0
        self._ticker: asyncio.Task[None] | None = None
        # This process's full collections (ms) in the current window: a stall of the
        # mock side is not the relay's.
        self.gc2_ms: list[float] = []
        self._gc_started = 0.0
        gc.callbacks.append(self._gc)
        self._users = 0

    # --- set-up ---------------------------------------------------------------------

    async def open(self) -> dict[str, Any]:
        self.session = aiohttp.ClientSession()
        self.pbx = await MockPbx.connect(
            self.relay,
            serial=self.spec.serial,
            secret=self.secret,
            domain=self.spec.domain,
            users={},
            ring_timeout=RING_TIMEOUT,
        )
        feeds = await self._find_feeds()
        self._ticker = asyncio.create_task(self.keepalives.run())
        return {"feeds": feeds, "probes": self.probes}

    async def _find_feeds(self) -> dict[str, int]:
        """One delivery feed per worker (module docstring): the feed number per node."""
        nodes = [f"{self.spec.node_base}-{i}" for i in range(self.spec.workers)]
        found: dict[str, set[int]] = {}
        for _ in range(FEED_ROUNDS):
            for _ in range(FEEDS_PER_ROUND * len(nodes)):
                await self._open_feed(len(self.feeds))
            for node in nodes:
                if node not in found:
                    hits = await self._probe(node)
                    if hits:
                        found[node] = hits
            if len(found) == len(nodes):
                break
        else:
            missing = sorted(set(nodes) - set(found))
            raise RuntimeError(f"no delivery feed reached worker(s) {missing}")
        keep = {node: min(hits) for node, hits in found.items()}
        for number in [n for n in self.feeds if n not in keep.values()]:
            ws, task = self.feeds.pop(number)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await ws.close()
        return keep

    async def _probe(self, node: str) -> set[int]:
        """The feeds on which a push from worker `node` arrives: a probe phone registers
        until its flow is on `node` (the node is the suffix of its Path token), sleeps,
        and the PBX calls it; `node` parks the call and pushes."""
        assert self.pbx is not None
        probe = self._phone(
            f"probe{self.spec.index}x{self.probes}",
            Kind.IOS,
            Transport.TCP,
            source(SLEEPER_BASE - 1 - self.spec.index * 64 - self.probes),
        )
        self.probes += 1
        assert probe.token is not None
        try:
            status = await probe.start()
            for _ in range(PROBE_TRIES):  # each flow from a new port: the kernel's pick
                if status == 200 and self._node_of(probe.spec.user) == node:
                    break
                status = await probe.wake()
            else:
                return set()
            await probe.sleep()
            self.feed_hits[probe.token] = set()
            self.feed_hit.clear()
            call = asyncio.create_task(self.pbx.call(probe.spec.user))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.feed_hit.wait(), PROBE_WAIT)
            hits = self.feed_hits.pop(probe.token)
            if hits:
                await call  # the probe woke and answered
            else:
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await call
            return hits
        finally:
            await probe.stop()

    def _node_of(self, user: str) -> str:
        """The worker a phone's flow is on: the node its Path token names."""
        assert self.pbx is not None
        for binding in self.pbx.live_bindings(user):
            for path in binding.paths:
                if match := re.search(r";ft=([^;>]+)", path):
                    return match.group(1).rpartition(".")[2]
        return ""

    async def _open_feed(self, number: int) -> None:
        assert self.session is not None
        url = self.spec.http_url.replace("http", "ws", 1) + FEED_PATH
        ws = await asyncio.wait_for(self.session.ws_connect(url, autoping=True), 10)

        async def follow() -> None:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    item = orjson.loads(msg.data)
                    token = item["token"]
                    if token in self.feed_hits:
                        self.feed_hits[token].add(number)
                        self.feed_hit.set()
                    self.inbox.put(
                        token, push_of(item["service"], item["headers"], item["payload"])
                    )

        self.feeds[number] = (ws, asyncio.create_task(follow()))

    def _phone(self, user: str, kind: Kind, transport: Transport, host: str) -> MockPhone:
        assert self.pbx is not None
        password = f"pw-{self.rng.getrandbits(64):016x}"  # a bench's throwaway, never shown
        self.pbx.add_user(user, password)
        spec = PhoneSpec(
            user, password, kind, transport, wake_delay=NO_DELAY, keepalive=0, local_host=host
        )
        return MockPhone(
            spec,
            self.relay,
            serial=self.spec.serial,
            domain=self.spec.domain,
            inbox=self.inbox,
            pace=self.pace,
        )

    def _transport(self, i: int) -> Transport:
        return Transport.TLS if (i * 7919) % 100 < self.spec.tls_share * 100 else Transport.TCP

    async def grow(self, to: int) -> dict[str, Any]:
        started = time.monotonic()
        new: list[MockPhone] = []
        if not self.sleepers and self.spec.sleepers:
            for j in range(self.spec.sleepers):
                kind = Kind.IOS if j % 2 == 0 else Kind.ANDROID
                index = SLEEPER_BASE + self.spec.index * self.spec.sleepers + j
                phone = self._phone(
                    f"s{self.spec.index}x{j}", kind, self._transport(j), source(index)
                )
                self.sleepers.append(phone)
            new += self.sleepers
        while len(self.phones) < to:
            i = len(self.phones)
            kind = KINDS[i % len(KINDS)]
            phone = self._phone(
                f"p{self.spec.index}x{i}", kind, self._transport(i), source(self.spec.first + i)
            )
            self.phones.append(phone)
            new.append(phone)
        gate = asyncio.Semaphore(self.spec.setup_concurrency)
        sleepers = set(map(id, self.sleepers))

        async def start(phone: MockPhone) -> None:
            async with gate:
                status = await phone.start()
                for _ in range(REGISTER_TRIES):
                    if status == 200:
                        break
                    self.retried += 1
                    await asyncio.sleep(self.rng.uniform(1.0, 5.0))
                    status = await phone.wake()
                if status != 200:
                    self.register_failed[str(status)] += 1
                elif id(phone) in sleepers:
                    await phone.sleep()
                else:
                    self.keepalives.add(phone)

        await asyncio.gather(*(start(p) for p in new))
        return {
            "registered": sum(1 for p in self.phones if p.state is State.AWAKE),
            "asleep": sum(1 for p in self.sleepers if p.state is State.ASLEEP),
            "tls": sum(1 for p in self.phones if p.spec.transport is Transport.TLS),
            "register_failed": dict(self.register_failed),
            "retried": self.retried,
            "seconds": round(time.monotonic() - started, 1),
        }

    # --- a window -------------------------------------------------------------------

    def _gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif info["generation"] == 2:
            self.gc2_ms.append((time.perf_counter() - self._gc_started) * 1000)

    async def window(self, seconds: float, rate: float) -> dict[str, Any]:
        window = self.keepalives.window = Window(calls={k: CallCount() for k, _ in MIX})
        self.gc2_ms = []
        cpu0 = _cpu()
        started = time.monotonic()
        tasks: set[asyncio.Task[None]] = set()
        if rate > 0:
            for k in range(int(rate * seconds)):
                wait = started + k / rate - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                task = asyncio.create_task(self._call(window))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        rest = started + seconds - time.monotonic()
        if rest > 0:
            await asyncio.sleep(rest)
        self.keepalives.window = Window()  # pings after the window count nowhere
        if tasks:
            await asyncio.wait(set(tasks), timeout=RING_TIMEOUT + 20)
        for task in tasks:
            task.cancel()
        pong = sorted(window.pong_ms)
        return {
            "seconds": round(time.monotonic() - started, 2),
            "pings": window.pings,
            "pongs": window.pongs,
            "ping_failures": dict(window.ping_failures),
            "pong_p50_ms": _rank(pong, 0.5),
            "pong_p99_ms": _rank(pong, 0.99),
            "calls": {
                k: {"attempted": c.attempted, "connected": c.connected, "failed": dict(c.failed)}
                for k, c in window.calls.items()
            },
            "wake_ms": [round(v, 2) for v in window.wake_ms],
            "setup_ms": [round(v, 2) for v in window.setup_ms],
            "cpu_seconds": round(_cpu() - cpu0, 2),
            "rss_kib": status_kib(os.getpid(), "VmRSS"),
            "awake": sum(1 for p in self.phones if p.state is State.AWAKE),
            "redials": sum(p.counters.redials for p in self.phones),
            "wake_retries": sum(p.counters.wake_retries for p in self.sleepers),
            "gc2_count": len(self.gc2_ms),
            "gc2_total_ms": round(sum(self.gc2_ms), 1),
            "gc2_max_ms": round(max(self.gc2_ms, default=0.0), 1),
        }

    def _pick(self, pool: list[MockPhone], state: State) -> MockPhone | None:
        for _ in range(20):
            phone = self.rng.choice(pool)
            if id(phone) not in self.busy and phone.state is state:
                return phone
        return None

    async def _call(self, window: Window) -> None:
        assert self.pbx is not None
        draw, kind = self.rng.random(), "out"
        for name, share in MIX:
            if draw < share:
                kind = name
                break
            draw -= share
        pool, state = (
            (self.sleepers, State.ASLEEP) if kind == "wake" else (self.phones, State.AWAKE)
        )
        phone = self._pick(pool, state) if pool else None
        if phone is None:
            return  # nobody free to call this time: not an attempt
        count = window.calls[kind]
        count.attempted += 1
        self.busy.add(id(phone))
        try:
            if kind == "out":
                out = await phone.call("echo")
                ok, reason = out.connected, f"{out.status} {out.reason}"
                if ok and out.setup_seconds is not None:
                    window.setup_ms.append(out.setup_seconds * 1000)
            else:
                result = await self.pbx.call(phone.spec.user)
                ok, reason = result.connected, f"{result.status} {result.reason}"
                if kind == "wake":
                    if ok and result.woken and result.wake_seconds is not None:
                        window.wake_ms.append(result.wake_seconds * 1000)
                    elif ok:
                        reason, ok = "connected without a wake", False
                    if phone.state is State.AWAKE:
                        await phone.sleep()
                elif ok and result.setup_seconds is not None:
                    window.setup_ms.append(result.setup_seconds * 1000)
            if ok:
                count.connected += 1
            else:
                count.failed[reason] += 1
        except Exception as exc:  # a failure of the mock side counts as a failed call
            count.failed[type(exc).__name__] += 1
        finally:
            self.busy.discard(id(phone))


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rank(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[max(1, math.ceil(q * len(ordered))) - 1], 2)


async def serve(spec: ClientSpec) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    client = Client(spec)

    def answer(value: dict[str, Any]) -> None:
        sys.stdout.buffer.write(orjson.dumps(value) + b"\n")
        sys.stdout.buffer.flush()

    answer({"opened": await client.open()})
    while line := await reader.readline():
        command = orjson.loads(line)
        if command["cmd"] == "grow":
            answer(await client.grow(int(command["to"])))
        elif command["cmd"] == "window":
            answer(await client.window(float(command["seconds"]), float(command["rate"])))
        elif command["cmd"] == "stop":
            answer({"stopped": True})
            break
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the module docstring says why


def main() -> None:
    raise_nofile()
    spec = ClientSpec(**orjson.loads(sys.argv[1]))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(spec))


if __name__ == "__main__":
    main()
