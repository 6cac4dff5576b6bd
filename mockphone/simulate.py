"""The simulation behind `softrelay simulate`: many mock phones and PBXs against one
softrelay (the command and its worlds: softrelay/simulate.py).

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

Several targets (`--target http://A:8081?sip=5061,http://B:8082?sip=5062`, or the option
repeated) are the nodes of a cluster: the PBXs are dealt out over them in turn, and each
phone goes to its PBX's node (`--placement pbx`, the default: every call stays on one
node, which two relays that know nothing of each other can carry too), or the phones of
each PBX are dealt out over the nodes in turn, starting at the PBX's (`--placement
spread`: with N nodes, (N-1)/N of the phones reach their PBX across nodes, which needs a
cluster that forwards between its nodes). The push inbox follows every node's delivery
feed, and the summary adds `nodes`: per node its phones (and how many of them have their
PBX on another node) and PBXs, registrations, the calls to or from its phones, their
wakes, and the pushes its own counters show.

What happens: every PBX links; every phone registers through its PBX; a share of the
mobile phones (`asleep`) go to sleep at once. Then, until `--duration` simulated seconds
have passed, events arrive as Poisson processes: calls (`--call-rate` per second in all;
most from a PBX to a random phone, the rest from an awake phone to its PBX), sleeps of
awake mobile phones (`--sleep-rate`) and crashes (`--crash-rate`; a phone that opted in,
`--opt-in` of them, sends its report through the stock sentry-sdk with the opt-in tag,
the others without; each report carries fake personal data of its user, `crash_details`,
for the relay to scrub). A woken phone takes its call and goes back to sleep. Each phone is
"used" once at start and pings usage (`usage/client.py`). `--speed` runs that many
simulated seconds per second. Ctrl-C ends the run early and still prints the summary.

The events are drawn from their own random stream (`Simulation.events`), so a seed fixes
them whatever the parties draw. A test injects a `SteppedPace`: the clock then moves only
as the simulation waits, no wait costs real time, and the events run one after another,
so a seeded run gives the same outcome every time.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import re
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from mockphone.contactsmix import ContactsMix, ContactsStats, user_number
from mockphone.delays import Delay, Pace, SteppedPace
from mockphone.pbx import CallResult, MockPbx, PbxRefused
from mockphone.phone import WAKE_DELAY, Answer, Kind, MockPhone, PhoneSpec, State
from mockphone.pushes import PushInbox
from mockphone.sip import TIMEOUT, RelayAddress, Transport
from mockphone.sipis import Provider, ProviderCaller, SipisPhone
from usage.client import UsageClient

CALLEE = "echo"  # whom phones call: a user of their PBX, or of the SIPIS apps' provider
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
    # Texts per second, in all, from a caller at the provider to sleeping SIPIS apps.
    text_rate: float = 0.0
    # Share of the relay-mode phones whose users sync a book and use Smart Contacts
    # (mockphone/contactsmix.py), and their book edits with a discovery, per second.
    contacts: float = 0.0
    contacts_rate: float = 0.0
    opt_in: float = 0.5  # share of phones whose users opted in to crash reports
    asleep: float = 0.6  # share of mobile phones asleep right after registering
    wake_delay: Delay = WAKE_DELAY
    answer_delay: Delay = ANSWER_DELAY
    hold: Delay = HOLD  # talk time before the caller hangs up
    ring_timeout: float = 20.0  # simulated seconds a PBX lets a call ring
    speed: float = 1.0
    seed: int | None = None
    # Several relays (`--target A,B`): "pbx" puts each phone on the node of its PBX, so
    # every call stays on one node; "spread" deals each PBX's phones out over the nodes,
    # so calls cross nodes (a cluster forwards them between its nodes).
    placement: str = "pbx"


PLACEMENTS = ("pbx", "spread")


@dataclass
class NodeStats:
    """The figures of one node: its parties, and the calls to or from its phones."""

    phones: int = 0
    phones_pbx_elsewhere: int = 0  # phones here whose PBX is on another node
    pbxs: int = 0
    registered: int = 0
    register_failed: Counter[str] = field(default_factory=Counter)
    calls_attempted: int = 0
    calls_connected: int = 0
    calls_failed: Counter[str] = field(default_factory=Counter)
    woken_calls: int = 0
    wake_latencies: list[float] = field(default_factory=list)
    pushes: dict[str, float] = field(default_factory=dict)  # from the node's own counters

    def summary(self) -> dict[str, Any]:
        return {
            "phones": self.phones,
            "phones_pbx_elsewhere": self.phones_pbx_elsewhere,
            "pbxs": self.pbxs,
            "registrations": {"ok": self.registered, "failed": dict(self.register_failed)},
            "calls": {
                "attempted": self.calls_attempted,
                "connected": self.calls_connected,
                "failed": dict(sorted(self.calls_failed.items())),
                "woken": self.woken_calls,
            },
            "wake_latency": latency_summary(self.wake_latencies),
            "pushes": dict(sorted(self.pushes.items())),
        }


@dataclass
class SipisStats:
    """The SIPIS-mode apps' figures: their accounts, the calls and texts to them."""

    apps: int = 0
    accounts_registered: int = 0  # registered at the provider by softrelay
    account_failures: Counter[str] = field(default_factory=Counter)
    calls_attempted: int = 0
    calls_to_sleeping: int = 0  # the app had no flow when the call came
    calls_delivered: int = 0  # of those: the INVITE reached the app after its push
    calls_connected: int = 0
    calls_failed: Counter[str] = field(default_factory=Counter)
    calls_placed: int = 0  # by the apps, through softrelay to the provider's line
    placed_connected: int = 0
    placed_failed: Counter[str] = field(default_factory=Counter)
    texts_sent: int = 0
    texts_accepted: Counter[str] = field(default_factory=Counter)  # by final status
    texts_delivered: int = 0  # received by the sleeping app after its push
    delivery_latencies: list[float] = field(default_factory=list)  # INVITE to app's 180

    def summary(self) -> dict[str, Any]:
        return {
            "apps": self.apps,
            "accounts": {
                "registered": self.accounts_registered,
                "failed": dict(sorted(self.account_failures.items())),
            },
            "calls": {
                "attempted": self.calls_attempted,
                "to_sleeping_apps": self.calls_to_sleeping,
                "delivered_to_sleeping_apps": self.calls_delivered,
                "connected": self.calls_connected,
                "failed": dict(sorted(self.calls_failed.items())),
            },
            "delivery_latency": latency_summary(self.delivery_latencies),
            "placed_calls": {
                "attempted": self.calls_placed,
                "connected": self.placed_connected,
                "failed": dict(sorted(self.placed_failed.items())),
            },
            "texts": {
                "sent": self.texts_sent,
                "answered": dict(sorted(self.texts_accepted.items())),
                "delivered_to_sleeping_apps": self.texts_delivered,
            },
        }


