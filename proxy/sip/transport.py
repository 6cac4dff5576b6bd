"""SIP over UDP, TCP and TLS: listeners that turn bytes into flows and messages.

`SipTransports` owns every SIP listener and every flow: it admits connections (a cap
in total and, optionally, per source address), hands each complete message with its
flow to one `MessageHandler`, answers RFC 5626 CRLF keep-alives, reaps flows that
went quiet, and closes peers that do not read what is sent to them. SIP over
WebSocket (`proxy.sip.websocket`) runs on the aiohttp application but registers its
flows here, so the limits, the reaper and the metrics cover it as well.

Messages of one flow reach the handler one after the other, in order (a CANCEL never
overtakes its INVITE); flows run concurrently. A worker task exists only while a flow
has messages waiting, so idle flows cost no task. A stream flow with too many
messages waiting stops being read, which pushes back on the peer through TCP.

Nothing here logs message bytes or addresses: a log line names the event and the
exception class, and the metrics count by transport and reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
from collections import Counter, OrderedDict, deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, cast

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import Counter as MetricCounter

from privacy.clock import Clock
from proxy.sip.flow import (
    Address,
    Flow,
    FlowClosed,
    MessageHandler,
    Transport,
    certificate_names,
)
from proxy.sip.framing import (
    PONG,
    FramingError,
    Item,
    Keepalive,
    StreamFramer,
    datagram_keepalive,
)
from proxy.sip.message import MAX_MESSAGE_SIZE

log = logging.getLogger("softrelay.sip")

# Bounds of the graceful part of `stop()`; past them the rest is aborted.
STOP_GRACE = 5.0
TLS_HANDSHAKE_TIMEOUT = 10.0  # a handshake is not yet a counted connection: keep it short
TLS_SHUTDOWN_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class TransportLimits:
    max_message_size: int = MAX_MESSAGE_SIZE
    max_connections: int = 100_000  # TCP, TLS and WebSocket together
    max_connections_per_ip: int = 100  # 0 turns it off (everyone behind a load balancer)
    max_udp_flows: int = 100_000  # UDP peers remembered; the least recently heard is evicted
    idle_timeout: float = 300.0  # seconds without traffic from the peer
    write_stall_timeout: float = 30.0  # seconds a peer may leave our writes unread
    write_buffer: int = 256 * 1024  # bytes queued for one peer before it is closed
    max_pending: int = 32  # messages of one flow waiting for the handler

    def __post_init__(self) -> None:
        for name in ("max_message_size", "max_connections", "max_udp_flows", "max_pending"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_connections_per_ip < 0:
            raise ValueError("max_connections_per_ip must be 0 (off) or more")
        if self.idle_timeout <= 0 or self.write_stall_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if self.write_buffer < max(4096, self.max_message_size):
            raise ValueError("write_buffer must hold a whole message (and 4096 bytes at least)")

    @property
    def write_high_water(self) -> int:
        """Senders wait for the peer above this; past `write_buffer` the peer is closed."""
        return self.write_buffer // 4

    @property
    def reap_interval(self) -> float:
        return max(1.0, min(self.idle_timeout, self.write_stall_timeout) / 4)


@dataclass(frozen=True, slots=True)
class TransportSettings:
    host: str = "127.0.0.1"
    udp_port: int | None = 5060  # None: no listener of that transport; 0: any free port
    tcp_port: int | None = 5060
    tls_port: int | None = None
    tls_cert: Path | None = None  # PEM certificate chain; holds the key too if tls_key is None
    tls_key: Path | None = None
    # PEM file of the CA(s) whose client certificates TLS peers may present (mutual TLS
    # for PBXs); None: no client certificate is asked for.
    tls_client_ca: Path | None = None
    limits: TransportLimits = field(default_factory=TransportLimits)

    def __post_init__(self) -> None:
        if self.tls_port is not None and self.tls_cert is None:
            raise ValueError("a TLS port needs a certificate (tls_cert)")


def server_tls_context(
    cert: Path, key: Path | None = None, client_ca: Path | None = None
) -> ssl.SSLContext:
    """The TLS listener's context. With `client_ca`, a client certificate is asked for
    but optional (phones have none): one that is sent must chain to `client_ca`, and
    only to it (no system CAs), or the handshake fails."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


class Refusal(StrEnum):
    """Why a connection was turned away (the `reason` label of the metric)."""

    PER_IP = "per_ip"
    TOTAL = "total"
    STOPPING = "stopping"


class SipMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.flows = Gauge(
            "softrelay_sip_flows", "Open SIP flows", ["transport"], registry=registry
        )
        self.received = MetricCounter(
            "softrelay_sip_messages_received",
            "SIP messages handed to the handler",
            ["transport"],
            registry=registry,
        )
        self.dropped = MetricCounter(
            "softrelay_sip_messages_dropped",
            "Messages dropped before the handler: overload, stopping, send_buffer",
            ["transport", "reason"],
            registry=registry,
        )
        self.refused = MetricCounter(
            "softrelay_sip_refused",
            "Connections refused: per_ip, total, stopping",
            ["transport", "reason"],
            registry=registry,
        )
        self.closed = MetricCounter(
            "softrelay_sip_flows_closed",
            "Flows the relay closed: idle, stalled, write_buffer, framing, evicted",
            ["transport", "reason"],
            registry=registry,
        )
        self.framing_errors = MetricCounter(
            "softrelay_sip_framing_errors",
            "Oversize or unframeable input",
            ["transport"],
            registry=registry,
        )
        self.handler_errors = MetricCounter(
            "softrelay_sip_handler_errors",
            "Exceptions raised by the message handler",
            ["transport"],
            registry=registry,
        )
        for transport in Transport:
            self.flows.labels(transport.value)
        # Bound once: a label look-up per message costs more than the count itself.
        self.received_on = {t: self.received.labels(t.value) for t in Transport}


class Link:
    """What the transports keep for one flow: when the peer was last heard, since when
    our writes stall, and the messages waiting for the handler."""

    __slots__ = ("flow", "last_seen", "pending", "stalled_since", "worker")

    flow: Flow  # set by each subclass as soon as its flow exists

    def __init__(self) -> None:
        self.last_seen = 0.0
        self.stalled_since: float | None = None
        self.pending: deque[bytes] | None = None
        self.worker: asyncio.Task[None] | None = None

    def write_blocked(self) -> bool:
        return False

    def pause_reading(self) -> None:
        """Stop reading from the peer until the handler caught up (streams only)."""

    def resume_reading(self) -> None:
        pass

    def abort(self) -> None:
        """Drop the connection at once, discarding what is still queued for the peer."""


