"""What the SIPIS call and text tests share: the whole app (`build_app`, SIPIS mode on,
the real registrar engine, SIP on loopback, the embedded push stand-ins) with an
account registered at a real Kamailio, a foreign caller sending through Kamailio over
UDP, bob (another subscriber of that Kamailio, registered there directly over UDP), and
a Python SIPIS app connecting to the app's SIP port over TCP.

Every wait is bounded (WAIT) and waits for a message or an event, never for time.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self, TypeVar

import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from mockphone import digest
from privacy.clock import ManualClock
from privacy.keys import Keyring
from privacy.policy import load_policy
from privacy.store import Store
from proxy.sip.flow import Transport
from proxy.sip.framing import StreamFramer
from proxy.sip.message import Request, Response
from proxy.sip.parser import parse
from proxy.sip.settings import SipSettings
from push.apps import PushSettings
from push.embedded import StandIns
from sipis.account import Account, Credential, Push, SipTransport, State, Status
from sipis.accounts import Accounts
from sipis.api import ACCOUNTS, REGISTRAR
from sipis.calls import Calls
from sipis.messages import Messages
from sipis.registrar import Registrations
from sipis.settings import SipisSettings
from softrelay.app import (
    REGISTRY,
    SIP_TRANSPORTS,
    SIPIS_CALLS,
    SIPIS_MESSAGES,
    STAND_INS,
    STORE,
    Services,
    build_app,
)
from tests.kamailio import DOMAIN, Kamailio, Subscriber
from tests.limits import LONGEST_WAIT
from tests.sipis.provider import running_kamailio

WAIT = LONGEST_WAIT / 3
RELAY_DOMAIN = "relay.test"
SIPIS_DOMAIN = f"sipis.{RELAY_DOMAIN}"
APP_ID = "com.example.softphone"
ALICE = Subscriber("alice", "alice-" + secrets.token_hex(4))
BOB = Subscriber("bob", "bob-" + secrets.token_hex(4))
CALLER_NAME = "Carol Caller-canary"
SDP_CANARY = "o=carol 4711 4711 IN IP4 sdp-canary.example"
SDP = f"v=0\r\n{SDP_CANARY}\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\n"
APP_IP = "127.0.0.2"  # the app's address differs from softrelay's


@pytest.fixture
def kamailio() -> Iterator[Kamailio]:
    """The provider, with alice (the SIPIS account) and bob (a `KamailioUser`)."""
    with running_kamailio([ALICE, BOB]) as server:
        yield server


def message(start: str, *headers: str, body: str = "") -> bytes:
    lines = [start, *headers, f"Content-Length: {len(body.encode())}", "", body]
    return "\r\n".join(lines).encode()


def answer(
    request: Request, status: int, reason: str, *extra: str, tag: str = "", body: str = ""
) -> bytes:
    """A UA's response: Via, Record-Route, From, To (with `tag`), Call-ID, CSeq copied."""
    copied = [f"Via: {v}" for v in request.values("Via")]
    copied += [f"Record-Route: {v}" for v in request.values("Record-Route")]
    to = request.get("To") or ""
    if tag and ";tag=" not in to:
        to += f";tag={tag}"
    copied += [f"From: {request.get('From')}", f"To: {to}", f"Call-ID: {request.call_id}"]
    copied.append(f"CSeq: {request.get('CSeq')}")
    return message(f"SIP/2.0 {status} {reason}", *copied, *extra, body=body)


