"""A mock PBX: dials out to softrelay, links by serial, and is its phones' registrar.

    pbx = await MockPbx.connect(relay, serial="0042137", secret=..., domain="relay.test",
                                users={"alice": "alice's password"})
    result = await pbx.call("alice")      # rings every binding of alice, along its Path
    assert result.connected and result.woken
    await pbx.close()

What it does, as a PBX behind NAT does with softrelay:

- opens one flow (TCP by default, or TLS or WebSocket) and REGISTERs
  `sip:<serial>@<domain>`, answering the relay's digest challenge with its secret;
  `PbxRefused` when the relay says no. It keeps the flow alive with CRLF pings;
- links again when the flow is lost (the relay's node died or stopped, a keep-alive
  went unanswered): to the next of the relay addresses it was given (the same one
  when it has one), with a capped, jittered backoff between attempts, as a PBX in the
  field does. Its registrar keeps its bindings meanwhile (`wait_links` counts links);
- is the registrar of its users: challenges each REGISTER (MD5 digest, qop=auth),
  keeps each binding's Contact and the `Path` the relay added (RFC 3327), and replaces a
  binding re-registered by the same instance (`+sip.instance`) or push token (RFC 8599);
- places calls: an INVITE to each live binding's Contact (which carries the phone's
  push parameters) with the binding's Path as Route, so the relay can wake a sleeping
  phone; the first answer wins and the other branches are cancelled; no answer within
  the ring timeout cancels them all;
- accepts the calls its phones place (180, then 200) and answers BYE, CANCEL, OPTIONS.

It keeps no password of its users beyond the mapping it was given, and logs none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from cluster.redis import Backoff
from mockphone import digest
from mockphone.sip import (
    TIMEOUT,
    LinkClosed,
    RelayAddress,
    SipLink,
    Transport,
    ack_for_failure,
    ack_hold_bye,
    cancel_for,
    new_request,
    sdp,
)
from mockphone.sipwire import NameAddr, Request, Response, make_response, request

log = logging.getLogger("softrelay.mockphone")

KEEPALIVE = 30.0  # seconds between CRLF pings on the PBX's flow
# Linking again after the flow was lost: from REDIAL_FIRST doubling to REDIAL_CAP.
REDIAL_FIRST = 0.05
REDIAL_CAP = 5.0
MAX_NONCES = 10_000


class PbxRefused(Exception):
    """The relay refused the PBX's link (wrong secret, unknown serial)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the relay answered {status} to the PBX's REGISTER")
        self.status = status


@dataclass(slots=True)
class LinkRegistration:
    """The REGISTER by which a PBX links to the relay as its serial, and its answer to
    the relay's digest challenge (with the secret the operator gave the relay for that
    serial). Sans I/O, so that every PBX client here sends the same: `MockPbx`, the
    tests' scripted PBX (tests/peers.py) and the benchmarks' PBXs.

        registration = LinkRegistration(serial, domain, contact)
        challenged = await send(registration.request(via))           # 401
        await send(registration.request(via, registration.answer(
            challenged.get("WWW-Authenticate"), secret)))           # 200
    """

    serial: str
    domain: str
    contact: str  # the PBX's Contact header value
    expires: int = 600
    call_id: str = field(default_factory=lambda: f"pbx-{secrets.token_hex(8)}")
    cseq: int = 0

    @property
    def aor(self) -> str:
        return f"<sip:{self.serial}@{self.domain}>"

    def request(self, via: str, authorization: str | None = None) -> Request:
        """The next REGISTER (CSeq counts up) with `via` (a Via value with its branch)."""
        self.cseq += 1
        headers = [
            ("Via", via),
            ("Max-Forwards", "70"),
            ("From", f"{self.aor};tag={self.call_id[-8:]}"),
            ("To", self.aor),
            ("Call-ID", self.call_id),
            ("CSeq", f"{self.cseq} REGISTER"),
            ("Contact", self.contact),
            ("Expires", str(self.expires)),
        ]
        if authorization is not None:
            headers.append(("Authorization", authorization))
        return request("REGISTER", f"sip:{self.domain}", headers)

    def answer(self, challenge: str, secret: str) -> str:
        """The Authorization value answering the relay's `challenge` with `secret`."""
        return digest.answer(
            challenge,
            username=self.serial,
            password=secret,
            method="REGISTER",
            uri=f"sip:{self.domain}",
        ).header


@dataclass(slots=True)
class Binding:
    user: str
    contact: NameAddr
    paths: list[str]  # the Path header values, in order: the Route of requests to it
    key: str  # +sip.instance, else the push token, else the Contact URI
    expires_at: float


