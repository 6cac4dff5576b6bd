"""The lean SIP WebSocket path (proxy/sip/websocket.py): once upgraded, the connection
leaves aiohttp for one small protocol object, and RFC 6455/7118 hold on it as they did
under aiohttp's WebSocketResponse. A raw-socket client checks the octets: the 101 and
its accept key, a frame sent with the handshake, fragments with a ping between them,
pongs, the close handshake either way, and each broken frame failing with its code.
aiohttp's client (the browser-style peer) checks that aiohttp's server keeps nothing of
the connection, and that the HTTP guard still counts it without timing it as a head."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from prometheus_client import CollectorRegistry

from privacy.clock import ManualClock
from proxy.sip.flow import Transport
from proxy.sip.websocket import SIP_PATH, add_sip_websocket
from proxy.sip.wsframes import Opcode, accept_key
from tests.sip import test_transport
from tests.sip.test_transport import IDLE, TIMEOUT, TRANSPORTS, Recorder, sample, sip
from tests.sip.test_websocket_frames import client_frame
from webapi.connections import GuardedSite, HttpGuard, HttpLimits
from webapi.errors import refusals

# The fixtures of the transport tests, under the names pytest finds them by.
registry = test_transport.registry
recorder = test_transport.recorder
start = test_transport.start
ws_app = test_transport.ws_app

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
OK = b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"


def handshake(port: int, protocol: str = "sip") -> bytes:
    return (
        f"GET {SIP_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: {protocol}\r\nOrigin: https://phone.example\r\n\r\n"
    ).encode()


class RawPeer:
    """A WebSocket client on a bare socket: what it sends and reads is octets."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, transports: Any
    ) -> None:
        self.reader, self.writer = reader, writer
        self.transports = transports  # the server's SipTransports

    async def frame(self) -> tuple[int, int, bytes]:
        """The next server frame: (first octet, opcode, payload); servers never mask."""
        first, second = await asyncio.wait_for(self.reader.readexactly(2), TIMEOUT)
        assert not second & 0x80, "a server frame is never masked"
        length = second & 0x7F
        if length == 126:
            length = int.from_bytes(await self.reader.readexactly(2), "big")
        elif length == 127:
            length = int.from_bytes(await self.reader.readexactly(8), "big")
        payload = await asyncio.wait_for(self.reader.readexactly(length), TIMEOUT)
        return first, first & 0x0F, payload

    async def closed(self) -> bool:
        """True once the server ended the TCP connection."""
        try:
            return await asyncio.wait_for(self.reader.read(1), TIMEOUT) == b""
        except ConnectionError:
            return True


Raw = Callable[..., Awaitable[tuple[RawPeer, bytes]]]


@pytest.fixture
async def raw(ws_app: Any) -> AsyncIterator[Raw]:
    """A raw peer upgraded on a fresh app; returns it with the server's 101 head."""
    writers: list[asyncio.StreamWriter] = []

    async def connect(first: bytes = b"", **limits: Any) -> tuple[RawPeer, bytes]:
        client = await ws_app(**limits)
        port = client.port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
        writer.write(handshake(port) + first)  # a first frame may come with the handshake
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        return RawPeer(reader, writer, client.app[TRANSPORTS]), head

    yield connect
    for writer in writers:
        writer.close()


async def test_the_101_names_sip_and_the_accept_key_and_an_early_frame_is_read(
    raw: Raw, recorder: Recorder
) -> None:
    peer, head = await raw(client_frame(Opcode.TEXT, sip("early")))
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 101 Switching Protocols"
    assert f"Sec-WebSocket-Accept: {accept_key(KEY)}" in lines
    assert "Sec-WebSocket-Protocol: sip" in lines
    data, flow = await recorder.next()
    assert data == sip("early")
    assert flow.transport is Transport.WS
    await flow.send(OK)
    assert await peer.frame() == (0x81, Opcode.TEXT, OK)  # final, text: it is UTF-8
    await flow.send(b"SIP/2.0 200 OK\r\nContent-Length: 1\r\n\r\n\xff")
    assert (await peer.frame())[1] == Opcode.BINARY  # not UTF-8: a binary frame


async def test_fragments_with_a_ping_between_them_are_one_message_and_the_ping_is_ponged(
    raw: Raw, recorder: Recorder
) -> None:
    peer, _ = await raw()
    message = sip("fragments", b"v=0\r\n")
    peer.writer.write(
        client_frame(Opcode.TEXT, message[:10], fin=False)
        + client_frame(Opcode.PING, b"are you there")
        + client_frame(Opcode.CONTINUATION, message[10:30], fin=False)
    )
    assert await peer.frame() == (0x8A, Opcode.PONG, b"are you there")
    assert recorder.received.empty()
    peer.writer.write(client_frame(Opcode.CONTINUATION, message[30:]))
    assert (await recorder.next())[0] == message
    # A CRLF keep-alive in a message (RFC 5626, as SIP.js sends it) gets a CRLF pong.
    peer.writer.write(client_frame(Opcode.TEXT, b"\r\n\r\n"))
    assert await peer.frame() == (0x81, Opcode.TEXT, b"\r\n")


