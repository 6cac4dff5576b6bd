"""APNs wakes through the real aioapns client and the fake APNs, over real loopback TLS.

Nothing here sleeps: the provider's and the fake's clocks are moved by hand, and waits
for a network answer are bounded by timeouts.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import pytest
from aioapns import APNs, NotificationRequest, PushType
from aioapns.connection import APNsTLSClientProtocol, AuthorizationHeaderProvider
from h2.utilities import HeaderValidationFlags, validate_outbound_headers
from hyperframe.frame import Frame

from privacy.clock import ManualClock
from push.apns import (
    PUSHES_PER_WRITE,
    STREAMS_PER_CONNECTION,
    ApnsProvider,
    ProviderToken,
    _Connection,
    _notification,
    _Streams,
)
from push.apps import ApnsCredentials, ApnsEndpoint, AppCredentials
from push.endpoints import apns_protocol_for, apns_ssl_context
from push.fakes.apns import ApnsKeyGrant, FakeApns
from push.fakes.certs import ApnsSigningKey, ThrowawayCa
from push.fakes.script import Respond
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

APP = "softphone"
BUNDLE = "com.example.softphone"
TOKEN = "a1b2c3d4" * 8  # 64 hex digits, like a device token
TIMEOUT = 5.0  # bounds a network answer; a passing test never waits this long

ProviderFactory = Callable[..., Awaitable[ApnsProvider]]


@pytest.fixture
def clock() -> ManualClock:
    """Starts at the real time, since apns-expiration is computed by aioapns from it."""
    return ManualClock(time.time())


@pytest.fixture
def ca(tmp_path: Path) -> ThrowawayCa:
    return ThrowawayCa.create(tmp_path / "ca")


@pytest.fixture
def key() -> ApnsSigningKey:
    return ApnsSigningKey.generate()


@pytest.fixture
async def fake(ca: ThrowawayCa, key: ApnsSigningKey, clock: ManualClock) -> AsyncIterator[FakeApns]:
    fake = await FakeApns.start(ca, keys=[ApnsKeyGrant.of(key, BUNDLE)], clock=clock.now)
    yield fake
    await fake.stop()


@pytest.fixture
async def providers(clock: ManualClock) -> AsyncIterator[ProviderFactory]:
    opened: list[ApnsProvider] = []

    async def make(
        apps: Sequence[AppCredentials], endpoint: ApnsEndpoint, **options: float
    ) -> ApnsProvider:
        provider = await ApnsProvider.create(apps, endpoint, clock=clock.now, **options)
        opened.append(provider)
        return provider

    yield make
    for provider in opened:
        await provider.close()


def token_app(key: ApnsSigningKey, app_id: str = APP) -> AppCredentials:
    credentials = ApnsCredentials(BUNDLE, key.team_id, key.key_id, key.key_pem)
    return AppCredentials(app_id, apns=credentials)


def wake(
    clock: ManualClock,
    reason: Reason = Reason.INCOMING_CALL,
    *,
    token: str = TOKEN,
    service: Service = Service.APNS,
    app_id: str = APP,
    within: float = 30.0,
    call_id: str = "call-7f3a",
) -> WakeRequest:
    call_id = "" if reason is Reason.REREGISTER else call_id
    return WakeRequest(service, token, app_id, reason, clock.now() + within, call_id)


async def test_incoming_call_is_a_voip_push_expiring_by_the_deadline(
    fake: FakeApns, providers: ProviderFactory, key: ApnsSigningKey, clock: ManualClock
) -> None:
    provider = await providers([token_app(key)], fake.endpoint())
    request = wake(clock)

    assert await provider.send(request, TIMEOUT) == Delivered()

    [delivery] = fake.deliveries.for_token(TOKEN)
    assert delivery.service == "apns"
    assert delivery.app == f"{BUNDLE}.voip"
    assert delivery.headers["apns-topic"] == f"{BUNDLE}.voip"
    assert delivery.headers["apns-push-type"] == "voip"
    assert delivery.headers["apns-priority"] == "10"
    expiration = int(delivery.headers["apns-expiration"])
    assert time.time() + 20 < expiration <= request.deadline
    # The call id and nothing else: no caller name or number travels through Apple.
    assert delivery.payload == {"event": "incoming_call", "call_id": "call-7f3a"}


async def test_expiration_never_passes_a_near_deadline(
    fake: FakeApns, providers: ProviderFactory, key: ApnsSigningKey, clock: ManualClock
) -> None:
    provider = await providers([token_app(key)], fake.endpoint())
    request = wake(clock, within=1.5)

    assert await provider.send(request, TIMEOUT) == Delivered()

    [delivery] = fake.deliveries.for_token(TOKEN)
    assert int(delivery.headers["apns-expiration"]) <= request.deadline


async def test_past_deadline_sends_nothing(
    fake: FakeApns, providers: ProviderFactory, key: ApnsSigningKey, clock: ManualClock
) -> None:
    provider = await providers([token_app(key)], fake.endpoint())

    outcome = await provider.send(wake(clock, within=-1), TIMEOUT)

    assert outcome == TemporaryFailure("deadline passed")
    assert not fake.deliveries.items


async def test_call_cancelled_is_the_follow_up_voip_push(
    fake: FakeApns, providers: ProviderFactory, key: ApnsSigningKey, clock: ManualClock
) -> None:
    provider = await providers([token_app(key)], fake.endpoint())

    assert await provider.send(wake(clock), TIMEOUT) == Delivered()
    assert await provider.send(wake(clock, Reason.CALL_CANCELLED), TIMEOUT) == Delivered()

    ring, cancel = fake.deliveries.for_token(TOKEN)
    assert cancel.app == ring.app == f"{BUNDLE}.voip"
    assert cancel.headers["apns-push-type"] == "voip"
    assert cancel.headers["apns-priority"] == "10"
    assert cancel.payload == {"event": "call_cancelled", "call_id": "call-7f3a"}


async def test_reregister_is_a_background_push_never_voip(
    fake: FakeApns, providers: ProviderFactory, key: ApnsSigningKey, clock: ManualClock
) -> None:
    provider = await providers([token_app(key)], fake.endpoint())

    assert await provider.send(wake(clock, Reason.REREGISTER), TIMEOUT) == Delivered()

    [delivery] = fake.deliveries.for_token(TOKEN)
    assert delivery.app == BUNDLE
    assert delivery.headers["apns-push-type"] == "background"
    assert delivery.headers["apns-priority"] == "5"
    assert delivery.payload == {"aps": {"content-available": 1}, "event": "reregister"}


async def test_certificate_auth_delivers(
    fake: FakeApns, providers: ProviderFactory, ca: ThrowawayCa, clock: ManualClock
) -> None:
    app = AppCredentials(
        APP, apns=ApnsCredentials(BUNDLE, cert_file=str(ca.issue_push_certificate(BUNDLE)))
    )
    provider = await providers([app], fake.endpoint())

    assert await provider.send(wake(clock), TIMEOUT) == Delivered()
    assert await provider.send(wake(clock, Reason.REREGISTER), TIMEOUT) == Delivered()

    assert [d.app for d in fake.deliveries.for_token(TOKEN)] == [f"{BUNDLE}.voip", BUNDLE]


async def test_two_certificate_apps_each_present_their_own_certificate(
    fake: FakeApns, providers: ProviderFactory, ca: ThrowawayCa, clock: ManualClock
) -> None:
    """aioapns loads the certificate into the context it gets; one shared context would
    push the first app with the second app's certificate (TopicDisallowed)."""
    apps = [
        AppCredentials(
            app_id, apns=ApnsCredentials(bundle, cert_file=str(ca.issue_push_certificate(bundle)))
        )
        for app_id, bundle in (("one", "com.example.one"), ("two", "com.example.two"))
    ]
    provider = await providers(apps, fake.endpoint())

    assert await provider.send(wake(clock, app_id="one"), TIMEOUT) == Delivered()
    assert await provider.send(wake(clock, app_id="two"), TIMEOUT) == Delivered()

    assert [d.app for d in fake.deliveries.items] == [
        "com.example.one.voip",
        "com.example.two.voip",
    ]


