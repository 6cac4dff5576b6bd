"""SIP transports on real loopback sockets: UDP, TCP, TLS and WebSocket deliver whole
messages with their flow, answer keep-alives, enforce their limits, reap quiet flows
when the injected clock moves, survive a failing handler, and stop without leaks."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from privacy.clock import ManualClock
from proxy.sip.flow import Flow, FlowClosed, Transport
from proxy.sip.link import Link
from proxy.sip.tls import server_tls_context
from proxy.sip.transport_settings import TransportLimits, TransportSettings
from proxy.sip.transports import SipTransports
from proxy.sip.websocket import SIP_PATH, add_sip_websocket
from push.fakes.certs import ThrowawayCa
from tests.backlog import BURST, queued_burst
from webapi.errors import refusals

TIMEOUT = 5.0  # a bound on waiting for the network, never a wait for time to pass
IDLE = 300.0

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter
Start = Callable[..., Awaitable[SipTransports]]
Connect = Callable[..., Awaitable[tuple[Reader, Writer]]]
TRANSPORTS = web.AppKey("sip_transports", SipTransports)


def sip(call: str = "1", body: bytes = b"") -> bytes:
    head = (
        f"OPTIONS sip:relay@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bK-{call}\r\n"
        f"Call-ID: {call}@test\r\n"
        f"CSeq: 1 OPTIONS\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Recorder:
    """The message handler of a test: records every message with its flow."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, Flow]] = asyncio.Queue()

    async def __call__(self, data: bytes, flow: Flow) -> None:
        await self.received.put((data, flow))

    async def next(self) -> tuple[bytes, Flow]:
        return await asyncio.wait_for(self.received.get(), TIMEOUT)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def start(
    clock: ManualClock, registry: CollectorRegistry, recorder: Recorder
) -> AsyncIterator[Start]:
    started: list[SipTransports] = []

    async def factory(
        handler: Any = None, *, tls_cert: Path | None = None, **limits: Any
    ) -> SipTransports:
        settings = TransportSettings(
            host="127.0.0.1",
            udp_port=0,
            tcp_port=0,
            tls_port=0 if tls_cert else None,
            tls_cert=tls_cert,
            limits=TransportLimits(idle_timeout=IDLE, **limits),
        )
        transports = await SipTransports.start(settings, handler or recorder, clock, registry)
        started.append(transports)
        return transports

    yield factory
    for transports in started:
        await transports.stop()


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Opens client connections; all are closed after the test."""
    writers: list[Writer] = []

    async def factory(address: tuple[str, int], **kwargs: Any) -> tuple[Reader, Writer]:
        reader, writer = await asyncio.open_connection(*address, **kwargs)
        writers.append(writer)
        return reader, writer

    yield factory
    for writer in writers:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):  # the server may have reset it
            await writer.wait_closed()


async def closed_by_server(reader: Reader) -> bool:
    """True once the server closed the connection (EOF or reset), False on data."""
    try:
        data = await asyncio.wait_for(reader.read(65536), TIMEOUT)
    except ConnectionError:
        return True
    return data == b""


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


class UdpClient(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.put_nowait(data)


@pytest.fixture
async def udp_client() -> AsyncIterator[Callable[[tuple[str, int]], Awaitable[Any]]]:
    transports: list[asyncio.DatagramTransport] = []

    async def factory(address: tuple[str, int]) -> tuple[asyncio.DatagramTransport, UdpClient]:
        transport, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
            UdpClient, remote_addr=address
        )
        transports.append(transport)
        return transport, protocol

    yield factory
    for transport in transports:
        transport.close()


# UDP ------------------------------------------------------------------------------


async def test_udp_datagram_reaches_handler_with_flow_and_reply_reaches_client(
    start: Start, recorder: Recorder, udp_client: Any, registry: CollectorRegistry
) -> None:
    transports = await start()
    client, protocol = await udp_client(transports.address(Transport.UDP))
    client.sendto(sip("udp"))
    data, flow = await recorder.next()
    assert data == sip("udp")
    assert flow.transport is Transport.UDP
    assert flow.remote == client.get_extra_info("sockname")[:2]
    await flow.send(b"SIP/2.0 200 OK\r\n\r\n")
    assert await asyncio.wait_for(protocol.received.get(), TIMEOUT) == b"SIP/2.0 200 OK\r\n\r\n"
    # A second datagram from the same address is the same flow.
    client.sendto(sip("again"))
    assert (await recorder.next())[1] is flow
    assert sample(registry, "softrelay_sip_flows", transport="udp") == 1


async def test_udp_crlf_keepalive_is_not_a_message(
    start: Start, recorder: Recorder, udp_client: Any
) -> None:
    transports = await start()
    client, _ = await udp_client(transports.address(Transport.UDP))
    client.sendto(b"\r\n\r\n")
    client.sendto(sip("after-keepalive"))
    data, _ = await recorder.next()
    assert data == sip("after-keepalive")
    assert recorder.received.empty()


async def test_udp_peer_is_forgotten_after_idle_timeout(
    start: Start, recorder: Recorder, udp_client: Any, clock: ManualClock
) -> None:
    transports = await start()
    client, _ = await udp_client(transports.address(Transport.UDP))
    client.sendto(sip("udp"))
    _, flow = await recorder.next()
    clock.advance(IDLE - 1)
    assert transports.reap_idle() == 0
    clock.advance(2)
    assert transports.reap_idle() == 1
    assert flow.closed
    with pytest.raises(FlowClosed):
        await flow.send(b"late")


async def test_udp_oversize_datagram_is_dropped_and_counted(
    start: Start, recorder: Recorder, udp_client: Any, registry: CollectorRegistry
) -> None:
    transports = await start(max_message_size=1024)
    client, _ = await udp_client(transports.address(Transport.UDP))
    client.sendto(sip("big", b"x" * 2048))
    client.sendto(sip("small"))
    assert (await recorder.next())[0] == sip("small")
    assert recorder.received.empty()
    assert sample(registry, "softrelay_sip_framing_errors_total", transport="udp") == 1


# TCP ------------------------------------------------------------------------------


async def test_tcp_message_written_in_pieces_arrives_once(
    start: Start, recorder: Recorder, connect: Connect, registry: CollectorRegistry
) -> None:
    transports = await start()
    _, writer = await connect(transports.address(Transport.TCP))
    message = sip("pieces", b"v=0\r\n")
    for i in range(0, len(message), 7):
        writer.write(message[i : i + 7])
        await writer.drain()
    data, flow = await recorder.next()
    assert data == message
    assert flow.transport is Transport.TCP
    assert recorder.received.empty()
    assert sample(registry, "softrelay_sip_flows", transport="tcp") == 1


async def test_tcp_two_messages_in_one_write_arrive_as_two_in_order(
    start: Start, recorder: Recorder, connect: Connect
) -> None:
    transports = await start()
    reader, writer = await connect(transports.address(Transport.TCP))
    writer.write(sip("first") + sip("second", b"body"))
    first, flow = await recorder.next()
    second, same_flow = await recorder.next()
    assert (first, second) == (sip("first"), sip("second", b"body"))
    assert same_flow is flow
    await flow.send(b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n")
    reply = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert reply == b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"


async def test_tcp_double_crlf_ping_gets_crlf_pong(
    start: Start, recorder: Recorder, connect: Connect
) -> None:
    transports = await start()
    reader, writer = await connect(transports.address(Transport.TCP))
    writer.write(b"\r\n\r\n")
    assert await asyncio.wait_for(reader.readexactly(2), TIMEOUT) == b"\r\n"
    assert recorder.received.empty()


async def test_tcp_oversize_message_closes_connection_and_counts(
    start: Start, recorder: Recorder, connect: Connect, registry: CollectorRegistry
) -> None:
    transports = await start(max_message_size=1024)
    reader, writer = await connect(transports.address(Transport.TCP))
    writer.write(sip("big", b"x" * 2048))
    assert await closed_by_server(reader)
    assert sample(registry, "softrelay_sip_framing_errors_total", transport="tcp") == 1
    assert recorder.received.empty()
    # The listener is unharmed.
    _, writer = await connect(transports.address(Transport.TCP))
    writer.write(sip("small"))
    assert (await recorder.next())[0] == sip("small")


async def test_tcp_garbage_after_a_message_closes_but_the_message_is_handled(
    start: Start, recorder: Recorder, connect: Connect, registry: CollectorRegistry
) -> None:
    transports = await start()
    reader, writer = await connect(transports.address(Transport.TCP))
    writer.write(sip("before") + b"NOT SIP, NO CONTENT-LENGTH\r\n\r\n")
    assert (await recorder.next())[0] == sip("before")
    assert await closed_by_server(reader)
    assert sample(registry, "softrelay_sip_framing_errors_total", transport="tcp") == 1
    assert (
        sample(registry, "softrelay_sip_flows_closed_total", transport="tcp", reason="framing") == 1
    )


async def test_per_ip_limit_refuses_one_connection_too_many_and_counts(
    start: Start, recorder: Recorder, connect: Connect, registry: CollectorRegistry
) -> None:
    transports = await start(max_connections_per_ip=2)
    address = transports.address(Transport.TCP)
    for call in ("a", "b"):
        _, writer = await connect(address)
        writer.write(sip(call))
        await recorder.next()  # admitted and served
    reader, _ = await connect(address)
    assert await closed_by_server(reader)
    assert sample(registry, "softrelay_sip_refused_total", transport="tcp", reason="per_ip") == 1


async def test_per_ip_limit_zero_is_off(
    start: Start, recorder: Recorder, connect: Connect, registry: CollectorRegistry
) -> None:
    transports = await start(max_connections_per_ip=0)
    address = transports.address(Transport.TCP)
    for call in ("a", "b", "c", "d"):
        _, writer = await connect(address)
        writer.write(sip(call))
        assert (await recorder.next())[0] == sip(call)
    assert sample(registry, "softrelay_sip_refused_total", transport="tcp", reason="per_ip") == 0


async def test_closed_connection_frees_its_per_ip_slot(
    start: Start, recorder: Recorder, connect: Connect
) -> None:
    transports = await start(max_connections_per_ip=1)
    address = transports.address(Transport.TCP)
    _, writer = await connect(address)
    writer.write(sip("first"))
    _, flow = await recorder.next()
    closed = asyncio.Event()
    flow.on_close.append(lambda _: closed.set())
    writer.close()
    await asyncio.wait_for(closed.wait(), TIMEOUT)
    _, writer = await connect(address)
    writer.write(sip("second"))
    assert (await recorder.next())[0] == sip("second")


async def test_total_connection_cap_refuses_and_counts(
    start: Start, recorder: Recorder, connect: Connect, registry: CollectorRegistry
) -> None:
    transports = await start(max_connections=1, max_connections_per_ip=0)
    address = transports.address(Transport.TCP)
    _, writer = await connect(address)
    writer.write(sip("only"))
    await recorder.next()
    reader, _ = await connect(address)
    assert await closed_by_server(reader)
    assert sample(registry, "softrelay_sip_refused_total", transport="tcp", reason="total") == 1


async def test_idle_reaping_closes_quiet_tcp_flow_and_keeps_active_one(
    start: Start,
    recorder: Recorder,
    connect: Connect,
    clock: ManualClock,
    registry: CollectorRegistry,
) -> None:
    transports = await start()
    address = transports.address(Transport.TCP)
    quiet_reader, quiet = await connect(address)
    quiet.write(sip("quiet"))
    _, quiet_flow = await recorder.next()
    active_reader, active = await connect(address)
    active.write(sip("active"))
    _, active_flow = await recorder.next()

    clock.advance(IDLE - 1)
    assert transports.reap_idle() == 0
    active.write(b"\r\n\r\n")  # a keep-alive is traffic
    assert await asyncio.wait_for(active_reader.readexactly(2), TIMEOUT) == b"\r\n"
    clock.advance(2)
    assert transports.reap_idle() == 1

    assert quiet_flow.closed
    assert not active_flow.closed
    assert await closed_by_server(quiet_reader)
    assert sample(registry, "softrelay_sip_flows_closed_total", transport="tcp", reason="idle") == 1
    assert sample(registry, "softrelay_sip_flows", transport="tcp") == 1


async def test_peer_that_does_not_read_blocks_senders_then_is_closed(
    start: Start, recorder: Recorder, registry: CollectorRegistry, clock: ManualClock
) -> None:
    transports = await start(write_buffer=64 * 1024, write_stall_timeout=30)
    async with not_reading_client(transports.address(Transport.TCP)):
        _, flow = await recorder.next()
        assert isinstance(flow.sender, Link)
        sending = asyncio.create_task(send_forever(flow, b"x" * 8192))
        try:
            # Once the kernel buffers are full, the sender waits for the peer.
            while not flow.sender.write_blocked():
                assert not sending.done()
                await asyncio.sleep(0)
            transports.reap_idle()  # notes the stall
            clock.advance(29)
            transports.reap_idle()
            assert not flow.closed
            clock.advance(2)
            transports.reap_idle()  # ends it
            with pytest.raises(FlowClosed):
                await asyncio.wait_for(sending, TIMEOUT)
        finally:
            sending.cancel()
    assert flow.closed
    assert (
        sample(registry, "softrelay_sip_flows_closed_total", transport="tcp", reason="stalled") == 1
    )


async def test_send_beyond_write_buffer_closes_the_flow(
    start: Start, recorder: Recorder, registry: CollectorRegistry
) -> None:
    transports = await start(write_buffer=64 * 1024)
    async with not_reading_client(transports.address(Transport.TCP)):
        _, flow = await recorder.next()
        # Sends not awaited one by one: a handler that ignores backpressure.
        results = await asyncio.gather(
            *(flow.send(b"x" * 65536) for _ in range(64)), return_exceptions=True
        )
        assert any(isinstance(result, FlowClosed) for result in results)
    assert flow.closed
    assert (
        sample(registry, "softrelay_sip_flows_closed_total", transport="tcp", reason="write_buffer")
        == 1
    )


@contextlib.asynccontextmanager
async def not_reading_client(address: tuple[str, int]) -> AsyncIterator[socket.socket]:
    """A client with a small receive buffer that sends one message and never reads."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, address)
        await loop.sock_sendall(sock, sip("hello"))
        yield sock
    finally:
        sock.close()