@dataclass
class Stats:
    started: float = field(default_factory=time.monotonic)
    elapsed: float = 0.0  # simulated seconds
    registered: int = 0
    register_failed: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)  # events run, by kind
    calls_attempted: int = 0
    calls_unplaced: int = 0  # a call event found no one to call (no phone free or awake)
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
    nodes: dict[str, NodeStats] = field(default_factory=dict)  # by node name, in order
    sipis: SipisStats = field(default_factory=SipisStats)
    contacts: ContactsStats = field(default_factory=ContactsStats)

    def failed(self, reason: str, node: NodeStats | None = None) -> None:
        self.calls_failed[reason] += 1
        if node is not None:
            node.calls_failed[reason] += 1

    def summary(self, settings: SimSettings) -> dict[str, Any]:
        return (
            {
                "phones": settings.phones,
                "pbxs": settings.pbxs,
                "duration": settings.duration,
                "simulated_seconds": round(self.elapsed, 3),
                "wall_seconds": round(time.monotonic() - self.started, 3),
                "interrupted": self.interrupted,
                "registrations": {"ok": self.registered, "failed": dict(self.register_failed)},
                "events": dict(sorted(self.events.items())),
                "calls": {
                    "attempted": self.calls_attempted,
                    "connected": self.calls_connected,
                    "failed": dict(sorted(self.calls_failed.items())),
                    "woken": self.woken_calls,
                    "unplaced": self.calls_unplaced,
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
            | self._by_node()
            | self._sipis()
            | ({"contacts": self.contacts.summary()} if self.contacts.users else {})
        )

    def _sipis(self) -> dict[str, Any]:
        """SIPIS mode's figures, when the mix has SIPIS apps."""
        return {"sipis": self.sipis.summary()} if self.sipis.apps else {}

    def _by_node(self) -> dict[str, Any]:
        """The figures per node, with several (with one, they are the totals above)."""
        if len(self.nodes) < 2:
            return {}
        return {"nodes": {name: node.summary() for name, node in self.nodes.items()}}


def latency_summary(values: list[float]) -> dict[str, float | int | None]:
    """Count and nearest-rank p50/p95/p99, in seconds."""
    ordered = sorted(values)

    def rank(p: float) -> float | None:
        if not ordered:
            return None
        return round(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)], 4)

    return {"count": len(ordered), "p50": rank(50), "p95": rank(95), "p99": rank(99)}