async def test_wrong_signing_key_is_refused(
    fake: FakeApns, providers: ProviderFactory, key: ApnsSigningKey, clock: ManualClock
) -> None:
    impostor = ApnsSigningKey.generate(key.team_id, key.key_id)  # same ids, other EC key
    provider = await providers([token_app(impostor)], fake.endpoint())

    outcome = await provider.send(wake(clock), TIMEOUT)

    assert outcome == PermanentFailure("InvalidProviderToken")
    assert fake.answers[(403, "InvalidProviderToken")] == 1
    assert not fake.deliveries.items


class _Presenting(AuthorizationHeaderProvider):
    """A connection's provider token, replaced by a fixed header."""

    def __init__(self, header: str) -> None:
        self.header = header

    def get_header(self) -> str:
        return self.header


async def test_a_token_is_verified_once_per_connection_and_a_forged_one_still_refused(
    fake: FakeApns, providers: ProviderFactory, key: ApnsSigningKey, clock: ManualClock
) -> None:
    """The fake remembers a token's verdict per connection, good or bad: the good one is
    not verified again, and a forged one presented on the same connection, even for the
    same key id and claims, is refused every time, before and after the good one."""
    provider = await providers([token_app(key)], fake.endpoint())
    for n in range(5):
        assert await provider.send(wake(clock, call_id=f"c{n}"), TIMEOUT) == Delivered()
    assert fake.signature_checks == 1
    (connection,) = _connections_of(provider)
    genuine = connection.auth_provider
    assert genuine is not None
    impostor = ApnsSigningKey.generate(key.team_id, key.key_id)  # same ids, other EC key
    credentials = ApnsCredentials(BUNDLE, key.team_id, key.key_id, impostor.key_pem)
    forged = ProviderToken(credentials, clock.now, 3600.0)

    connection.auth_provider = _Presenting(forged.get_header())
    refused = [await provider.send(wake(clock), TIMEOUT) for _ in range(2)]
    connection.auth_provider = genuine
    accepted = await provider.send(wake(clock), TIMEOUT)

    assert forged.get_header() != genuine.get_header()
    assert refused == [PermanentFailure("InvalidProviderToken")] * 2
    assert accepted == Delivered()
    assert fake.signature_checks == 2  # the forged one once; the genuine one not again
    assert fake.accepted_connections == 1
    assert len(fake.deliveries.for_token(TOKEN)) == 6


