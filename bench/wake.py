"""Simultaneous wakes of sleeping phones, against the limit of the same run.

    .venv/bin/python bench/wake.py [--quick] [--levels 1,100,1000] [--repeat 7]
        [--singles 20] [--max-in-flight N] [--profile] [--out bench/results/wake.json]

The APNs and FCM stand-ins run in a process of their own (`push.fakes.process`, on
uvloop), as Apple and Google do: their TLS, HTTP/2 and provider-token checks are not on
the relay's loop or CPU. This process runs `serve`'s app (`build_app`: store on SQLite
in a fresh temporary directory, the push service with the real aioapns and
firebase-admin clients pointed at that process, the relay with its parking) on uvloop.
SIP flows are in memory, so what is timed is the relay, the store and the push path, not
SIP socket I/O. At each level N (`--levels`), one round:

1. A PBX is linked (digest) and N phones register through it, each with its own APNs
   device token in the Contact (`pn-provider=apns;pn-prid=...;pn-param=<team>.<app>.voip`);
   the PBX answers 200 at once. Then every phone sleeps: its flow closes. The policy's
   log files are written as `serve` writes them (`setup_logging`).
2. The PBX's N INVITEs, one to each phone's Contact along its Path, are handed to the
   relay in the same loop turn (`t0`): each is parked and pushed.
3. "push": the moment the stand-in accepted the push (the stand-ins' process reads
   CLOCK_MONOTONIC, the machine's clock, as this one does). When its notice arrives
   here the phone re-registers on a new flow; the PBX answers 200 from its own task;
   the relay forwards the parked INVITE on the new flow: "delivery".

The limit, in the same round: a bare asyncio + h2 client (`bench/push.py`'s `BareH2`,
one TLS connection, open since the warm-up) sends N pushes shaped as the relay's, in one
loop turn, to the same stand-in process; the time from that turn to each push accepted
at the stand-in is the limit's. Wakes and limit alternate which goes first each round.
A round at level 1 is `--singles` wakes one after another (and as many single pushes).

Per round: p50 and p99 (nearest rank) of INVITE -> push and of the limit, and their
ratio; per level, the median and min-max of those over `--repeat` rounds. CPU per wake
of this process (relay, store, push clients and the bench's simulated PBX and phones)
and of the stand-ins' process is read around the wakes.

`--max-in-flight` is `[push] max_in_flight` (serve: 200). Its default here is the
largest level, so every wake of a burst is pushed; with 200, a burst of 1,000 has 800
refused at once (503 with Retry-After), counted in the table.

Goal (issue 21): 100 simultaneous wakes, INVITE to push p99 <= 30 ms (the median of the
rounds). The table and the JSON say PASS or FAIL; the exit status is 1 on FAIL.
`--profile` (and a FAIL) adds a cProfile of this process and one of the stand-ins'
process (`StandInsProcess.profile`) over one more round at 100.
`--quick` (`make bench`): 3 rounds, 10 singles.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import logging
import os
import platform
import pstats
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

import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import cpu_seconds, nearest_rank, spread, write_result
from bench.profiling import Needles, Stats, own_time, positive_ints
from bench.push import BareH2, bare_h2_sender, provider_token
from mockphone.pbx import LinkRegistration
from privacy.clock import SystemClock
from privacy.keys import Keyring
from privacy.logs import setup_logging
from privacy.policy import load_policy
from proxy.sip.flow import Flow, Transport
from proxy.sip.message import Request
from proxy.sip.parser import parse
from proxy.sip.relay import Relay
from proxy.sip.responses import make_response
from proxy.sip.settings import PbxSettings, SipSettings
from push.apps import DEFAULT_EMBEDDED_APP, PushSettings
from push.fakes.process import StandInsProcess
from softrelay.app import REGISTRY, RELAY, Services, build_app

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "wake.json"
DOMAIN = "relay.test"
SERIAL = "0077"
SECRET = "bench-pbx-secret"
PN_PARAM = f"ABCDE12345.{DEFAULT_EMBEDDED_APP}.voip"
GOAL_LEVEL = 100
GOAL_P99 = 0.030  # seconds, INVITE to push at GOAL_LEVEL (median of the rounds' p99)
ROUND_TIMEOUT = 60.0
SDP = "v=0\r\no=carol 1 1 IN IP4 198.51.100.9\r\ns=-\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"
clock = time.monotonic  # CLOCK_MONOTONIC, the stand-ins' process reads the same


def _message(start: str, *headers: str, body: str = "") -> bytes:
    lines = [start, *headers, f"Content-Length: {len(body.encode())}", "", body]
    return "\r\n".join(lines).encode()


# --- the peers ------------------------------------------------------------------------


class _Pbx:
    """The PBX's end of its flow. Keeps the REGISTERs forwarded to it, each answered 200
    (at once while phones register; from its own task during a round, as a peer on
    another connection would); counts the final failures of INVITEs."""

    def __init__(self) -> None:
        self.registers: asyncio.Queue[bytes] = asyncio.Queue()
        self.failed: Counter[int] = Counter()
        self.changed = asyncio.Event()
        self.last = b""

    async def send(self, data: bytes) -> None:
        self.last = data
        if data.startswith(b"REGISTER "):
            self.registers.put_nowait(data)
        elif (
            data.startswith(b"SIP/2.0 ")
            and int(data[8:11]) >= 300
            and parse(data).cseq.method == "INVITE"
        ):
            self.failed[int(data[8:11])] += 1
            self.changed.set()

    def close(self) -> None:
        pass

    async def answer(self, relay: Relay, flow: Flow) -> Request:
        """200 to the next REGISTER forwarded to the PBX; that REGISTER."""
        register = parse(await self.registers.get())
        assert isinstance(register, Request)
        contact = register.get("Contact") or ""
        ok = make_response(register, 200, headers=[("Contact", contact), ("Expires", "3600")])
        await relay.handle(ok.serialize(), flow)
        return register

    async def answer_forever(self, relay: Relay, flow: Flow) -> None:
        while True:
            await self.answer(relay, flow)


@dataclass
class _Round:
    """One burst of N wakes: its start and what each INVITE took."""

    n: int
    pbx: _Pbx
    t0: float = 0.0
    to_push: list[float] = field(default_factory=list)
    to_delivery: list[float] = field(default_factory=list)
    failed: Counter[int] = field(default_factory=Counter)  # final statuses, once done
    relay_cpu_s: float = 0.0  # this process from t0 to the last delivery
    stand_ins_cpu_s: float = 0.0  # the stand-ins' process, the same span

    def finished(self) -> bool:
        return len(self.to_delivery) + sum(self.pbx.failed.values()) >= self.n


class _Phone:
    """A phone's end of one flow: notes when an INVITE arrives on it."""

    def __init__(self, round_: _Round | None) -> None:
        self.round = round_

    async def send(self, data: bytes) -> None:
        if self.round is not None and data.startswith(b"INVITE "):
            self.round.to_delivery.append(clock() - self.round.t0)
            self.round.pbx.changed.set()

    def close(self) -> None:
        pass


