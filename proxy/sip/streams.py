"""SIP over TCP and TLS: one protocol object per connection, which is its flow's sender
and its link at once.

Bytes are framed into messages (`proxy.sip.framing`); RFC 5626 CRLF pings get a pong.
A connection is admitted (counted against the limits) when it is made, after the TLS
handshake for TLS; one refused is aborted at once. Writes past the high-water mark make
senders wait for the peer; a peer that leaves `write_buffer` bytes unread is closed.
"""

from __future__ import annotations

import asyncio
from typing import cast

from proxy.sip.flow import Flow, FlowClosed, Transport, certificate_names
from proxy.sip.framing import PONG, FramingError, Item, Keepalive, StreamFramer
from proxy.sip.link import Edge, Link, address_of


class StreamLink(Link, asyncio.Protocol):
    """One TCP or TLS connection: the protocol, its flow's sender, and its link."""

    __slots__ = ("_drained", "_edge", "_framer", "_kind", "_transport")

    def __init__(self, edge: Edge, kind: Transport) -> None:
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
        local = address_of(transport.get_extra_info("sockname"))
        # TLS: asyncio calls this once the handshake is done, the certificate verified.
        names = certificate_names(transport.get_extra_info("peercert"))
        self.flow = Flow(self._kind, address_of(peer), local, self, peer_names=names)
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
