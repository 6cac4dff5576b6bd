"""Keeping SIPIS accounts registered at their providers (RFC 3261 10.2).

    regs = await Registrations.create(settings, clock, registry, handler=...)
    regs.add(account)                 # PENDING, registered after its start delay
    regs.update(account)              # new registrar or credential: re-registered
    await regs.pause(account_id)      # un-REGISTER (Expires: 0), PAUSED
    regs.resume(account_id)
    await regs.remove(account_id)     # un-REGISTER, forgotten
    regs.status(account_id)           # sipis.account.Status
    await regs.close()                # bindings stay: a restart registers again

One REGISTER at a time per account, each one a job of one scheduler: a job is due at a
time (the start delay, a refresh, a backoff, or now for the answer to a challenge), and
when it is due it also needs a slot of its registrar's rate (`RateWindow`: at most
`rate` REGISTERs in any second per registrar host:port, retries and challenge answers
included). So a thousand accounts loaded after a restart start at random moments
within `start_spread`, and never more than `rate` a second reach one registrar.

A REGISTER carries To/From = the account's address of record, a Call-ID and From tag
kept for the account's life (refreshes are the same registration, RFC 3261 10.2.4), and
`Contact: <sip:{account_id}@{our address as the registrar sees it};transport=...>
;+sip.instance="<urn:uuid:...>";reg-id=1` with `Supported: path, outbound`.
The provider's requests to that contact come back on the socket or connection and are
handed, with the account that the Request-URI's user names, to the handler.

One binding per account, whichever process made it. Our address changes with a restart
(a new port) and with the node that holds the account (sipis/lease.py), and a binding
left behind would make the provider fork each call to a dead contact too: a busy answer
from the live one then waits for the dead branch's timeout. So:
- The Contact carries an RFC 5626 instance id that is the same for the account on every
  node and after restarts (a UUID from a keyed hash of the account id, `instance_key`,
  which the nodes share) and reg-id 1: a registrar that matches bindings by instance
  (RFC 5626 6, Kamailio's usrloc does) REPLACES the old binding with the new Contact.
  A 439 (First Hop Lacks Outbound Support) drops reg-id and `outbound` for that
  account; the instance id stays.
- A registrar of RFC 3261 alone matches by Contact URI and keeps the old one: its 200
  lists every binding of the address of record, and those of ours (user part = the
  account id) but for the one we hold are un-REGISTERed right after (Expires: 0 naming
  exactly them, WITHOUT the instance id, which would match our live binding at a
  registrar that does match by it). The user's other devices have other user parts
  and are never touched. The same follows the 200 of an un-REGISTER.

Answers:
- 200: REGISTERED; the granted expiry is our Contact's `expires` in the 200 (else its
  Expires header); the refresh is due at `refresh_fraction` of it.
- 401/407: answered with the stored HA1 (MD5 or SHA-256, qop=auth with nc/cnonce). The
  challenge is kept and reused with the next nc for the refreshes (one REGISTER instead
  of two). A second challenge right after answering a fresh nonce (not stale=true)
  means the HA1 is wrong: FAILING "credentials refused", backed off like any failure.
- 423: again at once with its Min-Expires (once; more is a failure).
- 439: again at once without reg-id (once per account; see above).
- anything else, a timeout, a lost or refused connection: FAILING with the reason, the
  next attempt after a capped exponential backoff with jitter (at least Retry-After).

Nothing here logs or labels a user name, an HA1, an Authorization header, an account
id or a registrar host: metrics count by state and outcome only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import hmac
import itertools
import logging
import random
import re
import secrets
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from enum import Enum
from typing import Final, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from privacy.clock import Clock
from privacy.tasks import Tasks, TasksClosed
from proxy.sip.message import Request, Response
from proxy.sip.syntax import SipParseError, parse_seconds
from proxy.sip.uri import SipUri, parse_uri
from sipis.account import Account, State, Status
from sipis.settings import SipisSettings
from sipis.uac import (
    Address,
    Challenge,
    ChallengeError,
    ClientInvite,
    Destination,
    Inbound,
    LostListener,
    Sleep,
    Uac,
    UacError,
    UacSettings,
    answer_unavailable,
    choose_challenge,
    digest_authorization,
)

log = logging.getLogger("softrelay.sipis")

# What an account id may be: it is the user part of the Contact we register.
_ACCOUNT_ID: Final = re.compile(r"[A-Za-z0-9_.~-]{1,64}")
_REASON_LIMIT: Final = 64  # a provider's reason phrase, as far as a status shows it
# Keys the instance ids when the caller gives no key of the nodes' own (unit tests,
# the bench): still the same for an account everywhere, only not secret.
_INSTANCE_LABEL: Final = b"softrelay sipis instance\0"
REG_ID: Final = 1  # our one flow per account (RFC 5626 4.2)


def instance_key_of(index_key: bytes) -> bytes:
    """The instance ids' key from the keyring's index key, which every node of a
    deployment holds (and a rotation keeps): a derivation of its own, so an instance
    id is comparable with no blind index."""
    return hmac.digest(index_key, _INSTANCE_LABEL, hashlib.sha256)


def instance_id(key: bytes, account_id: str) -> str:
    """The account's RFC 5626 instance id, `<urn:uuid:...>`: a UUID from a keyed hash
    of the account id, so every node and every restart registers the same one (a
    version-4 UUID: without the key its bits are as good as random)."""
    digest = hmac.digest(key, account_id.encode(), hashlib.sha256)
    return f"<urn:uuid:{uuid.UUID(bytes=digest[:16], version=4)}>"


@dataclass(frozen=True, slots=True)
class RegistrarSettings:
    """How accounts are kept registered; `[sipis]` in the TOML (see the keys below)."""

    expires: int = 600  # asked for in each REGISTER (seconds)
    refresh_fraction: float = 0.85  # refresh when this much of the granted time passed
    start_spread: float = 60.0  # accounts loaded at start begin within this (seconds)
    rate: int = 20  # REGISTERs per second, at most, to one registrar host:port
    backoff_first: float = 30.0  # the first retry after a failure (seconds)
    backoff_cap: float = 1800.0  # no retry waits longer (seconds)
    max_min_expires: int = 86400  # a 423's Min-Expires above this is a failure
    t1: float = 0.5  # SIP T1 (seconds): UDP retransmission starts here, timeout 64*T1
    # Behind NAT the registrar does not see our own address: a deployment names the
    # public host (and port) the provider can reach, and the Contact carries it. (The
    # 200's Via received/rport would tell the public address of UDP, but an address
    # learnt that way is only good while the NAT keeps that mapping.)
    contact_host: str | None = None
    contact_port: int | None = None

    def __post_init__(self) -> None:
        checks = {
            "expires": 1 <= self.expires <= 86400,
            "refresh_fraction": 0.1 <= self.refresh_fraction <= 0.95,
            "start_spread": self.start_spread >= 0,
            "rate": self.rate >= 1,
            "backoff_first": self.backoff_first > 0,
            "backoff_cap": self.backoff_cap >= self.backoff_first,
            "max_min_expires": self.max_min_expires >= self.expires,
            "t1": 0 < self.t1 <= 4.0,
            "contact_port": self.contact_port is None or 1 <= self.contact_port <= 65535,
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"bad value for {key}")


class Outcome(Enum):
    """What a REGISTER came to: the `outcome` label of the counter."""

    REGISTERED = "registered"
    UNREGISTERED = "unregistered"
    CHALLENGED = "challenged"
    INTERVAL_TOO_BRIEF = "interval_too_brief"
    CREDENTIALS_REFUSED = "credentials_refused"
    NO_CREDENTIAL = "no_credential"
    REJECTED = "rejected"  # another 3xx-6xx but 5xx
    SERVER_ERROR = "server_error"
    TIMEOUT = "timeout"
    TRANSPORT_ERROR = "transport_error"
    NO_OUTBOUND = "no_outbound"  # a 439: registered again without reg-id
    STALE_REMOVED = "stale_removed"  # an old binding of ours un-REGISTERed
    STALE_KEPT = "stale_kept"  # its un-REGISTER failed: it lapses at its expiry


class RegistrarMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.accounts = Gauge(
            "softrelay_sipis_accounts",
            "SIPIS accounts by registration state",
            ["state"],
            registry=registry,
        )
        self.registers = Counter(
            "softrelay_sipis_registers",
            "REGISTERs sent to providers, by outcome",
            ["outcome"],
            registry=registry,
        )
        self.by_state = {state: self.accounts.labels(state.value) for state in State}
        self.by_outcome = {o: self.registers.labels(o.value) for o in Outcome}


class Transactions(Protocol):
    """What the registrar needs of `sipis.uac.Uac` (a fake in unit tests)."""

    async def request(
        self, destination: Destination, make: Callable[[Address], Request]
    ) -> Response: ...

    def bind(
        self,
        handler: Callable[[Request, Inbound], Awaitable[None]],
        lost: LostListener | None = None,
    ) -> None: ...

    def registrar_addresses(self, destination: Destination) -> set[str]: ...

    async def send(self, destination: Destination, request: Request) -> None: ...

    async def invite(
        self,
        destination: Destination,
        request: Request,
        *,
        accepted: Callable[[Response], None] | None = None,
        ring_limit: float = 180.0,
    ) -> ClientInvite: ...

    async def close(self) -> None: ...


AccountHandler = Callable[[Account, Request, Inbound], Awaitable[None]]


async def unavailable(account: Account, request: Request, inbound: Inbound) -> None:
    """The default: OPTIONS 200, anything else 480 (calls and messages come later)."""
    await answer_unavailable(request, inbound)


class RateWindow:
    """At most `rate` sends in any one-second window [t, t+1): a slot for each send,
    reserved in order; a send past the rate gets a later slot."""

    def __init__(self, rate: int) -> None:
        self._rate = rate
        self._slots: deque[float] = deque()  # reserved send times, ascending

    def reserve(self, now: float) -> float:
        slots = self._slots
        while slots and slots[0] <= now - 1.0:
            slots.popleft()
        at = now if not slots else max(now, slots[-1])
        if len(slots) >= self._rate:
            at = max(at, slots.popleft() + 1.0)
        slots.append(at)
        return at

    @property
    def idle(self) -> bool:
        return not self._slots


class _Want(Enum):
    REGISTER = "register"
    PAUSE = "pause"  # un-REGISTER, then PAUSED
    REMOVE = "remove"  # un-REGISTER, then forgotten


@dataclass(slots=True)
class _Entry:
    account: Account
    status: Status
    want: _Want
    call_id: str = field(default_factory=lambda: secrets.token_hex(12))
    from_tag: str = field(default_factory=lambda: secrets.token_hex(6))
    cseq: int = 0
    expires: int = 0  # what we ask for (raised by a 423's Min-Expires)
    generation: int = 0  # bumped by update/pause/remove: a running job's result is void
    failures: int = 0
    challenges: dict[str, Challenge] = field(default_factory=dict)  # header -> challenge
    nc: int = 0
    fresh: bool = False  # the next answer is to a nonce we were just given
    answered_fresh: bool = False  # the REGISTER in flight answered a fresh nonce
    tried_min_expires: bool = False
    slot: float | None = None  # the rate slot this account holds for its next REGISTER
    running: bool = False
    deferred: bool = False  # a job came due while running: take it when done
    contact: str | None = None  # the Contact of the binding we hold (for Expires: 0)
    outbound: bool = True  # reg-id and `Supported: outbound` (a 439 clears it)
    stale: tuple[str, ...] = ()  # old bindings of ours a 200 listed: un-REGISTER next
    done: asyncio.Event = field(default_factory=asyncio.Event)  # un-REGISTER finished


class Registrations:
    """Every SIPIS account's registration; see the module docstring."""

    def __init__(
        self,
        settings: RegistrarSettings,
        uac: Transactions,
        clock: Clock,
        registry: CollectorRegistry,
        *,
        sleep: Sleep = asyncio.sleep,
        handler: AccountHandler = unavailable,
        rng: random.Random | None = None,
        on_status: Callable[[str, Status], None] | None = None,
        owns_uac: bool = False,
        instance_key: bytes | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = RegistrarMetrics(registry)
        self._uac = uac
        self._owns_uac = owns_uac
        self._clock = clock
        self._sleep = sleep
        self._handler = handler
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self._on_status = on_status
        # The nodes share it (softrelay/app.py derives it from the keyring), so each
        # names an account by the same instance id.
        self._instance_key = instance_key or _INSTANCE_LABEL
        self._entries: dict[str, _Entry] = {}
        self._jobs: list[tuple[float, int, str, int]] = []  # (due, seq, id, generation)
        self._seq = itertools.count()
        self._rates: dict[tuple[str, int], RateWindow] = {}
        self._kick = asyncio.Event()
        self._changed = asyncio.Event()
        self._in_flight = 0
        self._tasks = Tasks(log, "sipis.register_failed")
        self._scheduler: asyncio.Task[None] | None = None
        uac.bind(self._incoming, self._connection_lost)

    @classmethod
    async def create(
        cls,
        settings: RegistrarSettings,
        clock: Clock,
        registry: CollectorRegistry,
        *,
        sleep: Sleep = asyncio.sleep,
        handler: AccountHandler = unavailable,
        uac_settings: UacSettings | None = None,
        rng: random.Random | None = None,
        on_status: Callable[[str, Status], None] | None = None,
        instance_key: bytes | None = None,
    ) -> Registrations:
        """The service with its own Uac (closed with it), its scheduler running."""
        uac = await Uac.create(uac_settings or UacSettings(t1=settings.t1), clock, sleep)
        regs = cls(
            settings,
            uac,
            clock,
            registry,
            sleep=sleep,
            handler=handler,
            rng=rng,
            on_status=on_status,
            owns_uac=True,
            instance_key=instance_key,
        )
        regs.start()
        return regs

    def start(self) -> None:
        if self._scheduler is None:
            self._scheduler = self._tasks.spawn(self._run(), name="sipis.scheduler")

    async def close(self) -> None:
        """Stop registering. The providers keep the bindings until they expire: a
        restart registers again, and calls meanwhile are not refused as unreachable."""
        await self._tasks.close()
        if self._owns_uac:
            await self._uac.close()

    # --- requests of the account's calls (sipis/calls.py) ----------------------------

    def contact(self, account_id: str) -> str | None:
        """The Contact the account's binding at its provider names (`<sip:id@host>`),
        as the provider reaches us: the remote target of the calls we relay."""
        entry = self._entries.get(account_id)
        return None if entry is None else entry.contact

    async def request(self, account: Account, request: Request) -> Response:
        """A request of one of the account's dialogs to its provider, whose registrar
        is the outbound proxy; its final response (our Via still on top). UacError
        when none came."""
        return await self._uac.request(Destination.of(account), lambda _: request)

    async def send(self, account: Account, request: Request) -> None:
        """An ACK of a 2xx to the account's provider (no transaction, no answer)."""
        await self._uac.send(Destination.of(account), request)

    async def invite(
        self, account: Account, request: Request, *, accepted: Callable[[Response], None]
    ) -> ClientInvite:
        """An INVITE of a call the app places (sipis/outgoing.py) to the account's
        provider, in an INVITE client transaction; `accepted` gets the 2xx after the
        first. TransportError if it cannot go out."""
        return await self._uac.invite(Destination.of(account), request, accepted=accepted)

    # --- the accounts -----------------------------------------------------------------

    def add(self, account: Account, *, spread: bool = True) -> None:
        """Keep `account` registered: after a random delay within `start_spread` (the
        accounts loaded at a start), or `spread=False` at once (a new account); its
        registrar's rate applies either way. Paused accounts are held, not registered."""
        if not _ACCOUNT_ID.fullmatch(account.account_id):
            raise ValueError("account_id must be 1-64 of A-Z a-z 0-9 _ . ~ -")
        if account.account_id in self._entries:
            self.update(account)
            return
        now = self._clock.now()
        if account.paused:
            entry = _Entry(account, Status(State.PAUSED), _Want.PAUSE)
            entry.done.set()
            self._entries[account.account_id] = entry
            self._count(None, entry.status)
            self._bump()
            return
        delay = self._rng.uniform(0, self.settings.start_spread) if spread else 0.0
        entry = _Entry(account, Status(State.PENDING, retry_at=now + delay), _Want.REGISTER)
        entry.expires = self.settings.expires
        self._entries[account.account_id] = entry
        self._count(None, entry.status)
        self._schedule(entry, now + delay)
        self._bump()

    def update(self, account: Account) -> None:
        """Take the account's new fields. A new registrar, transport, address of record
        or credential is registered afresh (the old binding lapses at its expiry);
        a change of `paused` pauses or resumes; push or display name changes nothing
        on the wire."""
        entry = self._entries.get(account.account_id)
        if entry is None:
            self.add(account, spread=False)
            return
        old = entry.account
        entry.account = account
        if account.paused != old.paused:
            if account.paused:
                self._pause(entry)
            else:
                self.resume(account.account_id)
            return
        wire = (Destination.of(old), old.aor, old.credential)
        if wire == (Destination.of(account), account.aor, account.credential):
            return
        entry.generation += 1
        entry.challenges.clear()
        entry.failures = 0
        entry.call_id, entry.from_tag, entry.cseq = secrets.token_hex(12), secrets.token_hex(6), 0
        if entry.want is _Want.REGISTER:
            self._set(entry, Status(State.PENDING, retry_at=self._clock.now()))
            self._schedule(entry, self._clock.now())

    async def pause(self, account_id: str) -> None:
        """Un-REGISTER (Expires: 0) and hold: PAUSED at once; returns when the provider
        answered the un-REGISTER or it failed (timeout: 64*T1)."""
        entry = self._entries.get(account_id)
        if entry is None:
            raise KeyError(account_id)
        await self._quiet(entry)
        self._pause(entry)
        await entry.done.wait()

    def _pause(self, entry: _Entry) -> None:
        if entry.want is not _Want.REGISTER:
            return
        entry.want = _Want.PAUSE
        self._set(entry, Status(State.PAUSED))
        self._unregister(entry)

    def resume(self, account_id: str) -> None:
        """Register a paused account again (at once, within its registrar's rate)."""
        entry = self._entries.get(account_id)
        if entry is None:
            raise KeyError(account_id)
        if entry.want is not _Want.PAUSE:
            return
        entry.want = _Want.REGISTER
        entry.generation += 1
        entry.failures = 0
        entry.expires = entry.expires or self.settings.expires
        now = self._clock.now()
        self._set(entry, Status(State.PENDING, retry_at=now))
        self._schedule(entry, now)

    async def remove(self, account_id: str, *, unregister: bool = True) -> None:
        """Forget the account; first un-REGISTER it (unless `unregister=False`, or it
        holds no binding). Returns when the provider answered or the attempt failed."""
        entry = self._entries.get(account_id)
        if entry is None:
            return
        entry.want = _Want.REMOVE
        await self._quiet(entry)  # a REGISTER in flight may yet make a binding to undo
        if unregister and entry.contact is not None:
            self._unregister(entry)
            await entry.done.wait()
        if self._entries.get(account_id) is entry:
            self._forget(entry)

    async def _quiet(self, entry: _Entry) -> None:
        while entry.running:
            changed = self._changed
            await changed.wait()

    def status(self, account_id: str) -> Status | None:
        entry = self._entries.get(account_id)
        return None if entry is None else entry.status

    def __len__(self) -> int:
        return len(self._entries)

    def account_ids(self) -> Collection[str]:
        """The accounts it holds, paused ones included."""
        return list(self._entries)

    # --- waiting (the API's long polls, tests) -----------------------------------------

    async def wait_for(
        self, account_id: str, check: Callable[[Status | None], bool]
    ) -> Status | None:
        """Return the account's status once `check` holds for it (callers bound it)."""
        while True:
            status = self.status(account_id)
            if check(status):
                return status
            changed = self._changed
            await changed.wait()

    async def settled(self) -> None:
        """Return once no REGISTER is in flight and no job is due now: everything
        left waits for the clock (tests on a manual clock step it by this)."""
        while True:
            if self._in_flight == 0 and not self._due_now():
                return
            changed = self._changed
            await changed.wait()

    def next_due(self) -> float | None:
        """When the next job is due (tests step a manual clock to it)."""
        while self._jobs and not self._live(self._jobs[0]):
            heapq.heappop(self._jobs)
        return self._jobs[0][0] if self._jobs else None

    def _due_now(self) -> bool:
        due = self.next_due()
        return due is not None and due <= self._clock.now()

    def _bump(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # --- the scheduler ---------------------------------------------------------------

    def _schedule(self, entry: _Entry, due: float) -> None:
        job = (due, next(self._seq), entry.account.account_id, entry.generation)
        heapq.heappush(self._jobs, job)
        if self._jobs[0] is job:
            self._kick.set()

    def _live(self, job: tuple[float, int, str, int]) -> bool:
        entry = self._entries.get(job[2])
        return entry is not None and entry.generation == job[3]

    async def _run(self) -> None:
        while True:
            due = self.next_due()
            now = self._clock.now()
            if due is not None and due <= now:
                _, _, account_id, _ = heapq.heappop(self._jobs)
                self._take(self._entries[account_id], now)
                continue
            self._kick.clear()
            self._bump()  # nothing due now: `settled` may be satisfied
            waits: set[asyncio.Future[object]] = {asyncio.ensure_future(self._kick.wait())}
            if due is not None:
                waits.add(asyncio.ensure_future(self._sleep(due - now)))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiting in waits:
                    waiting.cancel()

    def _take(self, entry: _Entry, now: float) -> None:
        """A job is due: send its REGISTER now if its registrar's rate has a slot,
        else hold the slot it gets and come back then."""
        if entry.running:
            entry.deferred = True  # one REGISTER at a time: this one goes after it
            return
        if entry.slot is None:
            registrar = Destination.of(entry.account).registrar
            window = self._rates.get(registrar)
            if window is None:
                window = self._rates[registrar] = RateWindow(self.settings.rate)
            entry.slot = window.reserve(now)
        if entry.slot > now:
            if entry.status.state is State.PENDING:
                self._set(entry, Status(State.PENDING, entry.status.reason, retry_at=entry.slot))
            self._schedule(entry, entry.slot)
            return
        entry.slot = None
        entry.running = True
        self._in_flight += 1
        try:
            self._tasks.spawn(self._attempt(entry, entry.generation), name="sipis.register")
        except TasksClosed:
            entry.running = False
            self._in_flight -= 1

    # --- one REGISTER ----------------------------------------------------------------

    async def _attempt(self, entry: _Entry, generation: int) -> None:
        try:
            await self._register(entry, generation)
        finally:
            entry.running = False
            self._in_flight -= 1
            if entry.deferred:
                entry.deferred = False
                self._schedule(entry, self._clock.now())
            self._bump()

    async def _register(self, entry: _Entry, generation: int) -> None:
        account = entry.account
        destination = Destination.of(account)
        unregister = entry.want is not _Want.REGISTER
        expires = 0 if unregister else entry.expires
        entry.answered_fresh = bool(entry.challenges) and entry.fresh
        entry.fresh = False
        entry.cseq += 1
        stale = entry.stale
        sent: dict[str, str] = {}

        def make(local: Address) -> Request:
            if stale:
                # Exactly the old bindings, by their URIs, and no instance id: at a
                # registrar matching by instance it would name our live binding.
                return self._request(entry, ", ".join(f"<{uri}>" for uri in stale), 0)
            contact = (unregister and entry.contact) or self._contact(entry, local)
            sent["contact"] = contact
            request = self._request(entry, self._binding(entry, contact), expires)
            request.add("Supported", "path, outbound" if entry.outbound else "path")
            return request

        try:
            response = await self._uac.request(destination, make)
        except UacError as exc:
            if stale:
                self._stale_done(entry, generation, Outcome.STALE_KEPT)
                return
            self._failed(
                entry,
                generation,
                exc.reason,
                Outcome.TRANSPORT_ERROR if exc.reason != "timeout" else Outcome.TIMEOUT,
            )
            return
        if entry.generation != generation and not unregister:
            return  # updated, paused or removed meanwhile: that decides
        status = response.status
        if stale:
            self._stale_answer(entry, generation, response)
        elif status in (401, 407):
            self._challenged(entry, generation, response)
        elif 200 <= status < 300:
            entry.stale = _stale(
                response, entry.account.account_id, None if unregister else sent["contact"]
            )
            if unregister:
                self.metrics.by_outcome[Outcome.UNREGISTERED].inc()
                entry.contact = None
                if entry.stale:
                    self._schedule(entry, self._clock.now())
                else:
                    self._unregistered(entry)
            else:
                self._registered(entry, response, sent["contact"])
                if entry.stale:
                    self._schedule(entry, self._clock.now())
        elif status == 423 and not unregister:
            self._too_brief(entry, generation, response)
        elif status == 439 and entry.outbound:
            # No outbound through the provider's edge: the instance id alone still lets
            # a registrar match our binding (RFC 5627 4.1).
            self.metrics.by_outcome[Outcome.NO_OUTBOUND].inc()
            entry.outbound = False
            entry.fresh = False
            self._schedule(entry, self._clock.now())
        else:
            outcome = Outcome.SERVER_ERROR if 500 <= status < 600 else Outcome.REJECTED
            reason = f"{status} {_printable(response.reason)}".strip()
            self._failed(entry, generation, reason, outcome, _retry_after(response))

    def _request(self, entry: _Entry, contact: str, expires: int) -> Request:
        account = entry.account
        uri = f"sip:{account.domain}"
        headers = [
            ("Max-Forwards", "70"),
            ("From", f"<{account.aor}>;tag={entry.from_tag}"),
            ("To", f"<{account.aor}>"),
            ("Call-ID", entry.call_id),
            ("CSeq", f"{entry.cseq} REGISTER"),
            ("Contact", contact),
            ("Expires", str(expires)),
        ]
        for header, challenge in entry.challenges.items():
            entry.nc += 1
            value = digest_authorization(
                challenge,
                account.credential,
                method="REGISTER",
                uri=uri,
                nc=entry.nc,
                cnonce=secrets.token_hex(8),
            )
            name = "Authorization" if header == "www-authenticate" else "Proxy-Authorization"
            headers.append((name, value))
        return Request("REGISTER", uri, headers)

    def _binding(self, entry: _Entry, contact: str) -> str:
        """The Contact header value of a REGISTER for our binding: with the account's
        instance id, and reg-id unless the provider refused outbound (a 439)."""
        value = (
            f'{contact};+sip.instance="{instance_id(self._instance_key, entry.account.account_id)}"'
        )
        return f"{value};reg-id={REG_ID}" if entry.outbound else value

    def _stale_answer(self, entry: _Entry, generation: int, response: Response) -> None:
        """The answer to the un-REGISTER of old bindings: challenged, it goes again with
        the credentials; any other answer ends it (nothing else waits on it)."""
        status = response.status
        if status in (401, 407) and not entry.answered_fresh:
            header = "www-authenticate" if status == 401 else "proxy-authenticate"
            try:
                challenge = choose_challenge(response.get_all(header), entry.account.credential)
            except ChallengeError:
                self._stale_done(entry, generation, Outcome.STALE_KEPT)
                return
            self.metrics.by_outcome[Outcome.CHALLENGED].inc()
            entry.challenges[header] = challenge
            entry.nc = 0
            entry.fresh = True
            self._schedule(entry, self._clock.now())
            return
        ok = 200 <= status < 300
        self._stale_done(entry, generation, Outcome.STALE_REMOVED if ok else Outcome.STALE_KEPT)

    def _stale_done(self, entry: _Entry, generation: int, outcome: Outcome) -> None:
        self.metrics.by_outcome[outcome].inc(len(entry.stale))
        entry.stale = ()
        if outcome is Outcome.STALE_KEPT:
            log.info("sipis.stale_binding_kept")
        if entry.generation != generation:
            # Updated, paused or resumed while it ran: what that asked for comes next.
            self._schedule(entry, self._clock.now())
        elif entry.want is not _Want.REGISTER and entry.contact is None:
            self._unregistered(entry)  # the un-REGISTER this followed is complete now

    def _contact(self, entry: _Entry, local: Address) -> str:
        settings = self.settings
        host = settings.contact_host or local[0]
        port = settings.contact_port or local[1]
        uri = SipUri(host, entry.account.account_id, port=port)
        uri = uri.with_param("transport", entry.account.transport.value)
        return f"<{uri}>"

    def _challenged(self, entry: _Entry, generation: int, response: Response) -> None:
        self.metrics.by_outcome[Outcome.CHALLENGED].inc()
        header = "www-authenticate" if response.status == 401 else "proxy-authenticate"
        try:
            challenge = choose_challenge(response.get_all(header), entry.account.credential)
        except ChallengeError as exc:
            entry.challenges.clear()
            self._failed(entry, generation, exc.reason, Outcome.NO_CREDENTIAL)
            return
        if entry.answered_fresh and not challenge.stale:
            # Our answer to a nonce given a moment ago was refused: the HA1 is wrong.
            entry.challenges.clear()
            self._failed(entry, generation, "credentials refused", Outcome.CREDENTIALS_REFUSED)
            return
        entry.challenges[header] = challenge
        entry.nc = 0
        entry.fresh = True
        self._schedule(entry, self._clock.now())

    def _too_brief(self, entry: _Entry, generation: int, response: Response) -> None:
        self.metrics.by_outcome[Outcome.INTERVAL_TOO_BRIEF].inc()
        try:
            value = response.get("Min-Expires")
            minimum = None if value is None else parse_seconds(value, "Min-Expires")
        except SipParseError:
            minimum = None
        if (
            minimum is None
            or minimum <= entry.expires
            or minimum > self.settings.max_min_expires
            or entry.tried_min_expires
        ):
            self._failed(entry, generation, "423 Interval Too Brief", Outcome.REJECTED)
            return
        entry.expires = minimum
        entry.tried_min_expires = True
        # The credentials passed (a 423 comes after them): a challenge to the next one
        # is a new nonce to answer, not a refusal.
        entry.fresh = False
        self._schedule(entry, self._clock.now())

    def _registered(self, entry: _Entry, response: Response, contact: str) -> None:
        self.metrics.by_outcome[Outcome.REGISTERED].inc()
        now = self._clock.now()
        granted = _granted(response, entry.account.account_id, contact) or entry.expires
        entry.contact = contact
        entry.failures = 0
        entry.tried_min_expires = False
        self._set(entry, Status(State.REGISTERED, expires_at=now + granted))
        self._schedule(entry, now + granted * self.settings.refresh_fraction)
        log.debug("sipis.registered", extra={"fields": {"expires": granted}})

    def _failed(
        self,
        entry: _Entry,
        generation: int,
        reason: str,
        outcome: Outcome,
        retry_after: float | None = None,
    ) -> None:
        self.metrics.by_outcome[outcome].inc()
        if entry.want is not _Want.REGISTER:
            self._unregistered(entry)  # an un-REGISTER is tried once: the binding lapses
            return
        if entry.generation != generation:
            return
        settings = self.settings
        entry.failures += 1
        entry.tried_min_expires = False
        delay = min(settings.backoff_cap, settings.backoff_first * 2 ** min(entry.failures - 1, 30))
        delay *= self._rng.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, min(retry_after, settings.backoff_cap))
        retry_at = self._clock.now() + delay
        self._set(entry, Status(State.FAILING, reason, retry_at=retry_at))
        self._schedule(entry, retry_at)
        log.info("sipis.register_failed", extra={"fields": {"reason": reason}})

    def _unregister(self, entry: _Entry) -> None:
        entry.generation += 1
        entry.done.clear()
        if entry.contact is None:
            self._unregistered(entry)
            return
        self._schedule(entry, self._clock.now())

    def _unregistered(self, entry: _Entry) -> None:
        entry.contact = None
        entry.done.set()
        if entry.want is _Want.REMOVE:
            self._forget(entry)
        self._bump()

    def _forget(self, entry: _Entry) -> None:
        if self._entries.get(entry.account.account_id) is entry:
            del self._entries[entry.account.account_id]
            entry.generation += 1
            self._count(entry.status, None)
            entry.done.set()
            self._bump()

    # --- state ------------------------------------------------------------------------

    def _set(self, entry: _Entry, status: Status) -> None:
        old = entry.status
        entry.status = status
        self._count(old, status)
        self._bump()
        if self._on_status is not None:
            self._on_status(entry.account.account_id, status)

    def _count(self, old: Status | None, new: Status | None) -> None:
        if old is not None:
            self.metrics.by_state[old.state].dec()
        if new is not None:
            self.metrics.by_state[new.state].inc()

    # --- what the provider sends -----------------------------------------------------

    def _connection_lost(self, destination: Destination) -> None:
        """A TCP/TLS connection went: the bindings made over it point nowhere now, so
        its accounts register again (within the registrar's rate)."""
        now = self._clock.now()
        for entry in self._entries.values():
            if (
                Destination.of(entry.account) == destination
                and entry.want is _Want.REGISTER
                and entry.status.state is State.REGISTERED
            ):
                entry.generation += 1
                self._set(entry, Status(State.PENDING, "connection lost", retry_at=now))
                self._schedule(entry, now)

    async def _incoming(self, request: Request, inbound: Inbound) -> None:
        uri = request.uri
        account_id = uri.user if isinstance(uri, SipUri) else None
        entry = self._entries.get(account_id) if account_id else None
        if (
            entry is None
            or entry.want is not _Want.REGISTER
            or not self._from_registrar(entry.account, inbound)
        ):
            if request.method == "ACK":
                return
            if request.method == "OPTIONS" and account_id is None:
                inbound.respond(200)  # a keep-alive to us, not to an account
                return
            inbound.respond(404)
            return
        await self._handler(entry.account, request, inbound)

    def _from_registrar(self, account: Account, inbound: Inbound) -> bool:
        """Only the account's own provider may reach it: the connection we made to its
        registrar, or over UDP one of the addresses its registrar's host resolved to
        (the port is not compared: a provider may send from other ports)."""
        destination = Destination.of(account)
        if inbound.destination is not None:
            return inbound.destination == destination
        return inbound.remote[0] in self._uac.registrar_addresses(destination)


def _granted(response: Response, account_id: str, contact: str) -> int | None:
    """The expiry the registrar granted our contact: its `expires` in the 200's
    Contact list (RFC 3261 10.3 step 8), else the Expires header."""
    ours = contact.strip("<>")
    try:
        for value in response.contacts:
            uri = value.uri
            mine = isinstance(uri, SipUri) and uri.user == account_id and str(uri) == ours
            if mine and value.expires is not None:
                return value.expires
        expires = response.expires
    except SipParseError:
        return None
    return expires


def _stale(response: Response, account_id: str, keep: str | None) -> tuple[str, ...]:
    """The bindings of ours a 2xx to REGISTER lists besides `keep` (the Contact we hold,
    `<uri>`; None after an un-REGISTER: all of ours are left over): the URIs whose user
    part is the account id. Ours alone: any other user part is someone else's binding
    of the address of record. Nothing when the list does not show `keep` itself: a
    registrar that rewrites Contacts (a NAT fix-up) would list our live binding under
    another URI, and its un-REGISTER would cut us off."""
    try:
        contacts = response.contacts
        kept = None if keep is None else parse_uri(keep.strip("<>"))
    except SipParseError:
        return ()
    found: list[str] = []
    holds_kept = kept is None
    for value in contacts:
        uri = value.uri
        if not isinstance(uri, SipUri) or uri.user != account_id:
            continue
        if isinstance(kept, SipUri) and _same_address(uri, kept):
            holds_kept = True
        elif str(uri) not in found:
            found.append(str(uri))
    return tuple(found) if holds_kept else ()


def _same_address(a: SipUri, b: SipUri) -> bool:
    """The same contact address, as registrars compare URIs (RFC 3261 19.1.4: host
    case-insensitive, transport as a parameter; no port is 5060, no transport UDP)."""
    return (
        a.scheme == b.scheme
        and a.user == b.user
        and a.host.lower() == b.host.lower()
        and (a.port or 5060) == (b.port or 5060)
        and (a.transport or "udp") == (b.transport or "udp")
    )


def _retry_after(response: Response) -> float | None:
    value = response.get("Retry-After")
    if value is None:
        return None
    try:
        return float(parse_seconds(value.split(";")[0].split("(")[0].strip(), "Retry-After"))
    except SipParseError:
        return None


def _printable(text: str) -> str:
    return "".join(c for c in text if c.isprintable())[:_REASON_LIMIT]


def registrar_settings(sipis: SipisSettings) -> RegistrarSettings:
    """The engine's settings from `[sipis]` (sipis/settings.py)."""
    return RegistrarSettings(
        expires=sipis.expires,
        refresh_fraction=sipis.refresh,
        start_spread=float(sipis.start_spread),
        rate=sipis.rate_per_registrar,
        backoff_first=float(sipis.backoff_first),
        backoff_cap=float(sipis.backoff_cap),
        t1=sipis.t1,
        contact_host=sipis.contact_host or None,
        contact_port=sipis.contact_port or None,
    )


@contextlib.asynccontextmanager
async def open_registrations(
    sipis: SipisSettings,
    clock: Clock,
    registry: CollectorRegistry,
    *,
    handler: AccountHandler = unavailable,
    instance_key: bytes | None = None,
) -> AsyncIterator[Registrations]:
    """The engine `serve` runs while the app does (softrelay/app.py); `handler` gets
    the providers' requests (sipis/calls.py); `instance_key`, shared by the nodes,
    keys the accounts' instance ids."""
    settings = registrar_settings(sipis)
    registrations = await Registrations.create(
        settings,
        clock,
        registry,
        handler=handler,
        instance_key=instance_key,
        uac_settings=UacSettings(t1=settings.t1, ca_file=sipis.registrar_ca),
    )
    try:
        yield registrations
    finally:
        await registrations.close()
