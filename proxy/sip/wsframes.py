"""RFC 6455 on a server's side, without I/O: the opening handshake's answer, frames
read from a client and frames written to it.

`proxy.sip.websocket` holds one idle WebSocket per phone, up to 100,000 per node, so
what a flow keeps between messages is what counts: here nothing is kept at all. The
reader is a function over the bytes the link buffered (`read_frame`), the writer
returns bytes (`frame`); the link keeps only its unread bytes and, for a message in
fragments, the parts. No extension is negotiated (no permessage-deflate: a compression
context per connection costs more than an idle flow may), so every RSV bit must be 0.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from enum import IntEnum
from typing import Final

ACCEPT_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3


class Opcode(IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseCode(IntEnum):
    """The status codes a server sends (RFC 6455 7.4.1)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    INVALID_TEXT = 1007
    MESSAGE_TOO_BIG = 1009


_OPCODES: Final = frozenset(int(op) for op in Opcode)
_CONTROL_MAX: Final = 125  # a control frame's payload (RFC 6455 5.5)


class FrameError(Exception):
    """The client broke RFC 6455: the connection fails with `code` (RFC 6455 7.1.7)."""

    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def accept_key(key: str) -> str | None:
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key, or None when the key is
    not the base64 of 16 octets (RFC 6455 4.2.1, item 5)."""
    try:
        raw = base64.b64decode(key.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 16:
        return None
    digest = hashlib.sha1(key.strip().encode("ascii") + ACCEPT_GUID).digest()  # noqa: S324 (RFC 6455 names SHA-1)
    return base64.b64encode(digest).decode("ascii")


def read_frame(data: bytes, start: int, max_payload: int) -> tuple[bool, int, bytes, int] | None:
    """The client frame at `start` in `data`: (fin, opcode, unmasked payload, the offset
    after it), or None while the frame is incomplete. Offsets, not slices, so that many
    small frames in one read cost linear time. A payload over `max_payload` fails as
    soon as its header says so, before it is buffered."""
    size = len(data) - start
    if size < 2:
        return None
    first, second = data[start], data[start + 1]
    if first & 0x70:
        raise FrameError(CloseCode.PROTOCOL_ERROR, "RSV bit set without an extension")
    opcode = first & 0x0F
    if opcode not in _OPCODES:
        raise FrameError(CloseCode.PROTOCOL_ERROR, "unknown opcode")
    fin = bool(first & 0x80)
    if not second & 0x80:
        raise FrameError(CloseCode.PROTOCOL_ERROR, "a client frame must be masked")
    length = second & 0x7F
    at = start + 2
    if length == 126:
        if size < 4:
            return None
        length, at = int.from_bytes(data[at : at + 2], "big"), at + 2
    elif length == 127:
        if size < 10:
            return None
        length, at = int.from_bytes(data[at : at + 8], "big"), at + 8
        if length >> 63:
            raise FrameError(CloseCode.PROTOCOL_ERROR, "length with its top bit set")
    if opcode >= Opcode.CLOSE:
        if length > _CONTROL_MAX or not fin:
            raise FrameError(CloseCode.PROTOCOL_ERROR, "a control frame over 125 or fragmented")
    elif length > max_payload:
        raise FrameError(CloseCode.MESSAGE_TOO_BIG, "message too big")
    end = at + 4 + length
    if len(data) < end:
        return None
    return fin, opcode, unmask(data[at : at + 4], data[at + 4 : end]), end


def unmask(mask: bytes, payload: bytes) -> bytes:
    """XOR with the 4-octet mask (RFC 6455 5.3), as one big-integer operation: linear
    and in C, without a per-octet loop in Python."""
    n = len(payload)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def frame(opcode: Opcode, payload: bytes) -> bytes:
    """A server frame, final and unmasked (a server never masks, RFC 6455 5.1)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, n))
    elif n < 1 << 16:
        head = bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")
    return head + payload


def close_frame(code: int | None) -> bytes:
    """A close frame with `code` and no reason; None: with no status at all."""
    return frame(Opcode.CLOSE, b"" if code is None else code.to_bytes(2, "big"))


def close_code(payload: bytes) -> int | None:
    """The status of a client's close frame, checked (RFC 6455 5.5.1, 7.4): None when it
    carries none, or FrameError for one a peer may not send or a reason not in UTF-8."""
    if not payload:
        return None
    if len(payload) == 1:
        raise FrameError(CloseCode.PROTOCOL_ERROR, "a close payload of one octet")
    code = int.from_bytes(payload[:2], "big")
    # 1004-1006 and 1015 are reserved, never sent; 1016-2999 are for future RFCs.
    if not (1000 <= code <= 1014 and code not in (1004, 1005, 1006)) and not (3000 <= code <= 4999):
        raise FrameError(CloseCode.PROTOCOL_ERROR, "a close code a peer may not send")
    if not is_utf8(payload[2:]):
        raise FrameError(CloseCode.INVALID_TEXT, "a close reason not in UTF-8")
    return code


def is_utf8(data: bytes) -> bool:
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
