"""Simultaneous wakes of sleeping phones: INVITE to push, INVITE to delivery.

    .venv/bin/python bench/wake.py [--levels 1,100,1000] [--repeat 3] [--max-in-flight 200]
        [--profile] [--out bench/results/wake.json]

One process on uvloop, as `serve` runs: the app of `serve` (`build_app`: store on SQLite
in a fresh temporary directory, the push service, the embedded APNs and FCM stand-ins
on loopback with the real aioapns client, the relay with its parking). SIP flows are in
memory, so what is timed is the relay, the store, the push path and the stand-ins, not
socket I/O of SIP. At each level N (`--levels`), one round:

1. A PBX is linked (digest) and N phones register through it, each with its own APNs
   device token in the Contact (`pn-provider=apns;pn-prid=...;pn-param=<team>.<app>.voip`);
   the PBX answers 200 at once. Then every phone sleeps: its flow closes.
2. The PBX sends N INVITEs, one to each phone's Contact along its Path, all handed to
   the relay in the same loop turn (`t0`): each is parked and pushed.
3. The stand-in accepting a push (its `Deliveries` listener) is "push": the time is
   taken there. The simulated phone re-registers that moment, on a new flow; the PBX
   answers 200 at once; the relay forwards the parked INVITE on the new flow, and its
   arrival there is "delivery".

INVITE to push and INVITE to delivery are taken from `t0`, the moment the burst was
handed over, so an INVITE that waits behind the others of its burst counts that wait.
The relay's own histograms (`softrelay_wake_push_seconds`, to the provider's *answer*,
and `softrelay_wake_delivery_seconds`) are reported beside them. Each level runs
`--repeat` rounds, with new phones each time; percentiles are over all rounds' samples.
A round that does not finish within 60 s fails.

`--max-in-flight` is the push service's limit per provider and app (`[push]
max_in_flight`, default 200, as `serve`); pushes beyond it are refused at once
(`TemporaryFailure("overloaded")`) and the call ends with 480, which the table counts.

Goal (from the issue): INVITE to push under 5 ms at p99 for 100 simultaneous wakes.
The table and the JSON say PASS or FAIL; the exit status is 1 on FAIL. `--profile` (and
a FAIL) adds a cProfile of one more round at 100: own time per layer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import os
import platform
import pstats
import secrets
import statistics
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

from bench.harness import write_result
from bench.profiling import Stats, own_time
from mockphone.pbx import LinkRegistration
from privacy.clock import SystemClock
from privacy.keys import Keyring
from privacy.policy import load_policy
from proxy.sip.flow import Flow, Transport
from proxy.sip.message import Request
from proxy.sip.parser import parse
from proxy.sip.relay import Relay
from proxy.sip.responses import make_response
from proxy.sip.settings import PbxSettings, SipSettings
from push.apps import DEFAULT_EMBEDDED_APP, PushSettings
from push.fakes.script import Delivery
from softrelay.app import REGISTRY, RELAY, STAND_INS, Services, build_app

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "wake.json"
DOMAIN = "relay.test"
SERIAL = "0077"
SECRET = "bench-pbx-secret"
PN_PARAM = f"ABCDE12345.{DEFAULT_EMBEDDED_APP}.voip"
GOAL_LEVEL = 100
GOAL_P99 = 0.005  # seconds, INVITE to push at GOAL_LEVEL
ROUND_TIMEOUT = 60.0
SDP = "v=0\r\no=carol 1 1 IN IP4 198.51.100.9\r\ns=-\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"


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

    def finished(self) -> bool:
        return len(self.to_delivery) + sum(self.pbx.failed.values()) >= self.n


class _Phone:
    """A phone's end of one flow: notes when an INVITE arrives on it."""

    def __init__(self, round_: _Round | None) -> None:
        self.round = round_

    async def send(self, data: bytes) -> None:
        if self.round is not None and data.startswith(b"INVITE "):
            self.round.to_delivery.append(time.perf_counter() - self.round.t0)
            self.round.pbx.changed.set()

    def close(self) -> None:
        pass


# --- rounds ---------------------------------------------------------------------------


