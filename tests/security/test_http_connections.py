"""The HTTP port holds under slow clients (issue 14, point 5).

aiohttp's server on a `GuardedSite`: one address cannot hold more than its share of
connections, a request head must arrive whole within the header timeout (the reaper
is driven by hand on an injected clock), and meanwhile a client from another 127.x
address is served. Nothing here waits on time passing: every wait is for an event
(a connection attached or gone, an answer, an end of stream), bounded by TIMEOUT."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from prometheus_client import CollectorRegistry

from privacy.clock import ManualClock
from proxy.connections import GuardedSite, HttpGuard, HttpLimits
from proxy.http import refusals

TIMEOUT = 10.0
HEADER_TIMEOUT = 10.0
SLOW_HEAD = b"GET /healthz HTTP/1.1\r\nHost: relay\r\nX-Slow: 1\r\n"  # never finished


class WatchedGuard(HttpGuard):
    """The guard, with an event per change of its connections (our seam)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.changed = asyncio.Event()
        self.arrivals = 0  # reads of bytes, handed on to aiohttp

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
            HttpLimits(header_timeout=HEADER_TIMEOUT, **limits), clock, CollectorRegistry()
        )
        app = web.Application(middlewares=[guard.middleware, refusals])
        app.router.add_get("/healthz", healthz)
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
        clock.advance(10 * HEADER_TIMEOUT)
        assert guard.reap() == 0
        await ws.send_str("still here")
        assert (await asyncio.wait_for(ws.receive(), TIMEOUT)).data == "still here"
        assert guard.open == 1  # and it counts against the limits
