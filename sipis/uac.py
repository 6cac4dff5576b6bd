"""Outbound SIP to the providers' registrars: client transactions over UDP, TCP and TLS,
the answer to a digest challenge from a stored HA1, and the requests a provider sends
back on the same socket or connection.

    Uac.request(destination, make)   one non-INVITE client transaction (RFC 3261 17.1.2)
    Uac.invite(destination, request) an INVITE client transaction (17.1.1): ClientInvite
    digest_authorization(...)        the Authorization value for a challenge, from an HA1
    Inbound                          an incoming request and the way back for its answers

Transactions. Each request gets its own branch; a response belongs to the transaction
of its top Via's branch and CSeq method (RFC 3261 17.1.3), whatever socket it came on,
and a response that matches none (a late retransmission) is dropped. Over UDP a request
is sent again at T1, 2*T1, ... capped at T2 (timer E; at T2 once a provisional came);
over TCP and TLS it is sent once. No final response within 64*T1 (timer F) is a
`Timeout`. Time comes from the injected clock and sleep, so tests move it by hand.

An INVITE (a call placed through the provider) is sent again over UDP at T1, 2*T1, ...
until any response (timer A); no response within 64*T1 is a `Timeout` (timer B), and
after a provisional the final one may take `ring_limit` from the last provisional (the
proxy's timer C): then the INVITE is CANCELled, and the 487 is its answer. A non-2xx
final answer is ACKed here, with the INVITE's branch, and so is each retransmission
of it for 64*T1 (timer D). After a 2xx the transaction stays 64*T1 "accepted" (RFC
6026): further 2xx (retransmissions, forks) go to its `accepted` callback, since their
ACK is the dialog's, not ours.
`ClientInvite.cancel()` sends the CANCEL with the INVITE's branch and CSeq once a
provisional came (RFC 3261 9.1).

Sockets. One UDP socket for every registrar; one TCP or TLS connection per (registrar
host, port, transport), shared by the accounts registered there, made when first
needed and made again by the next request after it is lost (the registrar is told, so
it re-registers the accounts whose binding named the lost connection). TLS checks the
registrar's certificate against the system's CAs or a configured CA file.

What the provider sends us (INVITE, MESSAGE, OPTIONS, NOTIFY...) on those sockets goes
to the handler given to `bind`; a retransmitted request gets the answer already sent,
and never reaches the handler twice. Requests on UDP from anyone are handed on too:
the handler checks they come from the account's registrar (`Inbound.remote`).

Nothing of an Authorization header, a user name or an HA1 is logged here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import secrets
import socket
import ssl
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple, Protocol

from privacy.clock import Clock
from privacy.tasks import Tasks
from proxy.sip.framing import PONG, FramingError, Keepalive, StreamFramer, datagram_keepalive
from proxy.sip.headers import ViaHeader
from proxy.sip.message import MAX_MESSAGE_SIZE, Request, Response
from proxy.sip.parser import parse
from proxy.sip.responses import error_response, make_response
from proxy.sip.syntax import SipParseError
from sipis.account import Account, Credential, SipTransport

log = logging.getLogger("softrelay.sipis")

Address = tuple[str, int]
Sleep = Callable[[float], Awaitable[None]]

# Answers to incoming requests kept to answer their retransmissions (64*T1 each).
SERVER_CACHE_LIMIT: Final = 4096
_DIGEST_HASHES: Final = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}
# name=value or name="quoted value", comma separated (RFC 7616 3.3).
_CHALLENGE_PARAM: Final = re.compile(
    r'\s*([A-Za-z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,"]+)\s*(?:,|$)'
)


class UacError(Exception):
    """A request that got no final response. `reason` is short and names no one.

    UacError
    ├── TransportError   it could not go out or its connection went: connection
    │                    refused, TLS handshake failed, host not found, connection lost
    └── Timeout          no final response within timer F (64*T1)
    Both are temporary for the caller: retry after a backoff.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TransportError(UacError):
    pass


class Timeout(UacError):
    def __init__(self) -> None:
        super().__init__("timeout")


class Destination(NamedTuple):
    """A registrar as softrelay reaches it; also the key of its shared connection."""

    host: str
    port: int
    transport: SipTransport

    @classmethod
    def of(cls, account: Account) -> Destination:
        return cls(account.registrar_host, account.registrar_port, account.transport)

    @property
    def registrar(self) -> tuple[str, int]:
        """host:port, whatever the transport: what the per-registrar rate counts."""
        return (self.host, self.port)


