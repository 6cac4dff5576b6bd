"""The relay's side of the PBX tunnel (the protocol: `protocol.py`).

    hub = TunnelHub(secrets_by_serial, settings, limiter)
    app.router.add_get(TUNNEL_PATH, hub.handle); app.on_shutdown.append(hub.shutdown)
    tunnel = hub.get(serial)               # None: that PBX is offline
    exchange = await tunnel.open(head, body)
    head = await exchange.response()       # then exchange.body.read() until b""
    await exchange.close()                 # always: resets the stream if unfinished

One tunnel per serial: a PBX that dials again (after its NAT mapping changed, say)
replaces its older tunnel, which is closed. Nothing that passes through is kept
beyond the stream that carries it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from proxy.provisioning.protocol import (
    MAX_FRAME,
    SUBPROTOCOL,
    BodyReader,
    Kind,
    ProtocolError,
    SendWindow,
    StreamReset,
    challenge_message,
    credit_frame,
    credit_of,
    decode,
    encode,
    hello_proves,
    new_nonce,
    ready_message,
    send_body,
)
from proxy.provisioning.settings import ProvisioningSettings
from webapi.errors import Refusal
from webapi.ratelimit import Limiter

AUTH_TIMEOUT = 10.0  # for the PBX's hello after the challenge
HEARTBEAT = 30.0  # WebSocket pings; a PBX that stops answering is dropped
CLOSE_TIMEOUT = 5.0
log = logging.getLogger("softrelay.provisioning")


class TunnelUnavailable(Exception):
    """The tunnel closed, or has as many requests in flight as it may carry."""


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    headers: list[tuple[str, str]]


class Exchange:
    """One request through a tunnel and its response."""

    def __init__(self, tunnel: Tunnel, stream: int) -> None:
        self._tunnel = tunnel
        self.stream = stream
        self.head: asyncio.Future[ResponseHead] = asyncio.get_running_loop().create_future()
        self.body = BodyReader(self._grant)
        self.window = SendWindow()
        self._closed = False

    async def response(self) -> ResponseHead:
        return await self.head

    async def _grant(self, amount: int) -> None:
        await self._tunnel.send(credit_frame(self.stream, amount))

    def fail(self, exc: BaseException) -> None:
        if not self.head.done():
            self.head.set_exception(exc)
            self.head.exception()  # retrieved here: the waiter may be gone already
        self.body.fail(exc)
        self.window.fail(exc)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        head = self.head
        finished = (
            head.done() and not head.cancelled() and head.exception() is None and self.body.ended
        )
        self._tunnel.forget(self.stream)
        if not finished:
            self.fail(StreamReset("closed by the relay"))
            with contextlib.suppress(TunnelUnavailable):
                await self._tunnel.send(encode(Kind.RESET, self.stream, b"cancelled"))


class Tunnel:
    def __init__(self, serial: str, ws: web.WebSocketResponse[Any], max_streams: int) -> None:
        self.serial = serial
        self._ws = ws
        self._max_streams = max_streams
        self._streams: dict[int, Exchange] = {}
        self._ids = itertools.count(1)
        self.closed = False
        self.ended = asyncio.Event()  # set once the tunnel is closed

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    async def send(self, frame: bytes) -> None:
        if self.closed or self._ws.closed:
            raise TunnelUnavailable("tunnel closed")
        try:
            await self._ws.send_bytes(frame)
        except ConnectionError as exc:
            raise TunnelUnavailable("tunnel closed") from exc

    async def open(self, head: RequestHead, body: bytes) -> Exchange:
        """Send a request; its response arrives on the returned exchange."""
        if self.closed:
            raise TunnelUnavailable("tunnel closed")
        if len(self._streams) >= self._max_streams:
            raise TunnelUnavailable("too many requests in flight")
        stream = next(self._ids) & 0xFFFFFFFF
        exchange = Exchange(self, stream)
        self._streams[stream] = exchange
        meta = {
            "method": head.method,
            "path": head.path,
            "query": head.query,
            "headers": head.headers,
        }
        try:
            await self.send(encode(Kind.REQUEST, stream, orjson.dumps(meta)))
            await send_body(stream, body, exchange.window, self.send)
        except (TunnelUnavailable, StreamReset):
            await exchange.close()
            raise TunnelUnavailable("tunnel closed") from None
        return exchange

    def forget(self, stream: int) -> None:
        self._streams.pop(stream, None)

    async def serve(self) -> None:
        """Read frames until the PBX closes the tunnel or breaks the protocol."""
        try:
            while True:
                msg = await self._ws.receive()
                if msg.type is not WSMsgType.BINARY and msg.type is not WSMsgType.TEXT:
                    return  # closed, closing, or an error aiohttp already answered
                self._dispatch(*_frame(msg.type, msg.data))
        except ProtocolError as exc:
            log.warning(
                "provisioning.tunnel_protocol_error",
                extra={"fields": {"pbx_serial": self.serial, "error": type(exc).__name__}},
            )
            await self._ws.close(code=WSCloseCode.PROTOCOL_ERROR, message=b"protocol error")
        finally:
            self.end()

    def end(self) -> None:
        self.closed = True
        self.ended.set()
        for exchange in list(self._streams.values()):
            exchange.fail(StreamReset("tunnel closed"))
        self._streams.clear()

    async def close(self, code: int = WSCloseCode.GOING_AWAY, message: bytes = b"") -> None:
        self.end()
        with contextlib.suppress(ConnectionError):
            await self._ws.close(code=code, message=message)

    def _dispatch(self, kind: Kind, stream: int, payload: bytes) -> None:
        exchange = self._streams.get(stream)
        if exchange is None:
            return  # a stream we reset: its frames in flight are ignored
        if kind is Kind.RESPONSE:
            if exchange.head.done():
                raise ProtocolError("second RESPONSE on a stream")
            exchange.head.set_result(_response_head(payload))
        elif kind is Kind.DATA:
            if not exchange.head.done():
                raise ProtocolError("DATA before RESPONSE")
            exchange.body.feed(payload)
        elif kind is Kind.END:
            if not exchange.head.done():
                raise ProtocolError("END before RESPONSE")
            exchange.body.end()
        elif kind is Kind.CREDIT:
            exchange.window.add(credit_of(payload))
        elif kind is Kind.RESET:
            exchange.fail(StreamReset("reset by the PBX"))
            self.forget(stream)
        else:
            raise ProtocolError(f"{kind.name} from a PBX")


def _frame(kind: WSMsgType, data: bytes) -> tuple[Kind, int, bytes]:
    if kind is not WSMsgType.BINARY:
        raise ProtocolError("text frame after the handshake")
    return decode(data)


def _response_head(payload: bytes) -> ResponseHead:
    try:
        meta = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise ProtocolError("RESPONSE is not JSON") from None
    status = meta.get("status") if isinstance(meta, dict) else None
    headers = meta.get("headers", []) if isinstance(meta, dict) else None
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        raise ProtocolError("RESPONSE without a valid status")
    if not isinstance(headers, list) or not all(
        isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in headers
    ):
        raise ProtocolError("RESPONSE headers are not [[name, value]]")
    return ResponseHead(status, [(name, value) for name, value in headers])


class TunnelHub:
    """The tunnel endpoint and the tunnels up, by serial."""

    def __init__(
        self, secrets: dict[str, str], settings: ProvisioningSettings, limiter: Limiter
    ) -> None:
        self._secrets = secrets  # serial -> secret, for the PBXs that may dial a tunnel
        self._settings = settings
        self._limiter = limiter
        self._tunnels: dict[str, Tunnel] = {}
        self._handlers: set[asyncio.Task[Any]] = set()

    def get(self, serial: str) -> Tunnel | None:
        tunnel = self._tunnels.get(serial)
        return tunnel if tunnel is not None and not tunnel.closed else None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        wait = await self._limiter.check(request.remote)
        if wait:
            raise Refusal(429, "rate_limited", "too many requests", retry_after=wait)
        ws: web.WebSocketResponse[Any] = web.WebSocketResponse(
            protocols=(SUBPROTOCOL,),
            max_msg_size=MAX_FRAME,
            heartbeat=HEARTBEAT,
            compress=False,
            timeout=CLOSE_TIMEOUT,
        )
        ready = ws.can_prepare(request)
        if not ready.ok:
            raise Refusal(426, "websocket_required", "the tunnel is a WebSocket")
        if ready.protocol != SUBPROTOCOL:
            raise Refusal(400, "subprotocol_required", f"offer subprotocol {SUBPROTOCOL!r}")
        await ws.prepare(request)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            tunnel = await self._authenticate(ws)
            if tunnel is None:
                return ws
            old = self._tunnels.get(tunnel.serial)
            self._tunnels[tunnel.serial] = tunnel
            if old is not None:
                await old.close(message=b"replaced by a newer tunnel")
            log.info("provisioning.tunnel_up", extra={"fields": {"pbx_serial": tunnel.serial}})
            try:
                await tunnel.serve()
            finally:
                if self._tunnels.get(tunnel.serial) is tunnel:
                    del self._tunnels[tunnel.serial]
                log.info(
                    "provisioning.tunnel_down", extra={"fields": {"pbx_serial": tunnel.serial}}
                )
        finally:
            if task is not None:
                self._handlers.discard(task)
        return ws

    async def _authenticate(self, ws: web.WebSocketResponse[Any]) -> Tunnel | None:
        nonce = new_nonce()
        await ws.send_str(challenge_message(nonce))
        try:
            msg = await ws.receive(timeout=AUTH_TIMEOUT)
        except TimeoutError:
            await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"no hello")
            return None
        hello: Any = None
        if msg.type is WSMsgType.TEXT:
            with contextlib.suppress(orjson.JSONDecodeError):
                hello = orjson.loads(msg.data)
        if not isinstance(hello, dict) or hello.get("type") != "hello":
            await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"expected hello")
            return None
        serial, cnonce = hello.get("serial"), hello.get("cnonce")
        secret = self._secrets.get(serial) if isinstance(serial, str) else None
        if secret is None or not hello_proves(hello, secret, nonce):
            # The serial is named only when it is configured: others are free text.
            known = {"pbx_serial": serial} if secret is not None else {}
            log.warning(
                "provisioning.tunnel_refused",
                extra={"fields": {**known, "error": "authentication_failed"}},
            )
            await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"authentication failed")
            return None
        assert isinstance(serial, str)
        assert isinstance(cnonce, str)
        await ws.send_str(ready_message(serial, secret, nonce, cnonce))
        return Tunnel(serial, ws, self._settings.max_streams)

    async def shutdown(self, app: web.Application) -> None:
        """Close every tunnel (1001, going away) before aiohttp waits for handlers."""
        tunnels = list(self._tunnels.values())
        self._tunnels.clear()
        for tunnel in tunnels:
            await tunnel.close()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=CLOSE_TIMEOUT)
