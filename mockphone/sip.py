"""A small SIP user agent core for the mock parties: one flow, its transactions.

`SipLink.open` makes one flow to the relay over UDP, TCP, TLS or WebSocket (RFC 7118,
subprotocol `sip`). On it a party sends requests and waits for their responses
(`transact`), answers the requests it receives (`on_request`), and sends RFC 5626 CRLF
keep-alives (`ping`). Messages are written and read by `mockphone.sipwire`, and digest
challenges answered by `mockphone.digest`: the mock parties' own, written apart from the
relay's parser and digest so that a bug in those shows instead of being shared.

Reliability is the transport's: the mock parties run on loopback, so a request over
UDP is not retransmitted (a lost datagram ends its transaction in a timeout, which the
caller counts). Every wait is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import aiohttp
from aiohttp import WSMsgType

from mockphone import digest
from mockphone.sipwire import (
    PING,
    PONG,
    FramingError,
    Keepalive,
    Request,
    Response,
    SipWireError,
    StreamFramer,
    datagram_keepalive,
    parse,
    request,
)

log = logging.getLogger("softrelay.mockphone")

TIMEOUT = 10.0  # seconds for one transaction, unless the caller says otherwise


class Transport(StrEnum):
    UDP = "udp"
    TCP = "tcp"
    TLS = "tls"
    WS = "ws"

    @property
    def via(self) -> str:
        return self.value.upper()


@dataclass(frozen=True, slots=True)
class RelayAddress:
    """Where the relay listens: SIP host and ports, and its HTTP base URL (WebSocket)."""

    host: str
    sip_port: int
    http_url: str = ""  # e.g. http://127.0.0.1:8080; SIP over WebSocket is at /sip
    tls_port: int | None = None
    tls_context: ssl.SSLContext | None = None  # trusts the relay's certificate
    udp_port: int | None = None  # when not the SIP port (port 0 picks two free ports)


class LinkClosed(Exception):
    """The flow ended (closed by us, by the relay, or the network went away)."""


RequestHandler = Callable[[Request], Coroutine[Any, Any, None]]


class SipLink:
    """One flow to the relay and the client transactions on it."""

    def __init__(
        self, transport: Transport, sent_by: str, on_request: RequestHandler, media_host: str
    ) -> None:
        self.transport = transport
        self.sent_by = sent_by  # the Via sent-by; `<random>.invalid` on WebSocket
        # The local address of our socket: where our SDP asks for media, so a real
        # client answering a mock party's call sends it to this machine, not off it.
        self.media_host = media_host
        self.on_request = on_request
        self.closed = asyncio.Event()
        # Client transactions by branch and method (a CANCEL shares its INVITE's branch).
        self._pending: dict[tuple[str, str], asyncio.Queue[Response]] = {}
        self._pongs: asyncio.Queue[None] = asyncio.Queue()
        self._send: Callable[[bytes], Awaitable[None]] = _unset
        self._close: Callable[[], Awaitable[None]] = _noop
        self._reader: asyncio.Task[None] | None = None
        self._read: Coroutine[Any, Any, None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._framer: StreamFramer | None = None  # streams: told of our pings

    @classmethod
    async def open(
        cls,
        transport: Transport,
        relay: RelayAddress,
        on_request: RequestHandler,
        *,
        local_host: str = "127.0.0.1",
        within: float = TIMEOUT,
    ) -> SipLink:
        async with asyncio.timeout(within):
            if transport is Transport.UDP:
                return await cls._open_udp(relay, on_request, local_host)
            if transport is Transport.WS:
                return await cls._open_ws(relay, on_request, local_host)
            return await cls._open_stream(transport, relay, on_request, local_host)

    @classmethod
    async def _open_stream(
        cls, transport: Transport, relay: RelayAddress, on_request: RequestHandler, local: str
    ) -> SipLink:
        if transport is Transport.TLS:
            if relay.tls_port is None:
                raise ValueError("the relay has no TLS port")
            context = relay.tls_context or ssl.create_default_context()
            reader, writer = await asyncio.open_connection(
                relay.host, relay.tls_port, ssl=context, local_addr=(local, 0)
            )
        else:
            reader, writer = await asyncio.open_connection(
                relay.host, relay.sip_port, local_addr=(local, 0)
            )
        host, port = writer.get_extra_info("sockname")[:2]
        link = cls(transport, f"{host}:{port}", on_request, host)

        async def send(data: bytes) -> None:
            if writer.is_closing():
                raise LinkClosed("the flow is closed")
            writer.write(data)
            await writer.drain()

        async def close() -> None:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

        framer = link._framer = StreamFramer()

        async def read() -> None:
            while data := await reader.read(65536):
                try:
                    items = framer.feed(data)
                except FramingError as exc:
                    items = exc.items
                    await link._deliver_all(items, send)
                    return
                await link._deliver_all(items, send)

        link._start(send, close, read())
        return link

    @classmethod
    async def _open_udp(
        cls, relay: RelayAddress, on_request: RequestHandler, local: str
    ) -> SipLink:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        udp, _ = await loop.create_datagram_endpoint(
            lambda: _Datagrams(queue),
            local_addr=(local, 0),
            remote_addr=(relay.host, relay.udp_port or relay.sip_port),
        )
        host, port = udp.get_extra_info("sockname")[:2]
        link = cls(Transport.UDP, f"{host}:{port}", on_request, host)

        async def send(data: bytes) -> None:
            if udp.is_closing():
                raise LinkClosed("the flow is closed")
            udp.sendto(data)

        async def close() -> None:
            udp.close()

        async def read() -> None:
            while (data := await queue.get()) is not None:
                keepalive = datagram_keepalive(data)
                await link._deliver_all([keepalive if keepalive else data], send)

        link._start(send, close, read())
        return link

    @classmethod
    async def _open_ws(cls, relay: RelayAddress, on_request: RequestHandler, local: str) -> SipLink:
        if not relay.http_url:
            raise ValueError("SIP over WebSocket needs the relay's HTTP URL")
        url = relay.http_url.replace("http", "ws", 1).rstrip("/") + "/sip"
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(local, 0)))
        try:
            ws = await session.ws_connect(url, protocols=("sip",), autoping=True)
        except BaseException:
            await session.close()
            raise
        # RFC 7118 5.2: a WebSocket client knows no address of its own for SIP; media
        # still goes to its socket's.
        sockname = ws.get_extra_info("sockname")
        host = sockname[0] if sockname else local
        link = cls(Transport.WS, f"{secrets.token_hex(6)}.invalid", on_request, host)

        async def send(data: bytes) -> None:
            if ws.closed:
                raise LinkClosed("the flow is closed")
            await ws.send_str(data.decode("latin-1"))

        async def close() -> None:
            try:
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    await asyncio.wait_for(ws.close(), TIMEOUT)
            finally:
                await session.close()

        async def read() -> None:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    await link._deliver_all([msg.data.encode("latin-1")], send)
                elif msg.type is WSMsgType.BINARY:
                    await link._deliver_all([msg.data], send)

        link._start(send, close, read())
        return link

    def _start(
        self,
        send: Callable[[bytes], Awaitable[None]],
        close: Callable[[], Awaitable[None]],
        read: Coroutine[Any, Any, None],
    ) -> None:
        self._send, self._close = send, close
        self._read = read

        async def run() -> None:
            try:
                await read
            except (OSError, ssl.SSLError, aiohttp.ClientError):
                pass
            finally:
                self.closed.set()
                for queue in self._pending.values():
                    queue.put_nowait(_GONE)

        self._reader = asyncio.create_task(run(), name=f"sip-link-{self.sent_by}")

    async def _deliver_all(
        self, items: list[bytes | Keepalive], send: Callable[[bytes], Awaitable[None]]
    ) -> None:
        for item in items:
            if item is Keepalive.PING:
                with contextlib.suppress(LinkClosed, OSError):
                    await send(PONG)
            elif item is Keepalive.PONG:
                self._pongs.put_nowait(None)
            elif isinstance(item, bytes):
                self._deliver(item)

    def _deliver(self, data: bytes) -> None:
        try:
            message = parse(data)
            branch = message.top_via.branch or ""
        except SipWireError:
            log.warning("unparsable message dropped")
            return
        if isinstance(message, Response):
            queue = self._pending.get((branch, message.cseq.method))
            if queue is not None:
                queue.put_nowait(message)
            return
        # Each request is handled in a task of this link, so a slow answer (a phone
        # that lets it ring) does not hold up the flow.
        task = asyncio.create_task(self.on_request(message))
        self._handlers.add(task)
        task.add_done_callback(self._handled)

    def _handled(self, task: asyncio.Task[None]) -> None:
        self._handlers.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is not None and not isinstance(exc, LinkClosed | TimeoutError | OSError):
            log.error("request handler failed", exc_info=exc)

    # --- sending ----------------------------------------------------------------------

    def via(self) -> str:
        return f"SIP/2.0/{self.transport.via} {self.sent_by};branch=z9hG4bK{secrets.token_hex(8)}"

    async def send(self, message: Request | Response) -> None:
        if self.closed.is_set():
            raise LinkClosed("the flow is closed")
        await self._send(message.serialize())

    async def transact(
        self,
        request: Request,
        *,
        within: float = TIMEOUT,
        on_provisional: Callable[[Response], None] | None = None,
    ) -> Response:
        """Send `request` and wait for its final response (provisional ones go to
        `on_provisional`). TimeoutError when none comes; LinkClosed when the flow ends."""
        key = (request.top_via.branch or "", request.method)
        queue: asyncio.Queue[Response] = asyncio.Queue()
        self._pending[key] = queue
        try:
            await self.send(request)
            async with asyncio.timeout(within):
                while True:
                    answer = await queue.get()
                    if answer is _GONE:
                        raise LinkClosed("the flow ended during the transaction")
                    if answer.status >= 200:
                        return answer
                    if on_provisional is not None:
                        on_provisional(answer)
        finally:
            del self._pending[key]

    async def ping(self, within: float = TIMEOUT) -> None:
        """An RFC 5626 keep-alive: a double CRLF, answered by a single CRLF."""
        if self.closed.is_set():
            raise LinkClosed("the flow is closed")
        if self._framer is not None:
            self._framer.pinged += 1  # a lone CRLF is now its pong, not half a ping
        await self._send(PING)
        if self.transport is Transport.WS:
            return  # the relay keeps WebSockets alive with WebSocket pings
        async with asyncio.timeout(within):
            await self._pongs.get()

    async def close(self) -> None:
        """Close the flow and stop its reader and request handlers."""
        await self._close()
        if self._reader is not None:
            await cancel_and_wait(self._reader)
        if self._read is not None:
            self._read.close()  # a link closed before its reader ran: no "never awaited"
        await cancel_and_wait(*self._handlers)
        self.closed.set()


async def cancel_and_wait(*tasks: asyncio.Task[Any]) -> None:
    """Cancel `tasks` and wait until they ended. A cancel of the task waiting here is
    not swallowed (as `suppress(CancelledError)` around each await would): a phone's
    push watcher closing its flow must still stop when the phone stops."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