@dataclass(frozen=True, slots=True)
class UacSettings:
    t1: float = 0.5  # RFC 3261 T1: the round-trip estimate; timer F is 64*T1
    t2: float = 4.0  # the longest interval between retransmissions
    connect_timeout: float = 10.0  # TCP connect and TLS handshake
    bind_host: str = "0.0.0.0"  # the UDP socket's address  # noqa: S104 - every interface, as a UA
    ca_file: Path | None = None  # TLS: trust this CA file instead of the system's

    def __post_init__(self) -> None:
        if not 0 < self.t1 <= self.t2:
            raise ValueError("t1 must be > 0 and at most t2")
        if self.connect_timeout <= 0:
            raise ValueError("connect_timeout must be > 0")


# --- digest (the client side, from an HA1) -------------------------------------------


class ChallengeError(Exception):
    """A challenge we cannot answer; `reason` is shown in the account's status."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Challenge:
    """One parsed WWW- or Proxy-Authenticate Digest challenge."""

    realm: str
    nonce: str
    algorithm: str  # upper case: MD5 or SHA-256
    qop: bool  # qop=auth offered (else an RFC 2069 answer)
    opaque: str | None
    stale: bool


def parse_challenge(value: str) -> Challenge:
    """A Digest challenge's parameters; ChallengeError unless it is one we can answer
    (MD5 or SHA-256, qop absent or offering auth; no -sess, no auth-int alone)."""
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest":
        raise ChallengeError("not a Digest challenge")
    found: dict[str, str] = {}
    position, rest = 0, rest.strip()
    while position < len(rest):
        match = _CHALLENGE_PARAM.match(rest, position)
        if match is None or match.end() == position:
            raise ChallengeError("malformed challenge")
        text = match.group(2)
        if text.startswith('"'):
            text = re.sub(r"\\(.)", r"\1", text[1:-1])
        found.setdefault(match.group(1).lower(), text)
        position = match.end()
    if "realm" not in found or "nonce" not in found:
        raise ChallengeError("malformed challenge")
    algorithm = found.get("algorithm", "MD5").upper()
    qops = {q.strip().lower() for q in found.get("qop", "").split(",") if q.strip()}
    if qops and "auth" not in qops:
        raise ChallengeError("challenge without qop=auth")
    return Challenge(
        realm=found["realm"],
        nonce=found["nonce"],
        algorithm=algorithm,
        qop=bool(qops),
        opaque=found.get("opaque"),
        stale=found.get("stale", "").lower() == "true",
    )


def choose_challenge(values: Iterable[str], credential: Credential) -> Challenge:
    """The challenge to answer among a response's (RFC 8760: SHA-256 before MD5): the
    strongest we hold an HA1 for, in the credential's realm. ChallengeError naming
    why none fits: "no HA1 for SHA-256", "challenged for another realm"..."""
    usable: list[Challenge] = []
    reason = "no Digest challenge"
    for value in values:
        try:
            challenge = parse_challenge(value)
        except ChallengeError as exc:
            reason = exc.reason
            continue
        if challenge.algorithm not in _DIGEST_HASHES:
            reason = "unsupported digest algorithm"
        elif credential.ha1(challenge.algorithm) is None:
            reason = f"no HA1 for {challenge.algorithm}"
        elif challenge.realm != credential.realm:
            # The HA1 hashes the realm in: an answer for another one is wrong anyway.
            reason = "challenged for another realm"
        else:
            usable.append(challenge)
    if not usable:
        raise ChallengeError(reason)
    usable.sort(key=lambda c: c.algorithm != "SHA-256")
    return usable[0]


def digest_authorization(
    challenge: Challenge,
    credential: Credential,
    *,
    method: str,
    uri: str,
    nc: int,
    cnonce: str,
) -> str:
    """The Authorization (or Proxy-Authorization) value answering `challenge` with the
    stored HA1 (RFC 7616 3.4.1; RFC 2069 when no qop was offered)."""
    ha1 = credential.ha1(challenge.algorithm)
    hash_ = _DIGEST_HASHES.get(challenge.algorithm)
    if ha1 is None or hash_ is None:
        raise ChallengeError(f"no HA1 for {challenge.algorithm}")

    def h(text: str) -> str:
        return hash_(text.encode("utf-8")).hexdigest()

    ha2 = h(f"{method}:{uri}")
    nc_text = f"{nc:08x}"
    if challenge.qop:
        response = h(f"{ha1}:{challenge.nonce}:{nc_text}:{cnonce}:auth:{ha2}")
    else:
        response = h(f"{ha1}:{challenge.nonce}:{ha2}")
    parts = [
        f"username={_quote(credential.auth_user)}",
        f"realm={_quote(challenge.realm)}",
        f"nonce={_quote(challenge.nonce)}",
        f"uri={_quote(uri)}",
        f'response="{response}"',
        f"algorithm={challenge.algorithm}",
    ]
    if challenge.qop:
        parts += ["qop=auth", f"nc={nc_text}", f"cnonce={_quote(cnonce)}"]
    if challenge.opaque is not None:
        parts.append(f"opaque={_quote(challenge.opaque)}")
    return "Digest " + ", ".join(parts)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- incoming requests ---------------------------------------------------------------


class _Channel(Protocol):
    """Where a message came from, and the way back to it."""

    @property
    def transport(self) -> SipTransport: ...
    @property
    def local(self) -> Address: ...
    @property
    def remote(self) -> Address: ...
    @property
    def destination(self) -> Destination | None:  # the registrar connection; None: UDP
        ...

    def send(self, data: bytes) -> None: ...


class Inbound:
    """A request the provider sent us, and the way back for its answers."""

    def __init__(self, uac: Uac, request: Request, channel: _Channel, key: _ServerKey) -> None:
        self.request = request
        self._uac = uac
        self._channel = channel
        self._key = key
        self.answered = False  # a final response went back

    @property
    def transport(self) -> SipTransport:
        return self._channel.transport

    @property
    def remote(self) -> Address:
        """The source address of the request (UDP) or of its connection."""
        return self._channel.remote

    @property
    def destination(self) -> Destination | None:
        """The registrar connection it came on (TCP, TLS); None for UDP."""
        return self._channel.destination

    def respond(
        self, status: int, reason: str | None = None, headers: Iterable[tuple[str, str]] = ()
    ) -> Response:
        """Send a response (provisional or final); a final one is kept to answer the
        request's retransmissions."""
        response = make_response(self.request, status, reason, headers)
        self.send(response)
        return response

    def send(self, response: Response) -> None:
        """Send a response made elsewhere (with a To tag of our choice, or the app's own
        answer relayed by sipis/calls.py); a final one is kept for retransmissions."""
        data = response.serialize()
        with contextlib.suppress(TransportError):
            self._channel.send(data)
        if response.status >= 200:
            self.answered = True
            self._uac._answered(self._key, data)