# --- the world the parties play in ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Node:
    """One relay the parties play against: a node of a cluster, or the only one."""

    name: str  # as the summary shows it: host:port of its HTTP address
    address: RelayAddress
    metrics_url: str


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
    # Stops a relay the world started itself (`--embedded`); the composition root
    # supplies it, since mock parties must not import the relay they play against.
    stop_relay: Callable[[], Coroutine[Any, Any, None]] | None = None
    _tmp: tempfile.TemporaryDirectory[str] | None = None
    # Each phone connects from its own loopback address (127.1.x.y), as real phones
    # come from addresses of their own: a served relay limits connections per address.
    own_addresses: bool = False
    # Every node played against (`--target A,B`); empty: the one of `address`. The
    # inbox follows the pushes of all of them.
    nodes: list[Node] = field(default_factory=list)
    # The SIP provider whose accounts SIPIS-mode apps store with softrelay (`--mix
    # sipis=...`): a real registrar the composition root started, or None.
    provider: Provider | None = None

    def all_nodes(self) -> list[Node]:
        if self.nodes:
            return self.nodes
        name = self.address.http_url.removeprefix("http://") or self.address.host
        return [Node(name, self.address, self.metrics_url)]

    def local_host(self, i: int) -> str:
        """The address phone `i` connects from."""
        if not self.own_addresses:
            return "127.0.0.1"
        return f"127.{1 + i // 62_500}.{i // 250 % 250}.{1 + i % 250}"

    async def close(self) -> None:
        await self.inbox.close()
        await self.session.close()
        if self.stop_relay is not None:
            await self.stop_relay()
        if self._tmp is not None:
            self._tmp.cleanup()


