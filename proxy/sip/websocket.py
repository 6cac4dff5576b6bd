"""SIP over WebSocket (RFC 7118) at `/sip` on the aiohttp application.

One WebSocket message, text or binary, is one SIP message; the flow is `WS`, or `WSS`
when the request came over TLS. A client must offer the `sip` subprotocol; a request
without it gets HTTP 400, one that is no WebSocket upgrade at all 426, each with a
JSON reason. The connections count against the same limits as TCP and TLS (the
per-IP limit included), are reaped by the same reaper, and are closed (1001, going
away) by the app's `on_shutdown`.

    add_sip_websocket(app, SIP_TRANSPORTS)   # SIP_TRANSPORTS: web.AppKey[SipTransports]

aiohttp routes the upgrade request and its middlewares see it; once it is accepted,
the connection leaves aiohttp. An idle phone holds its WebSocket all day, and
aiohttp's `WebSocketResponse` keeps, per connection, its HTTP protocol and parser, the
request, the handler's task and the WebSocket reader, writer and queue: about 14.8 KiB
of the 16.3 KiB an idle flow cost (bench/README.md). Here the 101 is written straight
to the transport, which is handed to `WsLink`, one small protocol object that is the
flow's link and sender and frames RFC 6455 itself (`proxy.sip.wsframes`); aiohttp's
handler for the connection is told its connection is gone (it is, for HTTP), so its
objects and task are freed when the request handler returns.

The transports are looked up per request, so they may be started by one of the
app's cleanup contexts, after the route was added.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, cast

from aiohttp import web

from proxy.sip.flow import Flow, FlowClosed, Transport
from proxy.sip.framing import PONG, Keepalive, datagram_keepalive
from proxy.sip.link import Edge, Link, Refusal, address_of
from proxy.sip.transport_settings import STOP_GRACE
from proxy.sip.transports import SipTransports
from proxy.sip.wsframes import (
    CloseCode,
    FrameError,
    Opcode,
    accept_key,
    close_code,
    close_frame,
    frame,
    is_utf8,
    read_frame,
)
from webapi import openapi
from webapi.errors import Refusal as HttpRefusal

SIP_PATH = "/sip"
SUBPROTOCOL = "sip"
CLOSE_TIMEOUT = 5.0  # how long a close waits for the peer's close frame
# What aiohttp's WebSocketResponse accepted: 13 (RFC 6455) and the hybi drafts 7 and 8,
# whose framing is the same.
VERSIONS = frozenset({"13", "8", "7"})


def add_sip_websocket(
    app: web.Application, transports: web.AppKey[SipTransports], *, path: str = SIP_PATH
) -> None:
    endpoint = _SipWebSocket(transports)
    app.router.add_get(path, endpoint.handle)
    app.on_shutdown.append(endpoint.shutdown)
    if openapi.OPENAPI in app:  # build_app's registry; a test's bare app has none
        app[openapi.OPENAPI].operation(
            path,
            "get",
            openapi.websocket_upgrade(
                "SIP over WebSocket (RFC 7118): one message, text or binary, is one SIP message",
                SUBPROTOCOL,
                {
                    "400": openapi.refusal(
                        "subprotocol_required, websocket_key (not 16 octets in base64),"
                        " connection_gone"
                    ),
                    "426": openapi.refusal("websocket_required: no WebSocket upgrade"),
                    "429": openapi.refusal("too_many_connections from this address"),
                    "503": openapi.refusal("unavailable: not accepting connections now"),
                },
            ),
        )


class _Upgraded(web.StreamResponse):
    """What the handler returns once the 101 went out and the connection was handed
    over: aiohttp writes nothing more for it."""

    def __init__(self) -> None:
        super().__init__(status=101)

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


class _Upgradable(Protocol):
    """A transport's protocol that wraps aiohttp's and can be given another one
    (`webapi.connections`: the HTTP guard keeps counting the connection)."""

    def upgrade(self, protocol: asyncio.Protocol) -> None: ...


def _refuse_handshake(request: web.Request) -> tuple[str, str] | None:
    """None when `request` asks for a WebSocket with subprotocol `sip` (RFC 6455 4.2.1,
    RFC 7118 4); else the refusal's (error, detail). Checked in the order aiohttp did:
    an upgrade at all (426), then the subprotocol, then the key (400)."""
    headers = request.headers
    upgrade = {t.strip().lower() for t in headers.get("Upgrade", "").split(",")}
    connection = {t.strip().lower() for t in headers.get("Connection", "").split(",")}
    if (
        request.method != "GET"
        or request.version < (1, 1)
        or "websocket" not in upgrade
        or "upgrade" not in connection
        or headers.get("Sec-WebSocket-Version", "").strip() not in VERSIONS
    ):
        return "websocket_required", ""
    offered = {p.strip() for p in headers.get("Sec-WebSocket-Protocol", "").split(",")}
    if SUBPROTOCOL not in offered:
        return (
            "subprotocol_required",
            "offer the WebSocket subprotocol 'sip' (Sec-WebSocket-Protocol: sip, RFC 7118)",
        )
    if accept_key(headers.get("Sec-WebSocket-Key", "")) is None:
        return "websocket_key", "Sec-WebSocket-Key must be 16 octets in base64 (RFC 6455)"
    return None


class _SipWebSocket:
    def __init__(self, transports: web.AppKey[SipTransports]) -> None:
        self._key = transports
        self._links: set[WsLink] = set()  # open or closing, until their connection is gone
        self._gone: asyncio.Future[None] | None = None  # set while shutdown waits

    async def handle(self, request: web.Request) -> web.StreamResponse:
        edge = request.app.get(self._key)
        refused = _refuse_handshake(request)
        if refused is not None and refused[0] == "websocket_required":
            raise HttpRefusal(
                426,
                "websocket_required",
                "SIP over WebSocket needs a WebSocket upgrade with subprotocol 'sip' (RFC 7118)",
                {"Upgrade": "websocket", "Sec-WebSocket-Version": "13"},
            )
        if refused is not None:
            raise HttpRefusal(400, *refused)
        if edge is None:  # an app built without SIP transports (`sip_listen` None)
            raise HttpRefusal(503, "unavailable", "SIP is not served here")
        transport = request.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        if transport is None or transport.is_closing() or peer is None:
            raise HttpRefusal(400, "connection_gone", "the connection closed")
        kind = Transport.WSS if request.secure else Transport.WS
        refusal = edge.admit(kind, str(peer[0]))
        if refusal is Refusal.PER_IP:
            raise HttpRefusal(429, "too_many_connections", "too many connections from this address")
        if refusal is not None:
            raise HttpRefusal(503, "unavailable", "not accepting connections now")
        accept = accept_key(request.headers["Sec-WebSocket-Key"])
        transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: %s\r\nSec-WebSocket-Protocol: sip\r\n\r\n"
            % str(accept).encode("ascii")
        )
        link = WsLink(edge, self, transport)
        tail = _take_over(request, transport, link)
        local = address_of(transport.get_extra_info("sockname"))
        link.start(kind, address_of(peer), local, tail)
        return _Upgraded()

    def started(self, link: WsLink) -> None:
        self._links.add(link)

    def ended(self, link: WsLink) -> None:
        self._links.discard(link)
        if not self._links and self._gone is not None and not self._gone.done():
            self._gone.set_result(None)

    async def shutdown(self, app: web.Application) -> None:
        """Let the messages in flight be handled (their answers may still go out), then
        close every SIP WebSocket (1001, going away) and wait, bounded, until their
        connections are gone; what is left then is aborted."""
        links = list(self._links)
        workers = [link.worker for link in links if link.worker is not None]
        if workers:
            await asyncio.wait(workers, timeout=STOP_GRACE)
        if not self._links:
            return
        self._gone = asyncio.get_running_loop().create_future()
        for link in list(self._links):
            link.flow.close()
        if self._links:
            await asyncio.wait([self._gone], timeout=STOP_GRACE)
        for link in list(self._links):
            link.abort()


def _take_over(request: web.Request, transport: asyncio.Transport, link: WsLink) -> bytes:
    """Hand the connection from aiohttp to `link`: from now on every event of the
    transport reaches `link`, and aiohttp lets go of the connection without closing it.
    Returns the octets the client sent after its request head (a client may send its
    first frame before it reads our 101), which aiohttp kept for the upgraded protocol.

    This leans on aiohttp's `RequestHandler` in three places, each one a documented
    part of its protocol or kept for exactly this (the upgrade's tail): `transport`
    (set to None, aiohttp neither writes to nor closes the connection after that),
    `connection_lost` (it forgets the connection; its task ends once this handler
    returns `_Upgraded`, which writes nothing) and `_message_tail`. The WebSocket tests
    (tests/sip/test_transport.py, test_websocket_phone.py) cover each against the
    aiohttp that is pinned."""
    http = request.protocol
    outer = transport.get_protocol()
    if outer is not http and hasattr(outer, "upgrade"):
        cast(_Upgradable, outer).upgrade(link)  # the HTTP guard keeps counting it
    else:
        transport.set_protocol(link)
    tail = bytes(getattr(http, "_message_tail", b""))
    http.transport = None
    http.connection_lost(None)
    return tail


class WsLink(Link, asyncio.Protocol):
    """One SIP WebSocket once upgraded: the transport's protocol, its flow's sender and
    its link. Between messages it holds no buffer (`_buffer` is the shared b""), no
    task, no timer and no future; a close it starts has a timer until the peer's close
    frame arrives."""

    __slots__ = (
        "_buffer",
        "_closing",
        "_drained",
        "_edge",
        "_endpoint",
        "_parts",
        "_timer",
        "_transport",
    )

    def __init__(self, edge: Edge, endpoint: _SipWebSocket, transport: asyncio.Transport) -> None:
        super().__init__()
        self._edge = edge
        self._endpoint = endpoint
        self._transport = transport
        self._buffer = b""  # unread octets of an incomplete frame
        self._parts: bytearray | None = None  # a fragmented message so far, its opcode first
        self._drained: asyncio.Future[None] | None = None  # set while writing is paused
        self._closing = False  # our close frame went out (or the connection failed)
        self._timer: asyncio.TimerHandle | None = None  # bounds the closing handshake

    def start(
        self, kind: Transport, remote: tuple[str, int], local: tuple[str, int], tail: bytes
    ) -> None:
        """Attach the flow (the connection was admitted), then read what came early."""
        edge = self._edge
        self._transport.set_write_buffer_limits(high=edge.limits.write_high_water)
        self.flow = Flow(kind, remote, local, self)
        edge.attach(self)
        self._endpoint.started(self)
        if tail:
            self.data_received(tail)

    # asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        edge = self._edge
        edge.touch(self)
        buffer = self._buffer + data if self._buffer else data
        used = 0
        limit = edge.limits.max_message_size
        try:
            while (got := read_frame(buffer, used, limit)) is not None:
                fin, opcode, payload, used = got
                if not self._frame(fin, opcode, payload) or self._transport.is_closing():
                    self._buffer = b""
                    return
        except FrameError as exc:
            self._fail(exc.code)
            return
        # What is left is one incomplete frame, its size already checked by its header.
        self._buffer = buffer[used:] if used else buffer

    def _frame(self, fin: bool, opcode: int, payload: bytes) -> bool:
        """Act on one frame; False: read no further."""
        if opcode >= Opcode.CLOSE:
            return self._control(opcode, payload)
        if self._closing:
            return True  # data after our close frame is dropped (RFC 6455 7.1.4)
        parts = self._parts
        if opcode == Opcode.CONTINUATION:
            if parts is None:
                raise FrameError(CloseCode.PROTOCOL_ERROR, "a continuation without a start")
            parts += payload
            if len(parts) - 1 > self._edge.limits.max_message_size:
                raise FrameError(CloseCode.MESSAGE_TOO_BIG, "message too big")
            if not fin:
                return True
            self._parts = None
            opcode, payload = parts[0], bytes(parts[1:])
        elif parts is not None:
            raise FrameError(CloseCode.PROTOCOL_ERROR, "a new message inside a fragmented one")
        elif not fin:
            self._parts = bytearray((opcode,)) + payload  # the opcode, then the payload
            return True
        if opcode == Opcode.TEXT and not is_utf8(payload):
            raise FrameError(CloseCode.INVALID_TEXT, "a text message not in UTF-8")
        return self._message(payload)

    def _message(self, data: bytes) -> bool:
        keepalive = datagram_keepalive(data)
        if keepalive is Keepalive.PING:  # RFC 5626, as SIP.js sends it over WebSocket
            self._transport.write(frame(Opcode.TEXT, PONG))
            return True
        if keepalive is None and not self._edge.deliver(self, data):
            self.pause_reading()  # too many messages waiting: read on once handled
        return True

    def _control(self, opcode: int, payload: bytes) -> bool:
        if opcode == Opcode.PING:
            if not self._closing:
                self._transport.write(frame(Opcode.PONG, payload))
            return True
        if opcode == Opcode.PONG:
            return True  # activity, already noted
        code = close_code(payload)
        if not self._closing:  # the peer's close first: echo its code (RFC 6455 5.5.1)
            self._closing = True
            self._transport.write(close_frame(code))
        # The server closes the TCP connection first (RFC 6455 7.1.1).
        self._transport.close()
        self.flow.close()
        return False

    def _fail(self, code: CloseCode) -> None:
        """Fail the connection (RFC 6455 7.1.7): our close frame, then the connection."""
        self._edge.metrics.framing_errors.labels(self.flow.transport.value).inc()
        if not self._closing:
            self._closing = True
            self._transport.write(close_frame(code))
        self._buffer, self._parts = b"", None
        self._transport.close()
        self.flow.close()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.resume_writing()  # wakes waiting senders; they find the flow closed
        self._closing = True
        self.flow.close()
        self._edge.ended(self)
        self._endpoint.ended(self)

    def pause_writing(self) -> None:
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drained is not None:
            self._drained.set_result(None)
            self._drained = None

    # FlowSender

    async def send(self, data: bytes) -> None:
        transport = self._transport
        if self._closing or transport.is_closing():
            raise FlowClosed(self.flow.id)
        # RFC 7118 allows both frame types; text frames must be UTF-8.
        transport.write(frame(Opcode.TEXT if is_utf8(data) else Opcode.BINARY, data))
        if transport.get_write_buffer_size() > self._edge.limits.write_buffer:
            self._edge.close_link(self, "write_buffer")
            raise FlowClosed(self.flow.id)
        while self._drained is not None:
            await self._drained
        if self.flow.closed:
            raise FlowClosed(self.flow.id)

    def close(self) -> None:
        """Start the closing handshake (1001, going away); the peer's close frame ends
        it, or CLOSE_TIMEOUT does. A peer that does not read is aborted instead."""
        transport = self._transport
        if self._closing or transport.is_closing():
            return
        self._closing = True
        if transport.get_write_buffer_size():
            transport.abort()
            return
        transport.write(close_frame(CloseCode.GOING_AWAY))
        self._timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, transport.abort)

    # Link

    def write_blocked(self) -> bool:
        return self._drained is not None

    def pause_reading(self) -> None:
        if not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if not self._transport.is_closing():
            self._transport.resume_reading()

    def abort(self) -> None:
        self._transport.abort()
