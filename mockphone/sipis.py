"""A SIPIS-mode app, and a caller at its provider: the mock parties of SIPIS mode.

    account = ProviderAccount("sip:127.0.0.1:5070", "provider.test", "alice", password)
    phone = SipisPhone(PhoneSpec("alice", password, Kind.SIPIS), relay,
                       account=account, relay_domain="relay.test", session=session,
                       inbox=inbox)
    await phone.start()     # POST /sipis/v1/accounts (the HA1, never the password);
                            # softrelay registers it at the provider; the app sleeps
    async with ProviderCaller.open(provider_host, provider_port, "provider.test") as carol:
        result = await carol.call("alice")   # push, the app connects, 180, 200, BYE

The app talks to softrelay as a real one does, over the wire only: it stores its SIP
account over HTTP (`POST /sipis/v1/accounts`) with the HA1s it computed on the device
from the user's password (MD5 and SHA-256 of user:realm:password; the password never
leaves the app) and its push token, keeps the device secret the answer gives, and holds
no connection. A push (the stand-ins' delivery, as for the relay-mode phones) wakes it:
it connects to softrelay's SIP port and REGISTERs `sip:<account id>@sipis.<domain>` with
`Authorization: Bearer <device secret>`; the parked INVITE then arrives on that flow and
is answered as the phone's `Answer` says (`MockPhone._incoming`), a waiting text as a
MESSAGE (answered 200). After the call or the text the app goes back to sleep (its flow
closes). It places calls the same way (`place_call`): connect, REGISTER, INVITE a user
at the provider through softrelay, which authenticates it there with the stored HA1.

The caller is a foreign user (`sip:<name>@other.test`) sending INVITEs and MESSAGEs
through the provider's proxy (Kamailio in the tests) over UDP, as a call from outside
reaches the provider: it sees 100 from the provider, 180 with `Push-Status` from
softrelay when the app was pushed, then the app's own answers.

The caller can also be a user of the provider (`register`): registered at the provider,
it answers every INVITE there with 180 and 200 (an echo line), and the apps' own calls
reach it. Neither party logs a password, an HA1, a secret or a text.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from mockphone.delays import Pace
from mockphone.pbx import CallResult
from mockphone.phone import Kind, MockPhone, OutgoingCall, PhoneSpec, State, new_token
from mockphone.pushes import Push, PushInbox, PushKind
from mockphone.sip import (
    TIMEOUT,
    LinkClosed,
    RelayAddress,
    SipLink,
    Transport,
    ack_for_failure,
    ack_hold_bye,
    authorization,
    cancel_and_wait,
    cancel_for,
    new_request,
    sdp,
)
from mockphone.sipwire import Request, make_response

ACCOUNTS_PATH = "/sipis/v1/accounts"
# How long an app shows "registering..." before it reports a failure: softrelay
# registers a new account at once (a restart spreads them; a new one is not delayed).
REGISTERED_WITHIN = TIMEOUT
_POLL_FIRST = 0.02  # seconds between status reads, doubling up to _POLL_CAP
_POLL_CAP = 0.5


class SipisRefused(Exception):
    """softrelay refused the account (HTTP 4xx/5xx); the message has status and error."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(f"{status} {error}")
        self.status = status
        self.error = error


@dataclass(frozen=True, slots=True)
class ProviderAccount:
    """The user's account at the SIP provider, as typed into the app."""

    registrar: str  # sip:host[:port][;transport=udp|tcp|tls]
    domain: str
    user: str
    password: str = field(repr=False)
    realm: str = ""  # the digest realm; "" is the domain

    def ha1(self, algorithm: str = "MD5") -> str:
        """H(user:realm:password), computed on the device (RFC 2617, RFC 8760)."""
        text = f"{self.user}:{self.realm or self.domain}:{self.password}".encode()
        digest = hashlib.sha256 if algorithm == "SHA-256" else hashlib.md5
        return digest(text).hexdigest()