Handler = Callable[[Request, Inbound], Awaitable[None]]
LostListener = Callable[[Destination], None]


async def answer_unavailable(request: Request, inbound: Inbound) -> None:
    """Until calls and messages are relayed: OPTIONS 200, ACK nothing, CANCEL 481
    (nothing is pending), anything else 480."""
    if request.method == "ACK":
        return
    if request.method == "OPTIONS":
        inbound.respond(200)
    elif request.method == "CANCEL":
        inbound.respond(481)
    else:
        inbound.respond(480)


_ServerKey = tuple[str, str, Address]  # (branch, method, source)


# --- sockets -------------------------------------------------------------------------


class _UdpRemote:
    """A UDP peer: the shared socket and one remote address."""

    __slots__ = ("_socket", "local", "remote")
    transport: Final = SipTransport.UDP
    destination: Final[Destination | None] = None

    def __init__(self, udp: _UdpSocket, local: Address, remote: Address) -> None:
        self._socket = udp
        self.local = local
        self.remote = remote

    def send(self, data: bytes) -> None:
        transport = self._socket.transport
        if transport is None or transport.is_closing():
            raise TransportError("socket closed")
        transport.sendto(data, self.remote)


class _UdpSocket(asyncio.DatagramProtocol):
    def __init__(self, uac: Uac) -> None:
        self._uac = uac
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # the selector's datagram transport
        self.port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if datagram_keepalive(data) is not None or len(data) > MAX_MESSAGE_SIZE:
            return
        remote = (addr[0], addr[1])
        self._uac._received(data, _UdpRemote(self, self._uac._udp_local(remote[0]), remote))

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable of an earlier send: the transaction times out.
        log.debug("sipis.udp_error", extra={"fields": {"error": type(exc).__name__}})


