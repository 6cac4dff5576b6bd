"""SIP over WebSocket (RFC 7118) at `/sip` on the aiohttp application.

One WebSocket message, text or binary, is one SIP message; the flow is `WS`, or `WSS`
when the request came over TLS. A client must offer the `sip` subprotocol; a request
without it gets HTTP 400, one that is no WebSocket upgrade at all 426, each with a
JSON reason. The connections count against the same limits as TCP and TLS (the
per-IP limit included), are reaped by the same reaper, and are closed by the app's
`on_shutdown`, before aiohttp waits for its handlers to return.

    add_sip_websocket(app, SIP_TRANSPORTS)   # SIP_TRANSPORTS: web.AppKey[SipTransports]

The transports are looked up per request, so they may be started by one of the
app's cleanup contexts, after the route was added.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import WebSocketError, WSCloseCode, WSMsgType, web

from proxy.sip.flow import Flow, FlowClosed, Transport
from proxy.sip.framing import PONG, Keepalive, datagram_keepalive
from proxy.sip.link import Link, Refusal
from proxy.sip.transport_settings import STOP_GRACE
from proxy.sip.transports import SipTransports
from webapi import openapi
from webapi.errors import Refusal as HttpRefusal

SIP_PATH = "/sip"
SUBPROTOCOL = "sip"
CLOSE_TIMEOUT = 5.0  # how long a close waits for the peer's close frame


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
                    "400": openapi.refusal("subprotocol_required, connection_gone"),
                    "426": openapi.refusal("websocket_required: no WebSocket upgrade"),
                    "429": openapi.refusal("too_many_connections from this address"),
                    "503": openapi.refusal("unavailable: not accepting connections now"),
                },
            ),
        )


class _SipWebSocket:
    def __init__(self, transports: web.AppKey[SipTransports]) -> None:
        self._key = transports
        self._links: set[_WsLink] = set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        edge = request.app.get(self._key)
        ws: web.WebSocketResponse[Any] = web.WebSocketResponse(
            protocols=(SUBPROTOCOL,),
            max_msg_size=edge.limits.max_message_size if edge else 1,  # refused below
            autoping=False,  # pings count as activity, so they are seen and answered here
            compress=False,  # a deflate context per connection costs more than idle flows may
            decode_text=False,
            timeout=CLOSE_TIMEOUT,
        )
        ready = ws.can_prepare(request)
        if not ready.ok:
            raise HttpRefusal(
                426,
                "websocket_required",
                "SIP over WebSocket needs a WebSocket upgrade with subprotocol 'sip' (RFC 7118)",
                {"Upgrade": "websocket"},
            )
        if ready.protocol != SUBPROTOCOL:
            raise HttpRefusal(
                400,
                "subprotocol_required",
                "offer the WebSocket subprotocol 'sip' (Sec-WebSocket-Protocol: sip, RFC 7118)",
            )
        if edge is None:  # an app built without SIP transports (`sip_listen` None)
            raise HttpRefusal(503, "unavailable", "SIP is not served here")
        transport = request.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        if transport is None or peer is None:
            raise HttpRefusal(400, "connection_gone", "the connection closed")
        kind = Transport.WSS if request.secure else Transport.WS
        refusal = edge.admit(kind, str(peer[0]))
        if refusal is Refusal.PER_IP:
            raise HttpRefusal(429, "too_many_connections", "too many connections from this address")
        if refusal is not None:
            raise HttpRefusal(503, "unavailable", "not accepting connections now")
        local = transport.get_extra_info("sockname")
        link = _WsLink(edge, ws, transport, kind, (str(peer[0]), int(peer[1])), local)
        edge.attach(link)
        self._links.add(link)
        try:
            await ws.prepare(request)
            if link.flow.closed:  # closed (shutdown, reaper) while the handshake ran
                await ws.close(code=WSCloseCode.GOING_AWAY)
            else:
                await _serve(edge, link, ws)
        finally:
            self._links.discard(link)
            link.flow.close()
            edge.ended(link)
            link.finished.set_result(None)
        return ws

    async def shutdown(self, app: web.Application) -> None:
        """Let the messages in flight be handled (their answers may still go out), then
        close every SIP WebSocket (1001, going away) and wait until their handlers
        returned; aiohttp would otherwise wait its whole shutdown timeout for them."""
        links = list(self._links)
        workers = [link.worker for link in links if link.worker is not None]
        if workers:
            await asyncio.wait(workers, timeout=STOP_GRACE)
        for link in links:
            link.flow.close()
        if not links:
            return
        finished = [link.finished for link in links]
        _, late = await asyncio.wait(finished, timeout=STOP_GRACE)
        if late:
            for link in links:
                link.abort()
            await asyncio.wait(finished, timeout=STOP_GRACE)


async def _serve(edge: SipTransports, link: _WsLink, ws: web.WebSocketResponse[Any]) -> None:
    flow = link.flow
    while True:
        msg = await ws.receive()
        if msg.type is WSMsgType.TEXT or msg.type is WSMsgType.BINARY:
            edge.touch(link)
            data: bytes = msg.data
            keepalive = datagram_keepalive(data)
            if keepalive is Keepalive.PING:  # RFC 5626, as SIP.js sends it over WebSocket
                try:
                    await link.send(PONG)
                except FlowClosed:
                    return
            elif keepalive is None and not edge.deliver(link, data) and link.worker is not None:
                # Too many messages waiting: read on once the handler caught up.
                await asyncio.wait([link.worker])
        elif msg.type is WSMsgType.PING:
            edge.touch(link)
            try:
                await ws.pong(msg.data)
            except ConnectionError:
                return
        elif msg.type is WSMsgType.PONG:
            edge.touch(link)
        else:
            if (
                msg.type is WSMsgType.ERROR
                and isinstance(msg.data, WebSocketError)
                and msg.data.code == WSCloseCode.MESSAGE_TOO_BIG
            ):
                edge.metrics.framing_errors.labels(flow.transport.value).inc()
            return  # closed, closing, or an error aiohttp already answered with a close


class _WsLink(Link):
    __slots__ = ("_edge", "_transport", "_ws", "finished")

    def __init__(
        self,
        edge: SipTransports,
        ws: web.WebSocketResponse[Any],
        transport: asyncio.Transport,
        kind: Transport,
        remote: tuple[str, int],
        local: Any,
    ) -> None:
        super().__init__()
        self._edge = edge
        self._ws = ws
        self._transport = transport
        self.flow = Flow(kind, remote, (str(local[0]), int(local[1])), self)
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # FlowSender

    async def send(self, data: bytes) -> None:
        if self._ws.closed or self._transport.is_closing():
            raise FlowClosed(self.flow.id)
        if self._transport.get_write_buffer_size() > self._edge.limits.write_buffer:
            self._edge.close_link(self, "write_buffer")
            raise FlowClosed(self.flow.id)
        # RFC 7118 allows both frame types; text frames must be UTF-8.
        opcode = WSMsgType.TEXT if _is_utf8(data) else WSMsgType.BINARY
        try:
            await self._ws.send_frame(data, opcode)
        except ConnectionError as exc:
            raise FlowClosed(self.flow.id) from exc

    def close(self) -> None:
        if not self._ws.closed and self._ws.prepared:
            # Closing is a handshake; a task of the transports carries it out.
            self._edge.spawn(self._close())

    async def _close(self) -> None:
        try:
            await self._ws.close(code=WSCloseCode.GOING_AWAY)
        except ConnectionError:
            self._transport.abort()

    # Link

    def write_blocked(self) -> bool:
        _, high = self._transport.get_write_buffer_limits()
        return self._transport.get_write_buffer_size() > high

    def abort(self) -> None:
        self._transport.abort()


def _is_utf8(data: bytes) -> bool:
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