@dataclass(frozen=True, slots=True)
class Provider:
    """A SIP provider whose users the SIPIS apps are: its proxy and registrar (one
    address, as Kamailio is), its domain, and the accounts it knows."""

    host: str
    port: int
    domain: str
    accounts: tuple[ProviderAccount, ...] = field(repr=False)
    transport: str = "udp"
    # A user of the provider the caller registers as, so the apps' own calls reach it.
    line: ProviderAccount | None = field(default=None, repr=False)

    @property
    def registrar(self) -> str:
        return f"sip:{self.host}:{self.port};transport={self.transport}"


@dataclass(slots=True)
class SipisCounters:
    texts: int = 0  # MESSAGEs received from softrelay
    text_wakes: int = 0  # woken by a "new message" push


class SipisPhone(MockPhone):
    """See the module docstring. `spec.password` is the provider password (the HA1s are
    computed from it); `spec.kind` should be `Kind.SIPIS`; the push token is APNs'."""

    def __init__(
        self,
        spec: PhoneSpec,
        relay: RelayAddress | Sequence[RelayAddress],
        *,
        account: ProviderAccount,
        relay_domain: str,
        session: aiohttp.ClientSession,
        inbox: PushInbox | None = None,
        pace: Pace | None = None,
        now: Callable[[], float] = time.monotonic,
        token: str | None = None,
    ) -> None:
        # The app's address of record at softrelay is sip:<account id>@sipis.<domain>.
        super().__init__(
            spec,
            relay,
            serial="sipis",
            domain=relay_domain,
            inbox=inbox,
            pace=pace,
            now=now,
            token=token,
        )
        self.account = account
        self.session = session
        self.account_id: str | None = None
        self._secret: str | None = None  # the device secret: memory only, never logged
        self.provider_state = ""  # the last state the accounts API showed
        self.sipis = SipisCounters()
        self.texts: list[bytes] = []  # bodies received, for the test that sent them
        self.texted = asyncio.Condition()
        # An iPhone app's second token: APNs delivers no alert ("new message") push to a
        # PushKit VoIP token, so texts are pushed to this one.
        self.alert_token = new_token(Kind.IOS)
        self._alerts: asyncio.Task[None] | None = None
        # The user's own use of the app (placing a call) and its return to the
        # background after a text take turns: a text's "back to sleep" must not close
        # the flow of a call being placed.
        self._foreground = asyncio.Lock()

    # --- the account, over HTTP -----------------------------------------------------

    @property
    def _accounts_url(self) -> str:
        return self.relay.http_url.rstrip("/") + ACCOUNTS_PATH

    async def store_account(self) -> str:
        """POST the account (HA1s, push); keeps the device secret; the account id."""
        account = self.account
        body: dict[str, Any] = {
            "registrar": account.registrar,
            "domain": account.domain,
            "user": account.user,
            "auth_user": account.user,
            "realm": account.realm or account.domain,
            "ha1_md5": account.ha1("MD5"),
            "ha1_sha256": account.ha1("SHA-256"),
            "push": {
                "provider": "apns",
                "token": self.token,
                "alert_token": self.alert_token,
                "app_id": self.spec.app_id,
            },
        }
        async with self.session.post(self._accounts_url, json=body) as response:
            answer = await _json(response)
            if response.status != 201:
                raise SipisRefused(response.status, str(answer.get("error", "")))
        self.account_id = str(answer["account_id"])
        self._secret = str(answer["device_secret"])
        return self.account_id

    async def status(self) -> dict[str, Any]:
        """The account as softrelay shows it to its app (GET, with the device secret)."""
        url = f"{self._accounts_url}/{self.account_id}"
        async with self.session.get(url, headers=self._bearer()) as response:
            answer = await _json(response)
            if response.status != 200:
                raise SipisRefused(response.status, str(answer.get("error", "")))
        return answer

    async def wait_registered(self, within: float = REGISTERED_WITHIN) -> str:
        """Read the status until softrelay has registered the account at the provider
        (or it fails, or `within` real seconds pass); the last state seen."""
        delay = _POLL_FIRST
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while True:
                    answer = await self.status()
                    status = answer.get("status")
                    state = str(status.get("state", "")) if isinstance(status, dict) else ""
                    self.provider_state = state
                    if state in ("registered", "failing"):
                        return state
                    await asyncio.sleep(delay)  # an app's "registering..." screen
                    delay = min(delay * 2, _POLL_CAP)
        return self.provider_state

    async def delete_account(self) -> int:
        url = f"{self._accounts_url}/{self.account_id}"
        async with self.session.delete(url, headers=self._bearer()) as response:
            return response.status

    def _bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._secret}"}

    # --- what the app does ------------------------------------------------------------

    async def start(self) -> int:
        """Store the account and wait until softrelay registered it at the provider; the
        app then sleeps (no flow). 200 when registered, else the HTTP status (or 0 for a
        registration that did not succeed)."""
        try:
            await self.store_account()
            state = await self.wait_registered()
        except SipisRefused as exc:
            return exc.status
        except (aiohttp.ClientError, OSError, TimeoutError):
            return 0
        if self.inbox is not None and self.token and self.alert_token:
            # One queue for both tokens: one push is handled at a time.
            queue = self.inbox.watch(self.token)
            alerts = self.inbox.watch(self.alert_token)
            self._watcher = asyncio.create_task(self._watch(queue), name="sipis-app-pushes")
            self._alerts = asyncio.create_task(_forward(alerts, queue), name="sipis-app-alerts")
        self.state = State.ASLEEP
        self.last_register = 200 if state == "registered" else 0
        return self.last_register

    @property
    def aor(self) -> str:
        return f"<sip:{self.account_id}@{self.domain}>"

    async def register(self, expires: int | None = None) -> int:
        """REGISTER with softrelay for the account, the device secret as a Bearer token."""
        link = self._live_link()
        expires = self.spec.expires if expires is None else expires
        self._cseq += 1
        request = new_request(
            link,
            "REGISTER",
            f"sip:{self.domain}",
            from_=f"{self.aor};tag={self._call_id[-8:]}",
            to=self.aor,
            call_id=self._call_id,
            cseq=self._cseq,
            headers=[
                ("Contact", self.contact(link)),
                ("Expires", str(expires)),
                ("Authorization", f"Bearer {self._secret}"),
            ],
        )
        self.counters.registers += 1
        answer = await link.transact(request)
        self.last_register = answer.status
        return answer.status

    def target(self, callee: str) -> str:
        """A user at the provider: softrelay places the call there as the account's."""
        return f"sip:{callee}@{self.account.domain}"

    async def place_call(self, callee: str, *, hold: float = 0.0) -> OutgoingCall:
        """The user opens the app and calls `callee` at the provider: connect, REGISTER
        (Bearer), INVITE through softrelay (which answers the provider's challenge with
        the stored HA1), hang up after `hold` real seconds, back to sleep."""
        async with self._foreground:
            if self.state is not State.AWAKE and await self.wake() != 200:
                return OutgoingCall(self.last_register or 0, "the app could not connect")
            try:
                return await self.call(callee, hold=hold)
            finally:
                if self.calls_in_progress == 0:
                    await self.sleep()

    def contact(self, link: SipLink) -> str:
        """No push parameters: softrelay has the token from the account."""
        transport = f";transport={link.transport.value}"
        return f'<sip:app@{link.sent_by}{transport}>;+sip.instance="{self.instance}"'

    async def stop(self) -> None:
        if self._alerts is not None:
            await cancel_and_wait(self._alerts)
            self._alerts = None
        if self.inbox is not None and self.alert_token:
            self.inbox.forget(self.alert_token)
        await super().stop()

    async def wait_texts(self, count: int, within: float = TIMEOUT) -> list[bytes]:
        """Until `count` texts have arrived in all; their bodies."""
        async with asyncio.timeout(within), self.texted:
            await self.texted.wait_for(lambda: len(self.texts) >= count)
        return list(self.texts)

    # --- pushes -----------------------------------------------------------------------

    async def _watch(self, queue: asyncio.Queue[Push]) -> None:
        """A call or a text push wakes the sleeping app: it connects and registers."""
        while True:
            push = await queue.get()
            self.counters.pushes += 1
            if push.kind not in (PushKind.CALL, PushKind.MESSAGE) or self.state is State.AWAKE:
                continue
            self._woken_at = self.now()
            await self.pace.wait_for(self.spec.wake_delay)
            if self.awake.is_set():
                continue  # woken meanwhile
            texts = len(self.texts)
            if await self._connect_and_register() != 200:
                self.counters.wake_failures += 1
                continue
            self.counters.wakes += 1
            if push.kind is PushKind.MESSAGE:
                self.sipis.text_wakes += 1
                # The text comes right after the REGISTER's 200; then back to sleep.
                with contextlib.suppress(TimeoutError):
                    await self.wait_texts(texts + 1)
                async with self._foreground:
                    if self.awake.is_set() and self.calls_in_progress == 0:
                        await self.sleep()

    # --- requests from softrelay ------------------------------------------------------

    async def _on_request(self, request: Request) -> None:
        if request.method != "MESSAGE":
            await super()._on_request(request)
            return
        link = self._live_link()
        await link.send(make_response(request, 200))
        async with self.texted:
            self.sipis.texts += 1
            self.texts.append(request.body)
            self.texted.notify_all()