class Inbox:
    """Messages one peer received, waited for by what they are."""

    def __init__(self) -> None:
        self.items: list[Request | Response] = []
        self._changed = asyncio.Condition()

    async def put(self, item: Request | Response) -> None:
        async with self._changed:
            self.items.append(item)
            self._changed.notify_all()

    async def response(self, status: int, method: str = "INVITE") -> Response:
        found = await self._wait(
            lambda m: isinstance(m, Response) and m.status == status and m.cseq.method == method
        )
        assert isinstance(found, Response)
        return found

    async def nth_response(self, n: int, status: int, method: str = "INVITE") -> Response:
        """The `n`th (from 1) response `status` to `method` (a caller of a sleeping app
        hears softrelay's 180 with Push-Status, then the app's own)."""

        def same(m: Request | Response) -> bool:
            return isinstance(m, Response) and m.status == status and m.cseq.method == method

        async with asyncio.timeout(WAIT), self._changed:
            await self._changed.wait_for(lambda: sum(map(same, self.items)) >= n)
            found = [m for m in self.items if same(m)][n - 1]
        assert isinstance(found, Response)
        return found

    async def request(self, method: str) -> Request:
        found = await self._wait(lambda m: isinstance(m, Request) and m.method == method)
        assert isinstance(found, Request)
        return found

    def requests(self, method: str) -> list[Request]:
        return [m for m in self.items if isinstance(m, Request) and m.method == method]

    def statuses(self, method: str = "INVITE") -> list[int]:
        return [m.status for m in self.items if isinstance(m, Response) and m.cseq.method == method]

    async def _wait(self, match: object) -> Request | Response:
        assert callable(match)
        async with asyncio.timeout(WAIT), self._changed:
            await self._changed.wait_for(lambda: any(match(m) for m in self.items))
            return next(m for m in self.items if match(m))


def ua_answer(
    request: Request, status: int, reason: str, contact: str, tag: str, body: str = ""
) -> bytes:
    """A UA's own answer to `request`: its Contact when it accepts an INVITE, the SDP
    `body` when there is one."""
    extra = [f"Contact: {contact}"] if request.method == "INVITE" and status < 300 else []
    if body:
        extra.append("Content-Type: application/sdp")
    return answer(request, status, reason, *extra, tag=tag, body=body)


def callee_bye(invite: Request, via: str, tag: str) -> bytes:
    """The callee's BYE of the dialog `invite` set up: to the caller's Contact, by the
    INVITE's Record-Route (in order: the callee is the UAS)."""
    routes = [f"Route: {v}" for v in invite.values("Record-Route")]
    return message(
        f"BYE {invite.contacts[0].uri} SIP/2.0",
        via,
        *routes,
        "Max-Forwards: 70",
        f"From: {invite.get('To')};tag={tag}",
        f"To: {invite.get('From')}",
        f"Call-ID: {invite.call_id}",
        "CSeq: 1 BYE",
    )


class UdpPeer(asyncio.DatagramProtocol):
    """A UA on a loopback UDP socket of its own, sending to Kamailio; what reaches it
    goes to its inbox."""

    def __init__(self, kamailio_port: int) -> None:
        self.inbox = Inbox()
        self.target = ("127.0.0.1", kamailio_port)
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0
        self.tag = secrets.token_hex(4)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram transport
        self.port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if data.strip():
            asyncio.get_running_loop().create_task(self.inbox.put(parse(data)))

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, kamailio_port: int) -> AsyncIterator[Self]:
        async with _bound(lambda: cls(kamailio_port)) as peer:
            yield peer

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data, self.target)


_Peer = TypeVar("_Peer", bound=UdpPeer)


@contextlib.asynccontextmanager
async def _bound(make: Callable[[], _Peer]) -> AsyncIterator[_Peer]:
    """The peer `make` gives, on a loopback UDP socket of its own until the end."""
    loop = asyncio.get_running_loop()
    _, peer = await loop.create_datagram_endpoint(make, local_addr=("127.0.0.1", 0))
    try:
        yield peer
    finally:
        assert peer.transport is not None
        peer.transport.close()