@dataclass(slots=True)
class CallResult:
    """How a call the PBX placed ended."""

    user: str
    status: int  # the final answer; 0: none (the flow ended); 408: rang out, cancelled
    reason: str  # the Reason header, else the reason phrase
    woken: bool = False  # the relay parked it and pushed (180 with Push-Status)
    push_status: str = ""
    wake_seconds: float | None = None  # INVITE sent to the phone's own first answer
    setup_seconds: float | None = None  # INVITE sent to 200

    @property
    def connected(self) -> bool:
        return 200 <= self.status < 300


@dataclass(slots=True)
class PbxCounters:
    registers: int = 0
    register_refused: int = 0
    calls_in: int = 0  # calls from phones, answered
    links: int = 0  # accepted links to the relay, the first and every one after a loss


@dataclass
class MockPbx:
    serial: str
    domain: str
    users: dict[str, str] = field(repr=False)  # user -> SIP password (add_user)
    now: Callable[[], float] = time.monotonic
    ring_timeout: float = 30.0  # real seconds a call rings before the PBX cancels it
    link: SipLink | None = None
    bindings: dict[str, list[Binding]] = field(default_factory=dict)
    counters: PbxCounters = field(default_factory=PbxCounters)
    registered: asyncio.Condition = field(default_factory=asyncio.Condition)
    _nonces: dict[str, float] = field(default_factory=dict)
    _incoming: dict[str, asyncio.Event] = field(default_factory=dict)
    _keepalive: asyncio.Task[None] | None = None
    relays: tuple[RelayAddress, ...] = ()
    relay_index: int = 0  # which of `relays` the flow goes to
    transport: Transport = Transport.TCP
    _secret: str = field(default="", repr=False)

    @classmethod
    async def connect(
        cls,
        relay: RelayAddress | Sequence[RelayAddress],
        *,
        serial: str,
        secret: str,
        domain: str,
        users: Mapping[str, str],
        transport: Transport = Transport.TCP,
        ring_timeout: float = 30.0,
        keepalive: float = KEEPALIVE,
        now: Callable[[], float] = time.monotonic,
        redial: bool = True,
    ) -> MockPbx:
        """Dial out to the relay (the first of several addresses: the nodes of a
        cluster) and link as `serial`; PbxRefused if it says no. With `redial`, a lost
        flow is replaced (module docstring)."""
        if transport is Transport.UDP:
            raise ValueError("a PBX links over TCP, TLS or WebSocket: calls come back on it")
        relays = (relay,) if isinstance(relay, RelayAddress) else tuple(relay)
        if not relays:
            raise ValueError("a PBX needs at least one relay address")
        pbx = cls(serial, domain, dict(users), now=now, ring_timeout=ring_timeout)
        pbx.relays, pbx.transport, pbx._secret = relays, transport, secret
        status = await pbx._open()
        if status != 200:
            raise PbxRefused(status)
        pbx._keepalive = asyncio.create_task(
            pbx._keep_alive(keepalive, redial), name=f"pbx-{serial}"
        )
        return pbx

    async def _open(self) -> int:
        """A new flow to the current relay address, linked; the link's final status
        (the flow is closed unless 200). Errors of the flow itself propagate."""
        link = await SipLink.open(self.transport, self.relays[self.relay_index], self._on_request)
        self.link = link
        try:
            status = await self._link(self._secret)
        except BaseException:
            await link.close()
            raise
        if status != 200:
            await link.close()
            return status
        async with self.registered:
            self.counters.links += 1
            self.registered.notify_all()
        return status

    async def wait_links(self, count: int, within: float = TIMEOUT) -> None:
        """Until the PBX has linked `count` times (the first link counts)."""
        async with asyncio.timeout(within), self.registered:
            await self.registered.wait_for(lambda: self.counters.links >= count)

    def add_user(self, user: str, password: str) -> None:
        """A user the registrar accepts from now on."""
        self.users[user] = password

    @property
    def phone_domain(self) -> str:
        return f"{self.serial}.{self.domain}"

    def _link_or_raise(self) -> SipLink:
        if self.link is None or self.link.closed.is_set():
            raise LinkClosed("the PBX's flow is closed")
        return self.link

    async def _link(self, secret: str) -> int:
        link = self._link_or_raise()
        contact = f"<sip:{self.serial}@{link.sent_by};transport={link.transport.value}>"
        registration = LinkRegistration(self.serial, self.domain, contact)
        answer = await link.transact(registration.request(link.via()))
        if answer.status != 401:
            return answer.status
        header = registration.answer(answer.get("WWW-Authenticate") or "", secret)
        return (await link.transact(registration.request(link.via(), header))).status

    async def _keep_alive(self, every: float, redial: bool) -> None:
        """Ping every `every` seconds; when the flow ends (or a ping goes unanswered),
        link again with `redial`, else stop."""
        while True:
            link = self._link_or_raise()
            try:
                async with asyncio.timeout(every):
                    await link.closed.wait()
            except TimeoutError:
                try:
                    await link.ping()
                    continue
                except (TimeoutError, OSError, LinkClosed):
                    pass  # silent or gone: closed below
            await link.close()  # ended by the other side: our end too
            if not redial:
                return
            await self._relink()

    async def _relink(self) -> None:
        """Link again, to the next relay address first, until one accepts."""
        backoff = Backoff(REDIAL_FIRST, REDIAL_CAP)
        while True:
            self.relay_index = (self.relay_index + 1) % len(self.relays)
            try:
                if await self._open() == 200:
                    log.info("pbx linked again", extra={"fields": {"pbx_serial": self.serial}})
                    return
            except (OSError, TimeoutError, LinkClosed):
                pass  # that node is not there (yet): the next one, after a while
            await asyncio.sleep(backoff.delay())

    async def close(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive
        if self.link is not None:
            await self.link.close()

    # --- registrar --------------------------------------------------------------------

    def live_bindings(self, user: str) -> list[Binding]:
        now = self.now()
        return [b for b in self.bindings.get(user, []) if b.expires_at > now]

    async def wait_registered(self, user: str, count: int = 1, within: float = TIMEOUT) -> None:
        """Wait until `user` has at least `count` live bindings."""
        async with asyncio.timeout(within), self.registered:
            await self.registered.wait_for(lambda: len(self.live_bindings(user)) >= count)

    async def _on_request(self, request: Request) -> None:
        handler = {
            "REGISTER": self._register,
            "INVITE": self._invite,
            "BYE": self._ok,
            "OPTIONS": self._ok,
            "CANCEL": self._cancel,
        }.get(request.method)
        if request.method == "ACK":
            return
        link = self._link_or_raise()
        if handler is None:
            await link.send(make_response(request, 405, headers=[("Allow", _ALLOW)]))
            return
        await handler(link, request)

    async def _ok(self, link: SipLink, request: Request) -> None:
        await link.send(make_response(request, 200))

    async def _register(self, link: SipLink, request: Request) -> None:
        self.counters.registers += 1
        user = request.to.uri.user
        password = self.users.get(user or "")
        if user is None or password is None:
            self.counters.register_refused += 1
            await link.send(make_response(request, 404, "Unknown User"))
            return
        header = request.get("Authorization")
        if header is None or not self._proves(header, user, password):
            await link.send(make_response(request, 401, headers=[self._challenge()]))
            return
        now = self.now()
        kept = [b for b in self.bindings.get(user, []) if b.expires_at > now]
        default = request.expires if request.expires is not None else 3600
        paths = request.get_all("Path")
        for contact in request.contacts:
            expires = contact.expires if contact.expires is not None else default
            key = _binding_key(contact)
            kept = [b for b in kept if b.key != key]
            if expires > 0:
                kept.append(Binding(user, contact, paths, key, now + expires))
        if request.contact_star:
            kept = []
        async with self.registered:
            self.bindings[user] = kept
            self.registered.notify_all()
        contacts = [
            ("Contact", str(b.contact.with_param("expires", str(int(b.expires_at - now)))))
            for b in kept
        ]
        await link.send(make_response(request, 200, headers=contacts))

    def _challenge(self) -> tuple[str, str]:
        nonce = secrets.token_hex(16)
        if len(self._nonces) >= MAX_NONCES:
            self._nonces.pop(next(iter(self._nonces)))
        self._nonces[nonce] = self.now()
        return ("WWW-Authenticate", digest.challenge(f"pbx-{self.serial}", nonce))

    def _proves(self, header: str, user: str, password: str) -> bool:
        try:
            nonce = digest.params(header).get("nonce", "")
        except digest.DigestSyntaxError:
            return False
        return nonce in self._nonces and digest.proves(
            header, username=user, password=password, method="REGISTER"
        )

    # --- calls from phones ------------------------------------------------------------

    async def _invite(self, link: SipLink, invite: Request) -> None:
        tag = secrets.token_hex(6)
        echoed = [("Record-Route", rr) for rr in invite.get_all("Record-Route")]
        contact = ("Contact", f"<sip:pbx@{link.sent_by};transport={link.transport.value}>")
        cancelled = asyncio.Event()
        self._incoming[invite.call_id] = cancelled
        try:
            await link.send(make_response(invite, 180, headers=[*echoed, contact], to_tag=tag))
            if cancelled.is_set():
                return
            self.counters.calls_in += 1
            await link.send(
                make_response(
                    invite,
                    200,
                    headers=[*echoed, contact, ("Content-Type", "application/sdp")],
                    to_tag=tag,
                    body=sdp("pbx", link.media_host),
                )
            )
        finally:
            self._incoming.pop(invite.call_id, None)

    async def _cancel(self, link: SipLink, cancel: Request) -> None:
        pending = self._incoming.get(cancel.call_id)
        await link.send(make_response(cancel, 200 if pending else 481))
        if pending is not None:
            pending.set()

    # --- calls to phones --------------------------------------------------------------

    async def call(
        self, user: str, *, hold: float = 0.0, caller: str = "pbx", caller_name: str | None = None
    ) -> CallResult:
        """Call every live binding of `user` from `caller` (display name `caller_name`,
        else `caller`); the first to answer wins. After `hold` real seconds of talk the
        PBX hangs up."""
        link = self._link_or_raise()
        targets = self.live_bindings(user)
        if not targets:
            return CallResult(user, 480, "not registered")
        started = self.now()
        result = CallResult(user, 0, "")
        answered = asyncio.Event()
        invites = [self._invite_for(link, b, caller, caller_name or caller) for b in targets]

        def provisional(answer: Response) -> None:
            status = answer.get("Push-Status")
            if answer.status == 100 or status is not None:
                # Only the relay answers 100 here (it parked the call; the phones do not).
                result.woken = True
            if status is not None:
                result.push_status = status
            elif answer.status == 180 and result.woken and result.wake_seconds is None:
                result.wake_seconds = self.now() - started

        async def branch(invite: Request) -> Response | None:
            try:
                answer = await link.transact(
                    invite, within=self.ring_timeout + TIMEOUT, on_provisional=provisional
                )
            except (LinkClosed, TimeoutError):
                return None
            if answer.status >= 300:
                await link.send(ack_for_failure(invite, answer))
            else:
                answered.set()
            return answer

        tasks = [asyncio.create_task(branch(invite)) for invite in invites]
        try:
            ringing = asyncio.create_task(answered.wait())
            all_ended: asyncio.Future[list[Response | None]] = asyncio.gather(*tasks)
            # Its outcome is read from the tasks; a cancelled call must not leave it unread.
            all_ended.add_done_callback(lambda f: f.cancelled() or f.exception())
            waited: list[asyncio.Future[object]] = [ringing, all_ended]  # type: ignore[list-item]  # both are awaited below
            done, _ = await asyncio.wait(
                waited,
                timeout=self.ring_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            ringing.cancel()
            # Cancel every branch still ringing: rung out, or another branch answered.
            for invite, task in zip(invites, tasks, strict=True):
                if not task.done():
                    with contextlib.suppress(LinkClosed, TimeoutError):
                        await link.transact(cancel_for(invite))
            answers = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
        winner = next((a for a in answers if a is not None and a.status < 300), None)
        if winner is not None:
            invite = invites[answers.index(winner)]
            result.status, result.reason = winner.status, winner.reason
            result.setup_seconds = self.now() - started
            if result.woken and result.wake_seconds is None:
                result.wake_seconds = result.setup_seconds
            await ack_hold_bye(link, invite, winner, hold)
            return result
        finals = [a for a in answers if a is not None]
        if not finals:
            result.status, result.reason = 0, "no answer: the flow ended"
        elif not done or all(a.status == 487 for a in finals):
            result.status, result.reason = 408, "no answer: rang out"
        else:
            best = min(finals, key=lambda a: a.status)
            result.status = best.status
            result.reason = best.get("Reason") or best.reason
        return result

    def _invite_for(self, link: SipLink, binding: Binding, caller: str, name: str) -> Request:
        return new_request(
            link,
            "INVITE",
            str(binding.contact.uri),
            from_=f'"{name}" <sip:{caller}@{self.phone_domain}>;tag={secrets.token_hex(6)}',
            to=f"<sip:{binding.user}@{self.phone_domain}>",
            call_id=f"pbx-call-{secrets.token_hex(10)}",
            cseq=1,
            routes=binding.paths,
            headers=[
                ("Contact", f"<sip:{caller}@{link.sent_by};transport={link.transport.value}>"),
                ("Content-Type", "application/sdp"),
            ],
            body=sdp(caller, link.media_host),
        )


_ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER"


def _binding_key(contact: NameAddr) -> str:
    if contact.instance:
        return contact.instance
    push = contact.push
    if push is not None and push.prid:
        return f"{push.provider}:{push.prid}"
    return str(contact.uri)
