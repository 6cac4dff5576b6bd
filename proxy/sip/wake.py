"""Waking sleeping phones: parked INVITEs, pushes, delivery on re-register.

A mobile softphone sleeps without a connection. Its PBX still sends calls to the
Contact it registered, which carries the phone's RFC 8599 push parameters
(`pn-provider`, `pn-prid`, `pn-param`) in the Request-URI. When the phone's flow is
gone, the INVITE is parked here, in memory only (the policy's `relay` category), and
the phone is woken by a push, as Flexisip (`fork-late`) and Acrobits SIPIS do:

    INVITE ──► park ──► 100 Trying ──► push ──► 180 + Push-Status: delivered
                 │                        └──► provider refused: 480 at once
                 ├─ the PBX's 200 to a REGISTER of the same binding: forward on it
                 ├─ caller's CANCEL: 200, 487, and the "call cancelled" push iOS requires
                 ├─ wake timeout: 480 with a Reason
                 ├─ the store unreachable (restriction marks unknown): 503 with
                 │  Retry-After at once, nobody pushed (fail closed)
                 └─ softrelay stops (`close`): 503 with Retry-After; a call that
                    would be parked after that gets the same at once

"The same binding" is the same subject (user at the PBX serial the INVITE came from),
the same `pn-prid` and, when the parked binding was registered with one, the same
`+sip.instance`; and only the PBX's 200 counts, not the REGISTER itself. A push token
is no secret (a PBX, a provider, an old phone see it), so another user of the same PBX
who registers with it gets nobody's calls.

After delivery the caller's CANCEL, and the ACK of a failure, still name the old flow
in their Route; they follow the call to its new flow for as long as a transaction may
last. A parked or delivered call is known by the flow its INVITE came on as well as by
its Call-ID and branch (values every hop and every callee sees): only that flow, the
caller's PBX, can cancel it or send its ACK, not another PBX nor anyone else.

Calls to one phone with several bindings are forked by the PBX, which sends an
INVITE to each binding's Path and CANCELs the others when one answers: each INVITE is
parked, woken and cancelled on its own.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from privacy.backend import StorageUnavailable
from privacy.clock import Clock
from privacy.store import Store, Subject
from privacy.tasks import Tasks
from proxy.sip.flow import Flow
from proxy.sip.headers import NameAddr, PushParams
from proxy.sip.message import Request
from proxy.sip.parser import parse
from proxy.sip.uri import SipUri
from push.service import OVERLOADED, PushService
from push.wake import Delivered, PermanentFailure, Reason, Service, TokenDead, WakeRequest

log = logging.getLogger("softrelay.proxy")

TRANSACTION_LIFETIME = 32.0  # seconds: RFC 3261 timer B/F, how long a CANCEL may follow
DELIVERED_LIMIT = 10_000  # delivered calls remembered for their CANCEL or ACK, at most
TICK = 1.0  # seconds between checks of the wake timeouts
REREGISTER_SCAN = 60.0  # seconds between scans for bindings about to expire
# RFC 8599 5.4: a phone that refreshes on its own is pushed only if no REGISTER came
# by this long before its binding expires (the RFC's 120 s, or less for a short one).
REFRESH_MARGIN = 120
BINDINGS_LIMIT = 100_000  # bindings whose refresh time is remembered, at most

# A call as the flow its INVITE came on (Flow.key) and that INVITE's Call-ID and top
# branch: the CANCEL and ACK (RFC 3261 9.1, 17.1.1.3) carry the same two values.
_CallKey = tuple[bytes, str, str]


@dataclass(frozen=True, slots=True)
class WakeSettings:
    # 30 s: a woken iPhone or Android app is back within seconds (push, app launch,
    # TLS, REGISTER), and the caller's INVITE transaction (timer B, 32 s) would end
    # on its own soon after. Flexisip's fork-late and SIPIS wait about as long.
    timeout: float = 30.0
    max_parked: int = 10_000  # parked INVITEs in all; more get 503
    # A phone on UDP may sleep while its flow still looks alive (its NAT binding gone):
    # an INVITE it leaves unanswered this long is parked and the phone pushed. 0: off.
    # 2 s: a phone awake answers 100 within milliseconds; the INVITE has then gone out
    # three times (timer A).
    answer_timeout: float = 2.0
    max_per_binding: int = 4  # parked INVITEs per push identity; more get 503
    retry_after: int = 5  # seconds, in those 503s
    # RFC 8599 5.4: a binding with push parameters gets a background push this long
    # before it expires, so a suspended app can refresh it; but never sooner than half
    # its registration (one of 300 s: at 150 s), so a registration shorter than this
    # does not earn a push the moment it is stored. 0 turns it off.
    reregister_before: int = 600
    # PBX serials in debug mode: their calls' destination names are stored (28 days).
    debug_serials: frozenset[str] = frozenset()


class PushIdentity(NamedTuple):
    service: Service
    token: str
    app_param: str  # pn-param as the phone sent it

    @classmethod
    def of(cls, params: PushParams | None) -> PushIdentity | None:
        if params is None or not params.prid:
            return None
        try:
            service = Service(params.provider.lower())
        except ValueError:
            return None  # a push service we do not speak: no waking
        return cls(service, params.prid, params.param or "")

    @classmethod
    def in_uri(cls, uri: SipUri) -> PushIdentity | None:
        """From a Request-URI: the registered Contact, as the PBX sends calls to it."""
        provider = uri.params.get("pn-provider")
        if not provider:
            return None
        return cls.of(PushParams(provider, uri.params.get("pn-prid"), uri.params.get("pn-param")))


# Whether a parked call (its push identity, callee, instances and when it was parked,
# clock time) is for the phone of a registration another node saw accepted.
Release = Callable[[PushIdentity, Subject, frozenset[str], float], bool]


class Courier(Protocol):
    """What parking needs of the relay: answer a request, forward one to a flow."""

    async def reply(
        self,
        request: Request,
        flow: Flow,
        status: int,
        reason: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
        *,
        to_tag: str | None = None,
    ) -> None: ...

    async def forward_to(self, request: Request, flow: Flow, target: Flow) -> None: ...


@dataclass(eq=False, slots=True)
class _Watched:
    invite: bytes  # as it arrived, to park should the phone stay silent: memory only
    caller: Flow
    identity: PushIdentity
    subject: Subject
    deadline: float  # clock time


@dataclass(eq=False, slots=True)
class _Parked:
    request: Request  # the INVITE with its body and the caller's name: memory only
    caller: Flow
    identity: PushIdentity
    subject: Subject  # the callee at the PBX that sent the INVITE
    # +sip.instance of the subject's stored bindings with this token ("": none named);
    # empty when none is stored, and then subject and token alone decide.
    instances: frozenset[str]
    key: _CallKey  # caller's flow, Call-ID, caller's branch: how its CANCEL finds it
    deadline: float  # clock time
    arrived: float  # perf_counter, for the latency histograms only
    call_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    to_tag: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    push: asyncio.Task[None] | None = None

    def released_by(self, identity: PushIdentity, subject: Subject, instance: str) -> bool:
        """Whether an accepted REGISTER of `subject` (with `identity` and `instance`) is
        this call's own phone back: the token alone is not, anyone may present it."""
        return (
            identity.service is self.identity.service
            and identity.token == self.identity.token
            and subject == self.subject
            and (not self.instances or "" in self.instances or instance in self.instances)
        )