class SipTransports:
    """The SIP listeners and all flows; created by `start`, ended by `stop`."""

    def __init__(
        self,
        settings: TransportSettings,
        handler: MessageHandler,
        clock: Clock,
        metrics: SipMetrics,
    ) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.metrics = metrics
        self.addresses: list[tuple[Transport, Address]] = []
        self._handler = handler
        self._clock = clock
        self._servers: list[asyncio.Server] = []
        self._udp: _UdpEndpoint | None = None
        # Ordered by last activity, so the least recently heard peer is first.
        self._udp_peers: OrderedDict[Address, _UdpPeer] = OrderedDict()
        self._links: dict[Flow, Link] = {}  # open connection flows (TCP, TLS, WS)
        self._live: set[Link] = set()  # connections not yet fully gone (closing included)
        self._gone: asyncio.Future[None] | None = None
        self._connections = 0
        self._per_source: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._stopping = False

    @classmethod
    async def start(
        cls,
        settings: TransportSettings,
        handler: MessageHandler,
        clock: Clock,
        registry: CollectorRegistry,
    ) -> SipTransports:
        self = cls(settings, handler, clock, SipMetrics(registry))
        loop = asyncio.get_running_loop()
        host = settings.host
        try:
            if settings.udp_port is not None:
                self._udp = endpoint = _UdpEndpoint(self)
                udp, _ = await loop.create_datagram_endpoint(
                    lambda: endpoint, local_addr=(host, settings.udp_port)
                )
                self.addresses.append((Transport.UDP, _address(udp.get_extra_info("sockname"))))
            if settings.tcp_port is not None:
                await self._listen(Transport.TCP, settings.tcp_port, None)
            if settings.tls_port is not None:
                assert settings.tls_cert is not None
                context = server_tls_context(
                    settings.tls_cert, settings.tls_key, settings.tls_client_ca
                )
                await self._listen(Transport.TLS, settings.tls_port, context)
        except BaseException:
            await self.stop()
            raise
        self._reaper = asyncio.create_task(self._reap_forever(), name="sip-reaper")
        for transport, (addr_host, port) in self.addresses:
            listen = f"{transport}:{addr_host}:{port}"
            log.info("sip.listening", extra={"fields": {"listen": listen}})
        return self

    async def _listen(self, kind: Transport, port: int, context: ssl.SSLContext | None) -> None:
        loop = asyncio.get_running_loop()
        host = self.settings.host
        if context is None:
            server = await loop.create_server(lambda: _StreamLink(self, kind), host, port)
        else:
            server = await loop.create_server(
                lambda: _StreamLink(self, kind),
                host,
                port,
                ssl=context,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
                ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT,
            )
        self._servers.append(server)
        self.addresses.extend((kind, _address(s.getsockname())) for s in server.sockets)

    def address(self, kind: Transport) -> Address:
        """Where the listener of a transport is bound (the real port when 0 was asked)."""
        for transport, addr in self.addresses:
            if transport is kind:
                return addr
        raise LookupError(f"no {kind} listener")

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop accepting, let the handlers in flight answer, close every flow, and wait
        until every connection is gone. What is still running after `grace` is ended."""
        if self._stopping:
            return
        self._stopping = True
        loop = asyncio.get_running_loop()
        self._gone = loop.create_future()
        for server in self._servers:
            server.close()
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for link in self._links.values():
            link.pause_reading()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
        for flow in list(self._links):
            flow.close()
        for peer in list(self._udp_peers.values()):
            peer.flow.close()
        if self._udp is not None:
            self._udp.close()
        if not self._gone.done() and not self._live:
            self._gone.set_result(None)
        await asyncio.wait([self._gone], timeout=grace)
        for link in list(self._live):
            link.abort()
        if self._udp is not None:
            await self._udp.lost
        await asyncio.wait([self._gone], timeout=grace)
        if self._tasks:  # what is left: closing handshakes, handlers past their grace
            await asyncio.wait(set(self._tasks), timeout=grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()

    # Idle reaping --------------------------------------------------------------------

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.limits.reap_interval)
            try:
                self.reap_idle()
            except Exception as exc:
                log.warning("sip.reap_failed", extra={"fields": {"error": type(exc).__name__}})

    def reap_idle(self) -> int:
        """Close flows whose peer was quiet for `idle_timeout` or left our writes unread
        for `write_stall_timeout`, and forget quiet UDP peers. Returns how many."""
        now = self._clock.now()
        idle_before = now - self.limits.idle_timeout
        closing: list[tuple[Link, str]] = []
        for link in self._links.values():
            if link.last_seen <= idle_before:
                closing.append((link, "idle"))
            elif link.write_blocked():
                if link.stalled_since is None:
                    link.stalled_since = now
                elif now - link.stalled_since >= self.limits.write_stall_timeout:
                    closing.append((link, "stalled"))
            else:
                link.stalled_since = None
        for peer in self._udp_peers.values():
            if peer.last_seen > idle_before:
                break  # ordered by activity: every later one is newer
            closing.append((peer, "idle"))
        for link, reason in closing:
            self.close_link(link, reason)
        return len(closing)

    # What every transport (and proxy.sip.websocket) calls ---------------------------

    def admit(self, kind: Transport, host: str) -> Refusal | None:
        """Count a new connection from `host` in, or say (and count) why not. An
        admitted connection must be `attach`ed; its flow's close releases it."""
        limits = self.limits
        refusal: Refusal | None = None
        if self._stopping:
            refusal = Refusal.STOPPING
        elif self._connections >= limits.max_connections:
            refusal = Refusal.TOTAL
        elif limits.max_connections_per_ip:
            source = source_key(host)
            if self._per_source[source] >= limits.max_connections_per_ip:
                refusal = Refusal.PER_IP
            else:
                self._per_source[source] += 1
        if refusal is not None:
            self.metrics.refused.labels(kind.value, refusal.value).inc()
            return refusal
        self._connections += 1
        return None

    def attach(self, link: Link) -> None:
        flow = link.flow
        link.last_seen = self._clock.now()
        self._links[flow] = link
        self._live.add(link)
        self.metrics.flows.labels(flow.transport.value).inc()
        flow.on_close.append(self._detach)

    def _detach(self, flow: Flow) -> None:
        self._links.pop(flow, None)
        self.metrics.flows.labels(flow.transport.value).dec()
        self._connections -= 1
        if self.limits.max_connections_per_ip:
            source = source_key(flow.remote[0])
            self._per_source[source] -= 1
            if self._per_source[source] <= 0:
                del self._per_source[source]

    def ended(self, link: Link) -> None:
        """The connection of an attached link is fully gone (its socket is closed)."""
        self._live.discard(link)
        if self._gone is not None and not self._live and not self._gone.done():
            self._gone.set_result(None)

    def touch(self, link: Link) -> None:
        link.last_seen = self._clock.now()

    def close_link(self, link: Link, reason: str) -> None:
        """Close a flow on the relay's initiative, counted by reason."""
        flow = link.flow
        if flow.closed:
            return
        self.metrics.closed.labels(flow.transport.value, reason).inc()
        if reason != "idle":
            link.abort()  # a peer that misbehaves gets no graceful close
        flow.close()

    def framing_error(self, link: Link) -> None:
        self.metrics.framing_errors.labels(link.flow.transport.value).inc()
        self.close_link(link, "framing")

    def deliver(self, link: Link, data: bytes) -> bool:
        """Queue a message of `link` for the handler. False: stop reading for now."""
        if self._stopping:
            self.metrics.dropped.labels(link.flow.transport.value, "stopping").inc()
            return False
        pending = link.pending
        if pending is None:
            pending = link.pending = deque()
            link.worker = self.spawn(self._work(link))
        pending.append(data)
        return len(pending) < self.limits.max_pending

    async def _work(self, link: Link) -> None:
        pending = link.pending
        try:
            while pending:
                await self.dispatch(pending.popleft(), link.flow)
        finally:
            link.pending = None
            link.worker = None
            if not self._stopping:
                link.resume_reading()

    async def dispatch(self, data: bytes, flow: Flow) -> None:
        """Give one message to the handler; nothing it raises reaches the transport."""
        self.metrics.received_on[flow.transport].inc()
        try:
            await self._handler(data, flow)
        except Exception as exc:
            # The class only: an exception's message may quote the SIP message.
            self.metrics.handler_errors.labels(flow.transport.value).inc()
            log.warning("sip.handler_failed", extra={"fields": {"error": type(exc).__name__}})

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A task owned by the transports: `stop` waits for it, then cancels it."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # UDP -----------------------------------------------------------------------------

    def _datagram(self, endpoint: _UdpEndpoint, data: bytes, addr: Any) -> None:
        if self._stopping:
            return
        remote: Address = (addr[0], addr[1])
        peer = self._udp_peers.get(remote)
        if peer is not None:
            peer.last_seen = self._clock.now()
            self._udp_peers.move_to_end(remote)
        if datagram_keepalive(data) is not None:
            return  # a CRLF keep-alive: on UDP RFC 5626 answers with STUN, not a pong
        if len(data) > self.limits.max_message_size:
            self.metrics.framing_errors.labels(Transport.UDP.value).inc()
            return
        if peer is None:
            peer = self._new_udp_peer(endpoint, addr, remote)
        elif peer.pending is not None and len(peer.pending) >= self.limits.max_pending:
            self.metrics.dropped.labels(Transport.UDP.value, "overload").inc()
            return
        self.deliver(peer, data)

    def udp_flow(self, remote: Address) -> Flow | None:
        """The UDP flow to `remote`, made if we have not heard from it yet: how the relay
        reaches a PBX configured by static address, which never dials in first."""
        peer = self._udp_peers.get(remote)
        if peer is not None:
            return peer.flow
        if self._udp is None or self._stopping:
            return None
        return self._new_udp_peer(self._udp, remote, remote).flow

    def _new_udp_peer(self, endpoint: _UdpEndpoint, addr: Any, remote: Address) -> _UdpPeer:
        if len(self._udp_peers) >= self.limits.max_udp_flows:
            # The least recently heard goes: spoofed sources cannot push out live phones.
            _, oldest = next(iter(self._udp_peers.items()))
            self.close_link(oldest, "evicted")
        peer = _UdpPeer(self, endpoint, addr, remote)
        peer.last_seen = self._clock.now()
        self._udp_peers[remote] = peer
        self.metrics.flows.labels(Transport.UDP.value).inc()
        peer.flow.on_close.append(self._forget_udp)
        return peer

    def _forget_udp(self, flow: Flow) -> None:
        self._udp_peers.pop(flow.remote, None)
        self.metrics.flows.labels(Transport.UDP.value).dec()


