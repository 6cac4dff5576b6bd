"""Waking iPhones through APNs, on aioapns 4.0.

One `aioapns.APNs` client per app and environment (production for `pn-provider=apns`,
sandbox for `apns.dev`), made on first use inside the running loop. Each wake is one
attempt bounded by the caller's timeout; `PushService` owns retries, so aioapns's own
retry loop is cut to a single attempt.

What the app receives (JSON, nothing personal: no caller name or number):

    incoming call   voip push to "<bundle>.voip", priority 10, expiring by the deadline
                    {"event": "incoming_call", "call_id": "<id>"}
    call cancelled  the follow-up voip push, same topic and priority, so the app can end
                    the CallKit call it reported: {"event": "call_cancelled", "call_id": ...}
    re-register     a background push to "<bundle>", priority 5, never a voip push:
                    {"aps": {"content-available": 1}, "event": "reregister"}

aioapns is used as it is except where a long-lived, sparse sender needs otherwise; the
`_Connection` protocol subclass says what and why. Its host and port come from
`push.endpoints.apns_protocol_for`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn, cast

import jwt
from aioapns import APNs
from aioapns.common import NotificationRequest, NotificationResult, PushType
from aioapns.connection import (
    APNsBaseClientProtocol,
    APNsBaseConnectionPool,
    APNsTLSClientProtocol,
    AuthorizationHeaderProvider,
    ChannelPool,
)
from aioapns.exceptions import ConnectionClosed, MaxAttemptsExceeded
from aioapns.exceptions import ConnectionError as ApnsConnectionError
from aioapns.logging import logger as aioapns_log
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    SettingsAcknowledged,
    StreamEnded,
    WindowUpdated,
)
from h2.exceptions import FrameTooLargeError, H2Error
from h2.settings import ChangedSetting, SettingCodes
from hpack import Encoder, HeaderTuple, NeverIndexedHeaderTuple

from push.apps import ApnsCredentials, ApnsEndpoint, AppCredentials
from push.endpoints import apns_protocol_for, apns_ssl_context
from push.wake import (
    Delivered,
    Outcome,
    PermanentFailure,
    Reason,
    Service,
    TemporaryFailure,
    TokenDead,
    WakeRequest,
)

log = logging.getLogger("softrelay.push.apns")

# Apple: a provider token is valid for 60 minutes and may be replaced at most every 20;
# refreshing at 40 leaves margin on both sides.
TOKEN_REFRESH = 40 * 60
# aioapns closes a connection after 10 s without a send; a wake should find one open.
IDLE_CLOSE = 30 * 60
CLOSE_TIMEOUT = 2.0  # seconds `close()` waits for TLS shutdowns before aborting
# Streams one connection carries at once, at most (fewer if the server says so); beyond,
# the pool opens another connection, up to MAX_CONNECTIONS per app and environment. h2
# walks all of a connection's streams each time it opens one: at 1,000 streams that was
# its costliest function (bench/push.py).
STREAMS_PER_CONNECTION = 200
MAX_CONNECTIONS = 10
# Pushes queued in one loop turn go out together, but at most this many per write: the
# first of a burst of wakes then reach Apple while the relay still prepares the rest,
# instead of all waiting for the last (a write costs one TLS record and one send()).
PUSHES_PER_WRITE = 16
_TCP_KEEPALIVE = {"TCP_KEEPIDLE": 60, "TCP_KEEPINTVL": 15, "TCP_KEEPCNT": 4}

_DEAD_TOKEN = frozenset(
    {"BadDeviceToken", "DeviceTokenNotForTopic", "Unregistered", "ExpiredToken"}
)
_TRANSIENT = frozenset({"IdleTimeout", "Shutdown"})
# TLS alerts by which a server refuses our client certificate: retrying will not help.
_CERT_REFUSED = frozenset(
    {
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "TLSV1_ALERT_ACCESS_DENIED",
        "TLSV1_ALERT_UNKNOWN_CA",
    }
)
_REASON = re.compile(r"[A-Za-z]{1,64}")  # Apple's reasons; anything else is not echoed


class ProviderToken(AuthorizationHeaderProvider):
    """One signed provider token per key, shared by all connections of all clients using
    the key, re-signed only after `refresh_after` seconds.

    aioapns signs a new token for every connection it opens, so a sparse sender whose
    connections close between sends would update its token more often than Apple allows
    (429 TooManyProviderTokenUpdates).
    """

    def __init__(
        self, credentials: ApnsCredentials, clock: Callable[[], float], refresh_after: float
    ) -> None:
        self._team_id = credentials.team_id
        self._key_id = credentials.key_id
        self._key = credentials.key_pem
        self._clock = clock
        self._refresh_after = refresh_after
        self._header: str | None = None
        self._signed_at = 0.0

    def get_header(self) -> str:
        now = self._clock()
        if self._header is None or now - self._signed_at >= self._refresh_after:
            token = jwt.encode(
                {"iss": self._team_id, "iat": int(now)},
                self._key,
                algorithm="ES256",
                headers={"kid": self._key_id},
            )
            self._header, self._signed_at = f"bearer {token}", now
        return self._header

    def invalidate(self) -> None:
        """Apple called the token expired (a clock problem): sign anew on the next send."""
        self._header = None


class _Notification(NotificationRequest):
    """aioapns's request, plus the Retry-After header of its answer (aioapns drops it)."""

    __slots__ = ("retry_after",)

    def __init__(
        self,
        device_token: str,
        message: dict[str, Any],
        *,
        priority: int,
        push_type: PushType,
        apns_topic: str,
    ) -> None:
        super().__init__(
            device_token, message, priority=priority, push_type=push_type, apns_topic=apns_topic
        )
        self.retry_after: float | None = None