@pytest.mark.parametrize(
    "tls", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["tls13", "tls12"]
)
async def test_certificate_from_another_ca_is_refused(
    fake: FakeApns,
    providers: ProviderFactory,
    tmp_path: Path,
    clock: ManualClock,
    tls: ssl.TLSVersion,
) -> None:
    """TLS 1.3 refuses after the client's handshake is done (the alert ends the
    connection under the request), TLS 1.2 during the handshake (the connect fails)."""
    stranger = ThrowawayCa.create(tmp_path / "stranger")
    cert = stranger.issue_push_certificate(BUNDLE)
    endpoint = fake.endpoint()
    endpoint.ssl_context.maximum_version = tls
    provider = await providers(
        [AppCredentials(APP, apns=ApnsCredentials(BUNDLE, cert_file=str(cert)))], endpoint
    )

    outcome = await provider.send(wake(clock), TIMEOUT)

    assert isinstance(outcome, PermanentFailure)
    assert "refused the client certificate" in outcome.reason
    assert fake.refused_handshakes == 1
    assert not fake.deliveries.items


async def test_server_not_trusted_is_permanent(
    fake: FakeApns,
    providers: ProviderFactory,
    key: ApnsSigningKey,
    tmp_path: Path,
    clock: ManualClock,
) -> None:
    elsewhere = ThrowawayCa.create(tmp_path / "elsewhere").client_context()
    provider = await providers([token_app(key)], ApnsEndpoint(fake.host, fake.port, elsewhere))

    outcome = await provider.send(wake(clock), TIMEOUT)

    assert outcome == PermanentFailure("APNs server certificate not trusted")


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (Respond.error(410, "Unregistered"), TokenDead("Unregistered")),
        (Respond.error(400, "BadDeviceToken"), TokenDead("BadDeviceToken")),
        (Respond.error(400, "DeviceTokenNotForTopic"), TokenDead("DeviceTokenNotForTopic")),
        (
            Respond.error(429, "TooManyRequests", retry_after=7),
            TemporaryFailure("TooManyRequests", 7.0),
        ),
        (Respond.error(503, "ServiceUnavailable"), TemporaryFailure("ServiceUnavailable")),
        (Respond.error(500, "InternalServerError"), TemporaryFailure("InternalServerError")),
        (Respond.error(400, "TopicDisallowed"), PermanentFailure("TopicDisallowed")),
        (Respond.error(400, "BadTopic"), PermanentFailure("BadTopic")),
    ],
)
async def test_each_status_maps_to_its_outcome(
    fake: FakeApns,
    providers: ProviderFactory,
    key: ApnsSigningKey,
    clock: ManualClock,
    answer: Respond,
    expected: Outcome,
) -> None:
    provider = await providers([token_app(key)], fake.endpoint())
    fake.script.push(TOKEN, answer)

    assert await provider.send(wake(clock), TIMEOUT) == expected
    # The connection is still good for the next push.
    assert await provider.send(wake(clock), TIMEOUT) == Delivered()