class Bench:
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.pbx = _Pbx()
        self.pbx_flow = Flow(Transport.TCP, ("203.0.113.9", 40000), ("127.0.0.1", 5060), self.pbx)
        self._port = 1024
        self._waiting: dict[str, tuple[_Round, str]] = {}  # push token -> round, user
        self._tasks: set[asyncio.Task[None]] = set()

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

    def on_push(self, delivery: Delivery) -> None:
        """The stand-in accepted a push (a `Deliveries` listener, so it must not block):
        the phone it wakes re-registers at once, on a new flow."""
        now = time.perf_counter()
        found = self._waiting.pop(delivery.token, None)
        if found is None:
            return  # not a wake of a round in progress
        round_, user = found
        round_.to_push.append(now - round_.t0)
        register = self._register(user, delivery.token, 2)
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
                round_.t0 = time.perf_counter()
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


# --- measuring ------------------------------------------------------------------------


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _histogram(registry: CollectorRegistry, name: str) -> dict[str, float]:
    """Count and sum of one of the relay's wake histograms (the whole run)."""
    count = registry.get_sample_value(f"{name}_count") or 0.0
    total = registry.get_sample_value(f"{name}_sum") or 0.0
    return {"count": count, "mean_ms": 1000 * total / count if count else 0.0}


_LAYERS = (
    ("/proxy/sip/", "relay and parking (proxy/sip)"),
    ("/push/fakes/", "APNs stand-in (push/fakes)"),
    ("/push/", "push service and ApnsProvider (push/)"),
    ("/aioapns/", "aioapns"),
    ("/h2/", "h2, hpack, hyperframe (both sides)"),
    ("/hpack/", "h2, hpack, hyperframe (both sides)"),
    ("/hyperframe/", "h2, hpack, hyperframe (both sides)"),
    ("/privacy/", "store (privacy/)"),
    ("/jwt/", "JWT (provider token: signed, verified)"),
    ("/cryptography/", "cryptography"),
    ("/asyncio/", "asyncio"),
    ("/ssl.py", "asyncio"),
    ("bench/wake.py", "bench driver"),
)
_BUILTINS = (
    ("epoll", "waiting (epoll)"),
    ("_ssl.", "OpenSSL record crypto (both sides)"),
    ("MemoryBIO", "OpenSSL record crypto (both sides)"),
    ("EllipticCurve", "ES256 sign/verify"),
    ("ECPublicKey", "ES256 sign/verify"),
    ("ECPrivateKey", "ES256 sign/verify"),
    ("socket", "socket syscalls"),
)


def _profile_summary(profile: cProfile.Profile, wakes: int, top: int = 15) -> dict[str, Any]:
    """Own time per wake, per layer and for the top functions (µs; ~2x inflated)."""
    table: Stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]  # untyped in pstats
    layers, functions = own_time(table, _LAYERS, _BUILTINS)
    return {
        "wakes": wakes,
        "layers_us_per_wake": {k: round(1e6 * v / wakes, 1) for k, v in layers.most_common()},
        "top_us_per_wake": [
            {"function": where, "calls": calls, "us": round(1e6 * t / wakes, 1)}
            for t, calls, where in functions[:top]
        ],
    }


@dataclass
class Level:
    n: int
    rounds: list[_Round] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        to_push = [v for r in self.rounds for v in r.to_push]
        to_delivery = [v for r in self.rounds for v in r.to_delivery]
        failed: Counter[int] = Counter()
        for r in self.rounds:
            failed.update(r.failed)
        return {
            "simultaneous": self.n,
            "rounds": len(self.rounds),
            "wakes": self.n * len(self.rounds),
            "pushed": len(to_push),
            "delivered": len(to_delivery),
            "failed_by_status": {str(k): v for k, v in sorted(failed.items())},
            "invite_to_push_ms": _ms(to_push),
            "invite_to_delivery_ms": _ms(to_delivery),
        }