class _ConnectionLost(Exception):
    """Raised to senders when a connection drops with an error, carrying the error.

    Not a ConnectionClosed, so aioapns's pool passes it through instead of turning it
    into MaxAttemptsExceeded, which would lose the cause (e.g. a refused certificate).
    """

    def __init__(self, cause: BaseException) -> None:
        super().__init__(type(cause).__name__)
        self.cause = cause


class _Streams(ChannelPool):
    """The stream slots of one connection (aioapns's "channels"): a semaphore that the
    server's MAX_CONCURRENT_STREAMS resizes, here never beyond STREAMS_PER_CONNECTION,
    also before the server's SETTINGS come (aioapns starts at 1,000).

    aioapns's resize goes wrong while streams are open, and Apple changes its limit then
    (down to 1 after a rejected push, back up after an accepted one): lowering leaves a
    negative count, which asyncio's Semaphore takes for free slots (it tests `== 0`), and
    raising it with no sender waiting frees at most one slot. Here the slots in use stay
    in use across a resize and the count follows the new limit.

    Slots number no streams (aioapns's `acquire` does): h2 wants stream ids in the order
    the streams open, and a sender may wait for window between its slot and its stream.
    """

    def __init__(self) -> None:
        super().__init__(STREAMS_PER_CONNECTION)

    @property
    def bound(self) -> int:
        return self._bound_value

    @bound.setter
    def bound(self, limit: int) -> None:
        limit = max(0, min(limit, STREAMS_PER_CONNECTION))
        in_use = self._bound_value - self._value
        self._bound_value = limit
        self._value = limit - in_use  # negative until enough streams have ended
        for _ in range(max(0, self._value)):
            self._wake_up_next()  # a waiting sender, if any, takes one

    def locked(self) -> bool:
        return self._value <= 0 or super().locked()

    def release(self) -> None:
        self._value = min(self._value + 1, self._bound_value)
        if self._value > 0:
            self._wake_up_next()

    async def take(self) -> None:
        """Wait for a free slot and take it (`ConnectionClosed` if the connection is lost
        meanwhile)."""
        await asyncio.Semaphore.acquire(self)


@dataclass(eq=False)
class _ClientState:
    token: ProviderToken | None  # None for certificate auth
    live: set[_Connection] = field(default_factory=set)  # opened and not yet lost


