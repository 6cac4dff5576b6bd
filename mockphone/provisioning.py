"""The PBX side of the provisioning tunnel: the reference client.

A PBX behind NAT dials the relay and serves its provisioning files over the tunnel:

    async def serve(request: TunnelRequest) -> TunnelResponse:
        return TunnelResponse(200, [("Content-Type", "text/xml")], files[request.path])

    pbx = await PbxTunnel.connect("http://relay:8080", serial, secret, serve)
    ...
    await pbx.close()

A response body may be bytes or an async iterator of chunks, sent as the relay grants
credit: a file produced lazily is never held whole. The connection proves the serial
by HMAC over the relay's nonce and checks the relay's proof in turn (see
`proxy/provisioning/protocol.py`); a refused serial or secret raises `TunnelRefused`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from proxy.provisioning.protocol import (
    HEADER_SIZE,
    MAX_FRAME,
    SUBPROTOCOL,
    TUNNEL_PATH,
    BodyReader,
    Kind,
    ProtocolError,
    SendWindow,
    StreamReset,
    credit_frame,
    credit_of,
    decode,
    encode,
    hello_message,
    new_nonce,
    ready_proves,
    send_body,
)

HANDSHAKE_TIMEOUT = 10.0


class TunnelRefused(Exception):
    """The relay refused the serial or its secret, or could not prove its own."""


@dataclass(frozen=True, slots=True)
class TunnelRequest:
    method: str
    path: str  # "/" + the path after /provisioning/<serial>
    query: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        return next((v for k, v in self.headers if k.lower() == lowered), None)


@dataclass(slots=True)
class TunnelResponse:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | AsyncIterator[bytes] = b""


Handler = Callable[[TunnelRequest], Awaitable[TunnelResponse]]


class _Stream:
    def __init__(self, tunnel: PbxTunnel, stream: int, meta: dict[str, Any]) -> None:
        self.meta = meta
        self.body = BodyReader(lambda n: tunnel.send(credit_frame(stream, n)))
        self.window = SendWindow(stalled=tunnel.stalled)
        self.task: asyncio.Task[None] | None = None


class PbxTunnel:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        owns_session: bool,
        ws: aiohttp.ClientWebSocketResponse,
        handler: Handler,
    ) -> None:
        self._session = session
        self._owns_session = owns_session
        self._ws = ws
        self._handler = handler
        self._streams: dict[int, _Stream] = {}
        self.bytes_sent = 0  # response body bytes sent so far
        self.requests = 0
        self.stalled = asyncio.Event()  # set when a body waited for the relay's credit
        self.closed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls,
        base_url: str,
        serial: str,
        secret: str,
        handler: Handler,
        *,
        session: aiohttp.ClientSession | None = None,
    ) -> PbxTunnel:
        """Dial the relay at `base_url` (http:// or https://) and authenticate."""
        own = session is None
        session = session or aiohttp.ClientSession()
        try:
            ws = await session.ws_connect(
                base_url.rstrip("/") + TUNNEL_PATH,
                protocols=(SUBPROTOCOL,),
                max_msg_size=MAX_FRAME,
                compress=0,
                autoping=True,
            )
            try:
                await _handshake(ws, serial, secret)
            except BaseException:
                await ws.close()
                raise
        except BaseException:
            if own:
                await session.close()
            raise
        tunnel = cls(session, own, ws, handler)
        tunnel._reader = asyncio.create_task(tunnel._read(), name=f"pbx-tunnel-{serial}")
        return tunnel

    async def send(self, frame: bytes) -> None:
        if self._ws.closed:
            raise StreamReset("tunnel closed")
        await self._ws.send_bytes(frame)

    @property
    def waiting_for_credit(self) -> bool:
        """Whether a response body is held up until the relay grants more credit."""
        return any(stream.window.waiting for stream in self._streams.values())

    async def _send_data(self, frame: bytes) -> None:
        await self.send(frame)
        if frame[0] == Kind.DATA:
            self.bytes_sent += len(frame) - HEADER_SIZE

    async def close(self) -> None:
        await self._ws.close()
        if self._reader is not None:
            await self._reader
        if self._owns_session:
            await self._session.close()

    async def wait_closed(self) -> None:
        await self.closed.wait()

    async def _read(self) -> None:
        try:
            async for msg in self._ws:
                if msg.type is not aiohttp.WSMsgType.BINARY:
                    break
                self._dispatch(*decode(msg.data))
        except ProtocolError:
            await self._ws.close(code=aiohttp.WSCloseCode.PROTOCOL_ERROR)
        finally:
            streams, self._streams = list(self._streams.values()), {}
            for stream in streams:
                if stream.task is not None:
                    stream.task.cancel()
            for stream in streams:
                if stream.task is not None:
                    with contextlib.suppress(asyncio.CancelledError):
                        await stream.task
            self.closed.set()

    def _dispatch(self, kind: Kind, stream_id: int, payload: bytes) -> None:
        if kind is Kind.REQUEST:
            if stream_id in self._streams:
                raise ProtocolError("REQUEST on an open stream")
            meta = orjson.loads(payload)
            stream = _Stream(self, stream_id, meta)
            self._streams[stream_id] = stream
            stream.task = asyncio.create_task(self._serve(stream_id, stream))
            return
        known = self._streams.get(stream_id)
        if known is None:
            return
        stream = known
        if kind is Kind.DATA:
            stream.body.feed(payload)
        elif kind is Kind.END:
            stream.body.end()
        elif kind is Kind.CREDIT:
            stream.window.add(credit_of(payload))
        elif kind is Kind.RESET:
            del self._streams[stream_id]
            stream.body.fail(StreamReset("reset by the relay"))
            stream.window.fail(StreamReset("reset by the relay"))
            if stream.task is not None:
                stream.task.cancel()
        else:
            raise ProtocolError(f"{kind.name} from the relay")

    async def _serve(self, stream_id: int, stream: _Stream) -> None:
        try:
            body = b"".join([chunk async for chunk in stream.body.chunks()])
            meta = stream.meta
            request = TunnelRequest(
                str(meta["method"]),
                str(meta["path"]),
                str(meta.get("query", "")),
                [(str(k), str(v)) for k, v in meta.get("headers", [])],
                body,
            )
            self.requests += 1
            try:
                response = await self._handler(request)
            except Exception:
                response = TunnelResponse(500, [("Content-Type", "text/plain")], b"PBX error\n")
            head = {"status": response.status, "headers": response.headers}
            await self.send(encode(Kind.RESPONSE, stream_id, orjson.dumps(head)))
            await send_body(stream_id, response.body, stream.window, self._send_data)
        except (StreamReset, ConnectionError):
            pass  # the relay reset the stream or the tunnel closed
        finally:
            self._streams.pop(stream_id, None)


async def _handshake(ws: aiohttp.ClientWebSocketResponse, serial: str, secret: str) -> None:
    async with asyncio.timeout(HANDSHAKE_TIMEOUT):
        challenge = await _json(ws)
        nonce = challenge.get("nonce")
        if challenge.get("type") != "challenge" or not isinstance(nonce, str):
            raise TunnelRefused("the relay sent no challenge")
        cnonce = new_nonce(16)
        await ws.send_str(hello_message(serial, secret, nonce, cnonce))
        ready = await _json(ws)
    if not ready_proves(ready, serial, secret, nonce, cnonce):
        raise TunnelRefused("the relay did not prove that it knows the secret")


async def _json(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await ws.receive()
    if msg.type is not aiohttp.WSMsgType.TEXT:
        reason = ws.close_code if ws.closed else msg.type.name
        raise TunnelRefused(f"the relay closed the tunnel ({reason})")
    data = orjson.loads(msg.data)
    if not isinstance(data, dict):
        raise TunnelRefused("the relay sent no JSON object")
    return data
