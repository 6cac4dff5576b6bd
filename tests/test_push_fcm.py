"""FCM through the real firebase-admin client and the FCM stand-in, over real sockets.

The stand-in runs on the test's own event loop, so anything in the provider that
blocked the loop on network I/O (a token refresh on the loop) would deadlock here.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from google.auth import credentials as google_credentials
from google.oauth2 import service_account

from privacy.clock import ManualClock
from push.apps import AppCredentials, FcmCredentials
from push.fakes.fcm import GOOGLE_TOKEN_URI, JWT_BEARER, FakeFcm, Grant, make_service_account
from push.fakes.script import Respond
from push.fcm import FcmProvider
from push.provider import PushProvider
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

PROJECT = "softrelay-test"
APP = "com.example.softphone"
TOKEN = "fcm-canary-token-0c7e4a91d2"  # a marker: must never show up in outcomes or logs
MESSAGING = "https://www.googleapis.com/auth/firebase.messaging"

OpenProvider = Callable[..., Awaitable[FcmProvider]]


@pytest.fixture(scope="session")
def keys() -> tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]:
    """Two RSA keys, made once: key generation is the slow part of a service account."""
    return (
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )


@pytest.fixture
async def fake() -> AsyncIterator[FakeFcm]:
    fake = await FakeFcm.start()
    yield fake
    await fake.stop()


@pytest.fixture
def account(fake: FakeFcm, keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]) -> dict[str, Any]:
    info = make_service_account(PROJECT, fake.token_uri, key=keys[0])
    fake.trust(info)
    return info


@pytest.fixture
async def open_provider(fake: FakeFcm, clock: ManualClock) -> AsyncIterator[OpenProvider]:
    opened: list[FcmProvider] = []

    async def factory(*apps: AppCredentials) -> FcmProvider:
        provider = await FcmProvider.create(apps, fake.endpoint, clock=clock)
        opened.append(provider)
        return provider

    yield factory
    for provider in opened:
        await provider.close()


@pytest.fixture
async def provider(open_provider: OpenProvider, account: dict[str, Any]) -> FcmProvider:
    return await open_provider(AppCredentials(APP, fcm=FcmCredentials(PROJECT, account)))


def wake(
    clock: ManualClock,
    seconds: float = 30.0,
    token: str = TOKEN,
    reason: Reason = Reason.INCOMING_CALL,
    app_id: str = APP,
) -> WakeRequest:
    return WakeRequest(Service.FCM, token, app_id, reason, clock.now() + seconds, "call-1")


async def test_provider_meets_the_push_provider_protocol(provider: FcmProvider) -> None:
    checked: PushProvider = provider
    assert checked.family == "fcm"
    assert provider.serves(APP)
    assert not provider.serves("com.example.other")


async def test_delivers_a_high_priority_data_message_that_expires_by_the_deadline(
    provider: FcmProvider, fake: FakeFcm, clock: ManualClock
) -> None:
    outcome = await provider.send(wake(clock, seconds=30.7), timeout=5)

    assert outcome == Delivered()
    [delivery] = fake.deliveries.for_token(TOKEN)
    assert delivery.service == "fcm"
    assert delivery.app == PROJECT
    message = delivery.payload
    assert set(message) == {"token", "data", "android"}  # no notification: data only
    assert message["data"] == {"reason": "incoming_call", "call_id": "call-1"}  # nothing personal
    assert message["android"] == {"priority": "high", "ttl": "30s"}  # 30.7 s left, rounded down
    assert "authorization" not in {name.lower() for name in delivery.headers}


async def test_ttl_is_zero_not_negative_when_under_a_second_remains(
    provider: FcmProvider, fake: FakeFcm, clock: ManualClock
) -> None:
    assert await provider.send(wake(clock, seconds=0.4), timeout=5) == Delivered()
    assert fake.deliveries.for_token(TOKEN)[0].payload["android"]["ttl"] == "0s"


async def test_a_cancel_push_carries_its_reason(
    provider: FcmProvider, fake: FakeFcm, clock: ManualClock
) -> None:
    await provider.send(wake(clock, reason=Reason.CALL_CANCELLED), timeout=5)
    assert fake.deliveries.for_token(TOKEN)[0].payload["data"]["reason"] == "call_cancelled"


async def test_nothing_is_sent_once_the_deadline_has_passed(
    provider: FcmProvider, fake: FakeFcm, clock: ManualClock
) -> None:
    outcome = await provider.send(wake(clock, seconds=0), timeout=5)
    assert outcome == TemporaryFailure("deadline passed")
    assert list(fake.attempts) == []
    assert list(fake.grants) == []


async def test_an_app_without_fcm_credentials_is_a_permanent_failure(
    provider: FcmProvider, clock: ManualClock
) -> None:
    outcome = await provider.send(wake(clock, app_id="com.example.other"), timeout=5)
    assert isinstance(outcome, PermanentFailure)


async def test_a_wrong_service_account_key_is_refused_by_the_stand_in(
    open_provider: OpenProvider,
    fake: FakeFcm,
    account: dict[str, Any],
    keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey],
    clock: ManualClock,
) -> None:
    """Same account, same key id, another private key: the signature cannot verify."""
    forged = make_service_account(
        PROJECT,
        fake.token_uri,
        client_email=account["client_email"],
        private_key_id=account["private_key_id"],
        key=keys[1],
    )
    provider = await open_provider(AppCredentials(APP, fcm=FcmCredentials(PROJECT, forged)))

    outcome = await provider.send(wake(clock), timeout=5)

    assert outcome == PermanentFailure("token refused: invalid_grant")
    assert list(fake.grants) == [
        Grant(account["client_email"], accepted=False, error="invalid_grant")
    ]
    assert list(fake.attempts) == []  # no message went out without a token


async def test_a_service_account_of_another_project_is_denied(
    open_provider: OpenProvider,
    fake: FakeFcm,
    keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey],
    clock: ManualClock,
) -> None:
    other = make_service_account("another-project", fake.token_uri, key=keys[1])
    fake.trust(other)
    provider = await open_provider(AppCredentials(APP, fcm=FcmCredentials(PROJECT, other)))

    assert await provider.send(wake(clock), timeout=5) == PermanentFailure("PERMISSION_DENIED")
    assert [a.status for a in fake.attempts] == [403]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (Respond.error(404, "UNREGISTERED"), TokenDead("UNREGISTERED")),
        (Respond.error(403, "SENDER_ID_MISMATCH"), TokenDead("SENDER_ID_MISMATCH")),
        (
            Respond.error(400, "INVALID_ARGUMENT"),
            TokenDead("INVALID_ARGUMENT: not a valid registration token"),
        ),
        (
            Respond.error(429, "QUOTA_EXCEEDED", retry_after=17),
            TemporaryFailure("QUOTA_EXCEEDED", 17.0),
        ),
        (Respond.error(503, "UNAVAILABLE", retry_after=5), TemporaryFailure("UNAVAILABLE", 5.0)),
        (Respond.error(503, "UNAVAILABLE"), TemporaryFailure("UNAVAILABLE")),
        (Respond.error(500, "INTERNAL"), TemporaryFailure("INTERNAL")),
        (Respond.error(401, "THIRD_PARTY_AUTH_ERROR"), PermanentFailure("THIRD_PARTY_AUTH_ERROR")),
    ],
    ids=[
        "unregistered",
        "sender-id-mismatch",
        "invalid-token",
        "quota-exceeded",
        "unavailable-retry-after",
        "unavailable",
        "internal",
        "third-party-auth",
    ],
)
async def test_each_answer_maps_to_its_outcome_in_one_attempt(
    provider: FcmProvider,
    fake: FakeFcm,
    clock: ManualClock,
    answer: Respond,
    expected: Outcome,
) -> None:
    """One request per send, even for the 500/503 the library would retry four times."""
    fake.script.push(TOKEN, answer)

    outcome = await provider.send(wake(clock), timeout=5)

    assert outcome == expected
    assert [a.status for a in fake.sends_to(TOKEN)] == [answer.status]
    assert TOKEN not in repr(outcome)
    assert fake.deliveries.for_token(TOKEN) == []


async def test_a_problem_with_the_message_is_permanent_not_a_dead_token(
    provider: FcmProvider, fake: FakeFcm, clock: ManualClock
) -> None:
    """Google's field violation (here: data over 4096 bytes) says nothing about the token."""
    request = WakeRequest(
        Service.FCM, TOKEN, APP, Reason.INCOMING_CALL, clock.now() + 30, "x" * 5000
    )
    assert await provider.send(request, timeout=5) == PermanentFailure("INVALID_ARGUMENT")
    assert [a.status for a in fake.sends_to(TOKEN)] == [400]


