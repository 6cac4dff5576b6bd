"""A mock phone: an iOS, Android or desktop softphone app, as softrelay sees one.

    phone = MockPhone(PhoneSpec("alice", password, Kind.IOS), relay, serial, domain,
                      inbox=inbox)
    await phone.start()        # connects, REGISTERs with digest through its PBX
    await phone.sleep()        # the app went to the background: its flow is closed
    ...                        # a call comes: the push wakes it, it re-registers after
                               # a delay drawn from `wake_delay`, and takes the call

Kinds: `ios` registers APNs VoIP push parameters (RFC 8599 `pn-provider=apns`,
`pn-prid` = a 64-hex-digit device token, `pn-param` = `<team id>.<bundle id>.voip`),
`android` FCM ones, `desktop` none (it never sleeps, since nothing could wake it).
Over UDP, TCP, TLS or WebSocket. Behaviours: keep-alive (CRLF pings), sleep, wake on
push, answer / decline / ignore calls (`Answer`), place calls, lose the network and
come back. An awake phone whose flow the relay's side ends (its node died or stopped)
connects again and re-registers, to the next of the relay addresses it was given (the
nodes of a cluster; the same one when it has one) with a capped, jittered backoff, as
an app does on a lost flow (RFC 5626 4.5); `counters.redials` counts those. The
Contact carries a `+sip.instance`, so the PBX replaces the binding when the phone
re-registers from a new flow.

The phone's password is only used to answer digest challenges; it is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from cluster.redis import Backoff
from mockphone.delays import Delay, Pace
from mockphone.pushes import Push, PushInbox, PushKind
from mockphone.sip import (
    TIMEOUT,
    Dialog,
    LinkClosed,
    RelayAddress,
    SipLink,
    Transport,
    ack_for_failure,
    authorization,
    cancel_and_wait,
    new_request,
    sdp,
)
from mockphone.sipwire import Request, make_response

log = logging.getLogger("softrelay.mockphone")

DEFAULT_APP_ID = "com.example.softphone"
TEAM_ID = "ABCDE12345"
NO_DELAY = Delay.fixed(0)
# An app woken by a VoIP push connects and registers in about 1.5 s (CallKit, TLS, DNS).
WAKE_DELAY = Delay("lognormal", 1.5, 0.4)
# Connecting again after the flow was lost: from REDIAL_FIRST doubling to REDIAL_CAP.
# A woken phone's REGISTER refused with 503 is tried this many times in all.
WAKE_TRIES = 4
REDIAL_FIRST = 0.05
REDIAL_CAP = 5.0


class Kind(StrEnum):
    IOS = "ios"
    ANDROID = "android"
    DESKTOP = "desktop"
    # An iOS app in SIPIS mode (mockphone/sipis.py): softrelay registers its account at
    # the provider; the app connects only when a push wakes it.
    SIPIS = "sipis"

    @property
    def pushes(self) -> bool:
        return self is not Kind.DESKTOP

    @property
    def platform(self) -> str:
        """The usage ping's platform."""
        return {"ios": "ios", "android": "android", "desktop": "linux", "sipis": "ios"}[self.value]


class Answer(StrEnum):
    ANSWER = "answer"  # 180, then 200 after `answer_delay`
    DECLINE = "decline"  # 180, then 603 Decline after `answer_delay`
    IGNORE = "ignore"  # 180, then nothing: the caller rings out and cancels


class State(StrEnum):
    OFFLINE = "offline"
    AWAKE = "awake"
    ASLEEP = "asleep"


@dataclass(frozen=True, slots=True)
class PhoneSpec:
    user: str
    password: str = field(repr=False)
    kind: Kind = Kind.IOS
    transport: Transport = Transport.TCP
    answer: Answer = Answer.ANSWER
    answer_delay: Delay = NO_DELAY
    wake_delay: Delay = WAKE_DELAY  # push to re-REGISTER, in simulated seconds
    expires: int = 3600
    keepalive: float = 30.0  # real seconds between CRLF pings while awake; 0: none
    app_id: str = DEFAULT_APP_ID
    local_host: str = "127.0.0.1"


def new_token(kind: Kind) -> str | None:
    """A device token of the kind's shape: APNs 64 hex digits, FCM a long opaque string."""
    if kind in (Kind.IOS, Kind.SIPIS):
        return secrets.token_hex(32)
    if kind is Kind.ANDROID:
        return f"{secrets.token_urlsafe(16)}:APA91b{secrets.token_urlsafe(96)}"
    return None


