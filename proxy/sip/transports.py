"""The SIP transports: every listener and every flow, in one registry.

`SipTransports` starts the UDP, TCP and TLS listeners (`proxy.sip.udp`,
`proxy.sip.streams`), admits connections (a cap in total and, optionally, per source
address), hands each complete message with its flow to one `MessageHandler`, reaps
flows that went quiet, and closes peers that do not read what is sent to them. SIP over
WebSocket (`proxy.sip.websocket`) runs on the aiohttp application but registers its
flows here, so the limits, the reaper and the metrics cover it as well.

Messages of one flow reach the handler one after the other, in order (a CANCEL never
overtakes its INVITE); flows run concurrently. A worker task exists only while a flow
has messages waiting, so idle flows cost no task. A stream flow with too many
messages waiting stops being read, which pushes back on the peer through TCP.

Stopping has two steps. `stop_accepting` closes the listeners and refuses new
connections, while the flows already open carry on: calls under way can end, and the
relay can answer what it holds. `stop` then lets the handlers in flight answer, closes
every flow and waits, each step bounded by STOP_GRACE, until every connection is gone.

Nothing here logs message bytes or addresses: a log line names the event and the
exception class, and the metrics count by transport and reason.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import Counter, deque
from collections.abc import Coroutine
from typing import Any

from prometheus_client import CollectorRegistry

from privacy.clock import Clock
from privacy.tasks import Tasks
from proxy.sip.flow import Address, Flow, MessageHandler, Transport
from proxy.sip.link import Link, Refusal, address_of
from proxy.sip.streams import StreamLink
from proxy.sip.tls import TLS_HANDSHAKE_TIMEOUT, TLS_SHUTDOWN_TIMEOUT, server_tls_context
from proxy.sip.transport_metrics import SipMetrics
from proxy.sip.transport_settings import STOP_GRACE, TransportSettings
from proxy.sip.udp import UdpEndpoint
from webapi.connections import LISTEN_BACKLOG
from webapi.ratelimit import client_key

log = logging.getLogger("softrelay.sip")


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
        self.clock = clock
        self.addresses: list[tuple[Transport, Address]] = []
        self._handler = handler
        self._servers: list[asyncio.Server] = []
        self._udp: UdpEndpoint | None = None
        # `serve --workers N` only: a UDP socket of this worker's own (`udp_out`).
        self._own_udp: UdpEndpoint | None = None
        self._links: dict[Flow, Link] = {}  # open connection flows (TCP, TLS, WS)
        self._live: set[Link] = set()  # connections not yet fully gone (closing included)
        self._gone: asyncio.Future[None] | None = None
        self._connections = 0
        self._per_source: Counter[str] = Counter()
        # Flow workers and WebSocket close handshakes; the reaper apart, so that `stop`
        # can wait for the first without waiting on a loop that never ends.
        self._tasks = Tasks(log, "sip.task_failed")
        self._timers = Tasks(log, "sip.task_failed")
        self._accepting = True
        self.stopping = False  # set by `stop`: messages are no longer handed on

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
                self._udp = endpoint = UdpEndpoint(self)
                udp, _ = await loop.create_datagram_endpoint(
                    lambda: endpoint,
                    local_addr=(host, settings.udp_port),
                    reuse_port=settings.reuse_port,
                )
                self.addresses.append((Transport.UDP, address_of(udp.get_extra_info("sockname"))))
                if settings.reuse_port:
                    # Not a listener (not in `addresses`): where this worker's requests to
                    # UDP peers it chose go from, so that their answers come back to it.
                    self._own_udp = own = UdpEndpoint(self)
                    await loop.create_datagram_endpoint(lambda: own, local_addr=(host, 0))
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
        self._timers.spawn(self._reap_forever(), name="sip-reaper")
        for transport, (addr_host, port) in self.addresses:
            listen = f"{transport}:{addr_host}:{port}"
            log.info("sip.listening", extra={"fields": {"listen": listen}})
        return self

    async def _listen(self, kind: Transport, port: int, context: ssl.SSLContext | None) -> None:
        loop = asyncio.get_running_loop()
        host = self.settings.host
        reuse_port = self.settings.reuse_port
        if context is None:
            server = await loop.create_server(
                lambda: StreamLink(self, kind),
                host,
                port,
                reuse_port=reuse_port,
                backlog=LISTEN_BACKLOG,
            )
        else:
            server = await loop.create_server(
                lambda: StreamLink(self, kind),
                host,
                port,
                reuse_port=reuse_port,
                backlog=LISTEN_BACKLOG,
                ssl=context,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
                ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT,
            )
        self._servers.append(server)
        self.addresses.extend((kind, address_of(s.getsockname())) for s in server.sockets)

    def address(self, kind: Transport) -> Address:
        """Where the listener of a transport is bound (the real port when 0 was asked)."""
        for transport, addr in self.addresses:
            if transport is kind:
                return addr
        raise LookupError(f"no {kind} listener")

    @property
    def accepting(self) -> bool:
        return self._accepting

    def stop_accepting(self) -> None:
        """Close the TCP and TLS listeners (a new connection is refused by the system)
        and refuse new WebSocket flows; the flows already open carry on. Idempotent."""
        if not self._accepting:
            return
        self._accepting = False
        for server in self._servers:
            server.close()

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop accepting, let the handlers in flight answer, close every flow, and wait
        until every connection is gone. What is still running after `grace` is ended."""
        if self.stopping:
            return
        self.stopping = True
        self.stop_accepting()
        loop = asyncio.get_running_loop()
        self._gone = loop.create_future()
        await self._timers.close()
        for link in self._links.values():
            link.pause_reading()
        await self._tasks.wait(grace)
        for flow in list(self._links):
            flow.close()
        for endpoint in self._udp_endpoints():
            endpoint.close()
        if not self._gone.done() and not self._live:
            self._gone.set_result(None)
        await asyncio.wait([self._gone], timeout=grace)
        for link in list(self._live):
            link.abort()
        for endpoint in self._udp_endpoints():
            await endpoint.lost
        await asyncio.wait([self._gone], timeout=grace)
        # What is left: closing handshakes, handlers past their grace.
        await self._tasks.close(grace)
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
        now = self.clock.now()
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
        for endpoint in self._udp_endpoints():
            closing.extend((peer, "idle") for peer in endpoint.quiet_since(idle_before))
        for link, reason in closing:
            self.close_link(link, reason)
        return len(closing)

    # What every transport (and proxy.sip.websocket) calls ---------------------------

    def admit(self, kind: Transport, host: str) -> Refusal | None:
        """Count a new connection from `host` in, or say (and count) why not. An
        admitted connection must be `attach`ed; its flow's close releases it."""
        limits = self.limits
        refusal: Refusal | None = None
        if not self._accepting:
            refusal = Refusal.STOPPING
        elif self._connections >= limits.max_connections:
            refusal = Refusal.TOTAL
        elif limits.max_connections_per_ip:
            source = client_key(host)  # an IPv6 client by its /64
            if self._per_source[source] >= limits.max_connections_per_ip:
                refusal = Refusal.PER_IP
            else:
                self._per_source[source] += 1
        if refusal is not None:
            self.metrics.refused.labels(kind.value, refusal.value).inc()
            return refusal
        self._connections += 1
        return None

    @property
    def flow_count(self) -> int:
        """Connection flows open now (UDP sources are not connections)."""
        return len(self._links)

    def attach(self, link: Link) -> None:
        flow = link.flow
        link.last_seen = self.clock.now()
        self._links[flow] = link
        self._live.add(link)
        self.metrics.flows_on[flow.transport].inc()
        flow.on_close.append(self._detach)

    def _detach(self, flow: Flow) -> None:
        self._links.pop(flow, None)
        self.metrics.flows_on[flow.transport].dec()
        self._connections -= 1
        if self.limits.max_connections_per_ip:
            source = client_key(flow.remote[0])
            self._per_source[source] -= 1
            if self._per_source[source] <= 0:
                del self._per_source[source]

    def ended(self, link: Link) -> None:
        """The connection of an attached link is fully gone (its socket is closed)."""
        self._live.discard(link)
        if self._gone is not None and not self._live and not self._gone.done():
            self._gone.set_result(None)

    def touch(self, link: Link) -> None:
        link.last_seen = self.clock.now()

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
        if self.stopping:
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
            if not self.stopping:
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
        return self._tasks.spawn(coro)

    def _udp_endpoints(self) -> list[UdpEndpoint]:
        return [e for e in (self._udp, self._own_udp) if e is not None]

    @property
    def own_udp_address(self) -> Address | None:
        """Where this worker's own UDP socket is bound (`udp_out`); None: it has none."""
        own = self._own_udp
        return None if own is None else own.local

    def udp_flow(self, remote: Address) -> Flow | None:
        """The UDP flow to `remote` on the SIP port, made if we have not heard from it
        yet: where a phone's NAT binding is, and what a peer sends to."""
        return _flow_on(self._udp, remote, self.stopping)

    def udp_out(self, remote: Address) -> Flow | None:
        """The UDP flow for requests the relay sends to a peer it chose (a PBX configured
        by static address, which never dials in first), made if need be.

        The workers of `serve --workers N` share the SIP port (SO_REUSEPORT), and the
        kernel hands each datagram to the worker its 4-tuple hashes to: the answers of a
        peer sent to the shared port all reach one worker, half of them not the sender.
        So each worker sends such requests from a socket of its own, which its Via names
        (RFC 3261 18.2.2): the answers come back to it. Without workers: `udp_flow`."""
        if self._own_udp is None:
            return self.udp_flow(remote)
        return _flow_on(self._own_udp, remote, self.stopping)


def _flow_on(udp: UdpEndpoint | None, remote: Address, stopping: bool) -> Flow | None:
    """The flow to `remote` on the socket `udp`; made only while not stopping."""
    if udp is None:
        return None
    if stopping:
        peer = udp.peers.get(remote)
        return None if peer is None else peer.flow
    return udp.flow_to(remote)