async def test_a_token_google_cannot_parse_is_dead(
    provider: FcmProvider, fake: FakeFcm, clock: ManualClock
) -> None:
    outcome = await provider.send(wake(clock, token="has a space"), timeout=5)
    assert outcome == TokenDead("INVALID_ARGUMENT: not a valid registration token")


async def test_a_hanging_service_is_a_temporary_failure_within_the_timeout(
    provider: FcmProvider, fake: FakeFcm, clock: ManualClock
) -> None:
    assert await provider.send(wake(clock, token="fcm-warm-up"), timeout=5) == Delivered()
    fake.script.push(TOKEN, Respond.hanging())  # the access token is in hand: only the send hangs

    started = time.monotonic()
    outcome = await provider.send(wake(clock), timeout=0.2)
    elapsed = time.monotonic() - started

    assert outcome == TemporaryFailure("timeout")
    assert elapsed < 2.0
    assert [a.status for a in fake.sends_to(TOKEN)] == [None]
    # The abandoned request leaves the client usable.
    assert await provider.send(wake(clock, token="fcm-other-token"), timeout=5) == Delivered()


async def test_an_unreachable_service_is_a_temporary_failure(
    provider: FcmProvider, fake: FakeFcm, clock: ManualClock
) -> None:
    assert await provider.send(wake(clock), timeout=5) == Delivered()  # token fetched
    await fake.stop()
    outcome = await provider.send(wake(clock), timeout=5)
    assert isinstance(outcome, TemporaryFailure)
    assert outcome.reason in {"UNAVAILABLE", "connection error"}