# --- rounds ---------------------------------------------------------------------------


@dataclass
class _LimitRound:
    """N pushes of the bare h2 client sent in one loop turn (`t0`)."""

    n: int
    t0: float = 0.0
    accepted: list[float] = field(default_factory=list)  # s from t0, at the stand-in
    failed: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class Bench:
    def __init__(
        self, relay: Relay, bare: BareH2, host: str, authorization: str, stand_ins_pid: int
    ) -> None:
        self.relay = relay
        self._stand_ins_pid = stand_ins_pid
        self.pbx = _Pbx()
        self.pbx_flow = Flow(Transport.TCP, ("203.0.113.9", 40000), ("127.0.0.1", 5060), self.pbx)
        self._port = 1024
        self._waiting: dict[str, tuple[_Round, str]] = {}  # push token -> round, user
        self._tasks: set[asyncio.Task[None]] = set()
        self._bare, self._host, self._authorization = bare, host, authorization
        self._limit_waiting: dict[str, _LimitRound] = {}  # push token -> limit round

    def _flow(self, sender: _Pbx | _Phone) -> Flow:
        self._port = self._port % 60000 + 1
        return Flow(Transport.TCP, ("198.51.100.23", self._port), ("127.0.0.1", 5060), sender)

    async def link(self) -> None:
        """The PBX registers as its serial, answering the relay's digest challenge: the
        mock parties' PBX link (`LinkRegistration`)."""
        contact = f"<sip:{SERIAL}@203.0.113.9:40000;transport=tcp>"
        registration = LinkRegistration(SERIAL, DOMAIN, contact, call_id="bench-link")

        def via() -> str:
            return f"SIP/2.0/TCP 203.0.113.9:40000;branch=z9hG4bK-link-{registration.cseq + 1}"

        await self.relay.handle(registration.request(via()).serialize(), self.pbx_flow)
        challenge = parse(self.pbx.last).get("WWW-Authenticate") or ""
        answer = registration.answer(challenge, SECRET)
        await self.relay.handle(registration.request(via(), answer).serialize(), self.pbx_flow)
        assert self.pbx.last.startswith(b"SIP/2.0 200"), self.pbx.last

    @staticmethod
    def _register(user: str, token: str, cseq: int) -> bytes:
        aor = f"sip:{user}@{SERIAL}.{DOMAIN}"
        return _message(
            f"REGISTER sip:{SERIAL}.{DOMAIN} SIP/2.0",
            f"Via: SIP/2.0/TCP 10.0.0.5:5062;branch=z9hG4bK-{user}-{cseq}",
            f"From: <{aor}>;tag=r{cseq}",
            f"To: <{aor}>",
            f"Call-ID: reg-{user}",
            f"CSeq: {cseq} REGISTER",
            "Max-Forwards: 70",
            f"Contact: <sip:{user}@10.0.0.5:5062;transport=tcp;pn-provider=apns;"
            f"pn-prid={token};pn-param={PN_PARAM}>",
            "Expires: 3600",
        )

    def on_push(self, service: str, token: str, at: float) -> None:
        """The stand-in accepted a push at `at` (a listener of the stand-ins' process, so
        it must not block): the phone it wakes re-registers at once, on a new flow; a
        push of the limit is noted."""
        limit = self._limit_waiting.pop(token, None)
        if limit is not None:
            limit.accepted.append(at - limit.t0)
            limit.changed.set()
            return
        found = self._waiting.pop(token, None)
        if found is None:
            return  # not a wake of a round in progress
        round_, user = found
        round_.to_push.append(at - round_.t0)
        register = self._register(user, token, 2)
        task = asyncio.create_task(self.relay.handle(register, self._flow(_Phone(round_))))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _asleep(self, n: int, tag: str) -> list[tuple[str, str, str]]:
        """N phones registered, then asleep: (user, token, Path) of each."""
        phones = []
        for i in range(n):
            user, token = f"{tag}x{i}", secrets.token_hex(32)  # an APNs token: 64 hex
            flow = self._flow(_Phone(None))
            await self.relay.handle(self._register(user, token, 1), flow)
            register = await self.pbx.answer(self.relay, self.pbx_flow)
            phones.append((user, token, str(register.paths[0])))
            flow.close()  # the app went to the background: its connection is gone
            if i % 100 == 99:
                await self.relay.drain()  # the binding writes, before shedding starts
        await self.relay.drain()
        return phones

    @staticmethod
    def _invite(user: str, token: str, path: str) -> bytes:
        """The PBX's INVITE to the registered Contact (RFC 8599), along the Path."""
        return _message(
            f"INVITE sip:{user}@10.0.0.5:5062;transport=tcp;pn-provider=apns;"
            f"pn-prid={token};pn-param={PN_PARAM} SIP/2.0",
            f"Via: SIP/2.0/TCP 203.0.113.9:40000;branch=z9hG4bK-inv-{user}",
            f"Route: {path}",
            f'From: "Carol" <sip:carol@{SERIAL}.{DOMAIN}>;tag=c-{user}',
            f"To: <sip:{user}@{SERIAL}.{DOMAIN}>",
            f"Call-ID: call-{user}",
            "CSeq: 1 INVITE",
            "Max-Forwards: 70",
            "Contact: <sip:carol@203.0.113.9:40000;transport=tcp>",
            "Content-Type: application/sdp",
            body=SDP,
        )

    async def round(self, n: int, tag: str, profiler: cProfile.Profile | None = None) -> _Round:
        """N phones asleep, N INVITEs handed over at once; until each is delivered or
        has failed. `profiler` runs from the burst until the last delivery."""
        self.pbx.failed.clear()
        phones = await self._asleep(n, tag)
        round_ = _Round(n, self.pbx)
        invites = [self._invite(user, token, path) for user, token, path in phones]
        for user, token, _ in phones:
            self._waiting[token] = (round_, user)
        answering = asyncio.create_task(self.pbx.answer_forever(self.relay, self.pbx_flow))
        try:
            async with asyncio.timeout(ROUND_TIMEOUT):
                if profiler is not None:
                    profiler.enable()
                cpu, stand_ins_cpu = time.process_time(), cpu_seconds([self._stand_ins_pid])
                round_.t0 = clock()
                handed = [
                    asyncio.create_task(self.relay.handle(invite, self.pbx_flow))
                    for invite in invites
                ]
                while not round_.finished():
                    self.pbx.changed.clear()
                    await self.pbx.changed.wait()
                await asyncio.gather(*handed)
                while self._tasks:
                    await asyncio.gather(*self._tasks)
                round_.relay_cpu_s = time.process_time() - cpu
                round_.stand_ins_cpu_s = cpu_seconds([self._stand_ins_pid]) - stand_ins_cpu
        finally:
            if profiler is not None:
                profiler.disable()
            answering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await answering
            for token in [t for t, (r, _) in self._waiting.items() if r is round_]:
                del self._waiting[token]
        await self.relay.drain()
        round_.failed = Counter(self.pbx.failed)
        return round_

    async def limit(self, n: int) -> _LimitRound:
        """The limit: N pushes shaped as the relay's, from the bare h2 client in one
        loop turn, each to a token of its own; until the stand-in accepted each (or it
        failed)."""
        tokens = [secrets.token_hex(32) for _ in range(n)]
        round_ = _LimitRound(n)
        for token in tokens:
            self._limit_waiting[token] = round_
        send = bare_h2_sender(self._bare, self._host, self._authorization, tokens)
        try:
            async with asyncio.timeout(ROUND_TIMEOUT):
                round_.t0 = clock()
                errors = await asyncio.gather(*(send(i) for i in range(n)))
                round_.failed = sum(1 for error in errors if error)
                # The 200s may come before the notices from the stand-ins' process.
                while len(round_.accepted) < n - round_.failed:
                    round_.changed.clear()
                    await round_.changed.wait()
        finally:
            for token in tokens:
                self._limit_waiting.pop(token, None)
        return round_