class Simulation:
    def __init__(
        self,
        settings: SimSettings,
        world: World,
        stop: asyncio.Event,
        *,
        pace: Pace | None = None,
    ) -> None:
        """`pace` None: real time at `settings.speed`, or a `SteppedPace` for speed `inf`.
        An injected pace brings its clock; its random source is replaced by the run's."""
        self.settings = settings
        self.world = world
        self.stop = stop
        self.rng = random.Random(settings.seed)  # noqa: S311  (simulation draws, no secrets)
        # The events' own stream, drawn first: the parties' draws cannot shift them.
        self._events_seed = self.rng.getrandbits(64)
        if pace is None:
            # Speed `inf`: as fast as the parties answer, the events one after another.
            pace = SteppedPace() if math.isinf(settings.speed) else Pace(settings.speed)
        self.pace = pace
        self.pace.rng = self.rng
        self.stats = Stats()
        self.pbxs: list[MockPbx] = []
        self.phones: list[MockPhone] = []
        self.opted_in: set[str] = set()
        self._usage: dict[str, UsageClient] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._started_at: float | None = None
        self._node_of: dict[str, Node] = {}  # PBX serial or phone user -> its node
        self.caller: ProviderCaller | None = None  # calls and texts SIPIS apps
        self._caller_scope: contextlib.AsyncExitStack | None = None
        self._sipis_busy: set[str] = set()  # SIPIS apps in a call or text event now
        self.contacts = ContactsMix(world.session, self.rng, self.stats.contacts)

    def _stats_of(self, phone: MockPhone) -> NodeStats:
        return self.stats.nodes[self._node_of[phone.spec.user].name]

    def elapsed(self) -> float:
        """Simulated seconds since the events began."""
        if self._started_at is None:
            return 0.0
        if math.isinf(self.pace.speed) and not self.pace.sequential:
            return self.settings.duration  # every event is due at once
        return self.pace.now() - self._started_at

    def _actions(self) -> list[tuple[str, float, Callable[[], Coroutine[Any, Any, None]]]]:
        s = self.settings
        return [
            ("pbx_call", s.call_rate * (1 - s.outgoing_share), self._pbx_call),
            ("phone_call", s.call_rate * s.outgoing_share, self._phone_call),
            ("sleep", s.sleep_rate, self._sleep_one),
            ("crash", s.crash_rate, self._crash_one),
            # Last: a zero rate leaves the other events' draws as they were.
            ("text", s.text_rate, self._text_one),
            ("contacts", s.contacts_rate, self.contacts.event),
        ]

    def events(self) -> Iterator[tuple[float, str]]:
        """The run's events: (simulated seconds after the start, kind), in order; the
        same for every run with the same seed (Poisson processes of the rates)."""
        rng = random.Random(self._events_seed)  # noqa: S311  (simulation draws)
        rates = [(name, rate) for name, rate, _ in self._actions()]
        total = sum(rate for _, rate in rates)
        due = 0.0
        while total > 0:
            due += rng.expovariate(total)
            if due >= self.settings.duration:
                return
            pick = rng.uniform(0, total)
            for name, rate in rates:
                pick -= rate
                if pick <= 0:
                    yield due, name
                    break

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
        # On an injected pace no wait costs real time, so the ring timeout cannot be
        # paced: a bound on a transaction instead (parties that ignore calls ring that
        # long, in real seconds).
        ring = TIMEOUT if self.pace.sequential else self.pace.real(s.ring_timeout) or 0.05
        nodes = self.world.all_nodes()
        self.stats.nodes = {node.name: NodeStats() for node in nodes}
        for j, (serial, secret) in enumerate(self.world.pbx_secrets.items()):
            node = nodes[j % len(nodes)]  # PBXs dealt out over the nodes in turn
            self._node_of[serial] = node
            self.stats.nodes[node.name].pbxs += 1
            try:
                pbx = await MockPbx.connect(
                    node.address,
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
        provider = self.world.provider
        sipis_apps = kinds.count(Kind.SIPIS)
        if sipis_apps:
            if provider is None or len(provider.accounts) < sipis_apps:
                raise SimulationError(
                    f"--mix sipis: {sipis_apps} SIPIS app(s) but this world's provider has "
                    f"{0 if provider is None else len(provider.accounts)} account(s)"
                )
            self._caller_scope = contextlib.AsyncExitStack()
            self.caller = await self._caller_scope.enter_async_context(
                ProviderCaller.open(
                    provider.host, provider.port, provider.domain, ring_timeout=ring
                )
            )
            line = provider.line
            if line is not None and await self.caller.register(line.user, line.password) != 200:
                raise SimulationError(f"--mix sipis: the provider refused its user {line.user}")
        provider_accounts = iter(provider.accounts if provider is not None else ())
        # The first of the relay-mode phones (their kinds are shuffled) use contacts.
        contacts_users = share_counts({1: s.contacts, 0: 1 - s.contacts}, s.phones).get(1, 0)
        for i in range(s.phones):
            pbx = self.pbxs[i % len(self.pbxs)]
            home = nodes.index(self._node_of[pbx.serial])
            # Phone i is its PBX's (i // pbxs)-th: "spread" puts it that many nodes on.
            turn = 0 if s.placement == "pbx" else i // len(self.pbxs)
            node = nodes[(home + turn) % len(nodes)]
            kind = kinds[i]
            transport = transports[i]
            if kind is not Kind.DESKTOP and transport is Transport.UDP:
                transport = Transport.TCP  # a sleeping app's UDP flow cannot be told gone
            if kind is Kind.SIPIS:
                account = next(provider_accounts)
                user, password = account.user, account.password
            else:
                user = f"{kind.value}{i + 1}"
                password = f"pw-{self.rng.getrandbits(64):016x}"
                if len(self.contacts.users) < contacts_users:
                    # A phone number: softrelay makes it discoverable once proved.
                    user = user_number(i)
                    self.contacts.add(user, password, pbx.serial, node.address.http_url)
                pbx.add_user(user, password)
            spec = PhoneSpec(
                user,
                password,
                kind,
                transport,
                answers[i],
                answer_delay=s.answer_delay,
                wake_delay=s.wake_delay,
                keepalive=0 if math.isinf(self.pace.speed) else 30.0,
                local_host=self.world.local_host(i),
            )
            self._node_of[user] = node
            self.stats.nodes[node.name].phones += 1
            if node.name != nodes[home].name:
                self.stats.nodes[node.name].phones_pbx_elsewhere += 1
            phone: MockPhone
            if kind is Kind.SIPIS:
                self.stats.sipis.apps += 1
                phone = SipisPhone(
                    spec,
                    node.address,
                    account=account,
                    relay_domain=self.world.domain,
                    session=self.world.session,
                    inbox=self.world.inbox,
                    pace=self.pace,
                )
            else:
                phone = MockPhone(
                    spec,
                    node.address,
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
                node = self._stats_of(phone)
                sipis = isinstance(phone, SipisPhone)
                if status != 200:
                    self.stats.register_failed[str(status or "no answer")] += 1
                    node.register_failed[str(status or "no answer")] += 1
                    if isinstance(phone, SipisPhone):
                        reason = str(status) if status else phone.provider_state or "no answer"
                        self.stats.sipis.account_failures[reason] += 1
                    return
                self.stats.registered += 1
                node.registered += 1
                if sipis:
                    self.stats.sipis.accounts_registered += 1
                await self._ping(phone)
                if sipis:
                    return  # asleep from the start: it connects only when pushed
                if phone.spec.kind.pushes and self.rng.random() < s.asleep:
                    await phone.sleep()
                    self.stats.sleeps += 1

        await asyncio.gather(*(start(p) for p in self.phones))
        if self.contacts.users and not self.stop.is_set():
            users = {p.spec.user: p for p in self.phones}
            await self.contacts.set_up(lambda user: users[user].last_register == 200)

    async def _events(self) -> None:
        s = self.settings
        actions = {name: action for name, _, action in self._actions()}
        self._started_at = start = self.pace.now()
        for due, name in self.events():
            if self.stop.is_set():
                break
            await self.pace.wait_until(start + due, self.stop)
            if self.stop.is_set():
                break
            self.stats.events[name] += 1
            if self.pace.sequential:
                await actions[name]()  # one after another: the outcome is the seed's
            else:
                self._spawn(actions[name]())
                await asyncio.sleep(0)
        if not self.stop.is_set():
            await self.pace.wait_until(start + s.duration, self.stop)
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
        registered = [
            p
            for p in self.phones
            if p.last_register == 200
            and p.calls_in_progress == 0
            and p.spec.user not in self._sipis_busy
        ]
        if not registered:
            self.stats.calls_unplaced += 1
            return
        phone = self.rng.choice(registered)
        if isinstance(phone, SipisPhone):
            await self._sipis_call(phone)
            return
        pbx = next(p for p in self.pbxs if p.serial == phone.serial)
        node = self._stats_of(phone)
        self.stats.calls_attempted += 1
        node.calls_attempted += 1
        self.stats.calls_in_progress += 1
        try:
            result = await pbx.call(
                phone.spec.user, hold=self.pace.real(self.settings.hold.draw(self.rng))
            )
        except Exception as exc:  # a party's link went away mid-call: still an outcome
            self.stats.failed(f"error: {type(exc).__name__}", node)
            return
        finally:
            self.stats.calls_in_progress -= 1
        self._count(result, node)
        if result.woken and phone.state is State.AWAKE and phone.calls_in_progress == 0:
            await phone.sleep()  # the app goes back to the background after the call
            self.stats.sleeps += 1

    def _count(self, result: CallResult, node: NodeStats) -> None:
        if result.woken:
            self.stats.woken_calls += 1
            node.woken_calls += 1
            if result.wake_seconds is not None:
                self.stats.wake_latencies.append(result.wake_seconds)
                node.wake_latencies.append(result.wake_seconds)
        if result.connected:
            self.stats.calls_connected += 1
            node.calls_connected += 1
        else:
            self.stats.failed(_reason(result.status, result.reason), node)

    async def _sipis_call(self, phone: SipisPhone) -> None:
        """A call from outside, through the provider, to a SIPIS app (asleep, unless a
        text woke it just now): delivered when its INVITE reached the app."""
        assert self.caller is not None
        stats, node = self.stats.sipis, self._stats_of(phone)
        asleep = phone.state is not State.AWAKE
        before = phone.counters.calls_in
        self._sipis_busy.add(phone.spec.user)
        self.stats.calls_attempted += 1
        node.calls_attempted += 1
        stats.calls_attempted += 1
        stats.calls_to_sleeping += asleep
        self.stats.calls_in_progress += 1
        try:
            hold = self.pace.real(self.settings.hold.draw(self.rng))
            result = await self.caller.call(phone.spec.user, hold=hold)
        except Exception as exc:  # the caller's socket went away: still an outcome
            self.stats.failed(f"error: {type(exc).__name__}", node)
            stats.calls_failed[f"error: {type(exc).__name__}"] += 1
            return
        finally:
            self.stats.calls_in_progress -= 1
            self._sipis_busy.discard(phone.spec.user)
        if asleep and phone.counters.calls_in > before:
            stats.calls_delivered += 1
            if result.wake_seconds is not None:
                stats.delivery_latencies.append(result.wake_seconds)
        self._count(result, node)
        if result.connected:
            stats.calls_connected += 1
        else:
            stats.calls_failed[_reason(result.status, result.reason)] += 1
        if phone.state is State.AWAKE and phone.calls_in_progress == 0:
            await phone.sleep()  # the app connected for this call only
            self.stats.sleeps += 1

    async def _text_one(self) -> None:
        """A text from outside to a sleeping SIPIS app; delivered when the app, woken by
        the "new message" push, received it."""
        asleep = [
            p
            for p in self.phones
            if isinstance(p, SipisPhone)
            and p.last_register == 200
            and p.state is State.ASLEEP
            and p.spec.user not in self._sipis_busy
        ]
        if not asleep or self.caller is None:
            return
        phone = self.rng.choice(asleep)
        stats = self.stats.sipis
        self._sipis_busy.add(phone.spec.user)
        try:
            texts = len(phone.texts)
            stats.texts_sent += 1
            status = await self.caller.text(phone.spec.user, f"text {stats.texts_sent}")
            stats.texts_accepted[str(status or "no answer")] += 1
            if status == 202:
                with contextlib.suppress(TimeoutError):
                    await phone.wait_texts(texts + 1)
                    stats.texts_delivered += 1
        finally:
            self._sipis_busy.discard(phone.spec.user)

    async def _phone_call(self) -> None:
        # Awake relay-mode phones, and SIPIS apps (asleep: the user opens the app to
        # call) when their provider has a line to call.
        provider = self.world.provider
        lines = provider is not None and provider.line is not None
        awake = [
            p
            for p in self.phones
            if p.calls_in_progress == 0
            and p.spec.user not in self._sipis_busy
            and (
                (p.state is State.AWAKE and not isinstance(p, SipisPhone))
                or (isinstance(p, SipisPhone) and lines and p.last_register == 200)
            )
        ]
        if not awake:
            self.stats.calls_unplaced += 1
            return
        phone = self.rng.choice(awake)
        node = self._stats_of(phone)
        self.stats.calls_attempted += 1
        node.calls_attempted += 1
        self.stats.calls_in_progress += 1
        try:
            hold = self.pace.real(self.settings.hold.draw(self.rng))
            if isinstance(phone, SipisPhone):
                self._sipis_busy.add(phone.spec.user)
                self.stats.sipis.calls_placed += 1
                call = await phone.place_call(CALLEE, hold=hold)
            else:
                call = await phone.call(CALLEE, hold=hold)
        except Exception as exc:  # a party's link went away mid-call: still an outcome
            self.stats.failed(f"error: {type(exc).__name__}", node)
            return
        finally:
            self.stats.calls_in_progress -= 1
            self._sipis_busy.discard(phone.spec.user)
        if call.connected:
            self.stats.calls_connected += 1
            node.calls_connected += 1
        else:
            self.stats.failed(_reason(call.status, call.reason), node)
        if isinstance(phone, SipisPhone):
            sipis = self.stats.sipis
            if call.connected:
                sipis.placed_connected += 1
            else:
                sipis.placed_failed[_reason(call.status, call.reason)] += 1

    async def _sleep_one(self) -> None:
        awake = [
            p
            for p in self.phones
            if p.spec.kind.pushes
            and p.state is State.AWAKE
            and p.calls_in_progress == 0
            and p.spec.user not in self._sipis_busy
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
            node = self._node_of[phone.spec.user]  # the phone's own node takes its pings
            # From the phone's own address, as real apps ping from theirs: the server's
            # per-address ping limit then counts apps, not the one simulate process.
            bound = aiohttp.TCPConnector(local_addr=(phone.spec.local_host, 0))
            async with aiohttp.ClientSession(connector=bound) as session:
                status = await client.used(session, node.address.http_url, time.time())
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
        message, extra = crash_details(phone.spec, self.world.domain)
        try:
            await asyncio.to_thread(
                send_crash,
                self.world.dsn,
                phone.spec.kind,
                opted_in,
                message=message,
                extra=extra,
            )
        except Exception:  # the SDK's failure is counted, the run goes on
            self.stats.crash_errors += 1

    async def _tear_down(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(p.stop() for p in self.phones), return_exceptions=True)
        self.stats.pushes = {}
        for node in self.world.all_nodes():
            pushes = await push_outcomes(self.world.session, node.metrics_url)
            self.stats.nodes[node.name].pushes = pushes
            for outcome, count in pushes.items():
                self.stats.pushes[outcome] = self.stats.pushes.get(outcome, 0) + count
        await asyncio.gather(*(p.close() for p in self.pbxs), return_exceptions=True)
        if self._caller_scope is not None:
            await self._caller_scope.aclose()


def crash_details(spec: PhoneSpec, domain: str) -> tuple[str, dict[str, str]]:
    """What a careless app puts into its crash report: its user's personal data (fake,
    made from the phone's user name, with its real SIP password), which the relay's
    scrubber must remove before anything is stored. The message and the extras."""
    number = f"+49 30 555{zlib.crc32(spec.user.encode()) % 100_000:05d}"
    email = f"{spec.user}@example.com"
    message = f"call to {number} from {email} failed in CallScreen.render"
    return message, {
        "sip_uri": f"sip:{spec.user}@{domain}",
        "caller_name": "Erika Mustermann",
        "password": spec.password,
        "last_ip": f"203.0.113.{zlib.crc32(spec.user.encode()) % 250 + 1}",
        "contact": email,
    }


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


async def push_outcomes(session: aiohttp.ClientSession, metrics_url: str) -> dict[str, float]:
    """Pushes by outcome, from a relay's `softrelay_push_total` counters."""
    try:
        async with session.get(metrics_url) as response:
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


def share_counts(shares: Mapping[Any, float], n: int) -> dict[Any, int]:
    """How many of `n` items each share gets (largest remainder)."""
    total = sum(shares.values())
    exact = {k: n * v / total for k, v in shares.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)[
        : n - sum(counts.values())
    ]:
        counts[k] += 1
    return counts


def _spread(shares: dict[Any, float], n: int, rng: random.Random) -> list[Any]:
    """`n` items in the given shares (largest remainder), shuffled."""
    items = [k for k, c in share_counts(shares, n).items() for _ in range(c)]
    rng.shuffle(items)
    return items


# --- the command ----------------------------------------------------------------------


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
    for name in ("call_rate", "sleep_rate", "crash_rate", "text_rate", "contacts_rate"):
        if not getattr(settings, name) >= 0:
            problems.append(f"{name.replace('_', '-')} must not be negative")
    if not 0 <= settings.opt_in <= 1:
        problems.append("opt-in must be between 0 and 1")
    if not 0 <= settings.contacts <= 1:
        problems.append("contacts must be between 0 and 1")
    if not settings.speed > 0:
        problems.append("speed must be positive")
    if settings.placement not in PLACEMENTS:
        problems.append(f"placement must be one of {', '.join(PLACEMENTS)}")
    if problems:
        raise SimulationError(f"{where}: {'; '.join(problems)}")
    return settings