_GONE = Response([], status=599, reason="Flow Gone")


async def _unset(data: bytes) -> None:
    raise LinkClosed("not open")


async def _noop() -> None:
    return None


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, queue: asyncio.Queue[bytes | None]) -> None:
        self.queue = queue

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.queue.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP unreachable while the relay restarts: the transaction times out

    def connection_lost(self, exc: Exception | None) -> None:
        self.queue.put_nowait(None)


# --- digest (the client side) ------------------------------------------------------------


def authorization(
    challenge: str, *, username: str, password: str, method: str, uri: str
) -> tuple[str, str]:
    """The Authorization header answering `challenge` (qop=auth when offered), and the
    digest response in it."""
    answer = digest.answer(challenge, username=username, password=password, method=method, uri=uri)
    return answer.header, answer.response


# --- requests and dialogs -------------------------------------------------------------


def new_request(
    link: SipLink,
    method: str,
    uri: str,
    *,
    from_: str,
    to: str,
    call_id: str,
    cseq: int,
    routes: Iterable[str] = (),
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
) -> Request:
    """A request from `link`'s side with a new branch."""
    fields = [
        ("Via", link.via()),
        *(("Route", route) for route in routes),
        ("Max-Forwards", "70"),
        ("From", from_),
        ("To", to),
        ("Call-ID", call_id),
        ("CSeq", f"{cseq} {method}"),
        *headers,
    ]
    return request(method, uri, fields, body)