# --- measuring ------------------------------------------------------------------------


@dataclass
class Sample:
    """One round of one level: the wakes (a burst, or `--singles` bursts of one) and the
    limit's pushes, with the CPU both processes spent on the wakes."""

    wakes: int
    to_push: list[float] = field(default_factory=list)  # s, sorted at the end
    to_delivery: list[float] = field(default_factory=list)
    failed: Counter[int] = field(default_factory=Counter)  # final statuses
    limit: list[float] = field(default_factory=list)  # s: bare h2 send -> accepted
    limit_failed: int = 0
    relay_cpu_s: float = 0.0  # this process over the bursts: relay, push, driver, DB thread
    stand_ins_cpu_s: float = 0.0  # the stand-ins' process over the bursts (10 ms ticks)

    def add(self, round_: _Round) -> None:
        self.to_push += round_.to_push
        self.to_delivery += round_.to_delivery
        self.failed.update(round_.failed)
        self.relay_cpu_s += round_.relay_cpu_s
        self.stand_ins_cpu_s += round_.stand_ins_cpu_s

    def done(self) -> None:
        for values in (self.to_push, self.to_delivery, self.limit):
            values.sort()

    def p(self, which: str, q: float) -> float:
        return nearest_rank(getattr(self, which), q)


def _ms(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": round(1000 * nearest_rank(ordered, 0.5), 3),
        "p99": round(1000 * nearest_rank(ordered, 0.99), 3),
        "max": round(1000 * ordered[-1], 3) if ordered else float("nan"),
    }


