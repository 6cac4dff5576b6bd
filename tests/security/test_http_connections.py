"""The HTTP port holds under slow clients (issue 14, point 5).

aiohttp's server on a `GuardedSite`: one address cannot hold more than its share of
connections, a request head must arrive whole within the header timeout, a body
within the body timeout of its head, and an answer the client does not read is cut
after the write timeout (the reaper is driven by hand on an injected clock); meanwhile
a client from another 127.x address is served. Nothing here waits on time passing:
every wait is for an event (a connection attached or gone, an answer, an end of
stream), bounded by TIMEOUT."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from prometheus_client import CollectorRegistry

from privacy.clock import ManualClock
from softrelay.config import ConfigError, load_config
from tests.backlog import BURST, queued_burst
from webapi.connections import GuardedSite, HttpGuard, HttpLimits
from webapi.errors import refusals

TIMEOUT = 10.0
HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 20.0
WRITE_TIMEOUT = 15.0
BIG_ANSWER = 64 * 1024 * 1024  # far more than any socket buffers hold
SLOW_HEAD = b"GET /healthz HTTP/1.1\r\nHost: relay\r\nX-Slow: 1\r\n"  # never finished


class WatchedGuard(HttpGuard):
    """The guard, with an event per change of its connections (our seam)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.changed = asyncio.Event()
        self.arrivals = 0  # reads of bytes, handed on to aiohttp
        self.paused = 0  # times a connection's writes were paused
        self.entered = 0  # requests that reached a handler of the test app
        self.left = 0  # and that left it, answered or not
        self.release = asyncio.Event()  # lets /slow-handler answer

    def attach(self, *args: Any) -> None:
        super().attach(*args)
        self.changed.set()

    def detach(self, *args: Any) -> None:
        super().detach(*args)
        self.changed.set()

    def bytes_arrived(self, *args: Any) -> None:
        super().bytes_arrived(*args)
        self.arrivals += 1
        self.changed.set()

    def write_paused(self, *args: Any) -> None:
        super().write_paused(*args)
        self.paused += 1
        self.changed.set()

    def admit(self, *args: Any) -> str | None:
        reason = super().admit(*args)
        self.changed.set()
        return reason

    async def next_arrival(self) -> None:
        seen = self.arrivals
        await self.until(lambda: self.arrivals > seen)

    async def until(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(TIMEOUT):
            while not condition():
                self.changed.clear()
                await self.changed.wait()


Serve = Callable[..., Awaitable[tuple[WatchedGuard, int]]]


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


GUARD = web.AppKey("guard", WatchedGuard)


async def upload(request: web.Request) -> web.Response:
    """Reads the whole body, as every body-taking handler of ours does."""
    guard = request.app[GUARD]
    guard.entered += 1
    guard.changed.set()
    try:
        body = await request.read()
        return web.json_response({"length": len(body)})
    finally:
        guard.left += 1
        guard.changed.set()


async def slow_handler(request: web.Request) -> web.Response:
    """Reads its body, then works until the test lets it answer."""
    guard = request.app[GUARD]
    body = await request.read()
    guard.entered += 1
    guard.changed.set()
    await guard.release.wait()
    return web.json_response({"length": len(body)})


async def big(request: web.Request) -> web.StreamResponse:
    """A large streamed answer (a firmware image through the provisioning relay)."""
    guard = request.app[GUARD]
    guard.entered += 1
    guard.changed.set()
    response = web.StreamResponse()
    try:
        await response.prepare(request)
        chunk = b"f" * 65536
        for _ in range(BIG_ANSWER // len(chunk)):
            await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        guard.left += 1
        guard.changed.set()


async def echo_ws(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            await ws.send_str(msg.data)
    return ws


@pytest.fixture
async def serve(clock: ManualClock) -> AsyncIterator[Serve]:
    runners: list[web.AppRunner] = []

    async def start(**limits: Any) -> tuple[WatchedGuard, int]:
        guard = WatchedGuard(
            HttpLimits(
                **{
                    "header_timeout": HEADER_TIMEOUT,
                    "body_timeout": BODY_TIMEOUT,
                    "write_timeout": WRITE_TIMEOUT,
                    **limits,
                }
            ),
            clock,
            CollectorRegistry(),
        )
        app = web.Application(middlewares=[guard.middleware, refusals])
        app[GUARD] = guard
        app.router.add_get("/healthz", healthz)
        app.router.add_post("/upload", upload)
        app.router.add_post("/slow-handler", slow_handler)
        app.router.add_get("/big", big)
        app.router.add_get("/ws", echo_ws)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        runners.append(runner)
        site = GuardedSite(runner, "127.0.0.1", 0, guard)
        await site.start()
        return guard, runner.addresses[0][1]

    yield start
    for runner in runners:
        await runner.cleanup()


Connect = Callable[[int, str], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Raw connections from a chosen 127.x source address, all closed after the test."""
    writers: list[asyncio.StreamWriter] = []

    async def open_one(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), TIMEOUT
        )
        writers.append(writer)
        return reader, writer

    yield open_one
    for writer in writers:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def cut(reader: asyncio.StreamReader) -> bool:
    """True once the server ended the connection without answering a byte."""
    try:
        data = await asyncio.wait_for(reader.read(), TIMEOUT)
    except ConnectionResetError:
        return True
    return data == b""


async def served(port: int, source: str) -> int:
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(f"http://127.0.0.1:{port}/healthz") as answer,
    ):
        return answer.status


def sample(guard: HttpGuard, name: str, reason: str) -> float:
    metric = guard.refused if name == "refused" else guard.closed
    return float(metric.labels(reason)._value.get())


async def test_one_address_is_cut_at_its_limit_while_another_is_served(
    serve: Serve, connect: Connect
) -> None:
    guard, port = await serve(max_connections_per_ip=3)
    slow = []
    for _ in range(3):
        reader, writer = await connect(port, "127.0.0.2")
        writer.write(SLOW_HEAD)
        slow.append((reader, writer))
    await guard.until(lambda: guard.open == 3)

    reader, _ = await connect(port, "127.0.0.2")  # one too many from this address
    assert await cut(reader)
    assert sample(guard, "refused", "per_ip") == 1
    # Another address is not affected.
    assert await served(port, "127.0.0.3") == 200
    for _, writer in slow:
        writer.close()


async def test_a_head_that_does_not_arrive_in_time_is_cut_and_frees_the_slot(
    serve: Serve, connect: Connect, clock: ManualClock
) -> None:
    guard, port = await serve(max_connections_per_ip=2)
    slow = []
    for _ in range(2):
        reader, writer = await connect(port, "127.0.0.2")
        writer.write(SLOW_HEAD)
        slow.append((reader, writer))
    await guard.until(lambda: guard.open == 2)
    # A kept-alive client of another address, between two requests.
    ka_reader, ka_writer = await connect(port, "127.0.0.3")
    request = b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n"
    ka_writer.write(request)
    assert (await asyncio.wait_for(ka_reader.readline(), TIMEOUT)).startswith(b"HTTP/1.1 200")

    clock.advance(HEADER_TIMEOUT - 1)
    assert guard.reap() == 0
    clock.advance(2)
    assert guard.reap() == 2  # the two slow heads; not the idle kept-alive connection
    for reader, _ in slow:
        assert await cut(reader)
    assert sample(guard, "closed", "header_timeout") == 2
    await guard.until(lambda: guard.open == 1)
    # Their slots are free again, and the kept-alive connection still answers.
    assert await served(port, "127.0.0.2") == 200
    await ka_reader.readuntil(b'{"status": "ok"}')
    ka_writer.write(request)
    assert (await asyncio.wait_for(ka_reader.readline(), TIMEOUT)).startswith(b"HTTP/1.1 200")
    ka_writer.close()


async def test_dribbling_a_head_line_by_line_does_not_reset_its_timeout(
    serve: Serve, connect: Connect, clock: ManualClock
) -> None:
    """Dribbling a head one line at a time does not reset the timeout: the whole head
    must arrive within it."""
    guard, port = await serve()
    reader, writer = await connect(port, "127.0.0.2")
    await guard.until(lambda: guard.open == 1)
    for line in SLOW_HEAD.splitlines(keepends=True):
        arrived = guard.next_arrival()
        writer.write(line)
        await arrived  # aiohttp has the line
        clock.advance(HEADER_TIMEOUT / 4)
        assert guard.reap() == 0
    clock.advance(HEADER_TIMEOUT / 4)  # the head began HEADER_TIMEOUT ago
    assert guard.reap() == 1
    assert await cut(reader)


async def test_the_total_cap_refuses_whatever_the_address(serve: Serve, connect: Connect) -> None:
    guard, port = await serve(max_connections=2, max_connections_per_ip=0)
    writers = []
    for source in ("127.0.0.2", "127.0.0.3"):
        _, writer = await connect(port, source)
        writer.write(SLOW_HEAD)
        writers.append(writer)
    await guard.until(lambda: guard.open == 2)
    reader, _ = await connect(port, "127.0.0.4")
    assert await cut(reader)
    assert sample(guard, "refused", "total") == 1
    for writer in writers:
        writer.close()
    await guard.until(lambda: guard.open == 0)
    assert await served(port, "127.0.0.4") == 200


async def test_a_per_ip_limit_of_zero_is_off(serve: Serve, connect: Connect) -> None:
    """Behind a load balancer every client has the balancer's address."""
    guard, port = await serve(max_connections_per_ip=0)
    writers = []
    for _ in range(5):
        _, writer = await connect(port, "127.0.0.2")
        writer.write(SLOW_HEAD)
        writers.append(writer)
    await guard.until(lambda: guard.open == 5)
    assert sample(guard, "refused", "per_ip") == 0
    for writer in writers:
        writer.close()


async def test_an_upgraded_websocket_is_never_reaped_as_a_slow_head(
    serve: Serve, connect: Connect, clock: ManualClock
) -> None:
    """SIP over WebSocket rides this port: once upgraded, the connection is in its
    handler for good, and only the SIP transports reap it."""
    guard, port = await serve(max_connections_per_ip=2)
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.ws_connect(f"http://127.0.0.1:{port}/ws") as ws,
    ):
        # Past the head, body and write timeouts alike: a quiet WebSocket that reads
        # what it is sent is none of them.
        clock.advance(10 * max(HEADER_TIMEOUT, BODY_TIMEOUT, WRITE_TIMEOUT))
        assert guard.reap() == 0
        await ws.send_str("still here")
        assert (await asyncio.wait_for(ws.receive(), TIMEOUT)).data == "still here"
        assert guard.open == 1  # and it counts against the limits


def upload_head(framing: bytes) -> bytes:
    return b"POST /upload HTTP/1.1\r\nHost: relay\r\n" + framing + b"\r\n\r\n"


@pytest.mark.parametrize(
    ("framing", "trickle"),
    [
        (b"Content-Length: 1000000", [b"x", b"y", b"z"]),
        (b"Transfer-Encoding: chunked", [b"1\r\nx\r\n", b"1\r\ny\r\n", b"1\r\nz\r\n"]),
    ],
    ids=["content-length", "chunked"],
)
async def test_a_trickled_body_is_cut_at_the_body_timeout_and_frees_its_handler(
    serve: Serve, connect: Connect, clock: ManualClock, framing: bytes, trickle: list[bytes]
) -> None:
    """Its head came in time; each byte of the body resets nothing."""
    guard, port = await serve(max_connections_per_ip=1)
    reader, writer = await connect(port, "127.0.0.2")
    writer.write(upload_head(framing))
    await guard.until(lambda: guard.entered == 1)
    for piece in trickle:
        arrived = guard.next_arrival()
        writer.write(piece)
        await arrived
        clock.advance(BODY_TIMEOUT / 4)
        assert guard.reap() == 0
    clock.advance(BODY_TIMEOUT / 4)  # the head arrived BODY_TIMEOUT ago
    assert guard.reap() == 1
    assert await cut(reader)
    await guard.until(lambda: guard.left == 1 and guard.open == 0)
    assert sample(guard, "closed", "body_timeout") == 1
    assert await served(port, "127.0.0.2") == 200  # its address's slot is free again


async def test_a_body_that_arrived_in_time_is_not_cut_however_long_its_handler_works(
    serve: Serve, connect: Connect, clock: ManualClock
) -> None:
    guard, port = await serve()
    reader, writer = await connect(port, "127.0.0.2")
    writer.write(b"POST /slow-handler HTTP/1.1\r\nHost: relay\r\nContent-Length: 5\r\n\r\nhello")
    await guard.until(lambda: guard.entered == 1)
    clock.advance(10 * BODY_TIMEOUT)
    assert guard.reap() == 0
    guard.release.set()
    assert (await asyncio.wait_for(reader.readline(), TIMEOUT)).startswith(b"HTTP/1.1 200")
    await reader.readuntil(b'{"length": 5}')
    writer.close()


async def test_pipelined_requests_are_answered_and_a_dribbled_one_behind_them_is_cut(
    serve: Serve, connect: Connect, clock: ManualClock
) -> None:
    """Two whole requests in one write are both answered; a third head dribbled in
    after their answers is timed like any head."""
    guard, port = await serve()
    reader, writer = await connect(port, "127.0.0.2")
    request = b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n"
    writer.write(request + upload_head(b"Content-Length: 3") + b"abc")
    for expected in (b'{"status": "ok"}', b'{"length": 3}'):
        assert (await asyncio.wait_for(reader.readline(), TIMEOUT)).startswith(b"HTTP/1.1 200")
        await asyncio.wait_for(reader.readuntil(expected), TIMEOUT)
    await guard.until(lambda: guard.left == 1)
    arrived = guard.next_arrival()
    writer.write(SLOW_HEAD)
    await arrived
    clock.advance(HEADER_TIMEOUT - 1)
    assert guard.reap() == 0
    clock.advance(2)
    assert guard.reap() == 1
    assert await cut(reader)


async def test_a_client_that_does_not_read_its_answer_is_cut_at_the_write_timeout(
    serve: Serve, clock: ManualClock
) -> None:
    """A phone that asks for a firmware image and never reads it: the server's writes
    wait (the buffers are full), and after the write timeout the connection is cut and
    the handler freed, so it holds no upstream stream either."""
    guard, port = await serve()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
    sock.bind(("127.0.0.2", 0))
    sock.setblocking(False)
    try:
        await asyncio.wait_for(
            asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), TIMEOUT
        )
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: relay\r\n\r\n")
        await guard.until(lambda: guard.paused >= 1)
        clock.advance(WRITE_TIMEOUT - 1)
        assert guard.reap() == 0
        clock.advance(2)
        assert guard.reap() == 1
        await guard.until(lambda: guard.left == 1 and guard.open == 0)
        assert sample(guard, "closed", "write_timeout") == 1
    finally:
        sock.close()
    assert await served(port, "127.0.0.2") == 200


def test_the_body_and_write_timeouts_are_read_from_the_http_section(tmp_path: Path) -> None:
    config = tmp_path / "softrelay.toml"
    config.write_text('[http]\nbody_timeout = "2m"\nwrite_timeout = "5s"\n')
    limits = load_config(config).http
    assert (limits.body_timeout, limits.write_timeout) == (120, 5)
    config.write_text('[http]\nbody_timeout = "0s"\n')
    with pytest.raises(ConfigError, match="body_timeout"):
        load_config(config)


async def test_the_listener_queues_a_burst_of_connections(serve: Serve) -> None:
    """WebSocket phones reconnecting at once: none is dropped by a short accept queue."""
    _, port = await serve()
    assert queued_burst(port) == BURST