def source_key(host: str) -> str:
    """What the per-IP limit counts. An IPv6 client counts by its /64: a host picks any
    address of its prefix at will, so single addresses would not limit it."""
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _address(sockaddr: Any) -> Address:
    """(host, port) of a socket address; IPv6 ones carry flow info and scope as well."""
    return (str(sockaddr[0]), int(sockaddr[1]))


class _UdpEndpoint(asyncio.DatagramProtocol):
    """The one UDP socket; every remote address on it is a `_UdpPeer` flow."""

    def __init__(self, edge: SipTransports) -> None:
        self._edge = edge
        self.transport: asyncio.DatagramTransport | None = None
        self.paused = False  # the socket's send buffer is full and asyncio queues sends
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector's datagram transport does not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._edge._datagram(self, data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors of earlier sends (port unreachable): the peer's flow ages out.
        log.debug("sip.udp_error", extra={"fields": {"error": type(exc).__name__}})

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        elif not self.lost.done():
            self.lost.set_result(None)


class _UdpPeer(Link):
    __slots__ = ("_addr", "_edge", "_endpoint")

    def __init__(
        self, edge: SipTransports, endpoint: _UdpEndpoint, addr: Any, remote: Address
    ) -> None:
        super().__init__()
        self._edge = edge
        self._endpoint = endpoint
        self._addr = addr
        transport = endpoint.transport
        assert transport is not None
        self.flow = Flow(
            Transport.UDP, remote, _address(transport.get_extra_info("sockname")), self
        )

    async def send(self, data: bytes) -> None:
        transport = self._endpoint.transport
        if transport is None or transport.is_closing():
            raise FlowClosed(self.flow.id)
        if self._endpoint.paused:
            # UDP may lose a message, and SIP over UDP retransmits: drop it, count it.
            self._edge.metrics.dropped.labels(Transport.UDP.value, "send_buffer").inc()
            return
        transport.sendto(data, self._addr)

    def close(self) -> None:
        """Forgetting the peer is all: the socket is shared."""