@dataclass
class Level:
    n: int
    samples: list[Sample] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        rounds = [s for s in self.samples if s.to_push and s.limit]
        per_round = [
            {
                "invite_to_push_ms": _ms(s.to_push),
                "invite_to_delivery_ms": _ms(s.to_delivery),
                "limit_ms": _ms(s.limit),
                "ratio_p50": round(s.p("to_push", 0.5) / s.p("limit", 0.5), 2),
                "ratio_p99": round(s.p("to_push", 0.99) / s.p("limit", 0.99), 2),
                "relay_cpu_us_per_wake": round(1e6 * s.relay_cpu_s / s.wakes),
                "stand_ins_cpu_us_per_wake": round(1e6 * s.stand_ins_cpu_s / s.wakes),
                "delivered": len(s.to_delivery),
                "failed_by_status": {str(k): v for k, v in sorted(s.failed.items())},
            }
            for s in self.samples
        ]

        def over_rounds(which: str, q: float) -> dict[str, float] | None:
            values = [1000 * s.p(which, q) for s in rounds]
            return spread(values) if values else None

        def ratios(q: float) -> dict[str, float] | None:
            values = [s.p("to_push", q) / s.p("limit", q) for s in rounds]
            return spread(values) if values else None

        failed: Counter[int] = Counter()
        for s in self.samples:
            failed.update(s.failed)
        wakes = sum(s.wakes for s in self.samples)
        return {
            "simultaneous": self.n,
            "rounds": len(self.samples),
            "wakes": wakes,
            "pushed": sum(len(s.to_push) for s in self.samples),
            "delivered": sum(len(s.to_delivery) for s in self.samples),
            "failed_by_status": {str(k): v for k, v in sorted(failed.items())},
            "limit_failed": sum(s.limit_failed for s in self.samples),
            # median (min-max) over the rounds of each round's percentile, ms
            "invite_to_push_p50_ms": over_rounds("to_push", 0.5),
            "invite_to_push_p99_ms": over_rounds("to_push", 0.99),
            "limit_p50_ms": over_rounds("limit", 0.5),
            "limit_p99_ms": over_rounds("limit", 0.99),
            "ratio_p50": ratios(0.5),
            "ratio_p99": ratios(0.99),
            "invite_to_delivery_p99_ms": over_rounds("to_delivery", 0.99),
            "relay_cpu_us_per_wake": spread(
                [1e6 * s.relay_cpu_s / s.wakes for s in self.samples], 0
            ),
            "stand_ins_cpu_us_per_wake": spread(
                [1e6 * s.stand_ins_cpu_s / s.wakes for s in self.samples], 0
            ),
            "per_round": per_round,
        }