class _Connection(asyncio.Protocol):
    """One TCP or TLS connection to a registrar, shared by its accounts."""

    def __init__(self, uac: Uac, destination: Destination) -> None:
        self._uac = uac
        self.target = destination
        self.destination: Destination | None = destination
        self.transport = destination.transport
        self._stream: asyncio.Transport | None = None
        self._framer = StreamFramer()
        self.local: Address = ("", 0)
        self.remote: Address = ("", 0)
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._stream = transport  # type: ignore[assignment]  # a stream transport
        local = transport.get_extra_info("sockname")
        peer = transport.get_extra_info("peername")
        self.local = (local[0], local[1])
        self.remote = (peer[0], peer[1]) if peer else ("", 0)

    def data_received(self, data: bytes) -> None:
        try:
            items = self._framer.feed(data)
        except FramingError as exc:
            items = exc.items
            self.abort()
        for item in items:
            if isinstance(item, bytes):
                self._uac._received(item, self)
            elif item is Keepalive.PING:
                self.send(PONG)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._uac._lost(self)

    def send(self, data: bytes) -> None:
        stream = self._stream
        if stream is None or self.closed or stream.is_closing():
            raise TransportError("connection lost")
        stream.write(data)

    def abort(self) -> None:
        if self._stream is not None:
            self._stream.abort()


# --- the client ----------------------------------------------------------------------


@dataclass(slots=True)
class _Transaction:
    future: asyncio.Future[Response]
    channel: _Channel
    proceeding: bool = False  # a provisional response came: retransmit at T2


InviteItem = Response | UacError