class _Refresh(NamedTuple):
    expires_at: int  # clock time
    push_at: int  # clock time from which a binding-refresh push is due


class WakeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.parked = Gauge("softrelay_wake_parked", "INVITEs parked now", registry=registry)
        self.ends = Counter(
            "softrelay_wake_calls",
            "Parked INVITEs by how they ended",
            ["end"],
            registry=registry,
        )
        buckets = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.to_push = Histogram(
            "softrelay_wake_push_seconds",
            "From a parked INVITE's arrival to the provider's answer to its push",
            buckets=buckets,
            registry=registry,
        )
        self.to_delivery = Histogram(
            "softrelay_wake_delivery_seconds",
            "From a parked INVITE's arrival to its forwarding on the woken phone's flow",
            buckets=buckets,
            registry=registry,
        )
        self.reregister_pushes = Counter(
            "softrelay_wake_reregister_pushes",
            "Background pushes asking a phone to refresh its binding before it expires",
            registry=registry,
        )


class Parking:
    def __init__(
        self,
        settings: WakeSettings,
        courier: Courier,
        push: PushService | None,
        store: Store,
        clock: Clock,
        registry: CollectorRegistry,
    ) -> None:
        self.settings = settings
        self._courier = courier
        self._push = push
        self._store = store
        self._clock = clock
        self._parked: dict[_CallKey, _Parked] = {}
        self._by_token: dict[str, list[_Parked]] = {}
        # Delivered calls: key -> (the woken flow, when), for their CANCEL or ACK.
        self._delivered: OrderedDict[_CallKey, tuple[Flow, float]] = OrderedDict()
        # binding (serial, user, instance) -> the expiry it was pushed for. By binding, not
        # token: another user's binding that names the same token (anyone may present
        # one) must not stand in for this one's push.
        self._reregistered: dict[tuple[str, str, str], int] = {}
        # binding (serial, user, instance) -> its refresh, as of the last accepted REGISTER
        self._refreshes: OrderedDict[tuple[str, str, str], _Refresh] = OrderedDict()
        self._watched: OrderedDict[_CallKey, _Watched] = OrderedDict()
        # Pushes: the wakes of parked calls, "call cancelled", binding refreshes.
        self._tasks = Tasks(log, "wake.push_failed")
        self._closed = False
        self.metrics = WakeMetrics(registry)

    def __len__(self) -> int:
        return len(self._parked)

    # --- parking --------------------------------------------------------------------

    async def park(
        self, request: Request, caller: Flow, identity: PushIdentity, subject: Subject
    ) -> None:
        """An INVITE for a phone whose flow is gone: wake the phone, hold the call."""
        key = _key(request, caller)
        if key in self._parked:
            return  # the caller's retransmission: the call is parked already
        if self._closed:
            await self._shutting_down(request, caller)
            return
        waiting = self._by_token.get(identity.token, [])
        if len(self._parked) >= self.settings.max_parked or (
            len(waiting) >= self.settings.max_per_binding
        ):
            self.metrics.ends.labels("refused").inc()
            retry = (("Retry-After", str(self.settings.retry_after)),)
            await self._courier.reply(request, caller, 503, "Too Many Parked Calls", retry)
            return
        try:
            if self._push is None or await self._store.is_restricted(subject):
                # Restricted (GDPR Art. 18): stored, but not processed; nobody is woken.
                self.metrics.ends.labels("not_woken").inc()
                await self._courier.reply(request, caller, 480, None, _reason("not reachable"))
                return
            instances = await self._instances(identity, subject)
        except StorageUnavailable as exc:
            # Fail closed: without the marks nobody can tell that the subject is not
            # restricted, so nobody is woken; the caller may try again (or elsewhere).
            self.metrics.ends.labels("store_unavailable").inc()
            retry = (("Retry-After", str(max(1, math.ceil(exc.retry_after)))),)
            await self._courier.reply(
                request, caller, 503, None, _reason("store unavailable") + retry
            )
            return
        if key in self._parked:
            return  # its retransmission was parked while we read the store
        if self._closed:  # closed while we read the store: nobody would answer it later
            await self._shutting_down(request, caller)
            return
        parked = _Parked(
            request,
            caller,
            identity,
            subject,
            instances,
            key,
            self._clock.now() + self.settings.timeout,
            time.perf_counter(),
        )
        self._parked[key] = parked
        self._by_token.setdefault(identity.token, []).append(parked)
        self.metrics.parked.set(len(self._parked))
        await self._courier.reply(request, caller, 100)
        parked.push = self._tasks.spawn(self._wake(parked))

    async def _instances(self, identity: PushIdentity, subject: Subject) -> frozenset[str]:
        """The instances of the subject's stored bindings with this push token."""
        records = await self._store.find(
            "registration",
            pbx_serial=subject.pbx_serial,
            sip_username=subject.sip_username,
            push_token=identity.token,
        )
        return frozenset(str(r.fields.get("instance") or "") for r in records)

    async def _wake(self, parked: _Parked) -> None:
        push = self._push
        assert push is not None
        app_id = push.app_for(parked.identity.service, parked.identity.app_param)
        if app_id is None:
            await self._end(parked, 480, "push not configured for this app", "push_failed")
            return
        result = await push.wake(
            WakeRequest(
                parked.identity.service,
                parked.identity.token,
                app_id,
                Reason.INCOMING_CALL,
                parked.deadline,
                parked.call_uuid,
            )
        )
        if self._parked.get(parked.key) is not parked:
            return  # delivered, cancelled or timed out meanwhile
        outcome = result.outcome
        self.metrics.to_push.observe(time.perf_counter() - parked.arrived)
        if isinstance(outcome, Delivered):
            headers = (("Push-Status", "delivered"),)
            await self._courier.reply(
                parked.request, parked.caller, 180, None, headers, to_tag=parked.to_tag
            )
        elif isinstance(outcome, TokenDead):
            # push/ has removed the token from the binding already.
            await self._end(parked, 480, "push token no longer valid", "push_failed")
        elif isinstance(outcome, PermanentFailure):
            await self._end(parked, 480, "push refused", "push_failed")
        elif outcome == OVERLOADED:
            # Our own limit, not the phone's state: the caller may try again shortly.
            await self._end(parked, 503, "push service busy", "refused")
        else:
            await self._end(parked, 480, "push failed", "push_failed")

    async def _end(self, parked: _Parked, status: int, text: str, end: str) -> None:
        """Answer a parked INVITE finally and forget it."""
        if not self._unpark(parked):
            return
        self.metrics.ends.labels(end).inc()
        headers = _reason(text) if status != 487 else ()
        if status == 503:
            headers = (*headers, ("Retry-After", str(self.settings.retry_after)))
        await self._courier.reply(
            parked.request, parked.caller, status, None, headers, to_tag=parked.to_tag
        )

    def _unpark(self, parked: _Parked) -> bool:
        if self._parked.get(parked.key) is not parked:
            return False
        del self._parked[parked.key]
        waiting = self._by_token.get(parked.identity.token, [])
        if parked in waiting:
            waiting.remove(parked)
        if not waiting:
            self._by_token.pop(parked.identity.token, None)
        # A push in flight is left to finish: it has likely reached the provider, and
        # its outcome belongs in the push log and counters whatever became of the call.
        self.metrics.parked.set(len(self._parked))
        return True

    def watch(
        self, invite: Request, caller: Flow, identity: PushIdentity, subject: Subject
    ) -> None:
        """An INVITE about to go to a phone over UDP: park it if nothing answers."""
        if self.settings.answer_timeout <= 0:
            return
        if len(self._watched) >= self.settings.max_parked:
            self._watched.popitem(last=False)
        deadline = self._clock.now() + self.settings.answer_timeout
        self._watched[_key(invite, caller)] = _Watched(
            invite.serialize(), caller, identity, subject, deadline
        )

    @property
    def watching(self) -> bool:
        return bool(self._watched)

    def answered(self, caller: Flow, call_id: str, branch: str) -> None:
        """The phone answered the INVITE that came on `caller` (any response): it is
        awake."""
        self._watched.pop((caller.key, call_id, branch), None)

    # --- the ways a parked call ends ------------------------------------------------

    async def deliver(
        self, identity: PushIdentity, subject: Subject, instance: str, flow: Flow
    ) -> int:
        """The PBX accepted (its 200, not the phone's request) a REGISTER of `subject` with
        `identity` and `instance`, which came on `flow`: forward the calls parked for that
        binding there; how many."""
        waiting = [
            parked
            for parked in self._by_token.get(identity.token, ())
            if parked.released_by(identity, subject, instance)
        ]
        return await self._release(waiting, flow)

    async def deliver_where(self, released: Release, flow: Flow) -> int:
        """Another node of the cluster saw the PBX accept a REGISTER, whose new flow is
        `flow` (to that node): forward the calls parked here that `released` says it
        is the phone of (the same checks as `deliver`, made on fingerprints); how many."""
        waiting = [
            parked
            for parked in self._parked.values()
            if released(
                parked.identity,
                parked.subject,
                parked.instances,
                parked.deadline - self.settings.timeout,
            )
        ]
        return await self._release(waiting, flow)

    def awaits(self, token: str) -> bool:
        """Whether a call is parked here for a phone with push token `token`."""
        return token in self._by_token

    def parked_calls(self) -> list[tuple[PushIdentity, Subject]]:
        """Whom the calls parked now are for (a node re-reads their registrations
        after it resubscribed to the registration events)."""
        return [(parked.identity, parked.subject) for parked in self._parked.values()]

    async def _release(self, waiting: list[_Parked], flow: Flow) -> int:
        delivered = 0
        for parked in waiting:
            if not self._unpark(parked):
                continue
            delivered += 1
            self.metrics.ends.labels("delivered").inc()
            self.metrics.to_delivery.observe(time.perf_counter() - parked.arrived)
            self._remember_delivery(parked.key, flow)
            await self._courier.forward_to(parked.request, parked.caller, flow)
        return delivered

    def _remember_delivery(self, key: _CallKey, flow: Flow) -> None:
        now = self._clock.now()
        while self._delivered and (
            len(self._delivered) >= DELIVERED_LIMIT
            or now - next(iter(self._delivered.values()))[1] > TRANSACTION_LIFETIME
        ):
            self._delivered.popitem(last=False)
        self._delivered[key] = (flow, now)

    def delivered_to(self, request: Request, flow: Flow) -> Flow | None:
        """Where a delivered call went: for its CANCEL, or the ACK of its failure, when
        `flow` is the one its INVITE came on."""
        found = self._delivered.get(_key(request, flow))
        if found is None or found[0].closed:
            return None
        if self._clock.now() - found[1] > TRANSACTION_LIFETIME:
            return None
        return found[0]

    async def cancel(self, cancel: Request, flow: Flow) -> bool:
        """The caller's CANCEL of a parked INVITE: 200 to it, 487 to the INVITE, and
        the "call cancelled" push; False when no such call was parked from `flow`."""
        parked = self._parked.get(_key(cancel, flow))
        if parked is None:
            return False
        await self._courier.reply(cancel, flow, 200)
        await self._end(parked, 487, "", "cancelled")
        if not self._closed:  # after `close` no push goes out: the tasks have no owner
            self._tasks.spawn(self._cancelled_push(parked))
        return True

    async def _cancelled_push(self, parked: _Parked) -> None:
        push = self._push
        if push is None:
            return
        app_id = push.app_for(parked.identity.service, parked.identity.app_param)
        if app_id is None:
            return
        request = WakeRequest(
            parked.identity.service,
            parked.identity.token,
            app_id,
            Reason.CALL_CANCELLED,
            self._clock.now() + self.settings.timeout,
            parked.call_uuid,
        )
        await push.wake(request)

    async def expire(self) -> int:
        """480 to every parked INVITE past its wake timeout; how many. Parks the
        INVITEs a phone on UDP left unanswered."""
        now = self._clock.now()
        silent = [(k, w) for k, w in self._watched.items() if w.deadline <= now]
        for key, watched in silent:
            del self._watched[key]
            invite = parse(watched.invite)
            assert isinstance(invite, Request)
            self.metrics.ends.labels("unanswered").inc()
            await self.park(invite, watched.caller, watched.identity, watched.subject)
        late = [p for p in self._parked.values() if p.deadline <= now]
        for parked in late:
            await self._end(parked, 480, "wake timeout", "timeout")
        return len(late)

    async def close(self) -> int:
        """At shutdown: every parked INVITE gets its final answer (503, Retry-After)
        while the flows to its caller still exist, and none is parked from now on; the
        pushes under way are cancelled. How many calls were answered."""
        self._closed = True
        parked = list(self._parked.values())
        for call in parked:
            await self._end(call, 503, "relay shutting down", "shutdown")
        await self._tasks.close()
        return len(parked)

    async def _shutting_down(self, request: Request, caller: Flow) -> None:
        self.metrics.ends.labels("shutdown").inc()
        retry = (("Retry-After", str(self.settings.retry_after)),)
        await self._courier.reply(
            request, caller, 503, None, _reason("relay shutting down") + retry
        )

    # --- keeping bindings wakeable ----------------------------------------------------
    #
    # RFC 8599: a suspended app cannot refresh its binding on a timer, so we push it to
    # (5.4), early enough for its REGISTER to arrive before the binding expires. An app
    # that can refresh on its own says so with the `+sip.pnsreg` media feature tag in its
    # Contact; to it, and only to it, the 200 says `+sip.pnsreg="<s>"`: refresh at least
    # s seconds before expiry (5.6.1, 11.3), the time we would otherwise push it. It is
    # pushed only should that refresh not have come by REFRESH_MARGIN before expiry.

    def refresh_lead(self, duration: int) -> int:
        """How long before a binding registered for `duration` seconds expires it is to
        be refreshed: `reregister_before`, but at most half the registration."""
        return min(self.settings.reregister_before, max(duration, 0) // 2)

    def feature_caps(self, contact: NameAddr, expires: int) -> str:
        """Feature-Caps of the 200 to a REGISTER of `contact` with push parameters."""
        caps = '*;+sip.pns="apns,apns.dev,fcm"'
        lead = self.refresh_lead(expires)
        if lead > 0 and "+sip.pnsreg" in contact.params:
            caps += f';+sip.pnsreg="{lead}"'
        return caps

    def binding_registered(
        self, key: tuple[str, str, str], expires: int, contact: NameAddr | None
    ) -> None:
        """The PBX accepted a REGISTER of binding `key` (serial, user, instance): note
        when its refresh push is due. Remembered here, not only read back from the store,
        because the relay does not write every refresh: the stored expiry may lag."""
        self._refreshes.pop(key, None)
        if contact is None or expires <= 0 or PushIdentity.of(contact.push) is None:
            return
        expires_at = int(self._clock.now()) + expires
        lead = self.refresh_lead(expires)
        if "+sip.pnsreg" in contact.params:
            lead = min(REFRESH_MARGIN, lead // 2)
        if len(self._refreshes) >= BINDINGS_LIMIT:
            self._refreshes.popitem(last=False)
        self._refreshes[key] = _Refresh(expires_at, expires_at - lead)

    def _refresh_of(self, key: tuple[str, str, str], expires_at: int, written: float) -> _Refresh:
        known = self._refreshes.get(key)
        if known is not None and known.expires_at >= expires_at:
            return known
        # Not registered since we started: its lead from the registration as stored.
        return _Refresh(expires_at, expires_at - self.refresh_lead(expires_at - int(written)))

    async def reregister_due(self) -> int:
        """Background pushes to bindings whose refresh is due, once per expiry: never a
        VoIP push, which iOS punishes when no call follows."""
        push = self._push
        if self.settings.reregister_before <= 0 or push is None:
            return 0
        now = self._clock.now()
        sent = 0
        for record in await self._store.find("registration"):
            fields = record.fields
            expires_at, token = fields.get("expires_at"), fields.get("push_token")
            if not isinstance(expires_at, int) or not isinstance(token, str):
                continue
            serial, user = str(fields["pbx_serial"]), str(fields["sip_username"])
            key = (serial, user, str(fields.get("instance") or ""))
            refresh = self._refresh_of(key, expires_at, record.last_used_at)
            expires_at = refresh.expires_at
            if not refresh.push_at <= now < expires_at:
                continue
            if self._reregistered.get(key) == expires_at:
                continue
            app_param = fields.get("push_app_id")
            identity = PushIdentity.of(
                PushParams(str(fields.get("push_provider") or ""), token, str(app_param or ""))
            )
            if identity is None:
                continue
            if await self._store.is_restricted(Subject(user, serial)):
                continue
            app_id = push.app_for(identity.service, identity.app_param)
            if app_id is None:
                continue
            if self._closed:
                break
            self._reregistered[key] = expires_at
            self.metrics.reregister_pushes.inc()
            request = WakeRequest(identity.service, token, app_id, Reason.REREGISTER, expires_at)
            self._tasks.spawn(_wake_only(push, request))
            sent += 1
        # Forget what expired: those bindings are gone or were refreshed.
        self._reregistered = {k: e for k, e in self._reregistered.items() if e > now}
        for key in [k for k, r in self._refreshes.items() if r.expires_at <= now]:
            del self._refreshes[key]
        return sent

    async def run_forever(self) -> None:
        """`serve`'s timer: wake timeouts every second, expiring bindings every minute."""
        scanned = 0.0
        while True:
            await asyncio.sleep(TICK)
            await self.expire()
            if self._clock.now() - scanned >= REREGISTER_SCAN:
                scanned = self._clock.now()
                try:
                    await self.reregister_due()
                except Exception as exc:  # the store may be closing; try next time
                    log.warning(
                        "reregister scan failed", extra={"fields": {"error": type(exc).__name__}}
                    )

    # --- debug mode -------------------------------------------------------------------

    async def debug_record(self, serial: str, request: Request) -> None:
        """Debug mode of a PBX: keep the destination's display name (28 days)."""
        if serial not in self.settings.debug_serials:
            return
        to = request.to
        user = getattr(to.uri, "user", None)
        if not user:
            return
        try:
            await self._store.put(
                "debug",
                {"pbx_serial": serial, "sip_username": user, "destination_name": to.display or ""},
            )
        except StorageUnavailable:
            # A diagnostic record the call does not need: the call goes on unrecorded.
            log.warning("wake.debug_not_stored", extra={"fields": {"pbx_serial": serial}})


def _key(request: Request, caller: Flow) -> _CallKey:
    return (caller.key, request.call_id, request.top_via.branch or "")


def _reason(text: str) -> tuple[tuple[str, str], ...]:
    return (("Reason", f'SIP;cause=480;text="{text}"'),) if text else ()


async def _wake_only(push: PushService, request: WakeRequest) -> None:
    """A push whose outcome changes nothing here (push/ logs and counts it)."""
    await push.wake(request)