class Caller(UdpPeer):
    """A caller sending through Kamailio over UDP; this one a foreign caller
    (sip:carol@other.test), whom Kamailio does not challenge."""

    user = "carol"
    address = f'"{CALLER_NAME}" <sip:carol@other.test>'  # the From, without the tag

    def __init__(self, kamailio_port: int) -> None:
        super().__init__(kamailio_port)
        self.call_id = secrets.token_hex(8)
        self.branch = "z9hG4bK" + secrets.token_hex(8)
        self.cseq = 1  # the last one sent
        self.invite_cseq = 1

    @property
    def contact(self) -> str:
        return f"<sip:{self.user}@127.0.0.1:{self.port}>"

    def via(self, branch: str | None = None) -> str:
        return f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch={branch or self.branch};rport"

    def invite(self, user: str = "alice", *extra: str) -> None:
        """The INVITE of this call, with CSeq `self.cseq` and branch `self.branch`."""
        self.invite_cseq = self.cseq
        self.send(
            message(
                f"INVITE sip:{user}@{DOMAIN} SIP/2.0",
                self.via(),
                "Max-Forwards: 70",
                f"From: {self.address};tag={self.tag}",
                f"To: <sip:{user}@{DOMAIN}>",
                f"Call-ID: {self.call_id}",
                f"CSeq: {self.cseq} INVITE",
                f"Contact: {self.contact}",
                *extra,
                "Content-Type: application/sdp",
                body=SDP,
            )
        )

    def text(self, body: str, user: str = "alice") -> None:
        """A SIP MESSAGE to the user, through Kamailio."""
        self.send(
            message(
                f"MESSAGE sip:{user}@{DOMAIN} SIP/2.0",
                self.via("z9hG4bK" + secrets.token_hex(8)),
                "Max-Forwards: 70",
                f"From: {self.address};tag={secrets.token_hex(4)}",
                f"To: <sip:{user}@{DOMAIN}>",
                f"Call-ID: {secrets.token_hex(8)}",
                "CSeq: 1 MESSAGE",
                "Content-Type: text/plain;charset=utf-8",
                body=body,
            )
        )

    def cancel(self, user: str = "alice") -> None:
        self.send(
            message(
                f"CANCEL sip:{user}@{DOMAIN} SIP/2.0",
                self.via(),
                "Max-Forwards: 70",
                f"From: {self.address};tag={self.tag}",
                f"To: <sip:{user}@{DOMAIN}>",
                f"Call-ID: {self.call_id}",
                f"CSeq: {self.invite_cseq} CANCEL",
            )
        )

    def in_dialog(self, method: str, ok: Response) -> None:
        """ACK or BYE of the dialog the 2xx `ok` set up (its Contact, its route set)."""
        target = ok.contacts[0].uri
        routes = [f"Route: {v}" for v in reversed(ok.values("Record-Route"))]
        cseq = self.invite_cseq if method == "ACK" else self.cseq + 1
        if method != "ACK":
            self.cseq = cseq
        self.send(
            message(
                f"{method} {target} SIP/2.0",
                self.via("z9hG4bK" + secrets.token_hex(8)),
                *routes,
                "Max-Forwards: 70",
                f"From: {self.address};tag={self.tag}",
                f"To: {ok.get('To')}",
                f"Call-ID: {self.call_id}",
                f"CSeq: {cseq} {method}",
            )
        )

    def reply(self, request: Request, status: int, reason: str, body: str = "") -> None:
        self.send(ua_answer(request, status, reason, self.contact, self.tag, body))