async def test_token_for_another_app_is_dead(
    fake: FakeApns, providers: ProviderFactory, key: ApnsSigningKey, clock: ManualClock
) -> None:
    fake.register_device(TOKEN, "com.example.other.voip")
    provider = await providers([token_app(key)], fake.endpoint())

    assert await provider.send(wake(clock), TIMEOUT) == TokenDead("DeviceTokenNotForTopic")


async def test_malformed_token_is_dead(
    fake: FakeApns, providers: ProviderFactory, key: ApnsSigningKey, clock: ManualClock
) -> None:
    provider = await providers([token_app(key)], fake.endpoint())

    outcome = await provider.send(wake(clock, token="not-a-device-token"), TIMEOUT)

    assert outcome == TokenDead("BadDeviceToken")


async def test_hang_is_a_temporary_failure_within_the_timeout(
    fake: FakeApns, providers: ProviderFactory, key: ApnsSigningKey, clock: ManualClock
) -> None:
    provider = await providers([token_app(key)], fake.endpoint())
    fake.script.push(TOKEN, Respond.hanging())
    loop = asyncio.get_running_loop()

    started = loop.time()
    outcome = await provider.send(wake(clock), 0.2)

    assert outcome == TemporaryFailure("timeout")
    assert loop.time() - started < 1.0
    # The abandoned stream was reset and forgotten; the connection still carries pushes.
    assert await provider.send(wake(clock), TIMEOUT) == Delivered()
    assert fake.hanging_streams == 0  # the reset went ahead of that push
    assert fake.accepted_connections == 1


