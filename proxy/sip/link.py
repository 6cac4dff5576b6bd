"""A link: what the SIP transports keep for one flow, whatever carries it (a UDP peer,
a TCP or TLS connection, a WebSocket). Each transport subclasses it; the registry of
flows (`proxy.sip.transports`) reaps, pauses and aborts links through this interface,
and a transport reaches the registry through `Edge`, so neither imports the other.
"""

from __future__ import annotations

import asyncio
from collections import deque
from enum import StrEnum
from typing import Any, Protocol

from privacy.clock import Clock
from proxy.sip.flow import Address, Flow, Transport
from proxy.sip.transport_metrics import SipMetrics
from proxy.sip.transport_settings import TransportLimits


class Link:
    """When the peer was last heard, since when our writes stall, and the messages
    waiting for the handler (with the worker task handing them on, while there are)."""

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


class Refusal(StrEnum):
    """Why a connection was turned away (the `reason` label of the metric)."""

    PER_IP = "per_ip"
    TOTAL = "total"
    STOPPING = "stopping"


class Edge(Protocol):
    """What a transport's links call on the registry of flows (`SipTransports`)."""

    limits: TransportLimits
    metrics: SipMetrics
    clock: Clock
    stopping: bool  # messages are no longer handed on

    def admit(self, kind: Transport, host: str) -> Refusal | None: ...

    def attach(self, link: Link) -> None: ...

    def ended(self, link: Link) -> None: ...

    def touch(self, link: Link) -> None: ...

    def close_link(self, link: Link, reason: str) -> None: ...

    def framing_error(self, link: Link) -> None: ...

    def deliver(self, link: Link, data: bytes) -> bool: ...


def address_of(sockaddr: Any) -> Address:
    """(host, port) of a socket address; IPv6 ones carry flow info and scope as well."""
    return (str(sockaddr[0]), int(sockaddr[1]))