async def _forward(source: asyncio.Queue[Push], to: asyncio.Queue[Push]) -> None:
    while True:
        to.put_nowait(await source.get())


async def _json(response: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        answer = await response.json(content_type=None)
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


# --- the caller at the provider ---------------------------------------------------------


@dataclass(slots=True)
class CallerCounters:
    calls: int = 0
    texts: int = 0
    byes_in: int = 0  # the app (through softrelay and the provider) hung up
    calls_in: int = 0  # INVITEs to our provider user (the apps' own calls)


class ProviderCaller:
    """A foreign user calling and texting the provider's users through its proxy (UDP)."""

    def __init__(
        self,
        link: SipLink,
        domain: str,
        *,
        name: str,
        ring_timeout: float,
        now: Callable[[], float],
    ) -> None:
        self.link = link
        self.domain = domain  # the provider's domain: its users are sip:<user>@<domain>
        self.name = name
        self.ring_timeout = ring_timeout  # real seconds a call rings before its CANCEL
        self.now = now
        self.counters = CallerCounters()

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        host: str,
        port: int,
        domain: str,
        *,
        name: str = "carol",
        ring_timeout: float = 20.0,
        now: Callable[[], float] = time.monotonic,
    ) -> AsyncIterator[ProviderCaller]:
        caller: ProviderCaller | None = None

        async def on_request(request: Request) -> None:
            assert caller is not None
            await caller._on_request(request)

        link = await SipLink.open(Transport.UDP, RelayAddress(host, port), on_request)
        caller = cls(link, domain, name=name, ring_timeout=ring_timeout, now=now)
        try:
            yield caller
        finally:
            await link.close()

    @property
    def _from(self) -> str:
        return f'"{self.name.title()}" <sip:{self.name}@other.test>;tag={secrets.token_hex(6)}'

    async def call(self, user: str, *, hold: float = 0.0) -> CallResult:
        """INVITE `user` at the provider; the first 180 with `Push-Status` marks a wake
        (softrelay parked and pushed), the next 180 the app's own (its wake latency).
        Rings out after `ring_timeout` (CANCEL); hangs up after `hold` real seconds."""
        link = self.link
        self.counters.calls += 1
        started = self.now()
        result = CallResult(user, 0, "")
        invite = new_request(
            link,
            "INVITE",
            f"sip:{user}@{self.domain}",
            from_=self._from,
            to=f"<sip:{user}@{self.domain}>",
            call_id=f"sipis-{secrets.token_hex(10)}",
            cseq=1,
            headers=[
                ("Contact", f"<sip:{self.name}@{link.sent_by}>"),
                ("Content-Type", "application/sdp"),
            ],
            body=sdp(self.name, link.media_host),
        )

        def provisional(answer: Any) -> None:
            push_status = answer.get("Push-Status")
            if push_status is not None:
                result.woken = True
                result.push_status = push_status
            elif answer.status == 180 and result.wake_seconds is None:
                result.wake_seconds = self.now() - started

        ringing = asyncio.create_task(
            link.transact(invite, within=self.ring_timeout + TIMEOUT, on_provisional=provisional)
        )
        try:
            done, _ = await asyncio.wait({ringing}, timeout=self.ring_timeout)
            if not done:
                with contextlib.suppress(LinkClosed, TimeoutError):
                    await link.transact(cancel_for(invite))
            answer = await ringing
        except (LinkClosed, TimeoutError) as exc:
            result.reason = f"no answer: {type(exc).__name__}"
            return result
        finally:
            ringing.cancel()
        result.status = answer.status
        result.reason = answer.get("Reason") or answer.reason
        if answer.status >= 300:
            if answer.status == 487 and not done:
                result.status, result.reason = 408, "no answer: rang out"
            await link.send(ack_for_failure(invite, answer))
            return result
        result.setup_seconds = self.now() - started
        if result.wake_seconds is None:
            result.wake_seconds = result.setup_seconds
        await ack_hold_bye(link, invite, answer, hold)
        return result

    async def text(self, user: str, body: str) -> int:
        """A MESSAGE to `user` through the provider; its final status (202: stored by
        softrelay for a sleeping app, 200: the connected app took it)."""
        self.counters.texts += 1
        message = new_request(
            self.link,
            "MESSAGE",
            f"sip:{user}@{self.domain}",
            from_=self._from,
            to=f"<sip:{user}@{self.domain}>",
            call_id=f"text-{secrets.token_hex(10)}",
            cseq=1,
            headers=[("Content-Type", "text/plain;charset=utf-8")],
            body=body.encode(),
        )
        try:
            answer = await self.link.transact(message)
        except (LinkClosed, TimeoutError):
            return 0
        return answer.status

    async def register(self, user: str, password: str, expires: int = 3600) -> int:
        """REGISTER at the provider as its user `user` (digest with the password: this
        party is the provider's own customer); INVITEs to the user are then answered."""
        link = self.link
        aor = f"<sip:{user}@{self.domain}>"
        contact = f"<sip:{user}@{link.sent_by}>"
        call_id, tag = f"reg-{secrets.token_hex(8)}", secrets.token_hex(4)

        def request(cseq: int, *extra: tuple[str, str]) -> Request:
            return new_request(
                link,
                "REGISTER",
                f"sip:{self.domain}",
                from_=f"{aor};tag={tag}",
                to=aor,
                call_id=call_id,
                cseq=cseq,
                headers=[("Contact", contact), ("Expires", str(expires)), *extra],
            )

        answer = await link.transact(request(1))
        if answer.status in (401, 407):
            name = "WWW-Authenticate" if answer.status == 401 else "Proxy-Authenticate"
            header, _ = authorization(
                answer.get(name) or "",
                username=user,
                password=password,
                method="REGISTER",
                uri=f"sip:{self.domain}",
            )
            field_name = "Authorization" if answer.status == 401 else "Proxy-Authorization"
            answer = await link.transact(request(2, (field_name, header)))
        return answer.status

    async def _on_request(self, request: Request) -> None:
        if request.method == "INVITE":
            await self._answer(request)
            return
        if request.method == "BYE":
            self.counters.byes_in += 1
        if request.method != "ACK":
            await self.link.send(make_response(request, 200))

    async def _answer(self, invite: Request) -> None:
        """An INVITE to our provider user: ring, then answer at once (an echo line)."""
        self.counters.calls_in += 1
        tag = secrets.token_hex(6)
        echoed = [("Record-Route", rr) for rr in invite.get_all("Record-Route")]
        contact = ("Contact", f"<sip:{self.name}@{self.link.sent_by}>")
        await self.link.send(make_response(invite, 180, headers=[*echoed, contact], to_tag=tag))
        await self.link.send(
            make_response(
                invite,
                200,
                headers=[*echoed, contact, ("Content-Type", "application/sdp")],
                to_tag=tag,
                body=sdp(self.name, self.link.media_host),
            )
        )