def _histogram(registry: CollectorRegistry, name: str) -> dict[str, float]:
    """Count and mean of one of the relay's wake histograms (the whole run)."""
    count = registry.get_sample_value(f"{name}_count") or 0.0
    total = registry.get_sample_value(f"{name}_sum") or 0.0
    return {"count": count, "mean_ms": round(1000 * total / count, 3) if count else 0.0}


_LAYERS = (
    ("/proxy/sip/", "relay and parking (proxy/sip)"),
    ("/push/", "push service and ApnsProvider (push/)"),
    ("/aioapns/", "aioapns"),
    ("/h2/", "h2, hpack, hyperframe (client)"),
    ("/hpack/", "h2, hpack, hyperframe (client)"),
    ("/hyperframe/", "h2, hpack, hyperframe (client)"),
    ("/privacy/", "store (privacy/)"),
    ("/prometheus_client/", "prometheus_client"),
    ("/logging/", "logging"),
    ("/jwt/", "JWT"),
    ("/asyncio/", "asyncio"),
    ("/ssl.py", "asyncio"),
    ("/uvloop/", "asyncio"),
    ("bench/wake.py", "bench driver (PBX, phones)"),
    ("/mockphone/", "bench driver (PBX, phones)"),
)
_BUILTINS = (
    ("epoll", "waiting (epoll)"),
    ("poll", "waiting (epoll)"),
    ("_ssl.", "OpenSSL record crypto"),
    ("MemoryBIO", "OpenSSL record crypto"),
    ("socket", "socket syscalls"),
)