async def test_a_client_close_is_echoed_and_the_server_ends_the_connection(
    raw: Raw, recorder: Recorder, registry: CollectorRegistry
) -> None:
    peer, _ = await raw()
    peer.writer.write(client_frame(Opcode.TEXT, sip("before-close")))
    _, flow = await recorder.next()
    peer.writer.write(client_frame(Opcode.CLOSE, (1000).to_bytes(2, "big") + b"bye"))
    assert await peer.frame() == (0x88, Opcode.CLOSE, (1000).to_bytes(2, "big"))
    assert await peer.closed()
    assert flow.closed
    assert sample(registry, "softrelay_sip_flows", transport="ws") == 0


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([client_frame(Opcode.TEXT, b"x", mask=None)], 1002),
        ([client_frame(Opcode.CONTINUATION, b"x")], 1002),
        ([client_frame(Opcode.TEXT, b"a", fin=False), client_frame(Opcode.TEXT, b"b")], 1002),
        ([client_frame(Opcode.TEXT, b"\xff\xfe")], 1007),
        ([client_frame(Opcode.BINARY, b"x" * 2048)], 1009),
        (
            [
                client_frame(Opcode.BINARY, b"x" * 600, fin=False),
                client_frame(Opcode.CONTINUATION, b"x" * 600),
            ],
            1009,
        ),
    ],
    ids=["unmasked", "lone-continuation", "interleaved", "bad-utf8", "too-big", "too-big-parts"],
)
async def test_a_broken_client_frame_fails_the_connection_with_its_code(
    raw: Raw, recorder: Recorder, registry: CollectorRegistry, frames: list[bytes], code: int
) -> None:
    peer, _ = await raw(max_message_size=1024)
    peer.writer.write(b"".join(frames))
    assert await peer.frame() == (0x88, Opcode.CLOSE, code.to_bytes(2, "big"))
    assert await peer.closed()
    assert recorder.received.empty()
    assert sample(registry, "softrelay_sip_framing_errors_total", transport="ws") == 1
    assert sample(registry, "softrelay_sip_flows", transport="ws") == 0


async def test_a_reaped_flow_closes_with_1001_and_ends_on_the_peers_close(
    raw: Raw, recorder: Recorder, clock: ManualClock
) -> None:
    peer, _ = await raw()
    peer.writer.write(client_frame(Opcode.TEXT, sip("reaped")))
    await recorder.next()
    clock.advance(IDLE + 1)
    assert peer.transports.reap_idle() == 1
    assert await peer.frame() == (0x88, Opcode.CLOSE, (1001).to_bytes(2, "big"))
    peer.writer.write(client_frame(Opcode.TEXT, sip("late")))  # dropped after our close
    peer.writer.write(client_frame(Opcode.CLOSE, (1001).to_bytes(2, "big")))
    assert await peer.closed()
    assert recorder.received.empty()


async def test_aiohttp_keeps_nothing_of_an_upgraded_connection(
    ws_app: Any, recorder: Recorder
) -> None:
    """The browser-style client: once upgraded, aiohttp's server no longer holds the
    connection (no request handler, no task); the flow still works both ways."""
    client = await ws_app()
    server: web.Server = client.server.runner.server
    async with client.ws_connect(SIP_PATH, protocols=("sip",), autoping=False) as ws:
        await ws.send_str(sip("lean").decode())
        _, flow = await recorder.next()
        assert server.connections == []
        await ws.ping(b"p")
        pong = await ws.receive(TIMEOUT)
        assert (pong.type, pong.data) == (WSMsgType.PONG, b"p")
        await flow.send(OK)
        assert (await ws.receive(TIMEOUT)).data == OK.decode()
    assert flow.closed


async def test_the_http_guard_counts_an_upgraded_sip_websocket_and_never_times_it_as_a_head(
    start: Any, recorder: Recorder, clock: ManualClock
) -> None:
    guard = HttpGuard(HttpLimits(header_timeout=10.0), clock, CollectorRegistry())
    app = web.Application(middlewares=[guard.middleware, refusals])
    app[TRANSPORTS] = await start()
    add_sip_websocket(app, TRANSPORTS)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await GuardedSite(runner, "127.0.0.1", 0, guard).start()
        port = runner.addresses[0][1]
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"http://127.0.0.1:{port}{SIP_PATH}", protocols=("sip",)) as ws,
        ):
            await ws.send_str(sip("guarded").decode())
            _, flow = await recorder.next()
            assert guard.open == 1
            clock.advance(100.0)  # ten header timeouts after its last bytes
            assert guard.reap() == 0
            await flow.send(OK)
            assert (await ws.receive(TIMEOUT)).data == OK.decode()
        async with asyncio.timeout(TIMEOUT):
            while guard.open:  # noqa: ASYNC110 (the guard has no event; bounded)
                await asyncio.sleep(0)
    finally:
        await runner.cleanup()


async def test_a_bad_key_is_refused_with_400_and_a_wrong_version_with_426(ws_app: Any) -> None:
    client = await ws_app()
    base = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Protocol": "sip",
    }
    bad_key = base64.b64encode(os.urandom(10)).decode()
    async with client.get(SIP_PATH, headers={**base, "Sec-WebSocket-Key": bad_key}) as answer:
        assert answer.status == 400
        assert (await answer.json())["error"] == "websocket_key"
    old = {**base, "Sec-WebSocket-Key": KEY, "Sec-WebSocket-Version": "6"}
    async with client.get(SIP_PATH, headers=old) as answer:
        assert answer.status == 426
        assert answer.headers["Sec-WebSocket-Version"] == "13"