async def send_forever(flow: Flow, chunk: bytes) -> None:
    for _ in range(100_000):  # bounded; the kernel buffers fill long before
        await flow.send(chunk)


# Handler failures and shutdown ------------------------------------------------------


async def test_handler_that_raises_does_not_kill_the_transport(
    start: Start, recorder: Recorder, connect: Connect, registry: CollectorRegistry
) -> None:
    async def handler(data: bytes, flow: Flow) -> None:
        if b"boom" in data:
            raise ValueError("a message that breaks the handler")
        await recorder(data, flow)

    transports = await start(handler)
    _, writer = await connect(transports.address(Transport.TCP))
    writer.write(sip("boom") + sip("fine"))
    assert (await recorder.next())[0] == sip("fine")
    assert sample(registry, "softrelay_sip_handler_errors_total", transport="tcp") == 1


async def test_stop_closes_every_flow_and_leaks_nothing(
    start: Start,
    recorder: Recorder,
    connect: Connect,
    udp_client: Any,
    registry: CollectorRegistry,
) -> None:
    transports = await start()
    reader, writer = await connect(transports.address(Transport.TCP))
    writer.write(sip("tcp"))
    _, tcp_flow = await recorder.next()
    udp, _ = await udp_client(transports.address(Transport.UDP))
    udp.sendto(sip("udp"))
    _, udp_flow = await recorder.next()

    await transports.stop()

    assert tcp_flow.closed
    assert udp_flow.closed
    assert await closed_by_server(reader)
    for transport in ("tcp", "udp"):
        assert sample(registry, "softrelay_sip_flows", transport=transport) == 0
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(*transports.address(Transport.TCP))
    gc.collect()  # a leaked socket or transport warns now, and warnings are errors