class ClientInvite:
    """An INVITE client transaction under way (see the module docstring); from
    `Uac.invite`. `await next()` gives each provisional (but 100) and then the final
    response; `cancel()` CANCELs it."""

    def __init__(
        self,
        uac: Uac,
        channel: _Channel,
        request: Request,
        accepted: Callable[[Response], None] | None,
        ring_limit: float,
    ) -> None:
        self.request = request  # as sent: our Via on top
        self.proceeding = False  # a provisional came: a CANCEL may go
        self.final: Response | None = None
        self._uac = uac
        self._channel = channel
        self._data = request.serialize()
        self._accepted = accepted
        self._ring_limit = ring_limit
        self._items: asyncio.Queue[InviteItem] = asyncio.Queue()
        now = uac._clock.now()
        self._deadline = now + 64 * uac.settings.t1  # timer B
        self._interval = uac.settings.t1  # timer A
        self._resend_at = now + self._interval
        self._cancel_wanted = False
        self._cancel_sent = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.request.top_via.branch or "", "INVITE")

    async def next(self) -> Response:
        """The next provisional (101-199) or the final response. Timeout or
        TransportError when none came in time or the connection went."""
        uac = self._uac
        reliable = self._channel.transport is not SipTransport.UDP
        while self._items.empty():
            now = uac._clock.now()
            if now >= self._deadline and self.proceeding and not self._cancel_wanted:
                await self.cancel()  # rung too long (timer C): its 487 is the answer
                continue
            if now >= self._deadline:
                uac._invite_done(self)
                raise Timeout()
            if not reliable and not self.proceeding and now >= self._resend_at:
                with contextlib.suppress(TransportError):
                    self._channel.send(self._data)
                self._interval *= 2
                self._resend_at = now + self._interval
            wake = self._deadline
            if not reliable and not self.proceeding:
                wake = min(wake, self._resend_at)
            getting = asyncio.ensure_future(self._items.get())
            napping = asyncio.ensure_future(uac._sleep(max(wake - now, 0.0)))
            try:
                await asyncio.wait({getting, napping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                napping.cancel()
                if not getting.done():
                    getting.cancel()
            if getting.done() and not getting.cancelled():
                return _item(getting.result())
        return _item(self._items.get_nowait())

    async def cancel(self) -> None:
        """CANCEL the INVITE: now if a provisional came, else once one does; nothing
        once it has its final answer. Its final answer (487, or a 2xx that crossed
        the CANCEL) still comes from `next()`, within 64*T1."""
        if self.final is not None or self._cancel_wanted:
            return
        self._cancel_wanted = True
        self._deadline = self._uac._clock.now() + 64 * self._uac.settings.t1
        if self.proceeding:
            self._send_cancel()

    def _send_cancel(self) -> None:
        if self._cancel_sent:
            return
        self._cancel_sent = True
        self._uac._spawn_cancel(self._channel, cancel_of(self.request))

    def _response(self, response: Response) -> None:
        """A response of this transaction (from the Uac's receive path)."""
        uac = self._uac
        if response.status < 200:
            if not self.proceeding:
                self.proceeding = True
                if self._cancel_wanted:
                    self._send_cancel()
            if not self._cancel_wanted:
                self._deadline = uac._clock.now() + self._ring_limit
            if response.status > 100:
                self._items.put_nowait(response)
            return
        self.final = response
        uac._invite_done(self)
        if response.status >= 300:
            ack = ack_of(self.request, response).serialize()
            with contextlib.suppress(TransportError):
                self._channel.send(ack)
            uac._finish(self.key, _Finished(0.0, self._channel, ack, None))
        else:
            uac._finish(self.key, _Finished(0.0, self._channel, None, self._accepted))
        self._items.put_nowait(response)

    def _failed(self, error: UacError) -> None:
        if self.final is None:
            self._uac._invite_done(self)
            self._items.put_nowait(error)


def _prepend_our_via(channel: _Channel, destination: Destination, request: Request) -> None:
    """Our Via, with a new branch, on top of a request we send on `channel`."""
    host, port = channel.local
    branch = "z9hG4bK" + secrets.token_hex(10)
    request.prepend_via(ViaHeader.new(destination.transport.value, host, port, branch))


def _item(item: InviteItem) -> Response:
    if isinstance(item, UacError):
        raise item
    return item


def cancel_of(invite: Request) -> Request:
    """The CANCEL of an INVITE we sent (RFC 3261 9.1): its Request-URI, top Via (the
    branch), From, To, Call-ID, Route and the CSeq number."""
    return _of_invite(invite, "CANCEL", invite.get("To") or "")


def ack_of(invite: Request, final: Response) -> Request:
    """The ACK of a non-2xx final answer to an INVITE we sent (RFC 3261 17.1.1.3): the
    INVITE's branch and Route, the answer's To (its tag)."""
    return _of_invite(invite, "ACK", final.get("To") or "")


def _of_invite(invite: Request, method: str, to: str) -> Request:
    """A request of the INVITE's own client transaction (its CANCEL or non-2xx ACK):
    the INVITE's Request-URI, top Via, From, Call-ID, Route and CSeq number."""
    headers = [
        ("Via", str(invite.top_via)),
        ("Max-Forwards", "70"),
        ("From", invite.get("From") or ""),
        ("To", to),
        ("Call-ID", invite.call_id),
        ("CSeq", f"{invite.cseq.number} {method}"),
    ]
    headers += [("Route", value) for value in invite.get_all("Route")]
    return Request(method, invite.uri, headers)


# A finished INVITE transaction (timer D, or RFC 6026 Accepted) kept for 64*T1: the ACK
# to send again for a retransmitted non-2xx, or who gets a further 2xx.
class _Finished(NamedTuple):
    until: float
    channel: _Channel
    ack: bytes | None
    accepted: Callable[[Response], None] | None


FINISHED_LIMIT: Final = 4096


class Uac:
    """Client transactions to registrars and the provider's requests back; see the
    module docstring. `await Uac.create(...)`, then `bind`, then `request`."""

    def __init__(self, settings: UacSettings, clock: Clock, sleep: Sleep) -> None:
        self.settings = settings
        self._clock = clock
        self._sleep = sleep
        self._udp = _UdpSocket(self)
        self._connections: dict[Destination, _Connection] = {}
        self._connecting: dict[Destination, asyncio.Task[_Connection | TransportError]] = {}
        self._transactions: dict[tuple[str, str], _Transaction] = {}
        self._invites: dict[tuple[str, str], ClientInvite] = {}
        self._finished: OrderedDict[tuple[str, str], _Finished] = OrderedDict()
        self._served: OrderedDict[_ServerKey, tuple[float, bytes | None]] = OrderedDict()
        self._local_ip: dict[str, str] = {}
        self._resolved: set[tuple[str, str]] = set()  # (host, ip) sent to over UDP
        self._handler: Handler = answer_unavailable
        self._lost_listener: LostListener | None = None
        self._tasks = Tasks(log, "sipis.uac_task_failed")
        self._tls: ssl.SSLContext | None = None
        self._closed = False

    @classmethod
    async def create(cls, settings: UacSettings, clock: Clock, sleep: Sleep = asyncio.sleep) -> Uac:
        uac = cls(settings, clock, sleep)
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(
            lambda: uac._udp, local_addr=(settings.bind_host, 0), family=socket.AF_INET
        )
        return uac

    def bind(self, handler: Handler, lost: LostListener | None = None) -> None:
        """Who gets the provider's requests, and who hears of a lost connection."""
        self._handler = handler
        self._lost_listener = lost

    @property
    def udp_port(self) -> int:
        return self._udp.port

    def registrar_addresses(self, destination: Destination) -> set[str]:
        """The addresses `destination`'s host resolved to so far (for checking where a
        request over UDP came from)."""
        return {ip for host, ip in self._resolved if host == destination.host}

    # -- client transactions --

    async def request(
        self, destination: Destination, make: Callable[[Address], Request]
    ) -> Response:
        """Send the request `make(local)` builds (`local`: our address as the registrar
        sees it, for its Contact) in a new client transaction; its final response.
        TransportError or Timeout otherwise."""
        channel = await self._open_channel(destination)
        request = make(channel.local)
        _prepend_our_via(channel, destination, request)
        return await self._transact(channel, request)

    async def send(self, destination: Destination, request: Request) -> None:
        """Send a request that is no transaction of its own (the ACK of a 2xx, RFC 3261
        13.2.2.4) once, under a Via of ours with a new branch. TransportError if it
        cannot go out."""
        channel = await self._open_channel(destination)
        _prepend_our_via(channel, destination, request)
        channel.send(request.serialize())

    async def invite(
        self,
        destination: Destination,
        request: Request,
        *,
        accepted: Callable[[Response], None] | None = None,
        ring_limit: float = 180.0,
    ) -> ClientInvite:
        """Send `request` (an INVITE) under a Via of ours in a new INVITE client
        transaction; the transaction, to take its responses from. `accepted` gets the
        2xx that come after the first (see the module docstring). TransportError if
        it cannot go out."""
        channel = await self._open_channel(destination)
        _prepend_our_via(channel, destination, request)
        invite = ClientInvite(self, channel, request, accepted, ring_limit)
        self._invites[invite.key] = invite
        try:
            channel.send(invite._data)
        except TransportError:
            self._invite_done(invite)
            raise
        return invite

    def _invite_done(self, invite: ClientInvite) -> None:
        if self._invites.get(invite.key) is invite:
            del self._invites[invite.key]

    def _finish(self, key: tuple[str, str], finished: _Finished) -> None:
        kept = self._finished
        now = self._clock.now()
        while kept:
            oldest_key, oldest = next(iter(kept.items()))
            if oldest.until > now and len(kept) < FINISHED_LIMIT:
                break
            del kept[oldest_key]
        kept[key] = finished._replace(until=now + 64 * self.settings.t1)

    def _spawn_cancel(self, channel: _Channel, cancel: Request) -> None:
        with contextlib.suppress(Exception):  # TasksClosed while closing: nothing to cancel
            self._tasks.spawn(self._cancel(channel, cancel), name="sipis.cancel")

    async def _open_channel(self, destination: Destination) -> _Channel:
        """The channel a new request to `destination` goes on; TransportError once
        closed or when it cannot be had."""
        if self._closed:
            raise TransportError("closed")
        return await self._channel(destination)

    async def _cancel(self, channel: _Channel, cancel: Request) -> None:
        """A CANCEL's own transaction; its answer tells nothing the INVITE's will not."""
        try:
            await self._transact(channel, cancel)
        except UacError:
            log.info("sipis.cancel_unanswered")

    async def _transact(self, channel: _Channel, request: Request) -> Response:
        """`request` (our Via on top) in a non-INVITE client transaction of its own on
        `channel`: its final response; TransportError or Timeout otherwise."""
        key = (request.top_via.branch or "", request.method)
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        transaction = _Transaction(future, channel)
        self._transactions[key] = transaction
        data = request.serialize()
        try:
            channel.send(data)
            return await self._await_final(transaction, data)
        finally:
            self._transactions.pop(key, None)
            if not future.done():
                future.cancel()

    async def _await_final(self, transaction: _Transaction, data: bytes) -> Response:
        settings = self.settings
        reliable = transaction.channel.transport is not SipTransport.UDP
        deadline = self._clock.now() + 64 * settings.t1  # timer F
        interval = settings.t1  # timer E
        resend_at = self._clock.now() + interval
        future = transaction.future
        while not future.done():
            now = self._clock.now()
            if now >= deadline:
                raise Timeout()
            if not reliable and now >= resend_at:
                with contextlib.suppress(TransportError):
                    transaction.channel.send(data)
                interval = settings.t2 if transaction.proceeding else min(2 * interval, settings.t2)
                resend_at = now + interval
            wake = deadline if reliable else min(deadline, resend_at)
            napping = asyncio.ensure_future(self._sleep(max(wake - now, 0.0)))
            waits: set[asyncio.Future[Any]] = {future, napping}
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                napping.cancel()
        return future.result()

    async def _channel(self, destination: Destination) -> _Channel:
        if destination.transport is SipTransport.UDP:
            ip = await self._resolve(destination.host, destination.port)
            return _UdpRemote(self._udp, self._udp_local(ip), (ip, destination.port))
        connection = self._connections.get(destination)
        if connection is not None and not connection.closed:
            return connection
        pending = self._connecting.get(destination)
        if pending is None:
            # One connect serves every account of the registrar; a task of ours, so a
            # waiter cancelled (its account removed) does not cancel it for the others.
            pending = self._tasks.spawn(self._connect(destination), name="sipis.connect")
            self._connecting[destination] = pending
            pending.add_done_callback(lambda _: self._connecting.pop(destination, None))
        await asyncio.wait({pending})
        if pending.cancelled():
            raise TransportError("closed")
        result = pending.result()
        if isinstance(result, TransportError):
            raise result
        return result

    async def _connect(self, destination: Destination) -> _Connection | TransportError:
        """The new connection, or the error (returned: a refused connect is an outcome
        for the waiting requests, not a failure of this task)."""
        try:
            return await self._open(destination)
        except TransportError as exc:
            return exc

    async def _open(self, destination: Destination) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = self._tls_context() if destination.transport is SipTransport.TLS else None
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self, destination),
                    destination.host,
                    destination.port,
                    ssl=tls,
                    server_hostname=destination.host if tls else None,
                )
        except ssl.SSLCertVerificationError as exc:
            # The app's status says what to fix: the provider's certificate, not the link.
            raise TransportError("TLS handshake failed: certificate not trusted") from exc
        except ssl.SSLError as exc:
            raise TransportError("TLS handshake failed") from exc
        except ConnectionRefusedError as exc:
            raise TransportError("connection refused") from exc
        except socket.gaierror as exc:
            raise TransportError("registrar host not found") from exc
        except TimeoutError as exc:
            raise TransportError("connect timeout") from exc
        except OSError as exc:
            raise TransportError("connection failed") from exc
        if self._closed:
            connection.abort()
            raise TransportError("closed")
        self._connections[destination] = connection
        return connection

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            ca = self.settings.ca_file
            context = ssl.create_default_context(cafile=str(ca) if ca else None)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            self._tls = context
        return self._tls

    async def _resolve(self, host: str, port: int) -> str:
        """The IPv4 address to send to (RFC 3263's SRV/NAPTR are not followed: the
        account names its registrar's host and port)."""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, family=socket.AF_INET, type=socket.SOCK_DGRAM
            )
        except socket.gaierror as exc:
            raise TransportError("registrar host not found") from exc
        ip = str(infos[0][4][0])
        self._resolved.add((host, ip))
        return ip

    def _udp_local(self, remote_ip: str) -> Address:
        """Our UDP address as `remote_ip` sees it: the bound one, or, bound to every
        interface, the one the kernel routes from (a connected UDP socket; nothing is
        sent). Behind NAT the registrar sees another: see RegistrarSettings.contact_host."""
        bound = self.settings.bind_host
        if bound not in ("0.0.0.0", ""):  # noqa: S104 - comparing, not binding
            return (bound, self._udp.port)
        ip = self._local_ip.get(remote_ip)
        if ip is None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                try:
                    probe.connect((remote_ip, 9))
                    ip = str(probe.getsockname()[0])
                except OSError:
                    ip = "127.0.0.1"
            if len(self._local_ip) < 1024:
                self._local_ip[remote_ip] = ip
        return (ip, self._udp.port)

    # -- what arrives --

    def _received(self, data: bytes, channel: _Channel) -> None:
        try:
            message = parse(data)
        except SipParseError as exc:
            answer = error_response(exc)
            if answer is not None:
                with contextlib.suppress(TransportError):
                    channel.send(answer.serialize())
            return
        if isinstance(message, Response):
            self._response(message)
        else:
            self._request(message, channel)

    def _response(self, response: Response) -> None:
        try:
            key = (response.top_via.branch or "", response.cseq.method)
        except SipParseError:
            return
        invite = self._invites.get(key)
        if invite is not None:
            invite._response(response)
            return
        finished = self._finished.get(key)
        if finished is not None and finished.until > self._clock.now():
            if response.status >= 300 and finished.ack is not None:
                with contextlib.suppress(TransportError):
                    finished.channel.send(finished.ack)  # our ACK was lost: again
            elif 200 <= response.status < 300 and finished.accepted is not None:
                finished.accepted(response)
            return
        transaction = self._transactions.get(key)
        if transaction is None or transaction.future.done():
            return  # a late retransmission, or not ours
        if response.status < 200:
            transaction.proceeding = True
        else:
            transaction.future.set_result(response)

    def _request(self, request: Request, channel: _Channel) -> None:
        if self._closed:
            return
        try:
            request.validate()
            branch = request.top_via.branch or ""
        except SipParseError as exc:
            answer = error_response(exc)
            if answer is not None:
                with contextlib.suppress(TransportError):
                    channel.send(answer.serialize())
            return
        method = "INVITE" if request.method == "ACK" else request.method
        key: _ServerKey = (branch, method, channel.remote)
        seen = self._served.get(key)
        if seen is not None and seen[0] > self._clock.now():
            if request.method != "ACK" and seen[1] is not None:
                with contextlib.suppress(TransportError):
                    channel.send(seen[1])  # the retransmission gets the same answer
            return  # an ACK for our non-2xx answer ends its transaction; or in progress
        if request.method != "ACK":
            self._remember(key, None)
        inbound = Inbound(self, request, channel, key)
        with contextlib.suppress(Exception):  # TasksClosed while closing: dropped
            self._tasks.spawn(self._handle(request, inbound), name="sipis.inbound")

    async def _handle(self, request: Request, inbound: Inbound) -> None:
        try:
            await self._handler(request, inbound)
        except Exception:
            if request.method != "ACK" and not inbound.answered:
                inbound.respond(500)
            raise

    def _answered(self, key: _ServerKey, data: bytes) -> None:
        self._remember(key, data)

    def _remember(self, key: _ServerKey, data: bytes | None) -> None:
        served = self._served
        now = self._clock.now()
        while served:
            oldest_key, (until, _) = next(iter(served.items()))
            if until > now and len(served) < SERVER_CACHE_LIMIT:
                break
            del served[oldest_key]
        served[key] = (now + 64 * self.settings.t1, data)
        served.move_to_end(key)

    def _lost(self, connection: _Connection) -> None:
        destination = connection.target
        if self._connections.get(destination) is connection:
            del self._connections[destination]
        for transaction in list(self._transactions.values()):
            if transaction.channel is connection and not transaction.future.done():
                transaction.future.set_exception(TransportError("connection lost"))
        for invite in list(self._invites.values()):
            if invite._channel is connection:
                invite._failed(TransportError("connection lost"))
        if self._lost_listener is not None and not self._closed:
            self._lost_listener(destination)

    def drop_connection(self, destination: Destination) -> None:
        """Close the connection to `destination` (tests: the provider's side lost it)."""
        connection = self._connections.get(destination)
        if connection is not None:
            connection.abort()

    async def close(self) -> None:
        """Fail what is in flight, close every connection and the UDP socket."""
        self._closed = True
        for transaction in self._transactions.values():
            if not transaction.future.done():
                transaction.future.set_exception(TransportError("closed"))
        for invite in list(self._invites.values()):  # each failed one leaves the dict
            invite._failed(TransportError("closed"))
        for pending in list(self._connecting.values()):
            pending.cancel()
        for connection in list(self._connections.values()):
            connection.abort()
        self._connections.clear()
        if self._udp.transport is not None:
            self._udp.transport.close()
        await self._tasks.close()
