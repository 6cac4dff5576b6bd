"""A local stand-in for Apple's APNs provider API: TLS and HTTP/2 on 127.0.0.1.

The real aioapns client talks to it (HTTP/2 over TLS without ALPN, as aioapns speaks
it). It checks what Apple checks, in this order, answering Apple's status and reason:

    :method POST, else 405 MethodNotAllowed; :path /3/device/<token>, else 404 BadPath
    token: hex, even length, 64..200 characters, else 400 BadDeviceToken (MissingDeviceToken)
    auth: a client certificate from the CA (its subject UID is the bundle id), else the
          `authorization: bearer <JWT>` provider token: ES256 signature by a configured
          key (kid header, iss = team id), else 403 MissingProviderToken or
          InvalidProviderToken; iat older than 1 h: 403 ExpiredProviderToken, in the
          future: 403 InvalidProviderToken; a new token for a key within 20 minutes of
          that key's previous one: 429 TooManyProviderTokenUpdates
    apns-topic: required (400 MissingTopic), well formed (400 BadTopic), and one the
          credential may push to: the key's bundle ids or the certificate's UID, each
          also with ".voip" (else 400 TopicDisallowed)
    apns-push-type: a known type (400 InvalidPushType); voip if and only if the topic
          ends in ".voip" (400 InvalidPushType: Apple documents no reason for this
          mismatch, this is ours)
    apns-priority 5 or 10, and 5 for background pushes (400 BadPriority); apns-expiration
          an integer (400 BadExpirationDate); apns-id a UUID (400 BadMessageId);
          apns-collapse-id at most 64 bytes (400 BadCollapseId); repeated apns headers
          (400 DuplicateHeaders)
    payload: not empty (400 PayloadEmpty), at most 5120 bytes for voip and 4096
          otherwise (413 PayloadTooLarge), a JSON object (400 BadPayload: ours, Apple
          documents no reason for malformed JSON)
    a token registered for another topic (`register_device`): 400 DeviceTokenNotForTopic
    then the token's script (`Script`/`Respond`), else 200 and the push is recorded.

Scripted answers apply only to requests that passed these checks, so a script never hides
a malformed request. Every answer carries `apns-id` (the request's, or a new one) and
errors a JSON body {"reason": ...} (plus "timestamp" in ms for 410), sent in one DATA
frame because aioapns parses each frame as a whole document.

Time is read only through the injected `clock` (provider token age and the 20-minute
rule, delivery times), so tests move it instead of sleeping.

What it costs per request is kept low, as Apple's servers are not what a burst of wakes
waits for: a provider token's signature is verified once per connection (its verdict,
good or bad, remembered for that string; its age, the 20-minute rule and the topics are
still checked on every request), requests are answered in the loop turn that completed
them, the answers of one read going out in one TLS write, and answer headers are sent
without Huffman coding.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import re
import ssl
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import H2Error, ProtocolError
from h2.settings import SettingCodes, Settings
from hpack import Encoder, HeaderTuple, NeverIndexedHeaderTuple

from push.apps import ApnsEndpoint
from push.fakes.certs import ApnsSigningKey, ThrowawayCa
from push.fakes.script import Deliveries, Delivery, Script

# Apple's rules.
TOKEN_LIFETIME = 60 * 60  # a provider token older than this is expired
TOKEN_UPDATE_INTERVAL = 20 * 60  # a key may get a new token at most this often
VOIP_PAYLOAD_LIMIT = 5120
PAYLOAD_LIMIT = 4096
_PUSH_TYPES = frozenset(
    {
        "alert",
        "background",
        "complication",
        "controls",
        "fileprovider",
        "liveactivity",
        "location",
        "mdm",
        "pushtotalk",
        "voip",
        "widgets",
    }
)
_DEVICE_TOKEN = re.compile(r"[0-9a-fA-F]{64,200}")
_TOPIC = re.compile(r"[A-Za-z0-9][A-Za-z0-9.\-_]{0,254}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
_EXPIRATION = re.compile(r"[0-9]{1,12}")
_MAX_JWT = 2048  # bytes of an authorization header worth parsing
# Provider-token verdicts a connection remembers; a client rarely presents more than one
# (Apple allows a new token per key every 20 minutes).
_VERDICTS_PER_CONNECTION = 8
# A token's verdict: the key that signed it and its iat, or None (not a valid ES256 JWT
# of a known key).
_Verdict = tuple["ApnsKeyGrant", int] | None
# What hpack's Encoder.encode takes.
_Headers = (
    Iterable[
        HeaderTuple | tuple[bytes | str, bytes | str] | tuple[bytes | str, bytes | str, bool | None]
    ]
    | dict[bytes | str, bytes | str]
)


@dataclass(frozen=True, slots=True)
class ApnsKeyGrant:
    """A token-auth key the fake knows, and the bundle ids it may push to."""

    team_id: str
    key_id: str
    public_key: ec.EllipticCurvePublicKey
    topics: frozenset[str]  # bundle ids; "<bundle>.voip" is allowed with each

    @classmethod
    def of(cls, key: ApnsSigningKey, *topics: str) -> ApnsKeyGrant:
        return cls(key.team_id, key.key_id, key.public_key(), frozenset(topics))


@dataclass(frozen=True, slots=True)
class FakeApnsLimits:
    max_connections: int = 256
    max_concurrent_streams: int = 1000  # per connection, as Apple advertises
    max_header_list_size: int = 8192  # bytes, decoded
    handshake_timeout: float = 10.0  # seconds a client has to complete TLS
    shutdown_timeout: float = 5.0  # seconds `stop()` waits for clients to close


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    reason: str = ""
    retry_after: int | None = None
    timestamp: int | None = None  # ms, for 410

    def body(self) -> bytes:
        if self.status == 200:
            return b""
        document: dict[str, Any] = {"reason": self.reason}
        if self.timestamp is not None:
            document["timestamp"] = self.timestamp
        return json.dumps(document).encode()


@dataclass(slots=True)
class _Request:
    headers: dict[str, str] = field(default_factory=dict)
    duplicated: bool = False
    body: bytearray = field(default_factory=bytearray)
    overflow: bool = False  # the body went past the largest payload Apple takes


class FakeApns:
    """The stand-in. `start()` it, point clients at `endpoint()`, `stop()` it.

    `deliveries` records every accepted push (service "apns", app = topic); `answers`
    counts every answer as (status, reason); `token_updates` counts the distinct provider
    tokens accepted per (team id, key id); `signature_checks` the provider-token
    signatures verified (once per token and connection); `accepted_connections` counts TCP
    connections taken, `refused_handshakes` TLS handshakes refused (e.g. a client
    certificate the CA did not issue).
    """

    def __init__(
        self,
        ca: ThrowawayCa,
        keys: Iterable[ApnsKeyGrant],
        script: Script,
        deliveries: Deliveries,
        clock: Callable[[], float],
        limits: FakeApnsLimits,
    ) -> None:
        self.ca = ca
        self.script = script
        self.deliveries = deliveries
        self.limits = limits
        self.answers: Counter[tuple[int, str]] = Counter()
        self.token_updates: Counter[tuple[str, str]] = Counter()
        self.refused_handshakes = 0
        self.accepted_connections = 0
        self.signature_checks = 0
        self.host = "127.0.0.1"
        self.port = 0
        self._clock = clock
        self._keys = {(k.team_id, k.key_id): k for k in keys}
        self._current_tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self._devices: dict[str, str] = {}
        self._tls = ca.server_context()
        self._connections: set[_ApnsConnection] = set()
        self._server: asyncio.Server | None = None

    @classmethod
    async def start(
        cls,
        ca: ThrowawayCa,
        *,
        keys: Iterable[ApnsKeyGrant] = (),
        script: Script | None = None,
        deliveries: Deliveries | None = None,
        clock: Callable[[], float] = time.time,
        limits: FakeApnsLimits | None = None,
    ) -> FakeApns:
        script, deliveries = script or Script(), deliveries or Deliveries()
        fake = cls(ca, keys, script, deliveries, clock, limits or FakeApnsLimits())
        loop = asyncio.get_running_loop()
        fake._server = await loop.create_server(lambda: _ApnsConnection(fake), fake.host, 0)
        fake.port = fake._server.sockets[0].getsockname()[1]
        return fake

    def endpoint(self) -> ApnsEndpoint:
        """Where a client reaches this stand-in, trusting its CA."""
        return ApnsEndpoint(self.host, self.port, self.ca.client_context())

    def register_device(self, token: str, topic: str) -> None:
        """Bind a device token to the one topic it was issued for (bundle id, or
        "<bundle>.voip" for a PushKit token); other topics get DeviceTokenNotForTopic."""
        self._devices[token.lower()] = topic

    @property
    def hanging_streams(self) -> int:
        """Requests scripted to hang that their client has not yet given up (reset)."""
        return sum(len(c.hanging) for c in self._connections)

    async def drop_connections(self) -> None:
        """Close every client connection as Apple does (GOAWAY, then TLS close), and
        return once they are closed."""
        connections = list(self._connections)
        for connection in connections:
            connection.go_away()
        await self._wait_closed(connections)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()  # stop accepting
        await self.drop_connections()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _wait_closed(self, connections: list[_ApnsConnection]) -> None:
        pending = [c.closed for c in connections if not c.closed.done()]
        if not pending:
            return
        _, late = await asyncio.wait(pending, timeout=self.limits.shutdown_timeout)
        if late:
            for connection in connections:
                connection.abort()
            await asyncio.wait(late)

    # --- one request ------------------------------------------------------------------

    def _answer(
        self, request: _Request, cert_topic: str | None, verdicts: dict[str, _Verdict]
    ) -> _Answer | None:
        """The answer to one complete request; None means never answer (hang).
        `verdicts`: the provider tokens its connection has verified."""
        checked = self._check(request, cert_topic, verdicts)
        if isinstance(checked, _Answer):
            return self._count(checked)
        token, topic, payload = checked
        scripted = self.script.next(token)
        if scripted is not None and scripted.hang:
            return None
        if scripted is not None and scripted.status != 200:
            timestamp = int(self._clock() * 1000) if scripted.status == 410 else None
            return self._count(
                _Answer(scripted.status, scripted.reason, scripted.retry_after, timestamp)
            )
        recorded = {k: v for k, v in request.headers.items() if k.startswith("apns-")}
        self.deliveries.add(Delivery("apns", token, topic, recorded, payload, self._clock()))
        return self._count(_Answer(200))

    def _count(self, answer: _Answer) -> _Answer:
        self.answers[(answer.status, answer.reason)] += 1
        return answer

    def _check(
        self, request: _Request, cert_topic: str | None, verdicts: dict[str, _Verdict]
    ) -> _Answer | tuple[str, str, dict[str, Any]]:
        headers = request.headers
        if request.duplicated:
            return _Answer(400, "DuplicateHeaders")
        if headers.get(":method") != "POST":
            return _Answer(405, "MethodNotAllowed")
        path = headers.get(":path", "")
        if not path.startswith("/3/device/") or "/" in path[len("/3/device/") :]:
            return _Answer(404, "BadPath")
        token = path[len("/3/device/") :]
        if not token:
            return _Answer(400, "MissingDeviceToken")
        if not _DEVICE_TOKEN.fullmatch(token) or len(token) % 2:
            return _Answer(400, "BadDeviceToken")
        allowed = self._authorize(headers.get("authorization"), cert_topic, verdicts)
        if isinstance(allowed, _Answer):
            return allowed
        topic = headers.get("apns-topic")
        if topic is None:
            return _Answer(400, "MissingTopic")
        if not _TOPIC.fullmatch(topic):
            return _Answer(400, "BadTopic")
        if topic not in allowed:
            return _Answer(400, "TopicDisallowed")
        push_type = headers.get("apns-push-type", "alert")
        if push_type not in _PUSH_TYPES or (push_type == "voip") != topic.endswith(".voip"):
            return _Answer(400, "InvalidPushType")
        priority = headers.get("apns-priority", "10")
        if priority not in ("5", "10") or (push_type == "background" and priority != "5"):
            return _Answer(400, "BadPriority")
        if "apns-expiration" in headers and not _EXPIRATION.fullmatch(headers["apns-expiration"]):
            return _Answer(400, "BadExpirationDate")
        if "apns-id" in headers and not _UUID.fullmatch(headers["apns-id"]):
            return _Answer(400, "BadMessageId")
        if len(headers.get("apns-collapse-id", "").encode()) > 64:
            return _Answer(400, "BadCollapseId")
        limit = VOIP_PAYLOAD_LIMIT if push_type == "voip" else PAYLOAD_LIMIT
        if request.overflow or len(request.body) > limit:
            return _Answer(413, "PayloadTooLarge")
        if not request.body:
            return _Answer(400, "PayloadEmpty")
        try:
            payload = json.loads(request.body)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            return _Answer(400, "BadPayload")
        if not isinstance(payload, dict):
            return _Answer(400, "BadPayload")
        registered = self._devices.get(token.lower())
        if registered is not None and registered != topic:
            return _Answer(400, "DeviceTokenNotForTopic")
        return token, topic, payload

    def _authorize(
        self, authorization: str | None, cert_topic: str | None, verdicts: dict[str, _Verdict]
    ) -> _Answer | frozenset[str]:
        """The topics this request may push to, or why it may not push at all. The
        signature of a token is checked once per connection (`verdicts`); whether it is
        still valid now, and whether it may replace the key's current one, every time."""
        if cert_topic is not None:  # a verified client certificate wins over any token
            return frozenset({cert_topic, f"{cert_topic}.voip"})
        if not authorization:
            return _Answer(403, "MissingProviderToken")
        scheme, _, jwt = authorization.partition(" ")
        if scheme.lower() != "bearer" or not jwt or len(jwt) > _MAX_JWT:
            return _Answer(403, "InvalidProviderToken")
        if jwt in verdicts:
            claims = verdicts[jwt]
        else:
            claims = _verified_claims(jwt, self._keys)
            self.signature_checks += 1
            if len(verdicts) >= _VERDICTS_PER_CONNECTION:
                verdicts.clear()  # a client cycling tokens: verified anew, still bounded
            verdicts[jwt] = claims
        if claims is None:
            return _Answer(403, "InvalidProviderToken")
        grant, issued_at = claims
        now = self._clock()
        if issued_at > now:
            return _Answer(403, "InvalidProviderToken")
        if now - issued_at > TOKEN_LIFETIME:
            return _Answer(403, "ExpiredProviderToken")
        key = (grant.team_id, grant.key_id)
        current = self._current_tokens.get(key)
        if current is None or current[0] != jwt:
            if current is not None and now - current[1] < TOKEN_UPDATE_INTERVAL:
                return _Answer(429, "TooManyProviderTokenUpdates")
            self._current_tokens[key] = (jwt, now)
            self.token_updates[key] += 1
        return grant.topics | {f"{t}.voip" for t in grant.topics}