class _Connection(APNsTLSClientProtocol):
    """aioapns's connection, fixed for a long-lived, sparse sender.

    - the shared `ProviderToken` replaces the per-connection token aioapns makes;
    - connections stay open for IDLE_CLOSE instead of 10 s, with TCP keepalive so that
      NAT mappings stay up and a dead peer is noticed;
    - a send waits until HTTP/2 flow control lets its body go: aioapns ignores window
      updates and sends the HEADERS, then h2 refuses the DATA (FlowControlError) once
      the connection's window (64 KiB at first) is used up, as with ~1,000 pushes in
      flight. The stream was left half-open at the server and its slot taken for good;
    - a send that fails or is abandoned (its timeout) resets its stream, if open, and
      frees its slot, exactly once; aioapns would leave an abandoned stream behind and
      later fail on its cancelled future, killing the connection;
    - at most STREAMS_PER_CONNECTION streams per connection (`_Streams`): the pool opens
      more connections beyond (it picks the first connection with a free slot);
    - the Retry-After header reaches the request; received data is acknowledged (aioapns
      never does, so a long-lived connection's flow-control window would close);
    - a connection lost with an error raises that error to its senders;
    - what h2 queued is written once per loop turn (`flush`), or after PUSHES_PER_WRITE
      pushes: aioapns writes, and re-arms its idle timer, once per push, so a burst of
      wakes cost a TLS record, a send() and a timer each;
    - the provider token goes into HPACK's dynamic table, and no header is Huffman
      coded (see `__init__`).

    A subclass per client binds `state` (see `ApnsProvider._new_client`).
    """

    INACTIVITY_TIME = IDLE_CLOSE
    state: ClassVar[_ClientState]

    def __init__(
        self,
        apns_topic: str,
        loop: asyncio.AbstractEventLoop | None = None,
        on_connection_lost: Callable[[APNsBaseClientProtocol], NoReturn] | None = None,
        auth_provider: AuthorizationHeaderProvider | None = None,
    ) -> None:
        # `auth_provider` is the token aioapns made for this connection alone: unused.
        super().__init__(apns_topic, loop, _tolerant(on_connection_lost), self.state.token)
        self.free_channels = self._streams = _Streams()
        # Our headers are lower case and bare already. h2's normalising would also send
        # the provider token never-indexed, Huffman-coded anew in every request (the
        # costliest function of a burst, bench/wake.py) and decoded anew by the server.
        # Indexed, it goes once per connection. That is safe for it (RFC 7541 7.1.3):
        # HPACK only confirms a guess of a whole value, and the token is a signed JWT
        # (64 random bytes of signature), changed every TOKEN_REFRESH.
        self.conn.config.normalize_outbound_headers = False
        # h2's checks of what it sends are of the header list's shape (pseudo-headers
        # first and known, a :path, no connection headers), which `_headers` fixes; a
        # test runs them on each kind of push (they cost more than the encoding).
        self.conn.config.validate_outbound_headers = False
        # What changes per push (the device token's path, apns-id) is sent as it is:
        # Huffman coding saves ~30 bytes a push and costs each side a loop over every
        # character (the stand-in's costliest function decoding it, bench/wake.py).
        self.conn.encoder = _LiteralEncoder()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self._retry_after: dict[str, float] = {}
        self._slots: set[int] = set()  # streams holding a slot, until ended or reset
        self._window_granted = asyncio.Event()  # set on a window update, cleared to wait
        self._flush_due = False  # a write is scheduled for the end of this loop turn
        self._unwritten = 0  # pushes queued since the last write

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.state.live.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                for name, value in _TCP_KEEPALIVE.items():
                    if hasattr(socket, name):  # Linux names; elsewhere the OS defaults
                        sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)

    async def send_notification(self, request: NotificationRequest) -> NotificationResult:
        """aioapns's send (the same request), waiting for flow-control window, and
        numbering its stream only when it opens it."""
        data = json.dumps(request.message, ensure_ascii=False).encode()
        if len(data) > self.conn.max_outbound_frame_size:  # sent whole, in one frame
            raise FrameTooLargeError(f"{len(data)}-byte payload")
        await self._streams.take()
        stream_id: int | None = None
        try:
            await self._window_for(len(data))  # so that HEADERS and DATA go together
            stream_id = self.conn.get_next_available_stream_id()
            self._slots.add(stream_id)
            self.conn.send_headers(stream_id, self._headers(request))
            await self._window_for(len(data), stream_id)  # the stream's own window too
            self.conn.send_data(stream_id, data, end_stream=True)
        except BaseException:  # CancelledError too: nothing may stay open or taken
            if stream_id is None:
                self._streams.release()
            else:
                self._end(stream_id)
            raise
        future: asyncio.Future[NotificationResult] = self.loop.create_future()
        self.requests[request.notification_id] = future
        self.request_streams[stream_id] = request.notification_id
        self._unwritten += 1
        if self._unwritten >= PUSHES_PER_WRITE:
            self._write_now()  # the end of the loop turn may be far: the rest of a burst
        else:
            self.flush()
        try:
            result = await future
        except asyncio.CancelledError:
            self._abandon(request.notification_id, stream_id)
            raise
        finally:
            retry_after = self._retry_after.pop(request.notification_id, None)
        if isinstance(request, _Notification):
            request.retry_after = retry_after
        return result

    def flush(self) -> None:
        """Write what h2 queued at the end of this loop turn, with what the other sends
        of the turn queue: one TLS record and one send() for a burst."""
        if not self._flush_due:
            self._flush_due = True
            self.loop.call_soon(self._write)

    def _write(self) -> None:
        self._flush_due = False
        self._write_now()

    def _write_now(self) -> None:
        self._unwritten = 0
        if self.transport is not None and not self.transport.is_closing():
            super().flush()  # aioapns's: the idle timer re-armed, the bytes written

    def close(self) -> None:
        self._write()  # what is queued (a reset stream, a GOAWAY) before the close
        super().close()

    def _headers(self, request: NotificationRequest) -> list[tuple[bytes, bytes]]:
        """The headers aioapns 4.0 sends, as bytes (h2 would encode each str anew). The
        two that differ in every request stay out of HPACK's dynamic table, where they
        would only push out the provider token."""
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"https"),
            _unindexed(b":path", f"/3/device/{request.device_token}".encode()),
            (b"host", self.APNS_SERVER.encode()),
            _unindexed(b"apns-id", request.notification_id.encode()),
            (b"apns-topic", (request.apns_topic or self.apns_topic).encode()),
        ]
        if request.time_to_live is not None:
            expiration = int(time.time()) + request.time_to_live
            headers.append((b"apns-expiration", b"%d" % expiration))
        if request.priority is not None:
            headers.append((b"apns-priority", b"%d" % request.priority))
        if request.collapse_key is not None:
            headers.append((b"apns-collapse-id", request.collapse_key.encode()))
        if request.push_type is not None:
            headers.append((b"apns-push-type", request.push_type.value.encode()))
        if self.auth_provider is not None:
            headers.append((b"authorization", self.auth_provider.get_header().encode()))
        return headers

    async def _window_for(self, size: int, stream_id: int | None = None) -> None:
        """Return once `size` bytes of DATA fit the connection's flow-control window, and
        also the stream's if given; raise ConnectionClosed once the connection closes."""
        while True:
            if not self.usable:
                raise ConnectionClosed("connection closing")
            if stream_id is None:
                window = self.conn.outbound_flow_control_window
            else:
                window = self.conn.local_flow_control_window(stream_id)
            if window >= size:
                return
            self.flush()  # what is queued, such as this stream's HEADERS
            self._window_granted.clear()
            await self._window_granted.wait()

    def _abandon(self, notification_id: str, stream_id: int) -> None:
        self._retry_after.pop(notification_id, None)
        self.requests.pop(notification_id, None)
        self.request_statuses.pop(notification_id, None)
        self.request_streams.pop(stream_id, None)
        self._end(stream_id)

    def _end(self, stream_id: int) -> None:
        """Reset the stream unless it has ended, and free its slot if it still holds it."""
        with contextlib.suppress(H2Error):  # ended already (or never opened)
            self.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
        self._release(stream_id)
        if self.usable:
            self.flush()

    def _release(self, stream_id: int) -> None:
        if stream_id in self._slots:
            self._slots.remove(stream_id)
            self._streams.release()

    def data_received(self, data: bytes) -> None:
        # aioapns's, plus what it drops: window updates, and received data to acknowledge.
        for event in self.conn.receive_data(data):
            if isinstance(event, ResponseReceived):
                self.on_response_received(dict(event.headers))
            elif isinstance(event, DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                self.on_data_received(event.data, event.stream_id)
            elif isinstance(event, RemoteSettingsChanged):
                changed = cast(dict[SettingCodes, ChangedSetting], event.changed_settings)
                self.on_remote_settings_changed(changed)
                self._window_granted.set()  # INITIAL_WINDOW_SIZE moves stream windows
            elif isinstance(event, StreamEnded):
                self.on_stream_ended(event.stream_id)
            elif isinstance(event, ConnectionTerminated):
                self.on_connection_terminated(event)  # GOAWAY: aioapns closes
                self._window_granted.set()  # senders waiting for window give up
            elif isinstance(event, WindowUpdated):
                self._window_granted.set()
            elif not isinstance(event, SettingsAcknowledged):
                aioapns_log.warning("Unknown event: %s", event)
        self.flush()

    def on_response_received(self, headers: dict[bytes, bytes]) -> None:
        notification_id = headers.get(b"apns-id", b"").decode("utf8")
        future = self.requests.get(notification_id)
        if future is not None and future.done():
            return  # cancelled by its timeout a moment ago; _abandon forgets it
        if b"retry-after" in headers:
            with contextlib.suppress(ValueError):
                self._retry_after[notification_id] = max(0.0, float(headers[b"retry-after"]))
        super().on_response_received(headers)

    def on_data_received(self, data: bytes, stream_id: int) -> None:
        notification_id = self.request_streams.get(stream_id, "")
        future = self.requests.get(notification_id)
        if future is not None and future.done():
            return
        super().on_data_received(data, stream_id)

    def on_stream_ended(self, stream_id: int) -> None:
        # aioapns frees a slot for any stream that ends, and keeps successful ones forever.
        self.request_streams.pop(stream_id, None)
        self._release(stream_id)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.live.discard(self)
        pending = {k: f for k, f in self.requests.items() if not f.done()}
        if exc is not None:
            for future in pending.values():
                future.set_exception(_ConnectionLost(exc))
            pending = {}
        self.requests = pending
        super().connection_lost(exc)
        self._window_granted.set()  # senders waiting for window find the connection gone
        if not self.closed.done():
            self.closed.set_result(None)


# What hpack's Encoder.encode takes.
_Headers = (
    Iterable[
        HeaderTuple | tuple[bytes | str, bytes | str] | tuple[bytes | str, bytes | str, bool | None]
    ]
    | dict[bytes | str, bytes | str]
)


class _LiteralEncoder(Encoder):
    """HPACK with every literal sent as it is, never Huffman coded (RFC 7541 5.2 leaves
    the choice to the encoder)."""

    def encode(self, headers: _Headers, huffman: bool = True) -> bytes:
        return super().encode(headers, huffman=False)


def _unindexed(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    """A header HPACK sends as a literal, never entered in its dynamic table."""
    return cast(tuple[bytes, bytes], NeverIndexedHeaderTuple(name, value))


def _tolerant(
    discard: Callable[[APNsBaseClientProtocol], NoReturn] | None,
) -> Callable[[APNsBaseClientProtocol], NoReturn] | None:
    """aioapns's pool callback, tolerating a connection we already took out of the pool."""
    if discard is None:
        return None

    def callback(connection: APNsBaseClientProtocol) -> None:
        with contextlib.suppress(ValueError):
            discard(connection)

    # aioapns annotates the callback as NoReturn, though its own returns None.
    return cast(Callable[[APNsBaseClientProtocol], NoReturn], callback)


async def _ignore_error(request: NotificationRequest, result: NotificationResult) -> None:
    """aioapns logs every failed push unless given an err_func; outcomes say it all."""


@dataclass(eq=False)
class _Client:
    apns: APNs
    state: _ClientState


class _Unusable(Exception):
    """Credentials that cannot work: a PermanentFailure for every send of the app."""


class ApnsProvider:
    """The APNs `PushProvider`: one instance for every app with APNs credentials."""

    family = "apns"

    def __init__(
        self,
        apps: Mapping[str, ApnsCredentials],
        endpoint: ApnsEndpoint | None,
        clock: Callable[[], float],
        token_refresh: float,
    ) -> None:
        self._apps = dict(apps)
        self._endpoint = endpoint
        self._clock = clock
        self._token_refresh = token_refresh
        self._clients: dict[tuple[str, bool], _Client] = {}
        self._tokens: dict[tuple[str, str, str], ProviderToken] = {}
        self._closed = False

    @classmethod
    async def create(
        cls,
        apps: Sequence[AppCredentials],
        endpoint: ApnsEndpoint | None = None,
        *,
        clock: Callable[[], float] = time.time,
        token_refresh: float = TOKEN_REFRESH,
    ) -> ApnsProvider:
        """`endpoint` None means Apple. `clock` (epoch seconds, the one deadlines are on)
        also dates provider tokens; `token_refresh` is their lifetime here in seconds."""
        credentials = {app.app_id: app.apns for app in apps if app.apns is not None}
        return cls(credentials, endpoint, clock, token_refresh)

    def serves(self, app_id: str) -> bool:
        return app_id in self._apps

    # ASYNC109: PushProvider names the parameter; asyncio.timeout below enforces it.
    async def send(self, request: WakeRequest, timeout: float) -> Outcome:  # noqa: ASYNC109
        credentials = self._apps.get(request.app_id)
        if credentials is None:
            return PermanentFailure("no APNs credentials for this app")
        if request.service.family != "apns":
            return PermanentFailure("not an APNs binding")
        if self._closed:
            return PermanentFailure("APNs provider closed")
        remaining = request.deadline - self._clock()
        if remaining <= 0:
            return TemporaryFailure("deadline passed")
        sandbox = request.service is Service.APNS_SANDBOX
        try:
            client = self._client(request.app_id, credentials, sandbox)
        except _Unusable as exc:
            return PermanentFailure(f"APNs credentials unusable: {exc}")
        notification = _notification(request, credentials.topic)
        try:
            async with asyncio.timeout(timeout):
                result = await self._attempt(client, notification, request.deadline)
        except TimeoutError:  # before OSError: TimeoutError is one
            return TemporaryFailure("timeout")
        except _ConnectionLost as exc:
            return _connection_failure(exc.cause)
        except ApnsConnectionError as exc:  # raised by aioapns with the cause as context
            return _connection_failure(exc.__context__)
        except (MaxAttemptsExceeded, ConnectionClosed):
            return TemporaryFailure("connection lost")
        except (H2Error, OSError) as exc:  # ssl.SSLError is an OSError
            return TemporaryFailure(f"connection error ({type(exc).__name__})")
        except Exception as exc:  # never let a library's surprise reach the relay
            log.warning(
                "unexpected exception from aioapns", extra={"fields": {"error": type(exc).__name__}}
            )
            return TemporaryFailure(f"unexpected error ({type(exc).__name__})")
        return self._outcome(result, notification, client)

    async def _attempt(
        self, client: _Client, notification: _Notification, deadline: float
    ) -> NotificationResult:
        await _open_connection(client.apns.pool)
        # `_Connection` sends int(time.time()) + time_to_live as apns-expiration (as
        # aioapns does), a moment later: one second less keeps it within the deadline.
        notification.time_to_live = max(0, math.floor(deadline - self._clock()) - 1)
        return await client.apns.send_notification(notification)

    def _outcome(
        self, result: NotificationResult, notification: _Notification, client: _Client
    ) -> Outcome:
        if result.is_successful:
            return Delivered()
        status = int(result.status) if result.status.isdigit() else 0
        reason = result.description or ""
        reason = reason if _REASON.fullmatch(reason) else f"HTTP {status}"
        if status == 410 or reason in _DEAD_TOKEN:
            return TokenDead(reason)
        if status == 429 or status >= 500 or reason in _TRANSIENT:
            return TemporaryFailure(reason, notification.retry_after)
        if reason == "ExpiredProviderToken" and client.state.token is not None:
            client.state.token.invalidate()
        return PermanentFailure(reason)

    def _client(self, app_id: str, credentials: ApnsCredentials, sandbox: bool) -> _Client:
        client = self._clients.get((app_id, sandbox))
        if client is None:
            client = self._new_client(credentials, sandbox)
            self._clients[(app_id, sandbox)] = client
            # No app id here: the service log declares none (the push log carries it).
            log.debug("apns client created")
        return client

    def _new_client(self, credentials: ApnsCredentials, sandbox: bool) -> _Client:
        token = self._token(credentials) if credentials.token_auth else None
        if token is None and not credentials.cert_file:
            raise _Unusable("neither a signing key nor a certificate")
        try:
            if token is not None:
                token.get_header()  # a key that cannot sign fails here, not mid-request
            # Certificate auth reads the PEM here, once per client, inside the loop.
            apns = APNs(
                client_cert=None if token else credentials.cert_file,
                key=credentials.key_pem if token else None,
                key_id=credentials.key_id or None,
                team_id=credentials.team_id or None,
                topic=credentials.topic,
                max_connections=MAX_CONNECTIONS,
                max_connection_attempts=1,  # it sleeps 1 s between attempts; we retry
                use_sandbox=sandbox,
                ssl_context=apns_ssl_context(self._endpoint),
                err_func=_ignore_error,
            )
        except (OSError, ValueError, TypeError, jwt.PyJWTError) as exc:
            raise _Unusable(type(exc).__name__) from exc
        state = _ClientState(token)
        bound = cast(type[_Connection], type("ApnsConnection", (_Connection,), {"state": state}))
        apns.pool.protocol_class = apns_protocol_for(bound, self._endpoint, sandbox=sandbox)
        return _Client(apns, state)

    def _token(self, credentials: ApnsCredentials) -> ProviderToken:
        key = (credentials.team_id, credentials.key_id, credentials.key_pem)
        token = self._tokens.get(key)
        if token is None:
            token = ProviderToken(credentials, self._clock, self._token_refresh)
            self._tokens[key] = token
        return token

    async def close(self) -> None:
        """Close every connection and wait (boundedly) until they are closed."""
        self._closed = True
        clients = list(self._clients.values())
        self._clients.clear()
        connections = [c for client in clients for c in client.state.live]
        for connection in connections:
            # Once only: asyncio's TLS transport detaches on a second close(), and an
            # abort() after that would do nothing.
            if connection.usable:
                connection.close()  # aioapns's pool.close(), but also for those we took out
        pending = [c.closed for c in connections if not c.closed.done()]
        if not pending:
            return
        _, late = await asyncio.wait(pending, timeout=CLOSE_TIMEOUT)
        if late:  # the peer did not answer our TLS close_notify
            for connection in connections:
                if not connection.closed.done() and connection.transport is not None:
                    connection.transport.abort()
            await asyncio.wait(late)


async def _open_connection(pool: APNsBaseConnectionPool) -> None:
    """Make sure the pool holds an open connection before aioapns sends.

    Connecting here makes a refused connection fail at once (aioapns would sleep 1 s
    first), and drops connections that aioapns still lists while they close (idle timer,
    GOAWAY): it would write into them and wait forever.
    """
    for _ in range(pool.max_connections + 1):
        connection = await pool.acquire()
        if isinstance(connection, _Connection) and connection.usable:
            return
        with contextlib.suppress(ValueError):
            pool.connections.remove(connection)
    raise ConnectionClosed("no usable connection")


def _notification(request: WakeRequest, bundle: str) -> _Notification:
    if request.reason is Reason.REREGISTER:
        return _Notification(
            request.token,
            {"aps": {"content-available": 1}, "event": "reregister"},
            priority=5,  # Apple refuses priority 10 for a background push
            push_type=PushType.BACKGROUND,
            apns_topic=bundle,
        )
    if request.reason is Reason.NEW_MESSAGE:
        # No call follows, so no VoIP push (iOS ends apps whose VoIP pushes report no
        # call): an alert the app words itself, naming neither sender nor text.
        return _Notification(
            request.token,
            {"aps": {"alert": {"loc-key": "NEW_MESSAGE"}}, "event": "new_message"},
            priority=10,
            push_type=PushType.ALERT,
            apns_topic=bundle,
        )
    return _Notification(
        request.token,
        {"event": request.reason.value, "call_id": request.call_id},
        priority=10,
        push_type=PushType.VOIP,
        apns_topic=f"{bundle}.voip",
    )


def _connection_failure(cause: BaseException | None) -> Outcome:
    if isinstance(cause, ssl.SSLCertVerificationError):
        return PermanentFailure("APNs server certificate not trusted")
    if isinstance(cause, ssl.SSLError) and cause.reason in _CERT_REFUSED:
        return PermanentFailure(f"APNs refused the client certificate ({cause.reason})")
    name = type(cause).__name__ if cause is not None else "unknown"
    return TemporaryFailure(f"connection failed ({name})")