@dataclass(slots=True)
class PhoneCounters:
    registers: int = 0
    register_failures: int = 0
    calls_in: int = 0  # INVITEs received
    answered: int = 0
    declined: int = 0
    ignored: int = 0
    cancelled: int = 0  # CANCELs received while ringing
    pushes: int = 0
    wakes: int = 0
    wake_failures: int = 0
    wake_retries: int = 0  # a woken phone's REGISTER tried again after a 503
    redials: int = 0  # registered again after the flow was lost under the awake app


@dataclass(slots=True)
class OutgoingCall:
    status: int  # final answer; 0 when the flow ended first
    reason: str
    setup_seconds: float | None = None

    @property
    def connected(self) -> bool:
        return 200 <= self.status < 300


class MockPhone:
    def __init__(
        self,
        spec: PhoneSpec,
        relay: RelayAddress | Sequence[RelayAddress],
        *,
        serial: str,
        domain: str,
        inbox: PushInbox | None = None,
        pace: Pace | None = None,
        now: Callable[[], float] = time.monotonic,
        token: str | None = None,
    ) -> None:
        self.spec = spec
        # The relay's addresses (a cluster's nodes): the flow goes to `relay`, the next
        # one after a loss.
        self.relays = (relay,) if isinstance(relay, RelayAddress) else tuple(relay)
        if not self.relays:
            raise ValueError("a phone needs at least one relay address")
        self.relay = self.relays[0]
        self.serial = serial
        self.domain = f"{serial}.{domain}"
        self.inbox = inbox
        self.pace = pace or Pace()
        self.now = now
        self.token = token if token is not None else new_token(spec.kind)
        self.instance = f"<urn:uuid:{uuid.uuid4()}>"
        self.state = State.OFFLINE
        self.counters = PhoneCounters()
        self.link: SipLink | None = None
        self.last_register: int | None = None  # the last REGISTER's final status
        self.retry_after: float | None = None  # its Retry-After, seconds
        self.calls_in_progress = 0
        self.on_wake: Callable[[MockPhone, float], None] | None = None  # latency, simulated
        self._call_id = f"reg-{secrets.token_hex(8)}"
        self._cseq = 0
        self._ringing: dict[str, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._keepalive: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._redial: asyncio.Task[None] | None = None  # watches the flow while awake
        self.redialed = asyncio.Condition()  # notified at each redial
        self._woken_at: float | None = None
        self.awake = asyncio.Event()

    # --- what the app does ------------------------------------------------------------

    @property
    def aor(self) -> str:
        return f"<sip:{self.spec.user}@{self.domain}>"

    async def start(self) -> int:
        """Connect and register; the final status of the REGISTER (200 on success)."""
        if self.spec.kind.pushes and self.inbox is not None and self.token:
            queue = self.inbox.watch(self.token)
            self._watcher = asyncio.create_task(self._watch(queue), name="phone-pushes")
        return await self._connect_and_register()

    async def _connect_and_register(self) -> int:
        await self._drop_link()
        try:
            self.link = await SipLink.open(
                self.spec.transport, self.relay, self._on_request, local_host=self.spec.local_host
            )
            status = await self.register()
        except (OSError, TimeoutError, LinkClosed):
            status = 0
        if status == 200:
            self.state = State.AWAKE
            self.awake.set()
            if self.spec.keepalive > 0:
                self._keepalive = asyncio.create_task(self._keep_alive(self.spec.keepalive))
            assert self.link is not None
            self._redial = asyncio.create_task(self._redial_on_loss(self.link))
        else:
            self.counters.register_failures += 1
            await self._drop_link()
            self.state = State.OFFLINE
        return status

    async def register(self, expires: int | None = None) -> int:
        """REGISTER through the relay, answering the PBX's challenge; the final status."""
        link = self._live_link()
        expires = self.spec.expires if expires is None else expires
        contact = self.contact(link)

        def register(*extra: tuple[str, str]) -> Request:
            self._cseq += 1
            return new_request(
                link,
                "REGISTER",
                f"sip:{self.domain}",
                from_=f"{self.aor};tag={self._call_id[-8:]}",
                to=self.aor,
                call_id=self._call_id,
                cseq=self._cseq,
                headers=[
                    ("Contact", contact),
                    ("Expires", str(expires)),
                    ("Supported", "path, outbound"),
                    *extra,
                ],
            )

        self.counters.registers += 1
        answer = await link.transact(register())
        if answer.status in (401, 407):
            name = "WWW-Authenticate" if answer.status == 401 else "Proxy-Authenticate"
            header, _ = authorization(
                answer.get(name) or "",
                username=self.spec.user,
                password=self.spec.password,
                method="REGISTER",
                uri=f"sip:{self.domain}",
            )
            field_name = "Authorization" if answer.status == 401 else "Proxy-Authorization"
            answer = await link.transact(register((field_name, header)))
        self.last_register = answer.status
        retry = answer.get("Retry-After") or ""
        self.retry_after = float(retry.split(";")[0].strip()) if retry[:1].isdigit() else None
        return answer.status

    def contact(self, link: SipLink) -> str:
        params = f";transport={link.transport.value}"
        if self.token and self.spec.kind is Kind.IOS:
            params += (
                f";pn-provider=apns;pn-prid={self.token};pn-param={TEAM_ID}.{self.spec.app_id}.voip"
            )
        elif self.token and self.spec.kind is Kind.ANDROID:
            params += f";pn-provider=fcm;pn-prid={self.token};pn-param={self.spec.app_id}"
        return f'<sip:{self.spec.user}@{link.sent_by}{params}>;+sip.instance="{self.instance}"'

    async def sleep(self) -> None:
        """The app goes to the background: its flow is closed, its binding stays with
        the PBX. A desktop app cannot sleep (nothing would wake it): ValueError."""
        if not self.spec.kind.pushes:
            raise ValueError("a desktop phone has no push: it cannot sleep")
        await self._drop_link()
        self.state = State.ASLEEP
        self.awake.clear()

    async def wake(self) -> int:
        """The app comes to the foreground: connect and register again."""
        return await self._connect_and_register()

    async def lose_network(self) -> None:
        """The network goes away under the app: the flow ends without an un-REGISTER."""
        await self._drop_link()
        self.state = State.OFFLINE
        self.awake.clear()

    async def come_back(self) -> int:
        return await self._connect_and_register()

    async def unregister(self) -> int:
        status = await self.register(expires=0)
        await self._drop_link()
        self.state = State.OFFLINE
        self.awake.clear()
        return status

    def target(self, callee: str) -> str:
        """The address of `callee` as the phone dials it: a user of its PBX."""
        return f"sip:{callee}@{self.domain}"

    async def call(self, callee: str = "echo", *, hold: float = 0.0) -> OutgoingCall:
        """INVITE `callee` at the PBX; after `hold` real seconds of talk, hang up."""
        link = self._live_link()
        started = self.now()
        invite = new_request(
            link,
            "INVITE",
            self.target(callee),
            from_=f"{self.aor};tag={secrets.token_hex(6)}",
            to=f"<{self.target(callee)}>",
            call_id=f"out-{secrets.token_hex(10)}",
            cseq=1,
            headers=[
                ("Contact", self.contact(link)),
                ("Content-Type", "application/sdp"),
            ],
            body=sdp(self.spec.user, link.media_host),
        )
        self.calls_in_progress += 1
        try:
            answer = await link.transact(invite, within=TIMEOUT * 3)
            if answer.status >= 300:
                await link.send(ack_for_failure(invite, answer))
                return OutgoingCall(answer.status, answer.get("Reason") or answer.reason)
            dialog = Dialog.as_caller(invite, answer)
            await link.send(dialog.request(link, "ACK", cseq=dialog.cseq))
            call = OutgoingCall(answer.status, answer.reason, self.now() - started)
            if hold > 0:
                await asyncio.sleep(hold)
            with contextlib.suppress(LinkClosed, TimeoutError):
                await link.transact(dialog.request(link, "BYE"))
        except (LinkClosed, TimeoutError) as exc:
            return OutgoingCall(0, type(exc).__name__)
        else:
            return call
        finally:
            self.calls_in_progress -= 1

    async def stop(self) -> None:
        """Stop everything the phone runs and close its flow (no un-REGISTER)."""
        if self._watcher is not None:
            await cancel_and_wait(self._watcher)
            self._watcher = None
        await cancel_and_wait(*self._tasks)
        if self.inbox is not None and self.token:
            self.inbox.forget(self.token)
        await self._drop_link()
        self.state = State.OFFLINE

    # --- the flow ---------------------------------------------------------------------

    def _live_link(self) -> SipLink:
        if self.link is None or self.link.closed.is_set():
            raise LinkClosed("the phone has no flow")
        return self.link

    async def _drop_link(self) -> None:
        """Close the flow on purpose (no redial follows)."""
        redial = self._redial
        if redial is not None and redial is not asyncio.current_task():  # else: redialing
            self._redial = None
            await cancel_and_wait(redial)
        if self._keepalive is not None:
            keepalive, self._keepalive = self._keepalive, None
            await cancel_and_wait(keepalive)
        if self.link is not None:
            link, self.link = self.link, None
            await link.close()

    async def _keep_alive(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            link = self._live_link()
            try:
                await link.ping()
            except (LinkClosed, TimeoutError, OSError):
                await link.close()  # silent: as good as gone (the redial takes over)
                return

    async def _redial_on_loss(self, link: SipLink) -> None:
        """When `link` ends under the awake app (not dropped on purpose): connect and
        register again, to the next relay address first, until one accepts."""
        await link.closed.wait()
        if self.link is not link:
            return  # dropped on purpose: sleep, lose_network, stop
        self.state = State.OFFLINE
        self.awake.clear()
        backoff = Backoff(REDIAL_FIRST, REDIAL_CAP)
        while True:
            index = (self.relays.index(self.relay) + 1) % len(self.relays)
            self.relay = self.relays[index]
            if await self._connect_and_register() == 200:
                async with self.redialed:
                    self.counters.redials += 1
                    self.redialed.notify_all()
                return
            await asyncio.sleep(backoff.delay())

    async def wait_redials(self, count: int, within: float = TIMEOUT) -> None:
        """Until the phone has registered again `count` times after a lost flow."""
        async with asyncio.timeout(within), self.redialed:
            await self.redialed.wait_for(lambda: self.counters.redials >= count)

    # --- pushes -----------------------------------------------------------------------

    async def _watch(self, queue: asyncio.Queue[Push]) -> None:
        """Take each push; a call or re-register push wakes a sleeping app."""
        while True:
            push = await queue.get()
            self.counters.pushes += 1
            kind = push.kind
            if kind is PushKind.CANCELLED or self.state is State.AWAKE:
                continue  # CallKit report ended; or awake already: nothing to do
            if kind in (PushKind.CALL, PushKind.REREGISTER):
                self._woken_at = self.now()
                await self.pace.wait_for(self.spec.wake_delay)
                if self.awake.is_set():
                    continue  # woken meanwhile by another push or by hand
                if await self._register_woken() != 200:
                    self.counters.wake_failures += 1
                elif kind is PushKind.REREGISTER:
                    await self.sleep()  # refreshed in the background; back to sleep
                else:
                    self.counters.wakes += 1

    async def _register_woken(self) -> int:
        """Connect and register after a push. A 503 (the relay shedding load, or the PBX)
        is tried again after its Retry-After on the phone's pace, as apps do: the call
        waits for the phone until the relay's wake timeout."""
        status = await self._connect_and_register()
        for _ in range(WAKE_TRIES - 1):
            if status != 503 or self.awake.is_set():
                break
            self.counters.wake_retries += 1
            await self.pace.wait(self.retry_after if self.retry_after is not None else 1.0)
            status = await self._connect_and_register()
        return status

    # --- calls to the phone -----------------------------------------------------------

    async def _on_request(self, request: Request) -> None:
        link = self._live_link()
        if request.method == "INVITE":
            await self._incoming(link, request)
        elif request.method == "CANCEL":
            ringing = self._ringing.get(request.call_id)
            await link.send(make_response(request, 200 if ringing else 481))
            if ringing is not None:
                self.counters.cancelled += 1
                ringing.set()
        elif request.method in ("BYE", "OPTIONS"):
            await link.send(make_response(request, 200))
        elif request.method != "ACK":
            await link.send(make_response(request, 405))

    async def _incoming(self, link: SipLink, invite: Request) -> None:
        self.counters.calls_in += 1
        tag = secrets.token_hex(6)
        echoed = [("Record-Route", rr) for rr in invite.get_all("Record-Route")]
        contact = ("Contact", self.contact(link))
        cancelled = asyncio.Event()
        self._ringing[invite.call_id] = cancelled
        self.calls_in_progress += 1
        try:
            await link.send(make_response(invite, 180, headers=[*echoed, contact], to_tag=tag))
            if self._woken_at is not None and self.on_wake is not None:
                self.on_wake(self, self.now() - self._woken_at)
            self._woken_at = None
            answer = self.spec.answer
            if answer is Answer.IGNORE:
                self.counters.ignored += 1
                await cancelled.wait()
            else:
                waited = asyncio.create_task(self.pace.wait_for(self.spec.answer_delay))
                gone = asyncio.create_task(cancelled.wait())
                await asyncio.wait({waited, gone}, return_when=asyncio.FIRST_COMPLETED)
                waited.cancel()
                gone.cancel()
                if not cancelled.is_set() and answer is Answer.DECLINE:
                    self.counters.declined += 1
                    await link.send(make_response(invite, 603, "Decline", to_tag=tag))
                    return
                if not cancelled.is_set():
                    self.counters.answered += 1
                    await link.send(
                        make_response(
                            invite,
                            200,
                            headers=[*echoed, contact, ("Content-Type", "application/sdp")],
                            to_tag=tag,
                            body=sdp(self.spec.user, link.media_host),
                        )
                    )
                    return
            await link.send(make_response(invite, 487, to_tag=tag))
        finally:
            self._ringing.pop(invite.call_id, None)
            self.calls_in_progress -= 1
