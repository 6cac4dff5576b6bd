"""`softrelay simulate`: many mock phones and PBXs against one softrelay.

    softrelay simulate --phones 200 --duration 60     # against `make run`'s server
    softrelay simulate --embedded --phones 200 --duration 60
    softrelay simulate --target http://127.0.0.1:8080 --phones 200 --duration 60

With neither option it plays against the `serve` of the same `--config` at that
configuration's own HTTP address when one answers there, else it starts one in this
process. `--embedded` starts softrelay in this process (a throwaway configuration and
data directory, or `--data-dir`); `--target URL` plays against a running `serve` of the
same `--config`: the simulator needs its PBX serials and secrets (`[[sip.pbx]]`), its SIP
port, a usage tenant for pings and a crash project for reports, and the push stand-ins'
delivery feed, which `serve` offers only with no push credentials configured. Against a
served relay on loopback each phone connects from its own 127.1.x.y address.

What happens: every PBX links; every phone registers through its PBX; a share of the
mobile phones (`asleep`) go to sleep at once. Then, until `--duration` simulated seconds
have passed, events arrive as Poisson processes: calls (`--call-rate` per second in all;
most from a PBX to a random phone, the rest from an awake phone to its PBX), sleeps of
awake mobile phones (`--sleep-rate`) and crashes (`--crash-rate`; a phone that opted in,
`--opt-in` of them, sends its report through the stock sentry-sdk with the opt-in tag,
the others without). A woken phone takes its call and goes back to sleep. Each phone is
"used" once at start and pings usage (`usage/client.py`). `--speed` runs that many
simulated seconds per second. Ctrl-C ends the run early and still prints the summary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import math
import random
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from mockphone.delays import Delay, Pace
from mockphone.embedded import EmbeddedRelay
from mockphone.pbx import CallResult, MockPbx, PbxRefused
from mockphone.phone import WAKE_DELAY, Answer, Kind, MockPhone, PhoneSpec, State
from mockphone.pushes import PushInbox
from mockphone.sip import RelayAddress, Transport
from proxy.config import Config
from usage.client import UsageClient

MAX_CONCURRENT_SETUP = 100  # phones registering at once at start
MAX_EVENTS_IN_FLIGHT = 5_000  # calls, crashes in progress; past it an event is skipped
ANSWER_DELAY = Delay("uniform", 0.5, 3.0)  # the user picks up
HOLD = Delay("uniform", 1.0, 5.0)


class SimulationError(Exception):
    """The run cannot start; the message says which option or configuration key."""


@dataclass(frozen=True, slots=True)
class SimSettings:
    phones: int = 20
    pbxs: int = 1
    duration: float = 60.0  # simulated seconds
    mix: dict[Kind, float] = field(
        default_factory=lambda: {Kind.IOS: 0.4, Kind.ANDROID: 0.4, Kind.DESKTOP: 0.2}
    )
    transports: dict[Transport, float] = field(default_factory=lambda: {Transport.TCP: 1.0})
    answers: dict[Answer, float] = field(
        default_factory=lambda: {Answer.ANSWER: 0.85, Answer.DECLINE: 0.1, Answer.IGNORE: 0.05}
    )
    call_rate: float = 1.0  # calls per simulated second, in all
    outgoing_share: float = 0.3  # of calls, placed by phones
    sleep_rate: float = 0.5  # awake mobile phones falling asleep per second, in all
    crash_rate: float = 0.0  # crashes per second, in all
    opt_in: float = 0.5  # share of phones whose users opted in to crash reports
    asleep: float = 0.6  # share of mobile phones asleep right after registering
    wake_delay: Delay = WAKE_DELAY
    answer_delay: Delay = ANSWER_DELAY
    hold: Delay = HOLD  # talk time before the caller hangs up
    ring_timeout: float = 20.0  # simulated seconds a PBX lets a call ring
    speed: float = 1.0
    seed: int | None = None


@dataclass
class Stats:
    started: float = field(default_factory=time.monotonic)
    elapsed: float = 0.0  # simulated seconds
    registered: int = 0
    register_failed: Counter[str] = field(default_factory=Counter)
    calls_attempted: int = 0
    calls_connected: int = 0
    calls_failed: Counter[str] = field(default_factory=Counter)
    calls_in_progress: int = 0
    woken_calls: int = 0
    wake_latencies: list[float] = field(default_factory=list)  # real seconds
    sleeps: int = 0
    pings: Counter[str] = field(default_factory=Counter)  # by HTTP status
    crashes: Counter[str] = field(default_factory=Counter)  # opted_in / not_opted_in
    crash_errors: int = 0
    skipped_events: int = 0
    pushes: dict[str, float] = field(default_factory=dict)  # outcome -> count, at the end
    interrupted: bool = False

    def failed(self, reason: str) -> None:
        self.calls_failed[reason] += 1

    def summary(self, settings: SimSettings) -> dict[str, Any]:
        return {
            "phones": settings.phones,
            "pbxs": settings.pbxs,
            "duration": settings.duration,
            "simulated_seconds": round(self.elapsed, 3),
            "wall_seconds": round(time.monotonic() - self.started, 3),
            "interrupted": self.interrupted,
            "registrations": {"ok": self.registered, "failed": dict(self.register_failed)},
            "calls": {
                "attempted": self.calls_attempted,
                "connected": self.calls_connected,
                "failed": dict(sorted(self.calls_failed.items())),
                "woken": self.woken_calls,
            },
            "wake_latency": latency_summary(self.wake_latencies),
            "pushes": dict(sorted(self.pushes.items())),
            "sleeps": self.sleeps,
            "pings": {"sent": sum(self.pings.values()), "by_status": dict(self.pings)},
            "crash_reports": {
                "sent": sum(self.crashes.values()),
                "opted_in": self.crashes["opted_in"],
                "not_opted_in": self.crashes["not_opted_in"],
                "errors": self.crash_errors,
            },
            "skipped_events": self.skipped_events,
        }


def latency_summary(values: list[float]) -> dict[str, float | int | None]:
    """Count and nearest-rank p50/p95/p99, in seconds."""
    ordered = sorted(values)

    def rank(p: float) -> float | None:
        if not ordered:
            return None
        return round(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)], 4)

    return {"count": len(ordered), "p50": rank(50), "p95": rank(95), "p99": rank(99)}


# --- the world the parties play in ----------------------------------------------------


@dataclass
class World:
    address: RelayAddress
    domain: str
    pbx_secrets: dict[str, str]
    inbox: PushInbox
    tenant: tuple[str, str] | None  # id, key
    dsn: str | None
    metrics_url: str
    session: aiohttp.ClientSession
    workdir: Path
    embedded: EmbeddedRelay | None = None
    _tmp: tempfile.TemporaryDirectory[str] | None = None
    # Each phone connects from its own loopback address (127.1.x.y), as real phones
    # come from addresses of their own: a served relay limits connections per address.
    own_addresses: bool = False

    def local_host(self, i: int) -> str:
        """The address phone `i` connects from."""
        if not self.own_addresses:
            return "127.0.0.1"
        return f"127.{1 + i // 62_500}.{i // 250 % 250}.{1 + i % 250}"

    async def close(self) -> None:
        await self.inbox.close()
        await self.session.close()
        if self.embedded is not None:
            await self.embedded.stop()
        if self._tmp is not None:
            self._tmp.cleanup()


async def embedded_world(settings: SimSettings, data_dir: Path | None) -> World:
    tmp = None
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="softrelay-simulate-")
        workdir = Path(tmp.name)
    else:
        workdir = data_dir
    serials = tuple(f"{9000000 + i:07d}" for i in range(settings.pbxs))
    relay = await EmbeddedRelay.start(workdir, serials=serials)
    return World(
        relay.address,
        relay.domain,
        relay.pbx_secrets,
        PushInbox.embedded(relay.stand_ins.deliveries),
        ("sim", relay.tenant_key),
        relay.dsn,
        relay.address.http_url + "/metrics",
        aiohttp.ClientSession(),
        workdir,
        relay,
        tmp,
    )


async def target_world(settings: SimSettings, url: str, config: Config) -> World:
    source = str(config.source or "<defaults>")
    pbxs = [p for p in config.sip.pbxs if p.secret and p.static is None]
    if not pbxs:
        raise SimulationError(
            f"{source}: sip.pbx: --target needs the [[sip.pbx]] serials and secrets of the "
            "server it plays against (or use --embedded)"
        )
    if settings.pbxs > len(pbxs):
        raise SimulationError(
            f"{source}: sip.pbx: --pbxs {settings.pbxs} but only {len(pbxs)} PBX(s) configured"
        )
    match = re.fullmatch(r"http://([^/:]+)(?::(\d+))?/?", url)
    if match is None:
        raise SimulationError(f"--target {url}: expected http://HOST[:PORT]")
    host = match.group(1)
    http_url = url.rstrip("/")
    tenant = config.usage.tenants[0] if config.usage.tenants else None
    project = config.crashreports.projects[0] if config.crashreports.projects else None
    port = match.group(2) or "80"
    session = aiohttp.ClientSession()
    try:
        inbox = await PushInbox.from_feed(http_url, session)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        await session.close()
        raise SimulationError(
            f"--target {url}: no push stand-ins' delivery feed there ({exc}); it runs "
            "only when serve has no push credentials"
        ) from None
    world = World(
        RelayAddress(host, config.listen.sip_port, http_url),
        config.sip.domain,
        {p.serial: p.secret for p in pbxs[: settings.pbxs]},
        inbox,
        (tenant.id, tenant.key) if tenant else None,
        f"http://{project.key}@{host}:{port}/{project.id}" if project else None,
        http_url + "/metrics",
        session,
        Path(tempfile.gettempdir()),
    )
    # Every 127/8 address is the loopback interface on Linux, not elsewhere.
    world.own_addresses = sys.platform == "linux" and _is_loopback(host)
    return world


def default_target(config: Config) -> str:
    """The HTTP address of a `serve` of this configuration, as a client reaches it."""
    host = config.listen.http_host
    if host in ("", "0.0.0.0", "::"):  # noqa: S104  (a wildcard listen address, not a bind)
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.listen.http_port}"


async def reachable(url: str) -> bool:
    """Whether a softrelay answers `GET /healthz` at `url` within a second."""
    timeout = aiohttp.ClientTimeout(total=1.0)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url.rstrip("/") + "/healthz") as response,
        ):
            return response.status == 200
    except (aiohttp.ClientError, OSError, TimeoutError):
        return False


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


# --- the run --------------------------------------------------------------------------


class Simulation:
    def __init__(self, settings: SimSettings, world: World, stop: asyncio.Event) -> None:
        self.settings = settings
        self.world = world
        self.stop = stop
        self.rng = random.Random(settings.seed)  # noqa: S311  (simulation draws, no secrets)
        self.pace = Pace(settings.speed, self.rng)
        self.stats = Stats()
        self.pbxs: list[MockPbx] = []
        self.phones: list[MockPhone] = []
        self.opted_in: set[str] = set()
        self._usage: dict[str, UsageClient] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._started_at = 0.0

    def elapsed(self) -> float:
        """Simulated seconds since the events began."""
        if self._started_at == 0.0:
            return 0.0
        real = time.monotonic() - self._started_at
        return (
            self.settings.duration
            if math.isinf(self.settings.speed)
            else real * self.settings.speed
        )

    async def run(self) -> Stats:
        try:
            await self._set_up()
            if not self.stop.is_set():
                await self._events()
        finally:
            self.stats.elapsed = self.elapsed()
            await self._tear_down()
        return self.stats

    async def _set_up(self) -> None:
        s = self.settings
        ring = self.pace.real(s.ring_timeout) or 0.05
        for serial, secret in self.world.pbx_secrets.items():
            try:
                pbx = await MockPbx.connect(
                    self.world.address,
                    serial=serial,
                    secret=secret,
                    domain=self.world.domain,
                    users={},
                    ring_timeout=ring,
                )
            except PbxRefused as exc:
                raise SimulationError(f"PBX {serial}: {exc}") from None
            self.pbxs.append(pbx)
        kinds = _spread(s.mix, s.phones, self.rng)
        transports = _spread(s.transports, s.phones, self.rng)
        answers = _spread(s.answers, s.phones, self.rng)
        for i in range(s.phones):
            pbx = self.pbxs[i % len(self.pbxs)]
            kind = kinds[i]
            transport = transports[i]
            if kind is not Kind.DESKTOP and transport is Transport.UDP:
                transport = Transport.TCP  # a sleeping app's UDP flow cannot be told gone
            user = f"{kind.value}{i + 1}"
            password = f"pw-{self.rng.getrandbits(64):016x}"
            pbx.add_user(user, password)
            spec = PhoneSpec(
                user,
                password,
                kind,
                transport,
                answers[i],
                answer_delay=s.answer_delay,
                wake_delay=s.wake_delay,
                keepalive=0 if math.isinf(s.speed) else 30.0,
                local_host=self.world.local_host(i),
            )
            phone = MockPhone(
                spec,
                self.world.address,
                serial=pbx.serial,
                domain=self.world.domain,
                inbox=self.world.inbox,
                pace=self.pace,
            )
            self.phones.append(phone)
            if self.rng.random() < s.opt_in:
                self.opted_in.add(user)
        gate = asyncio.Semaphore(MAX_CONCURRENT_SETUP)

        async def start(phone: MockPhone) -> None:
            async with gate:
                if self.stop.is_set():
                    return
                status = await phone.start()
                if status != 200:
                    self.stats.register_failed[str(status or "no answer")] += 1
                    return
                self.stats.registered += 1
                await self._ping(phone)
                if phone.spec.kind.pushes and self.rng.random() < s.asleep:
                    await phone.sleep()
                    self.stats.sleeps += 1

        await asyncio.gather(*(start(p) for p in self.phones))

    async def _events(self) -> None:
        s = self.settings
        rates: list[tuple[float, Callable[[], Coroutine[Any, Any, None]]]] = [
            (s.call_rate * (1 - s.outgoing_share), self._pbx_call),
            (s.call_rate * s.outgoing_share, self._phone_call),
            (s.sleep_rate, self._sleep_one),
            (s.crash_rate, self._crash_one),
        ]
        total = sum(rate for rate, _ in rates)
        self._started_at = time.monotonic()
        due = 0.0
        while not self.stop.is_set():
            due += self.rng.expovariate(total) if total > 0 else s.duration
            if due >= s.duration:
                break
            wait = self.pace.real(due - self.elapsed())
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), wait)
                if self.stop.is_set():
                    break
            pick = self.rng.uniform(0, total)
            for rate, action in rates:
                pick -= rate
                if pick <= 0:
                    self._spawn(action())
                    break
            await asyncio.sleep(0)
        if not self.stop.is_set():
            remaining = self.pace.real(s.duration - self.elapsed())
            if remaining > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), remaining)
        # Calls under way finish (bounded by their own timeouts) unless stopped again.
        if self._tasks and not self.stop.is_set():
            finishing = asyncio.create_task(self._finish())
            stopped = asyncio.create_task(self.stop.wait())
            await asyncio.wait({finishing, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            finishing.cancel()

    async def _finish(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        if len(self._tasks) >= MAX_EVENTS_IN_FLIGHT:
            self.stats.skipped_events += 1
            coro.close()
            return
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pbx_call(self) -> None:
        registered = [p for p in self.phones if p.last_register == 200 and p.calls_in_progress == 0]
        if not registered:
            return
        phone = self.rng.choice(registered)
        pbx = next(p for p in self.pbxs if p.serial == phone.serial)
        self.stats.calls_attempted += 1
        self.stats.calls_in_progress += 1
        try:
            result = await pbx.call(
                phone.spec.user, hold=self.pace.real(self.settings.hold.draw(self.rng))
            )
        except Exception as exc:  # a party's link went away mid-call: still an outcome
            self.stats.failed(f"error: {type(exc).__name__}")
            return
        finally:
            self.stats.calls_in_progress -= 1
        self._count(result)
        if result.woken and phone.state is State.AWAKE and phone.calls_in_progress == 0:
            await phone.sleep()  # the app goes back to the background after the call
            self.stats.sleeps += 1

    def _count(self, result: CallResult) -> None:
        if result.woken:
            self.stats.woken_calls += 1
            if result.wake_seconds is not None:
                self.stats.wake_latencies.append(result.wake_seconds)
        if result.connected:
            self.stats.calls_connected += 1
        else:
            self.stats.failed(_reason(result.status, result.reason))

    async def _phone_call(self) -> None:
        awake = [p for p in self.phones if p.state is State.AWAKE and p.calls_in_progress == 0]
        if not awake:
            return
        phone = self.rng.choice(awake)
        self.stats.calls_attempted += 1
        self.stats.calls_in_progress += 1
        try:
            call = await phone.call("echo", hold=self.pace.real(self.settings.hold.draw(self.rng)))
        except Exception as exc:  # a party's link went away mid-call: still an outcome
            self.stats.failed(f"error: {type(exc).__name__}")
            return
        finally:
            self.stats.calls_in_progress -= 1
        if call.connected:
            self.stats.calls_connected += 1
        else:
            self.stats.failed(_reason(call.status, call.reason))

    async def _sleep_one(self) -> None:
        awake = [
            p
            for p in self.phones
            if p.spec.kind.pushes and p.state is State.AWAKE and p.calls_in_progress == 0
        ]
        if awake:
            await self.rng.choice(awake).sleep()
            self.stats.sleeps += 1

    async def _ping(self, phone: MockPhone) -> None:
        if self.world.tenant is None:
            return
        tenant, key = self.world.tenant
        client = self._usage.get(phone.spec.user)
        if client is None:
            state = self.world.workdir / "usage-state" / f"{phone.spec.user}.json"
            client = await asyncio.to_thread(
                UsageClient,
                state,
                tenant=tenant,
                tenant_key=key,
                platform=phone.spec.kind.platform,
                app_version="1.0.0",
            )
            self._usage[phone.spec.user] = client
        try:
            status = await client.used(self.world.session, self.world.address.http_url, time.time())
        except (aiohttp.ClientError, OSError) as exc:
            self.stats.pings[type(exc).__name__] += 1
            return
        if status is not None:
            self.stats.pings[str(status)] += 1

    async def _crash_one(self) -> None:
        if self.world.dsn is None or not self.phones:
            return
        phone = self.rng.choice(self.phones)
        opted_in = phone.spec.user in self.opted_in
        self.stats.crashes["opted_in" if opted_in else "not_opted_in"] += 1
        try:
            await asyncio.to_thread(send_crash, self.world.dsn, phone.spec.kind, opted_in)
        except Exception:  # the SDK's failure is counted, the run goes on
            self.stats.crash_errors += 1

    async def _tear_down(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(p.stop() for p in self.phones), return_exceptions=True)
        self.stats.pushes = await push_outcomes(self.world)
        await asyncio.gather(*(p.close() for p in self.pbxs), return_exceptions=True)


def send_crash(
    dsn: str,
    kind: Kind,
    opted_in: bool,
    *,
    message: str = "simulated crash in CallScreen.render",
    extra: Mapping[str, str] | None = None,
) -> str | None:
    """One crash report, as an app sends it: the stock sentry-sdk, its own client.
    `message` and `extra` are what a careless app puts in a report (the relay scrubs
    them); the event id the SDK gave the report."""
    import sentry_sdk  # the app's SDK, imported where the app would use it
    from sentry_sdk.utils import event_from_exception

    client = sentry_sdk.Client(
        dsn=dsn,
        default_integrations=False,
        auto_enabling_integrations=False,
        release="softphone@1.0.0",
        environment="simulate",
    )
    scope = sentry_sdk.Scope(client=client)
    scope.set_tag("softrelay.opt_in", "yes" if opted_in else "no")
    scope.set_tag("device.kind", kind.value)
    scope.add_breadcrumb(message="opened the dial pad", category="ui")
    for key, value in (extra or {}).items():
        scope.set_extra(key, value)
    # One client per phone, so not the SDK's global hub: capture on this client.
    try:
        raise RuntimeError(message)  # noqa: TRY301
    except RuntimeError as exc:
        event, hint = event_from_exception(exc, client_options=client.options)
        event_id = client.capture_event(event, hint, scope=scope)
    client.flush(timeout=5)
    client.close(timeout=5)
    return event_id


async def push_outcomes(world: World) -> dict[str, float]:
    """Pushes by outcome, from the relay's `softrelay_push_total` counters."""
    try:
        async with world.session.get(world.metrics_url) as response:
            text = await response.text()
    except (aiohttp.ClientError, OSError):
        return {}
    outcomes: Counter[str] = Counter()
    for line in text.splitlines():
        match = re.match(r"softrelay_push_total\{([^}]*)\} ([0-9.e+]+)$", line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
            outcomes[labels.get("outcome", "?")] += int(float(match.group(2)))
    return dict(outcomes)


def _reason(status: int, reason: str) -> str:
    return f"{status} {reason}".strip() if status else reason or "no answer"


def _spread(shares: dict[Any, float], n: int, rng: random.Random) -> list[Any]:
    """`n` items in the given shares (largest remainder), shuffled."""
    total = sum(shares.values())
    exact = {k: n * v / total for k, v in shares.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)[
        : n - sum(counts.values())
    ]:
        counts[k] += 1
    items = [k for k, c in counts.items() for _ in range(c)]
    rng.shuffle(items)
    return items


# --- the command ----------------------------------------------------------------------


def add_simulate_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    sim = sub.add_parser(
        "simulate", parents=[common], help="mock phones and PBXs against a softrelay"
    )
    where = sim.add_mutually_exclusive_group()
    where.add_argument("--embedded", action="store_true", help="start softrelay in-process")
    where.add_argument(
        "--target",
        metavar="URL",
        help="a running serve (default: this config's HTTP address if it answers, else --embedded)",
    )
    sim.add_argument("--scenario", metavar="FILE", help="a TOML scenario (options override it)")
    sim.add_argument("--phones", type=int)
    sim.add_argument("--pbxs", type=int)
    sim.add_argument("--duration", type=float, help="simulated seconds")
    sim.add_argument("--mix", help="phone kinds, e.g. ios=0.4,android=0.4,desktop=0.2")
    sim.add_argument("--transports", help="e.g. tcp=0.8,ws=0.1,udp=0.1 (udp: desktops only)")
    sim.add_argument("--call-rate", type=float, help="calls per second, in all")
    sim.add_argument("--sleep-rate", type=float, help="phones falling asleep per second")
    sim.add_argument("--crash-rate", type=float, help="crashes per second, in all")
    sim.add_argument("--opt-in", type=float, help="share of users opted in to crash reports")
    sim.add_argument("--wake-delay", help="push to re-REGISTER, e.g. lognormal:1.5,0.4")
    sim.add_argument("--speed", type=float, help="simulated seconds per second (default 1)")
    sim.add_argument("--seed", type=int)
    sim.add_argument("--json", metavar="FILE", help="write the summary as JSON")
    sim.add_argument("--no-live", action="store_true", help="no live view, summary only")


def settings_from_args(args: argparse.Namespace, base: SimSettings) -> SimSettings:
    """The scenario's settings (or the defaults) with the command line's options on top."""
    changes: dict[str, Any] = {}
    for name in (
        "phones",
        "pbxs",
        "duration",
        "call_rate",
        "sleep_rate",
        "crash_rate",
        "opt_in",
        "speed",
        "seed",
    ):
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = value
    try:
        if args.mix:
            changes["mix"] = parse_shares(args.mix, Kind, "--mix")
        if args.transports:
            changes["transports"] = parse_shares(args.transports, Transport, "--transports")
        if args.wake_delay:
            changes["wake_delay"] = Delay.parse(args.wake_delay)
    except ValueError as exc:
        raise SimulationError(str(exc)) from None
    return check(replace(base, **changes), "option")


def parse_shares(text: str, enum: Any, what: str) -> dict[Any, float]:
    shares: dict[Any, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            shares[enum(name.strip())] = float(value) if sep else 1.0
        except ValueError:
            names = ", ".join(e.value for e in enum)
            raise ValueError(
                f"{what} {text}: {part!r} is not NAME=SHARE with NAME one of {names}"
            ) from None
    if any(v < 0 or not math.isfinite(v) for v in shares.values()) or sum(shares.values()) <= 0:
        raise ValueError(f"{what} {text}: shares must be non-negative and not all zero")
    return shares


def check(settings: SimSettings, where: str) -> SimSettings:
    problems = []
    if settings.phones < 1:
        problems.append("phones must be at least 1")
    if settings.pbxs < 1:
        problems.append("pbxs must be at least 1")
    if not settings.duration > 0:
        problems.append("duration must be positive")
    for name in ("call_rate", "sleep_rate", "crash_rate"):
        if not getattr(settings, name) >= 0:
            problems.append(f"{name.replace('_', '-')} must not be negative")
    if not 0 <= settings.opt_in <= 1:
        problems.append("opt-in must be between 0 and 1")
    if not settings.speed > 0:
        problems.append("speed must be positive")
    if problems:
        raise SimulationError(f"{where}: {'; '.join(problems)}")
    return settings


def simulate_command(args: argparse.Namespace, config: Config) -> int:
    """Run `softrelay simulate`; exit 0, or 2 for options or configuration that cannot
    work (one line naming the option, or the file and the key)."""
    import uvloop

    from mockphone.scenario import load_scenario
    from mockphone.view import LiveView, print_summary

    try:
        base = load_scenario(Path(args.scenario)) if args.scenario else SimSettings()
        settings = settings_from_args(args, base)
    except SimulationError as exc:
        print(f"softrelay: {exc}", file=sys.stderr)
        return 2

    async def main() -> dict[str, Any]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        target = args.target
        if target is None and not args.embedded:
            # The plain command plays against `make run`'s server when one answers.
            target = default_target(config)
            if not await reachable(target):
                print(
                    f"softrelay: simulate: no softrelay answers at {target}; starting one "
                    "in this process (--embedded)",
                    file=sys.stderr,
                )
                target = None
        if target:
            world = await target_world(settings, target, config)
        else:
            data_dir = Path(args.data_dir) if args.data_dir else None
            world = await embedded_world(settings, data_dir)
        try:
            simulation = Simulation(settings, world, stop)
            live = not args.no_live and sys.stdout.isatty()
            async with LiveView(simulation, enabled=live):
                stats = await simulation.run()
            stats.interrupted = stop.is_set()
            return stats.summary(settings)
        finally:
            await world.close()

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            summary = runner.run(main())
    except SimulationError as exc:
        print(f"softrelay: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"softrelay: simulate: {exc}", file=sys.stderr)
        return 2
    print_summary(summary)
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    return 0