async def test_the_token_refresh_runs_in_a_worker_thread_once_for_concurrent_sends(
    provider: FcmProvider,
    fake: FakeFcm,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """google-auth refreshes with blocking `requests`: it must never run on the loop."""
    threads: list[int] = []
    original: Callable[[Any, Any], None] = service_account.Credentials.refresh

    def observed(self: service_account.Credentials, request: Any) -> None:
        threads.append(threading.get_ident())
        original(self, request)

    monkeypatch.setattr(service_account.Credentials, "refresh", observed)

    outcomes = await asyncio.gather(
        *(provider.send(wake(clock, token=f"fcm-token-{n}"), timeout=5) for n in range(3))
    )

    assert outcomes == [Delivered()] * 3
    assert len(threads) == 1  # one refresh for all three: the others waited for it
    assert threads[0] != threading.get_ident()
    assert [g.accepted for g in fake.grants] == [True]


async def test_the_librarys_own_auth_path_is_never_taken(
    provider: FcmProvider, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`before_request` would refresh on the loop and start the Regional Access Boundary
    lookup thread, which sends the access token to iamcredentials.googleapis.com."""
    calls: list[str] = []

    def observed(self: google_credentials.Credentials, *args: Any) -> None:
        calls.append(type(self).__name__)

    monkeypatch.setattr(google_credentials.Credentials, "before_request", observed)

    assert await provider.send(wake(clock), timeout=5) == Delivered()
    assert calls == []


async def test_the_access_token_is_reused_while_fresh(
    provider: FcmProvider, fake: FakeFcm, clock: ManualClock
) -> None:
    for _ in range(3):
        assert await provider.send(wake(clock), timeout=5) == Delivered()
    assert len(fake.grants) == 1


async def test_a_token_close_to_expiry_is_renewed_before_the_send(
    open_provider: OpenProvider,
    keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey],
    clock: ManualClock,
) -> None:
    """Tokens living 200 s are always inside the 5-minute renewal margin."""
    fake = await FakeFcm.start(access_token_lifetime=200)
    try:
        info = make_service_account(PROJECT, fake.token_uri, key=keys[0])
        fake.trust(info)
        provider = await FcmProvider.create(
            [AppCredentials(APP, fcm=FcmCredentials(PROJECT, info))], fake.endpoint, clock=clock
        )
        try:
            for _ in range(2):
                assert await provider.send(wake(clock), timeout=5) == Delivered()
        finally:
            await provider.close()
        assert [g.accepted for g in fake.grants] == [True, True]
    finally:
        await fake.stop()


async def test_the_access_token_ages_on_the_injected_clock(
    provider: FcmProvider, fake: FakeFcm, clock: ManualClock
) -> None:
    """The token (3600 s) is renewed once the provider's clock, not the wall clock, has
    brought it within the 5-minute margin of its expiry."""
    assert await provider.send(wake(clock), timeout=5) == Delivered()
    clock.advance(3600 - 300 - 10)
    assert await provider.send(wake(clock), timeout=5) == Delivered()
    assert len(fake.grants) == 1, "still fresh: 310 s left"
    clock.advance(20)
    assert await provider.send(wake(clock), timeout=5) == Delivered()
    assert len(fake.grants) == 2, "within the margin: renewed before the send"


async def test_a_refused_access_token_fails_the_send_and_is_renewed_for_the_next(
    keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey], clock: ManualClock
) -> None:
    google_time = ManualClock(time.time())
    fake = await FakeFcm.start(clock=google_time, access_token_lifetime=600)
    try:
        info = make_service_account(PROJECT, fake.token_uri, key=keys[0])
        fake.trust(info)
        provider = await FcmProvider.create(
            [AppCredentials(APP, fcm=FcmCredentials(PROJECT, info))], fake.endpoint, clock=clock
        )
        try:
            assert await provider.send(wake(clock), timeout=5) == Delivered()
            google_time.advance(700)  # Google expired the token early, as it may
            assert await provider.send(wake(clock), timeout=5) == PermanentFailure(
                "UNAUTHENTICATED"
            )
            assert await provider.send(wake(clock), timeout=5) == Delivered()
        finally:
            await provider.close()
        assert [a.status for a in fake.attempts] == [200, 401, 200]
        assert len(fake.grants) == 2
    finally:
        await fake.stop()


async def test_two_providers_for_the_same_app_coexist(
    open_provider: OpenProvider, account: dict[str, Any], fake: FakeFcm, clock: ManualClock
) -> None:
    """firebase_admin apps live in a process-wide registry: each provider names its own."""
    app = AppCredentials(APP, fcm=FcmCredentials(PROJECT, account))
    first, second = await open_provider(app), await open_provider(app)
    assert await first.send(wake(clock), timeout=5) == Delivered()
    await first.close()
    assert await second.send(wake(clock), timeout=5) == Delivered()
    assert len(fake.deliveries.for_token(TOKEN)) == 2


async def test_close_deletes_the_firebase_apps(
    fake: FakeFcm, account: dict[str, Any], clock: ManualClock
) -> None:
    import firebase_admin  # type: ignore[import-untyped]  # ships no types

    before = set(firebase_admin._apps)  # the library's registry; no public listing exists
    provider = await FcmProvider.create(
        [AppCredentials(APP, fcm=FcmCredentials(PROJECT, account))], fake.endpoint, clock=clock
    )
    assert await provider.send(wake(clock), timeout=5) == Delivered()
    assert len(set(firebase_admin._apps) - before) == 1
    await provider.close()
    assert set(firebase_admin._apps) == before


async def test_a_malformed_service_account_stops_the_start(fake: FakeFcm) -> None:
    broken = {"type": "service_account", "project_id": PROJECT}
    with pytest.raises(ValueError, match=APP):
        await FcmProvider.create([AppCredentials(APP, fcm=FcmCredentials(PROJECT, broken))])


async def test_the_token_never_reaches_outcomes_or_logs(
    provider: FcmProvider,
    fake: FakeFcm,
    clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    answers = [
        Respond.error(404, "UNREGISTERED"),
        Respond.error(400, "INVALID_ARGUMENT"),
        Respond.error(503, "UNAVAILABLE"),
        Respond.hanging(),
        Respond.ok(),
    ]
    fake.script.push(TOKEN, *answers)
    outcomes = [
        await provider.send(wake(clock), timeout=0.2 if answer.hang else 5) for answer in answers
    ]

    assert TOKEN not in repr(outcomes)
    assert caplog.records  # the libraries did log (httpx, firebase-admin, ours)
    assert all(TOKEN not in record.getMessage() for record in caplog.records)


# --- the stand-in itself, spoken to directly -------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def assertion(info: dict[str, Any], issued: float, **claims: Any) -> str:
    """A JWT-bearer assertion signed with the account's key, as google-auth makes one."""
    header = {"alg": "RS256", "typ": "JWT", "kid": info["private_key_id"]}
    body = {
        "iss": info["client_email"],
        "aud": GOOGLE_TOKEN_URI,
        "scope": MESSAGING,
        "iat": int(issued),
        "exp": int(issued) + 3600,
        **claims,
    }
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(body).encode())}"
    key = serialization.load_pem_private_key(info["private_key"].encode(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64(signature)}"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def grant(http: aiohttp.ClientSession, fake: FakeFcm, jwt: str) -> tuple[int, Any]:
    form = {"grant_type": JWT_BEARER, "assertion": jwt}
    async with http.post(fake.token_uri, data=form) as response:
        return response.status, await response.json()


@pytest.mark.parametrize(
    ("claims", "error"),
    [
        ({}, None),
        ({"iat": 1_000, "exp": 4_600}, "invalid_grant"),  # long expired
        ({"exp": 10_000_000_000}, "invalid_grant"),  # not short-lived
        ({"aud": "https://example.com/token"}, "invalid_grant"),
        ({"iss": "nobody@example.iam.gserviceaccount.com"}, "invalid_grant"),
        ({"scope": "https://www.googleapis.com/auth/datastore"}, "invalid_scope"),
    ],
    ids=["valid", "expired", "long-lived", "audience", "unknown-account", "scope"],
)
async def test_the_token_endpoint_checks_the_assertion(
    http: aiohttp.ClientSession,
    fake: FakeFcm,
    account: dict[str, Any],
    claims: dict[str, Any],
    error: str | None,
) -> None:
    status, body = await grant(http, fake, assertion(account, time.time(), **claims))
    if error is None:
        assert status == 200
        assert body["token_type"] == "Bearer"
        assert body["expires_in"] == 3600
    else:
        assert (status, body["error"]) == (400, error)


async def test_the_token_endpoint_uses_its_injected_clock(
    http: aiohttp.ClientSession, keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]
) -> None:
    google_time = ManualClock(1_000_000.0)
    fake = await FakeFcm.start(clock=google_time)
    try:
        info = make_service_account(PROJECT, fake.token_uri, key=keys[0])
        fake.trust(info)
        assert (await grant(http, fake, assertion(info, 1_000_000.0)))[0] == 200
        google_time.advance(3601)
        assert (await grant(http, fake, assertion(info, 1_000_000.0)))[0] == 400
    finally:
        await fake.stop()