class KamailioUser(Caller):
    """A subscriber of the provider (bob by default), registered at Kamailio itself over
    UDP as a real UA is: it answers Kamailio's 401 to its REGISTER and 407 to its
    INVITE with its password (mockphone.digest), and answers what reaches it."""

    def __init__(self, kamailio_port: int, subscriber: Subscriber) -> None:
        super().__init__(kamailio_port)
        self.subscriber = subscriber
        self.user = subscriber.user
        self.address = f"<sip:{subscriber.user}@{DOMAIN}>"

    @classmethod
    @contextlib.asynccontextmanager
    async def registered(
        cls, kamailio_port: int, subscriber: Subscriber = BOB
    ) -> AsyncIterator[Self]:
        async with _bound(lambda: cls(kamailio_port, subscriber)) as ua:
            await ua._register()
            yield ua

    def _register_request(self, cseq: int, *extra: str) -> bytes:
        return message(
            f"REGISTER sip:{DOMAIN} SIP/2.0",
            self.via("z9hG4bK" + secrets.token_hex(8)),
            "Max-Forwards: 70",
            f"From: {self.address};tag=reg{self.tag}",
            f"To: {self.address}",
            f"Call-ID: reg-{self.tag}",
            f"CSeq: {cseq} REGISTER",
            f"Contact: {self.contact}",
            "Expires: 600",
            *extra,
        )

    async def _register(self) -> None:
        self.send(self._register_request(1))
        challenge = (await self.inbox.response(401, "REGISTER")).get("WWW-Authenticate")
        assert challenge is not None
        value = self._answer(challenge, "REGISTER", f"sip:{DOMAIN}")
        self.send(self._register_request(2, f"Authorization: {value}"))
        await self.inbox.response(200, "REGISTER")

    def _answer(self, challenge: str, method: str, uri: str) -> str:
        sub = self.subscriber
        return digest.answer(
            challenge, username=sub.user, password=sub.password, method=method, uri=uri
        ).header

    async def call(self, user: str = "alice") -> None:
        """INVITE `user`; Kamailio challenges its own subscribers with 407: ACK that,
        as every final non-2xx, and INVITE again (CSeq+1, a new branch) with the
        Proxy-Authorization answering it."""
        self.invite(user)
        challenged = await self.inbox.response(407)
        self.send(
            message(
                f"ACK sip:{user}@{DOMAIN} SIP/2.0",
                self.via(),
                "Max-Forwards: 70",
                f"From: {self.address};tag={self.tag}",
                f"To: {challenged.get('To')}",
                f"Call-ID: {self.call_id}",
                f"CSeq: {self.invite_cseq} ACK",
            )
        )
        challenge = challenged.get("Proxy-Authenticate")
        assert challenge is not None
        value = self._answer(challenge, "INVITE", f"sip:{user}@{DOMAIN}")
        self.cseq += 1
        self.branch = "z9hG4bK" + secrets.token_hex(8)
        self.invite(user, f"Proxy-Authorization: {value}")

    def bye(self, invite: Request) -> None:
        """As the callee: BYE of the dialog `invite` set up."""
        self.send(callee_bye(invite, self.via("z9hG4bK" + secrets.token_hex(8)), self.tag))


class App:
    """A SIPIS-mode app on one TCP connection to softrelay, from APP_IP."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.port: int = writer.get_extra_info("sockname")[1]
        self.inbox = Inbox()
        self.tag = secrets.token_hex(4)
        self._reading = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, port: int) -> AsyncIterator[Self]:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(APP_IP, 0)), WAIT
        )
        app = cls(reader, writer)
        try:
            yield app
        finally:
            app._reading.cancel()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @classmethod
    @contextlib.asynccontextmanager
    async def registered(cls, port: int, account_id: str, secret: str) -> AsyncIterator[Self]:
        """Connected, and REGISTERed (200) with the account's device secret."""
        async with cls.connect(port) as app:
            assert (await app.register(account_id, secret)).status == 200
            yield app

    async def _read(self) -> None:
        framer = StreamFramer()
        while data := await self.reader.read(65536):
            for item in framer.feed(data):
                if isinstance(item, bytes):
                    await self.inbox.put(parse(item))

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    @property
    def contact(self) -> str:
        return f"<sip:app@{APP_IP}:{self.port};transport=tcp>"

    async def register(
        self, account_id: str, secret: str | None, cseq: int = 1, authorization: str = ""
    ) -> Response:
        """`authorization`: the header's whole value as given (malformed ones too)."""
        auth = () if secret is None else (f"Authorization: Bearer {secret}",)
        if authorization:
            auth = (f"Authorization: {authorization}",)
        self.send(
            message(
                f"REGISTER sip:{SIPIS_DOMAIN} SIP/2.0",
                f"Via: SIP/2.0/TCP {APP_IP}:{self.port};branch=z9hG4bK{secrets.token_hex(6)}",
                "Max-Forwards: 70",
                f"From: <sip:{account_id}@{SIPIS_DOMAIN}>;tag=r{self.tag}",
                f"To: <sip:{account_id}@{SIPIS_DOMAIN}>",
                f"Call-ID: reg-{self.tag}",
                f"CSeq: {cseq} REGISTER",
                f"Contact: {self.contact}",
                "Expires: 600",
                *auth,
            )
        )
        found = await self.inbox._wait(
            lambda m: (
                isinstance(m, Response) and m.cseq.method == "REGISTER" and m.cseq.number == cseq
            )
        )
        assert isinstance(found, Response)
        return found

    def reply(self, request: Request, status: int, reason: str, body: str = "") -> None:
        self.send(ua_answer(request, status, reason, self.contact, self.tag, body))

    def bye(self, invite: Request) -> None:
        """BYE of the dialog `invite` set up, by its Record-Route and the caller's Contact."""
        via = f"Via: SIP/2.0/TCP {APP_IP}:{self.port};branch=z9hG4bK{secrets.token_hex(8)}"
        self.send(callee_bye(invite, via, self.tag))