def _ms(values: list[float]) -> dict[str, float | None]:
    p50, p99 = _percentile(values, 50), _percentile(values, 99)
    return {
        "min": round(1000 * min(values), 3) if values else None,
        "p50": None if p50 is None else round(1000 * p50, 3),
        "p99": None if p99 is None else round(1000 * p99, 3),
        "max": round(1000 * max(values), 3) if values else None,
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="softrelay-wake-bench-") as tmp:
        policy = load_policy("auerproxy")
        sip = SipSettings(DOMAIN, (PbxSettings(SERIAL, SECRET),))
        push = PushSettings(
            apps=(),
            max_in_flight=args.max_in_flight,
            max_attempts=4,
            embedded_app_id=DEFAULT_EMBEDDED_APP,
        )
        clock = SystemClock()
        app = build_app(Services(policy, Keyring.generate(), Path(tmp), clock, 3600, push, sip))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()  # the cleanup contexts: store, push and stand-ins, relay
        try:
            relay, registry = app[RELAY], app[REGISTRY]
            driver = Bench(relay)
            unsubscribe = app[STAND_INS].deliveries.subscribe(driver.on_push)
            await driver.link()
            # Warm-up: the first push opens aioapns's TLS connection to the stand-in.
            await driver.round(1, "warm")
            levels = {n: Level(n) for n in args.levels}
            for repeat in range(args.repeat):  # interleaved, as the other benches
                for n in args.levels:
                    round_ = await driver.round(n, f"l{n}r{repeat}")
                    levels[n].rounds.append(round_)
                    print(
                        f"  {n:>5} simultaneous, round {repeat + 1}: "
                        f"{len(round_.to_delivery)}/{n} delivered",
                        flush=True,
                    )
            summaries = [level.summary() for level in levels.values()]
            goal = next((s for s in summaries if s["simultaneous"] == GOAL_LEVEL), None)
            p99 = goal["invite_to_push_ms"]["p99"] if goal else None
            verdict = "PASS" if p99 is not None and p99 < 1000 * GOAL_P99 else "FAIL"
            if goal is None:
                verdict = "N/A"
            profile = None
            if args.profile or verdict == "FAIL":
                profiler = cProfile.Profile()
                profiled = await driver.round(GOAL_LEVEL, "prof", profiler)
                profile = _profile_summary(profiler, GOAL_LEVEL)
                profile["round"] = {
                    "invite_to_push_ms": _ms(profiled.to_push),
                    "invite_to_delivery_ms": _ms(profiled.to_delivery),
                }
            unsubscribe()
            return {
                "results": summaries,
                "goal": {
                    "simultaneous": GOAL_LEVEL,
                    "invite_to_push_p99_ms_below": 1000 * GOAL_P99,
                    "measured_p99_ms": p99,
                    "verdict": verdict,
                },
                "relay_histograms": {
                    "softrelay_wake_push_seconds": _histogram(
                        registry, "softrelay_wake_push_seconds"
                    ),
                    "softrelay_wake_delivery_seconds": _histogram(
                        registry, "softrelay_wake_delivery_seconds"
                    ),
                },
                "profile": profile,
            }
        finally:
            await runner.cleanup()


def _levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part]
    except ValueError as exc:
        raise argparse.ArgumentTypeError("levels must be integers") from exc
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("levels must be integers of at least 1")
    return levels


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--levels", type=_levels, default=[1, 100, 1000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-in-flight", type=int, default=200)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(bench(args))
    result = {
        "benchmark": "wake",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "args": {
            "levels": args.levels,
            "repeat": args.repeat,
            "max_in_flight": args.max_in_flight,
        },
        "seconds": round(time.perf_counter() - started, 1),
        **result,
    }
    write_result(args.out, result)

    print()
    print(
        "simultaneous | woken (delivered/wakes) | failed | INVITE->push p50/p99 ms "
        "| INVITE->delivery p50/p99 ms"
    )
    for s in result["results"]:
        push, delivery = s["invite_to_push_ms"], s["invite_to_delivery_ms"]
        print(
            f"{s['simultaneous']:>12} | {s['delivered']:>10}/{s['wakes']:<12} | "
            f"{s['failed_by_status'] or '-'!s:>6} | {push['p50']}/{push['p99']} | "
            f"{delivery['p50']}/{delivery['p99']}"
        )
    goal = result["goal"]
    print(
        f"\ngoal: INVITE to push p99 < {goal['invite_to_push_p99_ms_below']} ms at "
        f"{goal['simultaneous']} simultaneous: {goal['measured_p99_ms']} ms: {goal['verdict']}"
    )
    if result["profile"]:
        profile = result["profile"]
        print(f"\nprofile of one round at {GOAL_LEVEL} (own time, µs per wake; cProfile ~2x):")
        for layer, us in profile["layers_us_per_wake"].items():
            print(f"  {us:>9.1f}  {layer}")
        print("  top functions:")
        for row in profile["top_us_per_wake"]:
            print(f"  {row['us']:>9.1f}  {row['calls']:>7}  {row['function']}")
    print(f"\nwrote {args.out}")
    return 0 if goal["verdict"] != "FAIL" else 1


if __name__ == "__main__":
    sys.exit(main())