def cancel_for(invite: Request) -> Request:
    """The CANCEL of a pending INVITE (RFC 3261 9.1): same branch, Route and CSeq number."""
    fields = [("Via", invite.get("Via") or "")]
    fields += [("Route", route) for route in invite.get_all("Route")]
    fields += [
        ("Max-Forwards", "70"),
        ("From", invite.get("From") or ""),
        ("To", invite.get("To") or ""),
        ("Call-ID", invite.call_id),
        ("CSeq", f"{invite.cseq.number} CANCEL"),
    ]
    return request("CANCEL", invite.uri, fields)


def ack_for_failure(invite: Request, answer: Response) -> Request:
    """The ACK of a non-2xx final answer: same branch and route, the answer's To."""
    fields = [("Via", invite.get("Via") or "")]
    fields += [("Route", route) for route in invite.get_all("Route")]
    fields += [
        ("Max-Forwards", "70"),
        ("From", invite.get("From") or ""),
        ("To", answer.get("To") or ""),
        ("Call-ID", invite.call_id),
        ("CSeq", f"{invite.cseq.number} ACK"),
    ]
    return request("ACK", invite.uri, fields)


@dataclass(slots=True)
class Dialog:
    """An established INVITE dialog, from one side (RFC 3261 12)."""

    call_id: str
    local: str  # our From in requests we send (with our tag)
    remote: str  # our To in requests we send (with their tag)
    target: str  # the remote Contact URI
    route_set: list[str]
    cseq: int

    @classmethod
    def as_caller(cls, invite: Request, answer: Response) -> Dialog:
        (contact,) = answer.contacts or [None]  # type: ignore[list-item]  # absent: below
        target = str(contact.uri) if contact is not None else str(invite.uri)
        return cls(
            invite.call_id,
            invite.get("From") or "",
            answer.get("To") or "",
            target,
            list(reversed(answer.get_all("Record-Route"))),
            invite.cseq.number,
        )

    @classmethod
    def as_callee(cls, invite: Request, to_with_tag: str) -> Dialog:
        contacts = invite.contacts
        target = str(contacts[0].uri) if contacts else str(invite.from_.uri)
        return cls(
            invite.call_id,
            to_with_tag,
            invite.get("From") or "",
            target,
            list(invite.get_all("Record-Route")),
            0,
        )

    def request(self, link: SipLink, method: str, *, cseq: int | None = None) -> Request:
        if cseq is None:
            self.cseq += 1
            cseq = self.cseq
        return new_request(
            link,
            method,
            self.target,
            from_=self.local,
            to=self.remote,
            call_id=self.call_id,
            cseq=cseq,
            routes=self.route_set,
        )


async def ack_hold_bye(link: SipLink, invite: Request, answer: Response, hold: float) -> None:
    """An answered call, as its caller ends it: ACK, talk for `hold` seconds, BYE (its
    answer not awaited past the link's end or its timeout)."""
    dialog = Dialog.as_caller(invite, answer)
    await link.send(dialog.request(link, "ACK", cseq=dialog.cseq))
    if hold > 0:
        await asyncio.sleep(hold)
    with contextlib.suppress(LinkClosed, TimeoutError):
        await link.transact(dialog.request(link, "BYE"))


def sdp(user: str, host: str) -> bytes:
    """A minimal audio offer or answer at `host`, the party's own (loopback) address:
    the mock parties send no media, and what a real peer sends stays on this machine."""
    family = "IP6" if ":" in host else "IP4"
    return (
        f"v=0\r\no={user} 1 1 IN {family} {host}\r\ns=-\r\nc=IN {family} {host}\r\n"
        "t=0 0\r\nm=audio 49170 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    ).encode()