# The stand-ins' process. uvloop's own work (socket reads and writes, callbacks) shows
# as the own time of asyncio's runner, which calls into it.
_STAND_IN_LAYERS = (
    ("/push/fakes/", "stand-in's checks and answers (push/fakes)"),
    ("/h2/", "h2, hpack, hyperframe (server)"),
    ("/hpack/", "h2, hpack, hyperframe (server)"),
    ("/hyperframe/", "h2, hpack, hyperframe (server)"),
    ("/json/", "JSON"),
    ("/re/", "regular expressions"),
    ("/asyncio/", "event loop (uvloop: sockets, callbacks)"),
    ("/uvloop/", "event loop (uvloop: sockets, callbacks)"),
    ("/logging/", "logging"),
)
_STAND_IN_BUILTINS = (
    ("verify", "ES256 verify (cryptography)"),
    ("_ssl.", "OpenSSL (TLS records)"),
    ("MemoryBIO", "OpenSSL (TLS records)"),
    ("write", "socket and pipe writes"),
)


def _profile_summary(
    stats: pstats.Stats, wakes: int, files: Needles, builtins: Needles, top: int = 25
) -> dict[str, Any]:
    """Own time per wake, per layer and for the top functions (µs, inflated by cProfile
    and by waits for a core: compare `total_us_per_wake` with the CPU measured without
    it, and read the shares)."""
    table: Stats = stats.stats  # type: ignore[attr-defined]  # untyped in pstats
    layers, functions = own_time(table, files, builtins)
    return {
        "wakes": wakes,
        "total_us_per_wake": round(1e6 * sum(layers.values()) / wakes, 1),
        "layers_us_per_wake": {k: round(1e6 * v / wakes, 1) for k, v in layers.most_common()},
        "top_us_per_wake": [
            {"function": where, "calls": calls, "us": round(1e6 * t / wakes, 1)}
            for t, calls, where in functions[:top]
        ],
    }


async def _measure(driver: Bench, n: int, singles: int, tag: str, wakes_first: bool) -> Sample:
    """One round of level `n`: the wakes and the limit, in the order given."""
    bursts = singles if n == 1 else 1
    sample = Sample(n * bursts)

    async def wakes() -> None:
        for burst in range(bursts):
            sample.add(await driver.round(n, f"{tag}b{burst}"))

    async def limit() -> None:
        for _ in range(bursts):
            limit = await driver.limit(n)
            sample.limit += limit.accepted
            sample.limit_failed += limit.failed

    for part in (wakes, limit) if wakes_first else (limit, wakes):
        await part()
    sample.done()
    return sample


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    # aioapns logs every failed send; the outcomes are counted instead.
    logging.getLogger("aioapns").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="softrelay-wake-bench-") as tmp:
        profile = Path(tmp) / "stand-ins.prof"
        stand_ins = await StandInsProcess.start(
            [DEFAULT_EMBEDDED_APP], extra_keys=1, profile=profile
        )
        try:
            return await _bench(args, stand_ins, Path(tmp))
        finally:
            await stand_ins.stop()