def _b64json(part: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def _verified_claims(
    jwt: str, keys: Mapping[tuple[str, str], ApnsKeyGrant]
) -> tuple[ApnsKeyGrant, int] | None:
    """The key that signed `jwt` and its iat, if it is an ES256 JWT of a known key."""
    try:
        header_b64, claims_b64, signature_b64 = jwt.split(".")
        header, claims = _b64json(header_b64), _b64json(claims_b64)
        signature = base64.urlsafe_b64decode(signature_b64 + "=" * (-len(signature_b64) % 4))
    except (ValueError, binascii.Error):  # wrong part count, bad base64 or JSON
        return None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        return None
    kid, iss, iat = header.get("kid"), claims.get("iss"), claims.get("iat")
    if header.get("alg") != "ES256" or not isinstance(kid, str) or not isinstance(iss, str):
        return None
    if not isinstance(iat, int) or isinstance(iat, bool) or len(signature) != 64:
        return None
    grant = keys.get((iss, kid))
    if grant is None:
        return None
    # JWS carries r||s; cryptography verifies DER.
    der = encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    try:
        grant.public_key.verify(
            der, f"{header_b64}.{claims_b64}".encode(), ec.ECDSA(hashes.SHA256())
        )
    except InvalidSignature:
        return None
    return grant, iat


class _ApnsConnection(asyncio.Protocol):
    """One client connection: TLS through memory BIOs, then HTTP/2 with h2.

    TLS is driven by hand rather than by asyncio so that a refused handshake is seen and
    counted, and its alert reaches the client before the socket closes (asyncio's server
    side drops both silently).
    """

    def __init__(self, fake: FakeApns) -> None:
        self._fake = fake
        self._transport: asyncio.Transport | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = fake._tls.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._h2: H2Connection | None = None
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._cert_topic: str | None = None
        self._requests: dict[int, _Request] = {}
        self._verdicts: dict[str, _Verdict] = {}  # provider token -> its verdict
        self._blocked: dict[int, bytes] = {}  # response bodies waiting for flow-control window
        self.hanging: set[int] = set()  # streams scripted to hang, until reset or closed
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # --- transport --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = transport = cast(asyncio.Transport, transport)
        if len(self._fake._connections) >= self._fake.limits.max_connections:
            transport.abort()
            return
        self._fake._connections.add(self)
        self._fake.accepted_connections += 1
        self._handshake_timer = asyncio.get_running_loop().call_later(
            self._fake.limits.handshake_timeout, self.abort
        )

    def data_received(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            return  # refused or closed: nothing more is read
        self._incoming.write(data)
        if self._h2 is None and not self._handshake():
            return
        plain = bytearray()
        closing = False
        while not closing:
            try:
                chunk = self._tls.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLError:
                self.abort()
                return
            closing = not chunk  # the client's close_notify
            plain += chunk
        self._flush_tls()
        if plain:
            self._receive_h2(bytes(plain))
        if closing:
            self._close_tls()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self._fake._connections.discard(self)
        if not self.closed.done():
            self.closed.set_result(None)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _handshake(self) -> bool:
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush_tls()
            return False
        except ssl.SSLError:  # e.g. a client certificate our CA did not issue
            self._fake.refused_handshakes += 1
            self._flush_tls()  # the alert, so the client learns why
            if self._transport is not None:
                self._transport.close()
            return False
        self._flush_tls()
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self._cert_topic = _certificate_topic(self._tls.getpeercert())
        limits = self._fake.limits
        self._h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        # Replaced before the preface so the limits hold from the first frame (a settings
        # change would apply only once the client acknowledged it).
        self._h2.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
                SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
            },
        )
        self._h2.decoder.max_header_list_size = limits.max_header_list_size
        self._h2.encoder = _LiteralEncoder()
        self._h2.initiate_connection()
        self._send_h2()
        return True

    def _flush_tls(self) -> None:
        data = self._outgoing.read()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _send_close_notify(self) -> None:
        # unwrap() queues our close_notify, raising SSLWantReadError until the client's
        # has arrived.
        with contextlib.suppress(ssl.SSLError):
            self._tls.unwrap()
        self._flush_tls()

    def _close_tls(self) -> None:
        self._send_close_notify()
        if self._transport is not None:
            self._transport.close()

    def go_away(self) -> None:
        """GOAWAY and TLS close_notify, then wait for the client to close in turn (so
        that once this connection is closed, its client knows)."""
        if self._h2 is not None:
            self._h2.close_connection()
            self._send_h2()
        self._send_close_notify()

    # --- HTTP/2 -----------------------------------------------------------------------

    def _send_h2(self) -> None:
        assert self._h2 is not None
        data = self._h2.data_to_send()
        if data:
            try:
                self._tls.write(data)
            except ssl.SSLError:  # TLS already shut down
                return
            self._flush_tls()

    def _receive_h2(self, data: bytes) -> None:
        assert self._h2 is not None
        try:
            events = self._h2.receive_data(data)
        except ProtocolError:  # h2 queued a GOAWAY naming the error
            self._send_h2()
            self._close_tls()
            return
        for event in events:
            if isinstance(event, RequestReceived):
                self._on_headers(event.stream_id, event.headers)
            elif isinstance(event, DataReceived):
                self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                self._on_data(event.stream_id, event.data)
            elif isinstance(event, StreamEnded):
                self._on_request(event.stream_id)
            elif isinstance(event, StreamReset):  # the client gave up (timeout): forget it
                self._forget(event.stream_id)
            elif isinstance(event, WindowUpdated):
                self._send_blocked()
            elif isinstance(event, ConnectionTerminated):
                self._close_tls()
                return
        self._send_h2()

    def _on_headers(self, stream_id: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
        request = _Request()
        for raw_name, raw_value in headers:
            name = _text(raw_name).lower()
            value = _text(raw_value)
            if name in request.headers and (name.startswith("apns-") or name.startswith(":")):
                request.duplicated = True
            request.headers[name] = value
        self._requests[stream_id] = request

    def _on_data(self, stream_id: int, data: bytes) -> None:
        request = self._requests.get(stream_id)
        if request is None or request.overflow:
            return
        if len(request.body) + len(data) > VOIP_PAYLOAD_LIMIT:
            request.overflow = True  # keep nothing more; answered 413 at the end
            request.body.clear()
            return
        request.body += data

    def _on_request(self, stream_id: int) -> None:
        """Answer a complete request now; `_receive_h2` writes what the requests of its
        read queued at once."""
        request = self._requests.pop(stream_id, None)
        if request is None:
            return
        answer = self._fake._answer(request, self._cert_topic, self._verdicts)
        if answer is None:
            self.hanging.add(stream_id)  # open until the client resets it or leaves
            return
        self._respond(stream_id, request, answer)

    def _forget(self, stream_id: int) -> None:
        self.hanging.discard(stream_id)
        self._requests.pop(stream_id, None)
        self._blocked.pop(stream_id, None)

    def _respond(self, stream_id: int, request: _Request, answer: _Answer) -> None:
        assert self._h2 is not None
        apns_id = request.headers.get("apns-id") or str(uuid.uuid4())
        # Differs in every answer: kept out of the client's HPACK table.
        headers: list[HeaderTuple | tuple[str, str]] = [
            (":status", str(answer.status)),
            NeverIndexedHeaderTuple("apns-id", apns_id),
        ]
        body = answer.body()
        if body:
            headers.append(("content-type", "application/json; charset=utf-8"))
        if answer.retry_after is not None:
            headers.append(("retry-after", str(answer.retry_after)))
        try:
            self._h2.send_headers(stream_id, headers, end_stream=not body)
        except H2Error:  # the stream is gone (reset, connection closing)
            return
        if body:
            self._blocked[stream_id] = body
            self._send_blocked()

    def _send_blocked(self) -> None:
        """Queue each waiting body whole, in one DATA frame, once the window allows (the
        caller sends what is queued)."""
        assert self._h2 is not None
        for stream_id, body in list(self._blocked.items()):
            try:
                if self._h2.local_flow_control_window(stream_id) < len(body):
                    continue
                self._h2.send_data(stream_id, body, end_stream=True)
            except H2Error:
                pass  # the stream is gone
            del self._blocked[stream_id]


class _LiteralEncoder(Encoder):
    """HPACK without Huffman coding: the answers' few literals (a status, an apns-id)
    are cheaper to send and to read as they are, for the stand-in and its client alike
    (RFC 7541 5.2 leaves the choice to the encoder)."""

    def encode(self, headers: _Headers, huffman: bool = True) -> bytes:
        return super().encode(headers, huffman=False)


def _text(value: bytes | str) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _certificate_topic(peercert: Any) -> str | None:
    """The bundle id in a verified client certificate's subject UID, as Apple reads it."""
    if not isinstance(peercert, dict):
        return None
    for rdn in peercert.get("subject", ()):
        for name, value in rdn:
            if name == "userId" and isinstance(value, str):
                return value
    return None


__all__ = [
    "PAYLOAD_LIMIT",
    "TOKEN_LIFETIME",
    "TOKEN_UPDATE_INTERVAL",
    "VOIP_PAYLOAD_LIMIT",
    "ApnsKeyGrant",
    "FakeApns",
    "FakeApnsLimits",
]