# TLS ------------------------------------------------------------------------------


async def test_tls_message_round_trip(
    start: Start, recorder: Recorder, connect: Connect, tmp_path: Path
) -> None:
    ca = ThrowawayCa.create(tmp_path)
    transports = await start(tls_cert=ca.issue_server())
    reader, writer = await connect(
        transports.address(Transport.TLS), ssl=ca.client_context(), server_hostname="localhost"
    )
    writer.write(sip("tls"))
    data, flow = await recorder.next()
    assert data == sip("tls")
    assert flow.transport is Transport.TLS
    await flow.send(b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n")
    reply = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert reply.startswith(b"SIP/2.0 200 OK")


# WebSocket ------------------------------------------------------------------------


@pytest.fixture
async def ws_app(start: Start) -> AsyncIterator[Callable[..., Awaitable[TestClient[Any, Any]]]]:
    clients: list[TestClient[Any, Any]] = []

    async def factory(tls: ssl.SSLContext | None = None, **limits: Any) -> TestClient[Any, Any]:
        app = web.Application(middlewares=[refusals])  # renders the refusals, as in build_app
        app[TRANSPORTS] = await start(**limits)
        add_sip_websocket(app, TRANSPORTS)
        server = TestServer(app)
        await server.start_server(ssl=tls)
        client: TestClient[Any, Any] = TestClient(server)
        await client.start_server()
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.close()


async def test_websocket_with_sip_subprotocol_round_trip(
    ws_app: Any, recorder: Recorder, registry: CollectorRegistry
) -> None:
    client = await ws_app()
    async with client.ws_connect(SIP_PATH, protocols=("sip",)) as ws:
        assert ws.protocol == "sip"
        await ws.send_str(sip("ws").decode())
        data, flow = await recorder.next()
        assert data == sip("ws")
        assert flow.transport is Transport.WS
        assert sample(registry, "softrelay_sip_flows", transport="ws") == 1
        await flow.send(b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n")
        reply = await ws.receive(TIMEOUT)
        assert reply.type is WSMsgType.TEXT
        assert reply.data == "SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"
        await ws.send_bytes(sip("binary"))
        assert (await recorder.next())[0] == sip("binary")
        await ws.send_str("\r\n\r\n")
        assert (await ws.receive(TIMEOUT)).data == "\r\n"


async def test_websocket_over_tls_is_a_wss_flow(
    ws_app: Any, recorder: Recorder, tmp_path: Path
) -> None:
    ca = ThrowawayCa.create(tmp_path)
    client = await ws_app(tls=server_tls_context(ca.issue_server()))
    async with client.ws_connect(SIP_PATH, protocols=("sip",), ssl=ca.client_context()) as ws:
        await ws.send_str(sip("wss").decode())
        data, flow = await recorder.next()
        assert data == sip("wss")
        assert flow.transport is Transport.WSS
        await flow.send(b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n")
        assert (await ws.receive(TIMEOUT)).data.startswith("SIP/2.0 200 OK")


async def test_websocket_without_sip_subprotocol_is_refused(ws_app: Any) -> None:
    client = await ws_app()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(SIP_PATH)
    assert refused.value.status == 400
    async with client.get(
        SIP_PATH,
        headers={
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Protocol": "chat",
        },
    ) as response:
        assert response.status == 400
        assert (await response.json())["error"] == "subprotocol_required"
    async with client.get(SIP_PATH) as response:
        assert response.status == 426
        assert (await response.json())["error"] == "websocket_required"


async def test_websocket_counts_against_per_ip_limit_of_stream_transports(
    ws_app: Any, recorder: Recorder, connect: Connect, registry: CollectorRegistry
) -> None:
    client = await ws_app(max_connections_per_ip=1)
    transports = client.app[TRANSPORTS]
    _, writer = await connect(transports.address(Transport.TCP))
    writer.write(sip("tcp"))
    await recorder.next()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(SIP_PATH, protocols=("sip",))
    assert refused.value.status == 429
    assert sample(registry, "softrelay_sip_refused_total", transport="ws", reason="per_ip") == 1


async def test_websocket_oversize_message_closes_and_counts(
    ws_app: Any, recorder: Recorder, registry: CollectorRegistry
) -> None:
    client = await ws_app(max_message_size=1024)
    async with client.ws_connect(SIP_PATH, protocols=("sip",)) as ws:
        await ws.send_bytes(sip("big", b"x" * 2048))
        closing = await ws.receive(TIMEOUT)
        assert closing.type is WSMsgType.CLOSE
        assert closing.data == WSCloseCode.MESSAGE_TOO_BIG
    assert sample(registry, "softrelay_sip_framing_errors_total", transport="ws") == 1
    assert recorder.received.empty()


async def test_websocket_idle_flow_is_reaped(
    ws_app: Any, recorder: Recorder, clock: ManualClock
) -> None:
    client = await ws_app()
    transports = client.app[TRANSPORTS]
    async with client.ws_connect(SIP_PATH, protocols=("sip",)) as ws:
        await ws.send_str(sip("ws").decode())
        _, flow = await recorder.next()
        clock.advance(IDLE + 1)
        assert transports.reap_idle() == 1
        closing = await ws.receive(TIMEOUT)
        assert closing.type is WSMsgType.CLOSE
        assert closing.data == WSCloseCode.GOING_AWAY
    assert flow.closed


async def test_app_shutdown_closes_websockets(ws_app: Any, recorder: Recorder) -> None:
    client = await ws_app()
    ws = await client.ws_connect(SIP_PATH, protocols=("sip",))
    await ws.send_str(sip("ws").decode())
    _, flow = await recorder.next()
    await client.server.close()  # runs on_shutdown while the WebSocket is open
    closing = await ws.receive(TIMEOUT)
    assert closing.type is WSMsgType.CLOSE
    assert closing.data == WSCloseCode.GOING_AWAY
    assert flow.closed
    await ws.close()


async def test_stop_lets_a_handler_in_flight_answer_before_closing(
    start: Start, connect: Connect
) -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def handler(data: bytes, flow: Flow) -> None:
        started.set()
        await release.wait()
        await flow.send(b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n")

    transports = await start(handler)
    reader, writer = await connect(transports.address(Transport.TCP))
    writer.write(sip("in-flight"))
    await asyncio.wait_for(started.wait(), TIMEOUT)
    stopping = asyncio.create_task(transports.stop())
    for _ in range(100):  # yield until stop() waits (a stop that did not would close now)
        await asyncio.sleep(0)
    assert not stopping.done()
    release.set()
    reply = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert reply.startswith(b"SIP/2.0 200 OK")
    assert await closed_by_server(reader)
    await asyncio.wait_for(stopping, TIMEOUT)


async def test_tcp_and_tls_listeners_queue_a_burst_of_connections(
    start: Start, tmp_path: Path
) -> None:
    """Phones reconnecting at once (a node restart): the kernel holds them all until the
    relay accepts, instead of dropping SYNs past asyncio's default backlog of 100."""
    transports = await start(tls_cert=ThrowawayCa.create(tmp_path).issue_server())
    for kind in (Transport.TCP, Transport.TLS):
        assert queued_burst(transports.address(kind)[1]) == BURST, kind
