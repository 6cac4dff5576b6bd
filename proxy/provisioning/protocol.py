"""The provisioning tunnel's wire protocol, shared by softrelay and the PBX side
(`mockphone/provisioning.py`, the reference client).

A PBX behind NAT dials out a WebSocket to `TUNNEL_PATH` with subprotocol
`SUBPROTOCOL` and proves its serial without sending its secret:

    relay -> PBX  text  {"type": "challenge", "nonce": N}      N: 32 random bytes, base64
    PBX -> relay  text  {"type": "hello", "serial": S, "cnonce": C, "proof": P}
    relay -> PBX  text  {"type": "ready", "proof": Q}

    P = HMAC-SHA256(secret, "pbx" 0 S 0 N 0 C), Q = the same with "relay": the relay
    proves it knows the secret too, so a PBX never serves files to an impostor.

Then binary frames, each `kind (1 byte) | stream id (4 bytes, big endian) | payload`.
The relay opens a stream per HTTP request; both directions carry a body:

    REQUEST   relay -> PBX   JSON {"method", "path", "query", "headers": [[name, value]]}
    RESPONSE  PBX -> relay   JSON {"status", "headers": [[name, value]]}
    DATA      both           up to CHUNK body bytes
    END       both           the sender's body of this stream is complete
    CREDIT    both           4 bytes: the peer may send this many more body bytes
    RESET     both           the stream is abandoned (a short UTF-8 reason)

Flow control is per stream and counted in body bytes, as in HTTP/2: each side may
send WINDOW bytes of a stream's body before the receiver grants more, and a receiver
grants only what its consumer has taken. A file is therefore held in memory at most
one window at a time per stream, however large it is. Data beyond the granted window
is a protocol error and ends the tunnel. Frames for a stream already reset are ignored.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import struct
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from enum import IntEnum

import orjson

TUNNEL_PATH = "/provisioning/v1/tunnel"
SUBPROTOCOL = "softrelay-provisioning.1"
CHUNK = 16 * 1024
WINDOW = 256 * 1024
MAX_FRAME = 64 * 1024  # a head with its headers, or a chunk with its frame header
NONCE_BYTES = 32
_HEADER = struct.Struct("!BI")
HEADER_SIZE = _HEADER.size
_CREDIT = struct.Struct("!I")
_MAX_CREDIT = 2**31 - 1


class Kind(IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3
    END = 4
    CREDIT = 5
    RESET = 6


class ProtocolError(Exception):
    """The peer broke the protocol; the tunnel is closed."""


class StreamReset(Exception):
    """The peer abandoned the stream, or the tunnel closed under it."""


def encode(kind: Kind, stream: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack(kind, stream) + payload


def decode(frame: bytes) -> tuple[Kind, int, bytes]:
    if len(frame) < _HEADER.size:
        raise ProtocolError("frame shorter than its header")
    raw_kind, stream = _HEADER.unpack_from(frame)
    try:
        kind = Kind(raw_kind)
    except ValueError:
        raise ProtocolError(f"unknown frame kind {raw_kind}") from None
    return kind, stream, frame[_HEADER.size :]


def credit_frame(stream: int, amount: int) -> bytes:
    return encode(Kind.CREDIT, stream, _CREDIT.pack(amount))


def credit_of(payload: bytes) -> int:
    if len(payload) != _CREDIT.size:
        raise ProtocolError("a CREDIT frame holds 4 bytes")
    (amount,) = _CREDIT.unpack(payload)
    return int(amount)


def new_nonce(size: int = NONCE_BYTES) -> str:
    return base64.b64encode(secrets.token_bytes(size)).decode()


def proof(role: str, secret: str, serial: str, nonce: str, cnonce: str) -> str:
    """HMAC-SHA256 over the role, serial and both nonces, keyed by the PBX's secret."""
    message = "\0".join((role, serial, nonce, cnonce)).encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def proof_matches(expected: str, given: object) -> bool:
    return isinstance(given, str) and hmac.compare_digest(expected.encode(), given.encode())


# --- the handshake's three text messages, as both sides write and check them ----------


def challenge_message(nonce: str) -> str:
    return orjson.dumps({"type": "challenge", "nonce": nonce}).decode()


def hello_message(serial: str, secret: str, nonce: str, cnonce: str) -> str:
    message = {
        "type": "hello",
        "serial": serial,
        "cnonce": cnonce,
        "proof": proof("pbx", secret, serial, nonce, cnonce),
    }
    return orjson.dumps(message).decode()


def hello_proves(hello: dict[str, object], secret: str, nonce: str) -> bool:
    """Whether a hello's serial, cnonce (16 to 256 characters) and proof answer `nonce`
    with `secret`, the secret of the serial it names."""
    serial, cnonce = hello.get("serial"), hello.get("cnonce")
    return (
        isinstance(serial, str)
        and isinstance(cnonce, str)
        and 16 <= len(cnonce) <= 256
        and proof_matches(proof("pbx", secret, serial, nonce, cnonce), hello.get("proof"))
    )