async def _bench(args: argparse.Namespace, stand_ins: StandInsProcess, tmp: Path) -> dict[str, Any]:
    policy = load_policy("auerproxy")
    clock_ = SystemClock()
    # The policy's log files, as `serve` writes them: the push log's line per wake counts.
    logs = setup_logging(policy, tmp, clock_)
    sip = SipSettings(DOMAIN, (PbxSettings(SERIAL, SECRET),))
    push = PushSettings(
        apps=stand_ins.apps,
        max_in_flight=args.max_in_flight or max(args.levels),
        max_attempts=4,
        embedded_app_id=DEFAULT_EMBEDDED_APP,
        apns_endpoint=stand_ins.apns_endpoint,
        fcm_endpoint=stand_ins.fcm_endpoint,
    )
    app = build_app(Services(policy, Keyring.generate(), tmp, clock_, 3600, push, sip))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()  # the cleanup contexts: store, push clients, relay
    endpoint = stand_ins.apns_endpoint
    bare = await BareH2.connect(endpoint, 10.0)
    try:
        relay, registry = app[RELAY], app[REGISTRY]
        authorization = provider_token(stand_ins.extra_keys[0])
        driver = Bench(relay, bare, endpoint.host, authorization, stand_ins.proc.pid)
        unsubscribe = stand_ins.subscribe(driver.on_push)
        await driver.link()
        # Warm-up: aioapns's and the bare client's connections, first-use code paths.
        for _ in range(3):
            await driver.round(10, "warm")
            await driver.limit(10)
        levels = {n: Level(n) for n in args.levels}
        for repeat in range(args.repeat):  # interleaved, as the other benches
            for n in args.levels:
                sample = await _measure(driver, n, args.singles, f"l{n}r{repeat}", repeat % 2 == 0)
                levels[n].samples.append(sample)
                print(
                    f"  {n:>5} simultaneous, round {repeat + 1}: "
                    f"{len(sample.to_delivery)}/{sample.wakes} delivered, "
                    f"push p99 {1000 * sample.p('to_push', 0.99):.1f} ms, "
                    f"limit p99 {1000 * sample.p('limit', 0.99):.1f} ms",
                    flush=True,
                )
        summaries = [level.summary() for level in levels.values()]
        goal = next((s for s in summaries if s["simultaneous"] == GOAL_LEVEL), None)
        p99 = (
            goal["invite_to_push_p99_ms"]["median"]
            if goal and goal["invite_to_push_p99_ms"]
            else None
        )
        verdict = "PASS" if p99 is not None and p99 <= 1000 * GOAL_P99 else "FAIL"
        if goal is None:
            verdict = "N/A"
        profile = None
        if args.profile or verdict == "FAIL":
            # The wall clock (a CPU-time timer costs a system call per event, inflating
            # small functions ~10x): the time spent waiting for a core on a shared machine
            # lands in functions as their own time does, so read the shares.
            profiler = cProfile.Profile()
            await stand_ins.profile(True)
            profiled = await driver.round(GOAL_LEVEL, "prof", profiler)
            await stand_ins.profile(False)
            profile = _profile_summary(pstats.Stats(profiler), GOAL_LEVEL, _LAYERS, _BUILTINS)
            profile["stand_ins"] = _profile_summary(
                pstats.Stats(str(tmp / "stand-ins.prof")),
                GOAL_LEVEL,
                _STAND_IN_LAYERS,
                _STAND_IN_BUILTINS,
            )
            profile["round"] = {
                "invite_to_push_ms": _ms(profiled.to_push),
                "invite_to_delivery_ms": _ms(profiled.to_delivery),
                # under cProfile; this process's threads all, the DB thread too
                "relay_cpu_us_per_wake": round(1e6 * profiled.relay_cpu_s / GOAL_LEVEL),
                "stand_ins_cpu_us_per_wake": round(1e6 * profiled.stand_ins_cpu_s / GOAL_LEVEL),
            }
        unsubscribe()
        return {
            "results": summaries,
            "goal": {
                "simultaneous": GOAL_LEVEL,
                "invite_to_push_p99_ms_at_most": 1000 * GOAL_P99,
                "measured_p99_ms_median_of_rounds": p99,
                "verdict": verdict,
            },
            "relay_histograms": {
                name: _histogram(registry, name)
                for name in ("softrelay_wake_push_seconds", "softrelay_wake_delivery_seconds")
            },
            "profile": profile,
        }
    finally:
        await bare.close(2.0)
        await runner.cleanup()
        logs.close()