async def ack_then_app_hangs_up(caller: Caller, app: App, invite: Request, ok: Response) -> None:
    """The caller ACKs the app's 2xx `ok`, then the app BYEs the dialog `invite` set
    up: each request and the BYE's 200 waited for where it goes."""
    await _ack(caller, app, ok)
    app.bye(invite)
    bye = await caller.inbox.request("BYE")
    caller.reply(bye, 200, "OK")
    await app.inbox.response(200, "BYE")


async def ack_then_caller_hangs_up(caller: Caller, app: App, ok: Response) -> None:
    """The caller ACKs the app's 2xx `ok`, then BYEs: each request and the BYE's 200
    waited for where it goes."""
    await _ack(caller, app, ok)
    caller.in_dialog("BYE", ok)
    bye = await app.inbox.request("BYE")
    app.reply(bye, 200, "OK")
    await caller.inbox.response(200, "BYE")


async def _ack(caller: Caller, app: App, ok: Response) -> None:
    caller.in_dialog("ACK", ok)
    await app.inbox.request("ACK")


@dataclass
class World:
    kamailio: Kamailio
    clock: ManualClock
    store: Store
    stand_ins: StandIns
    registrations: Registrations
    accounts: Accounts
    calls: Calls
    messages: Messages
    sip_port: int  # TCP
    registry: CollectorRegistry
    http: str = ""  # the app's HTTP base URL (the accounts API), ending in "/"

    async def account(
        self,
        sub: Subscriber = ALICE,
        token: str | None = None,
        alert_token: str | None = None,
        *,
        push: Push | None = None,
    ) -> tuple[Account, str]:
        """An account stored as the API stores it (the whole app refuses a loopback
        registrar over the API by default), registered at Kamailio; an iPhone app's
        (APNs: `token` for calls, `alert_token` for the "new message" push) unless
        `push` names another target."""
        assert self.kamailio.port is not None
        draft = Account(
            account_id="",
            registrar_host="127.0.0.1",
            registrar_port=self.kamailio.port,
            transport=SipTransport.UDP,
            domain=DOMAIN,
            user=sub.user,
            credential=Credential(sub.user, DOMAIN, ha1_md5=sub.ha1()),
            push=push or Push("apns", token or secrets.token_hex(32), APP_ID, alert_token),
        )
        account, secret = await self.accounts.create(draft)
        self.registrations.add(account, spread=False)

        def registered(status: Status | None) -> bool:
            return status is not None and status.state is State.REGISTERED

        await asyncio.wait_for(self.registrations.wait_for(account.account_id, registered), WAIT)
        return account, secret


@contextlib.asynccontextmanager
async def make_world(kamailio: Kamailio, tmp_path: Path) -> AsyncIterator[World]:
    clock = ManualClock(time.time())  # real time to start: the stand-ins check tokens
    push = PushSettings(apps=(), max_in_flight=10, max_attempts=2, embedded_app_id=APP_ID)
    services = Services(
        load_policy("cloudsoftphone"),
        Keyring.generate(),
        tmp_path,
        clock,
        3600,
        push,
        SipSettings(RELAY_DOMAIN),
        sip_listen=("127.0.0.1", 0),
        sipis=SipisSettings(enabled=True, start_spread=0),
    )
    app = build_app(services)
    server = TestServer(app)
    await server.start_server()
    try:
        registrations = app[REGISTRAR]
        assert isinstance(registrations, Registrations)
        world = World(
            kamailio,
            clock,
            app[STORE],
            app[STAND_INS],
            registrations,
            app[ACCOUNTS],
            app[SIPIS_CALLS],
            app[SIPIS_MESSAGES],
            app[SIP_TRANSPORTS].address(Transport.TCP)[1],
            app[REGISTRY],
            str(server.make_url("/")),
        )
        yield world
    finally:
        await server.close()