def ready_message(serial: str, secret: str, nonce: str, cnonce: str) -> str:
    answer = proof("relay", secret, serial, nonce, cnonce)
    return orjson.dumps({"type": "ready", "proof": answer}).decode()


def ready_proves(
    ready: dict[str, object], serial: str, secret: str, nonce: str, cnonce: str
) -> bool:
    """Whether the relay's ready proves that it knows the serial's secret too."""
    expected = proof("relay", secret, serial, nonce, cnonce)
    return ready.get("type") == "ready" and proof_matches(expected, ready.get("proof"))


class BodyReader:
    """The body chunks of one stream as they arrive, bounded by the credit granted.

    `grant` sends a CREDIT frame; it is called once a quarter of the window has been
    consumed, so a slow consumer stops the sender after at most one window.
    """

    def __init__(self, grant: Callable[[int], Awaitable[None]], window: int = WINDOW) -> None:
        self._grant = grant
        self._window = window
        self._credit = window
        self._ungranted = 0
        self._chunks: deque[bytes] = deque()
        self._ready = asyncio.Event()
        self._ended = False
        self._error: BaseException | None = None
        self.buffered = 0
        self.max_buffered = 0  # the most body bytes held at once (tests, metrics)

    @property
    def ended(self) -> bool:
        return self._ended and not self._chunks

    def feed(self, data: bytes) -> None:
        if self._ended:
            raise ProtocolError("DATA after END")
        if len(data) > self._credit:
            raise ProtocolError("DATA beyond the granted window")
        self._credit -= len(data)
        self._chunks.append(data)
        self.buffered += len(data)
        self.max_buffered = max(self.max_buffered, self.buffered)
        self._ready.set()

    def end(self) -> None:
        self._ended = True
        self._ready.set()

    def fail(self, exc: BaseException) -> None:
        if self._error is None and not self.ended:
            self._error = exc
            self._chunks.clear()
            self.buffered = 0
            self._ready.set()

    async def read(self) -> bytes:
        """The next chunk, or b"" at the end of the body."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._ended:
                return b""
            self._ready.clear()
            await self._ready.wait()
        chunk = self._chunks.popleft()
        self.buffered -= len(chunk)
        self._ungranted += len(chunk)
        if self._ungranted >= self._window // 4 and not self._ended:
            amount, self._ungranted = self._ungranted, 0
            self._credit += amount
            await self._grant(amount)
        return chunk

    async def chunks(self) -> AsyncIterator[bytes]:
        while chunk := await self.read():
            yield chunk


class SendWindow:
    """The credit the peer granted for the body we send on one stream."""

    def __init__(self, window: int = WINDOW, *, stalled: asyncio.Event | None = None) -> None:
        self._credit = window
        self._changed = asyncio.Event()
        self._error: BaseException | None = None
        self._stalled = stalled  # set whenever a sender waits for credit
        self.stalls = 0
        self.waiting = False  # a sender is waiting for credit now

    def add(self, amount: int) -> None:
        if amount <= 0 or self._credit + amount > _MAX_CREDIT:
            raise ProtocolError("CREDIT out of range")
        self._credit += amount
        self._changed.set()

    def fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
            self._changed.set()

    async def take(self, wanted: int) -> int:
        """Wait for credit; how many of `wanted` bytes may go now (at least one)."""
        while True:
            if self._error is not None:
                raise self._error
            if self._credit > 0:
                amount = min(wanted, self._credit)
                self._credit -= amount
                return amount
            self.stalls += 1
            if self._stalled is not None:
                self._stalled.set()
            self._changed.clear()
            self.waiting = True
            try:
                await self._changed.wait()
            finally:
                self.waiting = False


async def send_body(
    stream: int,
    body: bytes | AsyncIterator[bytes],
    window: SendWindow,
    send: Callable[[bytes], Awaitable[None]],
) -> int:
    """Send a body as DATA frames within the window, then END; the bytes sent."""
    sent = 0

    async def pieces() -> AsyncIterator[bytes]:
        if isinstance(body, bytes):
            for start in range(0, len(body), CHUNK):
                yield body[start : start + CHUNK]
        else:
            async for part in body:
                for start in range(0, len(part), CHUNK):
                    yield part[start : start + CHUNK]

    async for piece in pieces():
        view = memoryview(piece)
        while view:
            amount = await window.take(len(view))
            await send(encode(Kind.DATA, stream, bytes(view[:amount])))
            view = view[amount:]
            sent += amount
    await send(encode(Kind.END, stream))
    return sent
