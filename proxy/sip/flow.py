"""A flow: one path to a peer over which SIP messages travel (RFC 5626's term).

For TCP, TLS and WebSocket a flow is one connection; for UDP it is the (local socket,
remote address) pair. Transports create flows and hand every complete message, with
its flow, to one handler; the relay answers and forwards through `Flow.send`. A
phone's binding and a PBX's link point at the flow they arrived on, which is how
softrelay reaches peers behind NAT without dialling them.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class Transport(StrEnum):
    UDP = "udp"
    TCP = "tcp"
    TLS = "tls"
    WS = "ws"
    WSS = "wss"

    @property
    def reliable(self) -> bool:
        return self is not Transport.UDP

    @property
    def via_name(self) -> str:
        """The transport token of a Via header (RFC 3261, RFC 7118)."""
        return self.value.upper()


Address = tuple[str, int]
_ids = itertools.count(1)


class FlowSender(Protocol):
    async def send(self, data: bytes) -> None: ...

    def close(self) -> None: ...


@dataclass(eq=False, slots=True)
class Flow:
    transport: Transport
    remote: Address
    local: Address
    sender: FlowSender
    id: int = field(default_factory=lambda: next(_ids))
    closed: bool = False
    # Called once when the flow ends (connection closed, reaped, or UDP peer forgotten).
    on_close: list[Callable[[Flow], None]] = field(default_factory=list)
    # The names of the peer's verified client certificate (TLS only, when a client CA is
    # configured): what a PBX linking by mutual TLS is recognised by. Memory only.
    peer_names: tuple[str, ...] = ()
    # What a seal (proxy.sip.tokens) names the flow by: the connection of a stream; for
    # UDP the (local socket, remote address) pair, which is all a datagram tells us.
    key: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.transport is Transport.UDP:
            local, remote = self.local, self.remote
            self.key = f"udp {local[0]} {local[1]} {remote[0]} {remote[1]}".encode()
        else:
            self.key = b"#%d" % self.id

    async def send(self, data: bytes) -> None:
        if self.closed:
            raise FlowClosed(self.id)
        await self.sender.send(data)

    def close(self) -> None:
        """Close the flow (idempotent) and tell whoever listens."""
        if self.closed:
            return
        self.closed = True
        self.sender.close()
        for callback in self.on_close:
            callback(self)


def certificate_names(peercert: object) -> tuple[str, ...]:
    """The DNS and URI entries of a peer certificate's subjectAltName, given as
    `SSLObject.getpeercert()` returns it: a dict only for a certificate that was verified
    against the configured CA, None (or empty) when the peer sent none.

    The subject's common name is left out on purpose: it is free text a CA fills with
    whatever it likes (a person, a device label), while subjectAltName entries are typed
    names, and RFC 9525 (like Python's own hostname check since 3.7) no longer falls
    back to the CN. A serial matched against a CN could match a certificate issued for
    something else entirely.
    """
    if not isinstance(peercert, dict):
        return ()
    entries = peercert.get("subjectAltName", ())
    return tuple(str(value) for kind, value in entries if kind in ("DNS", "URI"))


class FlowClosed(Exception):
    """The flow ended before a message could be sent on it."""


# What a transport calls for each complete message it received.
MessageHandler = Callable[[bytes, Flow], Awaitable[None]]