async def test_refused_connection_fails_at_once(
    providers: ProviderFactory, key: ApnsSigningKey, ca: ThrowawayCa, clock: ManualClock
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = await providers(
        [token_app(key)], ApnsEndpoint("127.0.0.1", port, ca.client_context())
    )

    # Under aioapns's 1 s sleep after a failed connect, this would be a timeout.
    outcome = await provider.send(wake(clock), 0.9)

    assert outcome == TemporaryFailure("connection failed (ConnectionRefusedError)")


async def test_unknown_app_and_missing_credentials_are_permanent(
    fake: FakeApns, providers: ProviderFactory, clock: ManualClock
) -> None:
    empty = AppCredentials("empty", apns=ApnsCredentials(BUNDLE))
    missing = AppCredentials("missing", apns=ApnsCredentials(BUNDLE, cert_file="/nonexistent.pem"))
    provider = await providers([empty, missing], fake.endpoint())

    assert not provider.serves("nobody")
    assert provider.serves("empty")
    unknown = await provider.send(wake(clock, app_id="nobody"), TIMEOUT)
    assert unknown == PermanentFailure("no APNs credentials for this app")
    no_key = await provider.send(wake(clock, app_id="empty"), TIMEOUT)
    assert no_key == PermanentFailure(
        "APNs credentials unusable: neither a signing key nor a certificate"
    )
    no_file = await provider.send(wake(clock, app_id="missing"), TIMEOUT)
    assert no_file == PermanentFailure("APNs credentials unusable: FileNotFoundError")


async def test_sparse_sends_reuse_one_provider_token(
    fake: FakeApns, providers: ProviderFactory, key: ApnsSigningKey, clock: ManualClock
) -> None:
    """Connections closed between sends (by Apple, or idle) do not mean new tokens."""
    provider = await providers([token_app(key)], fake.endpoint())
    start = clock.now()

    for minutes in (0, 5, 10, 19, 45):  # the last one past the 40-minute refresh
        clock.set(start + minutes * 60)
        assert await provider.send(wake(clock), TIMEOUT) == Delivered()
        await fake.drop_connections()

    assert fake.accepted_connections == 5  # a new connection for every send
    assert fake.answers[(429, "TooManyProviderTokenUpdates")] == 0
    assert fake.token_updates[(key.team_id, key.key_id)] == 2
    assert len(fake.deliveries.for_token(TOKEN)) == 5


async def test_sandbox_and_production_share_the_token(
    fake: FakeApns, providers: ProviderFactory, key: ApnsSigningKey, clock: ManualClock
) -> None:
    provider = await providers([token_app(key)], fake.endpoint())

    assert await provider.send(wake(clock, service=Service.APNS), TIMEOUT) == Delivered()
    assert await provider.send(wake(clock, service=Service.APNS_SANDBOX), TIMEOUT) == Delivered()

    assert fake.token_updates[(key.team_id, key.key_id)] == 1


async def test_expired_provider_token_is_signed_anew_on_the_next_send(
    fake: FakeApns, providers: ProviderFactory, key: ApnsSigningKey, clock: ManualClock
) -> None:
    provider = await providers([token_app(key)], fake.endpoint(), token_refresh=3 * 3600.0)
    assert await provider.send(wake(clock), TIMEOUT) == Delivered()

    clock.advance(61 * 60)  # the token is now older than Apple's hour
    assert await provider.send(wake(clock), TIMEOUT) == PermanentFailure("ExpiredProviderToken")
    assert await provider.send(wake(clock), TIMEOUT) == Delivered()


@pytest.fixture
async def stock(ca: ThrowawayCa, key: ApnsSigningKey) -> AsyncIterator[tuple[FakeApns, APNs]]:
    """Plain aioapns (none of the provider's fixes) and a fake on the real clock, since
    aioapns dates its tokens with time.time()."""
    fake = await FakeApns.start(ca, keys=[ApnsKeyGrant.of(key, BUNDLE)])
    endpoint = fake.endpoint()
    client = APNs(
        key=key.key_pem,
        key_id=key.key_id,
        team_id=key.team_id,
        topic=BUNDLE,
        max_connection_attempts=1,
        ssl_context=apns_ssl_context(endpoint),
        err_func=_ignore,
    )
    client.pool.protocol_class = apns_protocol_for(APNsTLSClientProtocol, endpoint, sandbox=False)
    yield fake, client
    client.pool.close()
    await fake.stop()


async def test_stock_aioapns_updates_its_token_too_often(
    stock: tuple[FakeApns, APNs],
) -> None:
    """The control: the fake does catch aioapns's token per connection."""
    fake, client = stock
    async with asyncio.timeout(TIMEOUT):
        first = await client.send_notification(_stock_request())
        await fake.drop_connections()
        # aioapns offers nothing to await for a lost connection; each turn only
        # yields to the loop (no time passes) until it has discarded it.
        while client.pool.connections:  # noqa: ASYNC110
            await asyncio.sleep(0)
        second = await client.send_notification(_stock_request())

    assert (first.status, second.status) == ("200", "429")
    assert second.description == "TooManyProviderTokenUpdates"


VOIP = f"{BUNDLE}.voip"


@pytest.mark.parametrize(
    ("token", "topic", "push_type", "priority", "size", "expected"),
    [
        (TOKEN, VOIP, PushType.VOIP, 10, 5120, ("200", None)),
        (TOKEN, BUNDLE, PushType.ALERT, 10, 4096, ("200", None)),
        (TOKEN, VOIP, PushType.VOIP, 10, 5121, ("413", "PayloadTooLarge")),
        (TOKEN, BUNDLE, PushType.ALERT, 10, 4097, ("413", "PayloadTooLarge")),
        (TOKEN, BUNDLE, PushType.VOIP, 10, 100, ("400", "InvalidPushType")),
        (TOKEN, VOIP, PushType.BACKGROUND, 5, 100, ("400", "InvalidPushType")),
        (TOKEN, BUNDLE, PushType.BACKGROUND, 10, 100, ("400", "BadPriority")),
        (TOKEN, BUNDLE, PushType.ALERT, 7, 100, ("400", "BadPriority")),
        (TOKEN, "com.example.other", PushType.ALERT, 10, 100, ("400", "TopicDisallowed")),
        (TOKEN[:-1], VOIP, PushType.VOIP, 10, 100, ("400", "BadDeviceToken")),
        (TOKEN[:62], VOIP, PushType.VOIP, 10, 100, ("400", "BadDeviceToken")),
    ],
)
async def test_fake_checks_requests_like_apple(
    stock: tuple[FakeApns, APNs],
    token: str,
    topic: str,
    push_type: PushType,
    priority: int,
    size: int,
    expected: tuple[str, str | None],
) -> None:
    fake, client = stock
    payload = {"p": "x" * (size - len('{"p": ""}'))}  # aioapns sends json.dumps(payload)
    request = NotificationRequest(
        token, payload, priority=priority, push_type=push_type, apns_topic=topic
    )

    async with asyncio.timeout(TIMEOUT):
        result = await client.send_notification(request)

    assert (result.status, result.description) == expected
    assert len(fake.deliveries.items) == (expected[0] == "200")


async def test_long_lived_connection_keeps_receiving_error_bodies(
    fake: FakeApns, providers: ProviderFactory, key: ApnsSigningKey, clock: ManualClock
) -> None:
    """More error bodies than HTTP/2's initial 64 KiB window, on one connection: aioapns
    never acknowledges received data, so without the fix the answers would stall."""
    provider = await providers([token_app(key)], fake.endpoint())
    sends = 1400  # x ~50-byte 410 bodies > 65,535 bytes
    fake.script.push(TOKEN, *[Respond.error(410, "Unregistered")] * sends)

    outcomes = await asyncio.gather(*(provider.send(wake(clock), TIMEOUT) for _ in range(sends)))

    assert set(outcomes) == {TokenDead("Unregistered")}


async def test_burst_beyond_the_flow_control_window_delivers_all_and_leaks_nothing(
    fake: FakeApns, providers: ProviderFactory, key: ApnsSigningKey, clock: ManualClock
) -> None:
    """More request bodies in flight than HTTP/2's initial 64 KiB connection window.
    aioapns would send a request's HEADERS, then h2 refuses its DATA (FlowControlError):
    the stream stays half-open at the server, its slot is never released, and the push
    fails as "connection lost". The provider waits for window instead."""
    provider = await providers([token_app(key)], fake.endpoint())
    assert await provider.send(wake(clock), TIMEOUT) == Delivered()  # the connection is up
    sends = 100  # x ~2 KB bodies: three times the window, within one connection's streams
    burst = [wake(clock, call_id=f"{n:04}" + "c" * 2000) for n in range(sends)]

    outcomes = await asyncio.gather(*(provider.send(request, TIMEOUT) for request in burst))

    assert outcomes == [Delivered()] * sends
    delivered = {d.payload["call_id"] for d in fake.deliveries.for_token(TOKEN)}
    assert {request.call_id for request in burst} <= delivered
    assert _open_streams_at(fake) == 0
    assert _slots_taken(provider) == 0
    assert fake.accepted_connections == 1


class _RecordingTransport:
    """A connection's transport that keeps every non-empty write, then passes it on."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        if data:
            self.writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self._transport, name)


def _frames(data: bytes) -> list[str]:
    """The HTTP/2 frame types in `data`, in order."""
    kinds, at = [], 0
    while at < len(data):
        frame, length = Frame.parse_frame_header(memoryview(data[at : at + 9]))
        kinds.append(type(frame).__name__)
        at += 9 + length
    return kinds


async def test_a_burst_of_pushes_goes_out_a_few_pushes_per_write(
    fake: FakeApns, providers: ProviderFactory, key: ApnsSigningKey, clock: ManualClock
) -> None:
    """aioapns writes each push on its own (a TLS record, a send() and its idle timer
    re-armed, per push); the provider writes what the sends of one loop turn queued
    together, PUSHES_PER_WRITE at most, so the first leave before the last is made;
    every push is still delivered, in order. Nothing is Huffman coded: the device token
    and each apns-id are in the bytes as they are."""
    provider = await providers([token_app(key)], fake.endpoint())
    assert await provider.send(wake(clock), TIMEOUT) == Delivered()  # the connection is up
    (connection,) = _connections_of(provider)
    assert connection.transport is not None
    recording = _RecordingTransport(connection.transport)
    connection.transport = recording  # type: ignore[assignment]  # a stand-in that records
    sends = 2 * PUSHES_PER_WRITE + 3
    burst = [wake(clock, call_id=f"burst-{n}") for n in range(sends)]

    outcomes = await asyncio.gather(*(provider.send(request, TIMEOUT) for request in burst))

    assert outcomes == [Delivered()] * sends
    delivered = fake.deliveries.for_token(TOKEN)
    assert [d.payload["call_id"] for d in delivered[1:]] == [r.call_id for r in burst]
    # (a SETTINGS acknowledgement may still be on its way out before the burst)
    requests = [w for w in recording.writes if "HeadersFrame" in _frames(w)]
    pair = ["HeadersFrame", "DataFrame"]
    assert [_frames(w) for w in requests] == [
        pair * PUSHES_PER_WRITE,
        pair * PUSHES_PER_WRITE,
        pair * 3,
    ]
    written = b"".join(requests)
    assert written.count(f"/3/device/{TOKEN}".encode()) == sends
    assert all(d.headers["apns-id"].encode() in written for d in delivered[1:])


async def test_the_provider_token_is_indexed_once_per_connection_and_tokens_never(
    fake: FakeApns, providers: ProviderFactory, key: ApnsSigningKey, clock: ManualClock
) -> None:
    """h2 would send the provider token never-indexed, Huffman-coded anew in every
    request; the provider lets HPACK index it (a signed JWT: RFC 7541 7.1.3), and keeps
    what differs per push (the device token's path, apns-id) out of the table."""
    provider = await providers([token_app(key)], fake.endpoint())
    sends = [wake(clock, call_id=f"c{n}") for n in range(30)]
    for request in sends:  # more than a 4 KiB table would hold, were paths indexed
        assert await provider.send(request, TIMEOUT) == Delivered()

    (connection,) = [c for c in fake._connections if c._h2 is not None]
    assert connection._h2 is not None
    table = connection._h2.decoder.header_table.dynamic_entries  # the server's view
    names = [name for name, _ in table]
    assert names.count(b"authorization") == 1
    assert b":path" not in names
    assert b"apns-id" not in names
    assert len(fake.deliveries.for_token(TOKEN)) == 30


async def test_sends_waiting_for_window_fail_at_once_when_the_connection_goes(
    fake: FakeApns, providers: ProviderFactory, key: ApnsSigningKey, clock: ManualClock
) -> None:
    provider = await providers([token_app(key)], fake.endpoint())
    assert await provider.send(wake(clock), TIMEOUT) == Delivered()
    burst = [wake(clock, call_id="c" * 2000) for _ in range(100)]  # 3x the window
    sends = [asyncio.ensure_future(provider.send(request, TIMEOUT)) for request in burst]
    await asyncio.sleep(0)  # only yields: each send has sent its push or waits for window

    await fake.drop_connections()
    outcomes = await asyncio.gather(*sends)

    # None waited for its timeout; those that had not gone out were told at once.
    assert set(outcomes) <= {Delivered(), TemporaryFailure("connection lost")}
    assert TemporaryFailure("connection lost") in outcomes
    assert await provider.send(wake(clock), TIMEOUT) == Delivered()  # a new connection


async def test_beyond_the_streams_of_one_connection_the_pool_opens_another(
    fake: FakeApns, providers: ProviderFactory, key: ApnsSigningKey, clock: ManualClock
) -> None:
    """The fake allows 1,000 streams per connection, as Apple does; the provider takes at
    most STREAMS_PER_CONNECTION on each and lets aioapns's pool open more connections."""
    provider = await providers([token_app(key)], fake.endpoint())
    assert await provider.send(wake(clock), TIMEOUT) == Delivered()
    sends = 2 * STREAMS_PER_CONNECTION + 50

    outcomes = await asyncio.gather(*(provider.send(wake(clock), TIMEOUT) for _ in range(sends)))

    assert outcomes == [Delivered()] * sends
    # The first connection was full when the send after it came: at least one more.
    assert fake.accepted_connections >= 2
    connections = _connections_of(provider)
    assert {c.free_channels.bound for c in connections} == {STREAMS_PER_CONNECTION}
    assert _open_streams_at(fake) == 0
    assert _slots_taken(provider) == 0


async def test_stream_slots_follow_a_limit_changed_while_streams_are_open() -> None:
    """Apple lowers MAX_CONCURRENT_STREAMS to 1 after a rejected push and raises it after
    an accepted one, while other pushes are in flight: slots in use stay in use, and no
    more are handed out than the new limit leaves."""
    slots = _Streams()
    for _ in range(3):
        await slots.take()

    slots.bound = 1  # 3 in flight: none free until 3 have ended
    assert slots.is_busy
    waiting = asyncio.ensure_future(slots.take())
    slots.release()
    slots.release()
    assert slots.is_busy
    await asyncio.sleep(0)  # only yields: the waiter would run now if it had a slot
    assert not waiting.done()
    slots.release()
    await asyncio.wait_for(waiting, TIMEOUT)  # the one slot, now free

    slots.bound = 1000  # clamped; the one in flight stays taken
    assert slots.bound == STREAMS_PER_CONNECTION
    for _ in range(STREAMS_PER_CONNECTION - 1):
        assert not slots.locked()  # take() would not wait
        await slots.take()
    assert slots.is_busy


async def test_token_never_appears_in_outcomes_or_logs(
    fake: FakeApns,
    providers: ProviderFactory,
    key: ApnsSigningKey,
    clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    provider = await providers([token_app(key)], fake.endpoint())
    answers = [
        Respond.ok(),
        Respond.error(410, "Unregistered"),
        Respond.error(429, "TooManyRequests", retry_after=3),
        Respond.error(400, TOKEN),  # a reason echoing the token is not repeated
        Respond.hanging(),
    ]
    fake.script.push(TOKEN, *answers)

    outcomes = [await provider.send(wake(clock), TIMEOUT) for _ in answers[:-1]]
    outcomes.append(await provider.send(wake(clock), 0.2))  # the hang

    assert outcomes[3] == PermanentFailure("HTTP 400")
    assert all(TOKEN not in repr(outcome) for outcome in outcomes)
    assert TOKEN not in caplog.text
    assert TOKEN.upper() not in caplog.text.upper()


def _open_streams_at(fake: FakeApns) -> int:
    """Streams the fake holds open: begun by a client and never finished or reset.
    (Reads the fake's connections, as bench/push.py does: it has no public view of them.)"""
    return sum(c._h2.open_inbound_streams for c in fake._connections if c._h2 is not None)


def _connections_of(provider: ApnsProvider) -> list[APNsTLSClientProtocol]:
    """The provider's open connections (read from its internals)."""
    connections = [c for client in provider._clients.values() for c in client.state.live]
    assert connections
    return list(connections)


def _slots_taken(provider: ApnsProvider) -> int:
    """Stream slots (aioapns's channels) held on the provider's open connections, and
    requests they still track; 0 once every send has returned."""
    return sum(
        c.free_channels.bound - c.free_channels._value + len(c.requests) + len(c.request_streams)
        for c in _connections_of(provider)
    )


async def _ignore(request: NotificationRequest, result: object) -> None:
    pass


def _stock_request() -> NotificationRequest:
    return NotificationRequest(
        TOKEN,
        {"event": "incoming_call"},
        priority=10,
        push_type=PushType.VOIP,
        apns_topic=f"{BUNDLE}.voip",
    )


@pytest.mark.parametrize("reason", list(Reason))
async def test_every_kind_of_push_has_headers_h2_would_accept_and_is_delivered(
    fake: FakeApns,
    providers: ProviderFactory,
    key: ApnsSigningKey,
    clock: ManualClock,
    reason: Reason,
) -> None:
    """The provider turns h2's checks of outgoing headers off (they cost more than the
    encoding): what it sends still passes them, for each kind of push."""
    provider = await providers([token_app(key)], fake.endpoint())
    assert await provider.send(wake(clock, reason), TIMEOUT) == Delivered()
    (connection,) = _connections_of(provider)
    assert isinstance(connection, _Connection)
    flags = HeaderValidationFlags(
        is_client=True, is_trailer=False, is_response_header=False, is_push_promise=False
    )

    headers = connection._headers(_notification(wake(clock, reason), BUNDLE))

    assert list(validate_outbound_headers(headers, flags)) == headers
    assert len(fake.deliveries.for_token(TOKEN)) == 1