class _StreamLink(Link, asyncio.Protocol):
    """One TCP or TLS connection: the protocol, its flow's sender, and its link."""

    __slots__ = ("_drained", "_edge", "_framer", "_kind", "_transport")

    def __init__(self, edge: SipTransports, kind: Transport) -> None:
        super().__init__()
        self._edge = edge
        self._kind = kind
        self._transport: asyncio.Transport | None = None
        self._framer: StreamFramer | None = None  # set once admitted
        self._drained: asyncio.Future[None] | None = None  # set while writing is paused

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports implement the interface without
        # subclassing asyncio's.
        self._transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        edge = self._edge
        if peer is None or edge.admit(self._kind, str(peer[0])) is not None:
            transport.abort()
            return
        transport.set_write_buffer_limits(high=edge.limits.write_high_water)
        self._framer = StreamFramer(edge.limits.max_message_size)
        local = _address(transport.get_extra_info("sockname"))
        # TLS: asyncio calls this once the handshake is done, the certificate verified.
        names = certificate_names(transport.get_extra_info("peercert"))
        self.flow = Flow(self._kind, _address(peer), local, self, peer_names=names)
        edge.attach(self)

    def data_received(self, data: bytes) -> None:
        framer = self._framer
        if framer is None or self.flow.closed:
            return
        edge = self._edge
        edge.touch(self)
        try:
            items = framer.feed(data)
        except FramingError as exc:
            self._take(exc.items)  # complete messages framed before the garbage
            edge.framing_error(self)
            return
        self._take(items)

    def _take(self, items: list[Item]) -> None:
        for item in items:
            if isinstance(item, bytes):
                if not self._edge.deliver(self, item):
                    self.pause_reading()
            elif item is Keepalive.PING and not self._write(PONG):
                return

    def eof_received(self) -> bool | None:
        return None  # close our side too: SIP has no use for half-closed connections

    def connection_lost(self, exc: Exception | None) -> None:
        self.resume_writing()  # wakes waiting senders; they find the flow closed
        if self._framer is None:
            return  # refused: never attached
        self.flow.close()
        self._edge.ended(self)

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
        if transport is None or transport.is_closing() or not self._write(data):
            raise FlowClosed(self.flow.id)
        while self._drained is not None:
            await self._drained
        if self.flow.closed:
            raise FlowClosed(self.flow.id)

    def close(self) -> None:
        transport = self._transport
        if transport is None:
            return
        # close() flushes first, which a peer that does not read would hold up forever.
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()

    def _write(self, data: bytes) -> bool:
        transport = self._transport
        assert transport is not None
        transport.write(data)
        if transport.get_write_buffer_size() > self._edge.limits.write_buffer:
            self._edge.close_link(self, "write_buffer")
            return False
        return True

    # Link

    def write_blocked(self) -> bool:
        return self._drained is not None

    def pause_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
