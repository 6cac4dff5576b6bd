"""SIP over UDP: the one socket, and every remote address heard on it as a flow.

A UDP flow is the (local socket, remote address) pair. Peers are remembered in order
of last activity, at most `max_udp_flows` of them: past that the least recently heard
is forgotten, so spoofed sources cannot push out live phones. A datagram is one
message; a CRLF keep-alive only refreshes its peer (RFC 5626 answers those with STUN
on UDP, not with a pong). When the socket's send buffer is full a send is dropped and
counted: SIP over UDP retransmits.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, cast

from proxy.sip.flow import Address, Flow, FlowClosed, Transport
from proxy.sip.framing import datagram_keepalive
from proxy.sip.link import Edge, Link, address_of

log = logging.getLogger("softrelay.sip")


class UdpEndpoint(asyncio.DatagramProtocol):
    """The one UDP socket; every remote address on it is a `UdpPeer` flow."""

    def __init__(self, edge: Edge) -> None:
        self._edge = edge
        self.transport: asyncio.DatagramTransport | None = None
        self.local: Address = ("", 0)  # where the socket is bound, read once
        self.paused = False  # the socket's send buffer is full and asyncio queues sends
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Ordered by last activity, so the least recently heard peer is first.
        self.peers: OrderedDict[Address, UdpPeer] = OrderedDict()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector's datagram transport does not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)
        # Once, not per new peer: every peer's flow has this local address.
        self.local = address_of(transport.get_extra_info("sockname"))

    def datagram_received(self, data: bytes, addr: Any) -> None:
        edge = self._edge
        if edge.stopping:
            return
        remote: Address = (addr[0], addr[1])
        peer = self.peers.get(remote)
        if peer is not None:
            peer.last_seen = edge.clock.now()
            self.peers.move_to_end(remote)
        if datagram_keepalive(data) is not None:
            return  # a CRLF keep-alive: on UDP RFC 5626 answers with STUN, not a pong
        limits = edge.limits
        if len(data) > limits.max_message_size:
            edge.metrics.framing_errors.labels(Transport.UDP.value).inc()
            return
        if peer is None:
            peer = self._new_peer(addr, remote)
        elif peer.pending is not None and len(peer.pending) >= limits.max_pending:
            edge.metrics.dropped.labels(Transport.UDP.value, "overload").inc()
            return
        edge.deliver(peer, data)

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

    def flow_to(self, remote: Address) -> Flow:
        """The flow to `remote`, made if we have not heard from it yet."""
        peer = self.peers.get(remote)
        if peer is None:
            peer = self._new_peer(remote, remote)
        return peer.flow

    def _new_peer(self, addr: Any, remote: Address) -> UdpPeer:
        edge = self._edge
        if len(self.peers) >= edge.limits.max_udp_flows:
            # The least recently heard goes: spoofed sources cannot push out live phones.
            _, oldest = next(iter(self.peers.items()))
            edge.close_link(oldest, "evicted")
        peer = UdpPeer(edge, self, addr, remote)
        peer.last_seen = edge.clock.now()
        self.peers[remote] = peer
        edge.metrics.flows_on[Transport.UDP].inc()
        peer.flow.on_close.append(self._forget)
        return peer

    def _forget(self, flow: Flow) -> None:
        self.peers.pop(flow.remote, None)
        self._edge.metrics.flows_on[Transport.UDP].dec()

    def quiet_since(self, before: float) -> Iterator[UdpPeer]:
        """The peers last heard at `before` or earlier, the least recent first."""
        for peer in self.peers.values():
            if peer.last_seen > before:
                return  # ordered by activity: every later one is newer
            yield peer

    def close(self) -> None:
        """Forget every peer, then close the socket; `lost` is done once it is."""
        for peer in list(self.peers.values()):
            peer.flow.close()
        if self.transport is not None:
            self.transport.close()
        elif not self.lost.done():
            self.lost.set_result(None)


class UdpPeer(Link):
    __slots__ = ("_addr", "_edge", "_endpoint")

    def __init__(self, edge: Edge, endpoint: UdpEndpoint, addr: Any, remote: Address) -> None:
        super().__init__()
        self._edge = edge
        self._endpoint = endpoint
        self._addr = addr
        self.flow = Flow(Transport.UDP, remote, endpoint.local, self)

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
