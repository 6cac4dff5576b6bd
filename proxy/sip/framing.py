"""Framing SIP messages on stream transports (TCP, TLS), with RFC 5626 keep-alives.

A stream carries messages back to back; each ends after its headers' blank line plus
Content-Length octets of body, so Content-Length is mandatory here (RFC 3261 18.3).
Between messages a peer may send CRLF keep-alives (RFC 5626 3.5.1): a double CRLF
"ping", which the transport answers with a single CRLF "pong", or a single CRLF pong
answering our own ping.

`StreamFramer.feed` is incremental and deterministic: the items it yields depend only
on the octets received, never on how they were split into chunks. That is why a CRLF
at the end of the buffer waits for the next octet before it is called a pong: it may
be the first half of a ping.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Final

from proxy.sip.message import MAX_MESSAGE_SIZE

PONG: Final = b"\r\n"  # what the transport sends back for a PING


class Keepalive(Enum):
    PING = "ping"  # double CRLF: answer with PONG
    PONG = "pong"  # single CRLF: the peer answers our ping


Item = bytes | Keepalive

# A Content-Length or compact "l" header line, anywhere in the header block.
_LENGTH_RE: Final = re.compile(rb"\r\n(?:content-length|l)[ \t]*:[ \t]*([^\r]*)", re.IGNORECASE)


class FramingError(Exception):
    """The stream cannot be framed any further: the transport closes the connection.

    `items` holds what was framed from the same `feed` call before the error; they are
    complete and may still be handled.
    """

    def __init__(self, reason: str, items: list[Item] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.items = items or []


class StreamFramer:
    """Split a byte stream into SIP messages and keep-alives."""

    # One per TCP/TLS flow, idle ones included: slots, no per-instance dict.
    __slots__ = ("_buffer", "_failed", "_max", "_scanned", "_total")

    def __init__(self, max_message_size: int = MAX_MESSAGE_SIZE) -> None:
        self._max = max_message_size
        self._buffer = bytearray()
        self._scanned = 0  # how far the search for the end of headers got
        self._total: int | None = None  # length of the current message, once known
        self._failed: str | None = None

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Item]:
        """Add received octets; return the complete messages and keep-alives."""
        if self._failed is not None:
            raise FramingError(self._failed)
        self._buffer += data
        items: list[Item] = []
        try:
            while self._next(items):
                pass
        except FramingError as exc:
            self._failed = exc.reason
            self._buffer.clear()
            raise FramingError(exc.reason, items) from None
        return items

    def _next(self, items: list[Item]) -> bool:
        """Frame one item off the buffer; False when more octets are needed."""
        buffer = self._buffer
        if self._total is None:
            if buffer.startswith(b"\r\n"):
                if buffer.startswith(b"\r\n\r\n"):
                    del buffer[:4]
                    items.append(Keepalive.PING)
                    return True
                if len(buffer) < 4 and b"\r\n\r\n".startswith(buffer):
                    return False  # a ping or a pong: the next octets tell
                del buffer[:2]
                items.append(Keepalive.PONG)
                return True
            end = buffer.find(b"\r\n\r\n", max(self._scanned - 3, 0))
            if end < 0:
                self._scanned = len(buffer)
                if len(buffer) > self._max:
                    raise FramingError("Message too large")
                return False
            if end + 4 > self._max:
                raise FramingError("Message too large")
            self._total = end + 4 + self._content_length(bytes(buffer[:end]))
            self._scanned = 0
            if self._total > self._max:
                raise FramingError("Message too large")
        if len(buffer) < self._total:
            return False
        items.append(bytes(buffer[: self._total]))
        del buffer[: self._total]
        self._total = None
        return True

    @staticmethod
    def _content_length(head: bytes) -> int:
        values = {m.strip(b" \t") for m in _LENGTH_RE.findall(head)}
        if not values:
            raise FramingError("Missing Content-Length")
        if len(values) > 1:
            raise FramingError("Conflicting Content-Length")
        value = values.pop()
        if not value.isdigit() or len(value) > 10:
            raise FramingError("Bad Content-Length")
        return int(value)


def datagram_keepalive(datagram: bytes) -> Keepalive | None:
    """A CRLF keep-alive sent as a whole datagram (some phones do so over UDP)."""
    if datagram == b"\r\n\r\n":
        return Keepalive.PING
    if datagram == b"\r\n":
        return Keepalive.PONG
    return None