def _fmt(entry: dict[str, float] | None, digits: int = 1) -> str:
    if entry is None:
        return "-"
    return f"{entry['median']:.{digits}f} ({entry['min']:.{digits}f}-{entry['max']:.{digits}f})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, 10 singles")
    parser.add_argument("--levels", type=positive_ints, default=[1, 100, 1000])
    parser.add_argument("--repeat", type=int, default=7, help="rounds per level (7)")
    parser.add_argument("--singles", type=int, default=20, help="wakes per round at level 1")
    parser.add_argument(
        "--max-in-flight", type=int, default=0, help="[push] max_in_flight (the largest level)"
    )
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat, args.singles = 3, 10
    if args.repeat < 1 or args.singles < 1 or args.max_in_flight < 0:
        parser.error("--repeat and --singles must be at least 1, --max-in-flight not negative")
    started = time.perf_counter()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(bench(args))
    result = {
        "benchmark": "wake",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average": os.getloadavg(),
        },
        "args": {
            "levels": args.levels,
            "repeat": args.repeat,
            "singles": args.singles,
            "max_in_flight": args.max_in_flight or max(args.levels),
        },
        "note": (
            "stand-ins in a process of their own; limit: a bare h2 client's pushes to the "
            "same stand-ins in the same round; per level the median (min-max) over rounds "
            "of each round's nearest-rank percentile"
        ),
        "seconds": round(time.perf_counter() - started, 1),
        **result,
    }
    write_result(args.out, result)

    print(
        "\nms, median (min-max) of the rounds | INVITE->push p50 | p99 | limit p50 | p99 "
        "| ratio p50 | ratio p99 | delivered/wakes | failed"
    )
    for s in result["results"]:
        print(
            f"{s['simultaneous']:>6} | {_fmt(s['invite_to_push_p50_ms'])} | "
            f"{_fmt(s['invite_to_push_p99_ms'])} | {_fmt(s['limit_p50_ms'])} | "
            f"{_fmt(s['limit_p99_ms'])} | {_fmt(s['ratio_p50'], 2)} | "
            f"{_fmt(s['ratio_p99'], 2)} | {s['delivered']}/{s['wakes']} | "
            f"{s['failed_by_status'] or '-'}"
        )
        print(
            f"{'':>6}   CPU µs per wake: relay process {_fmt(s['relay_cpu_us_per_wake'], 0)}, "
            f"stand-ins {_fmt(s['stand_ins_cpu_us_per_wake'], 0)}"
        )
    goal = result["goal"]
    print(
        f"\ngoal: INVITE to push p99 <= {goal['invite_to_push_p99_ms_at_most']:.0f} ms at "
        f"{goal['simultaneous']} simultaneous: {goal['measured_p99_ms_median_of_rounds']} ms: "
        f"{goal['verdict']}"
    )
    if result["profile"]:
        profile = result["profile"]
        print(
            f"\nprofile of one round at {GOAL_LEVEL} (own time, µs per wake, under cProfile: "
            f"{profile['total_us_per_wake']:.0f} in all):"
        )
        for layer, us in profile["layers_us_per_wake"].items():
            print(f"  {us:>9.1f}  {layer}")
        print("  top functions:")
        for row in profile["top_us_per_wake"]:
            print(f"  {row['us']:>9.1f}  {row['calls']:>7}  {row['function']}")
        stand_ins = profile["stand_ins"]
        print(
            "\nthe stand-ins' process over the same round (own time, µs per push, under "
            f"cProfile: {stand_ins['total_us_per_wake']:.0f} in all):"
        )
        for layer, us in stand_ins["layers_us_per_wake"].items():
            print(f"  {us:>9.1f}  {layer}")
        print("  top functions:")
        for row in stand_ins["top_us_per_wake"][:15]:
            print(f"  {row['us']:>9.1f}  {row['calls']:>7}  {row['function']}")
    print(f"\n{result['seconds']} s; wrote {args.out}")
    return 0 if goal["verdict"] != "FAIL" else 1


if __name__ == "__main__":
    sys.exit(main())