async def send_raw(
    http: aiohttp.ClientSession, fake: FakeFcm, body: Any, token: str | None, project: str = PROJECT
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"{fake.base_url}/v1/projects/{project}/messages:send"
    async with http.post(url, json=body, headers=headers) as response:
        return response.status, await response.json()


@pytest.fixture
async def bearer(http: aiohttp.ClientSession, fake: FakeFcm, account: dict[str, Any]) -> str:
    status, body = await grant(http, fake, assertion(account, time.time()))
    assert status == 200
    token: str = body["access_token"]
    return token


GOOD: dict[str, Any] = {
    "message": {
        "token": TOKEN,
        "data": {"reason": "incoming_call"},
        "android": {"priority": "high", "ttl": "30s"},
    }
}


def changed(**message: Any) -> dict[str, Any]:
    return {"message": {**GOOD["message"], **message}}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (changed(priority="high"), "message"),  # unknown field (priority lives in android)
        ({**GOOD, "dry_run": True}, ""),
        (changed(data={"reason": 12}), "message.data[0].value"),
        (changed(data={"from": "x"}), "message.data"),
        (changed(topic="news"), "message"),  # two targets
        (changed(token=None), "message"),  # no target
        (changed(data={"k": "v" * 4096}), "message"),  # over 4096 bytes
        (changed(android={"priority": "urgent"}), "message.android.priority"),
        (changed(android={"ttl": "2419201s"}), "message.android.ttl"),  # over 28 days
        (changed(android={"ttl": "-1s"}), "message.android.ttl"),
        (changed(android={"ttl": 30}), "message.android.ttl"),
        (changed(android={"visibility": "PUBLIC"}), "message.android"),
    ],
)
async def test_messages_send_refuses_what_google_refuses(
    http: aiohttp.ClientSession, fake: FakeFcm, bearer: str, body: Any, field: str
) -> None:
    status, answer = await send_raw(http, fake, body, bearer)
    assert status == 400
    error = answer["error"]
    assert error["status"] == "INVALID_ARGUMENT"
    [detail] = error["details"]
    assert detail["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    assert detail["fieldViolations"][0]["field"] == field
    assert fake.deliveries.for_token(TOKEN) == []


async def test_messages_send_accepts_a_good_message_and_records_it(
    http: aiohttp.ClientSession, fake: FakeFcm, bearer: str
) -> None:
    status, answer = await send_raw(http, fake, GOOD, bearer)
    assert status == 200
    assert answer["name"].startswith(f"projects/{PROJECT}/messages/")
    assert fake.deliveries.for_token(TOKEN)[0].payload == GOOD["message"]


async def test_a_dry_run_is_validated_but_not_delivered(
    http: aiohttp.ClientSession, fake: FakeFcm, bearer: str
) -> None:
    status, answer = await send_raw(http, fake, {**GOOD, "validate_only": True}, bearer)
    assert status == 200
    assert answer["name"] == f"projects/{PROJECT}/messages/fake_message_id"
    assert fake.deliveries.for_token(TOKEN) == []


@pytest.mark.parametrize(
    ("token", "project", "status", "canonical"),
    [
        (None, PROJECT, 401, "UNAUTHENTICATED"),
        ("ya29.made-up", PROJECT, 401, "UNAUTHENTICATED"),
        ("issued", "someone-elses-project", 403, "PERMISSION_DENIED"),
    ],
)
async def test_messages_send_requires_a_token_issued_for_the_project(
    http: aiohttp.ClientSession,
    fake: FakeFcm,
    bearer: str,
    token: str | None,
    project: str,
    status: int,
    canonical: str,
) -> None:
    sent_with = bearer if token == "issued" else token
    answer_status, answer = await send_raw(http, fake, GOOD, sent_with, project)
    assert (answer_status, answer["error"]["status"]) == (status, canonical)
    assert fake.deliveries.for_token(TOKEN) == []


async def test_an_oversized_body_is_refused(
    http: aiohttp.ClientSession, fake: FakeFcm, bearer: str
) -> None:
    url = f"{fake.base_url}/v1/projects/{PROJECT}/messages:send"
    headers = {"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"}
    async with http.post(url, data=b"{" + b" " * 100_000 + b"}", headers=headers) as response:
        assert response.status == 413
