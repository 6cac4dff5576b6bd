"""FCM: waking Android phones with high-priority data messages, through firebase-admin.

One firebase_admin App per configured app (its own service account and project), each
sending HTTP v1 through `messaging.send_each_async` over an `HttpxAsyncClient` of ours,
because three library defaults do not fit ringing a phone:

- a 120 s timeout and four retries of 500/503 with backoff: here a send is one attempt
  bounded by the caller's timeout, since `PushService` owns retries (it knows the
  deadline and honours Retry-After);
- its auth flow (`GoogleAuthCredentialFlow`) refreshes the access token with google-auth's
  synchronous `requests` transport on the event loop, and again on a 401;
- on every request that flow also starts google-auth's Regional Access Boundary lookup,
  a thread that sends the access token to iamcredentials.googleapis.com (even when the
  messages go to the local stand-in).

So our client only attaches the current access token (`_BearerAuth`), and the token is
refreshed in a worker thread before it runs out, one refresh per app at a time.

Google's answers (FCM v1 `ErrorCode`) and what they become:

    200                                           -> Delivered
    UNREGISTERED (404), SENDER_ID_MISMATCH (403)  -> TokenDead
    INVALID_ARGUMENT naming the registration token
      (an FcmError detail, no field violation)    -> TokenDead
    INVALID_ARGUMENT about the message            -> PermanentFailure
    QUOTA_EXCEEDED (429), UNAVAILABLE (503), INTERNAL (500), other 5xx,
      timeout, connection error, token endpoint unreachable
                                                  -> TemporaryFailure (Retry-After kept)
    UNAUTHENTICATED (401), PERMISSION_DENIED (403), THIRD_PARTY_AUTH_ERROR,
      invalid_grant, unknown app                  -> PermanentFailure

Outcome reasons are error codes only: never the token, never a library message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import threading
import uuid
import warnings
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import firebase_admin  # type: ignore[import-untyped]  # ships no types
import httpx
from firebase_admin import credentials, exceptions, messaging
from firebase_admin._http_client import HttpxAsyncClient  # type: ignore[import-untyped]
from firebase_admin._retry import HttpxRetry  # type: ignore[import-untyped]
from google.auth import exceptions as google_exceptions
from google.auth.transport import requests as google_requests

from privacy.clock import Clock, SystemClock
from push.apps import AppCredentials, FcmCredentials, FcmEndpoint
from push.endpoints import install_fcm_client
from push.wake import (
    Delivered,
    Outcome,
    PermanentFailure,
    TemporaryFailure,
    TokenDead,
    WakeRequest,
)

log = logging.getLogger("softrelay.push.fcm")

HTTP_TIMEOUT = 10  # s; httpx's bound per phase, a backstop: the caller's timeout is tighter
TOKEN_TIMEOUT = 10.0  # s per token endpoint request (google-auth's default is 120)
REFRESH_MARGIN = timedelta(minutes=5)  # renew this long before the access token expires
MAX_TTL = 28 * 24 * 3600  # s; FCM keeps a message at most four weeks
FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
# Platform codes firebase-admin gives a failed send that may succeed if sent again later.
_TEMPORARY_CODES = {
    exceptions.UNAVAILABLE,
    exceptions.INTERNAL,
    exceptions.DEADLINE_EXCEEDED,
    exceptions.RESOURCE_EXHAUSTED,
    exceptions.ABORTED,
}


class _Credential(Protocol):
    """What we use of a google.oauth2.service_account.Credentials."""

    token: str | None
    expiry: datetime | None  # naive UTC, as google-auth keeps it

    def refresh(self, request: Any) -> None: ...


@dataclass(eq=False)
class _App:
    """One configured app: its firebase_admin App, our client, and its access token."""

    app_id: str
    credential: _Credential
    transport: google_requests.Request  # owns the requests.Session of token refreshes
    clock: Clock  # the provider's: token expiry is judged on it, like every deadline
    firebase_app: Any = None
    client: Any = None  # firebase_admin's HttpxAsyncClient, built by us
    stale: bool = False  # the access token was refused: renew it before the next send
    expires_at: float | None = None  # the access token's expiry on `clock`
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one refresh task per app
    # A caller that times out leaves its refresh thread running; the next one waits here.
    thread_lock: threading.Lock = field(default_factory=threading.Lock)

    def token_fresh(self) -> bool:
        if self.stale or self.credential.token is None or self.expires_at is None:
            return False
        return self.expires_at - self.clock.now() > REFRESH_MARGIN.total_seconds()

    def refresh_blocking(self) -> None:
        """Fetch a new access token (blocking I/O: runs in a worker thread)."""
        with self.thread_lock:
            if not self.token_fresh():
                # google-auth waits 120 s for the token endpoint unless told otherwise.
                self.credential.refresh(functools.partial(self.transport, timeout=TOKEN_TIMEOUT))
                self.expires_at = self._expiry_on_our_clock()
                self.stale = False

    def _expiry_on_our_clock(self) -> float | None:
        """google-auth stamps the expiry on the wall clock (its own utcnow); translated
        once, right after the refresh, into a lifetime counted on `clock`."""
        expiry = self.credential.expiry
        if expiry is None:
            return None
        lifetime = expiry - datetime.now(UTC).replace(tzinfo=None)
        return self.clock.now() + lifetime.total_seconds()


class _BearerAuth(httpx.Auth):
    """Attaches the app's access token. It never refreshes: a refresh here would block
    the event loop (httpx runs a sync auth flow on it)."""

    def __init__(self, app: _App) -> None:
        self._app = app

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self._app.credential.token
        if token:
            request.headers["Authorization"] = f"Bearer {token}"
        yield request


class FcmProvider:
    """Sends wake-ups as FCM v1 data messages, android priority high."""

    family = "fcm"

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._apps: dict[str, _App] = {}

    @classmethod
    async def create(
        cls,
        apps: Sequence[AppCredentials],
        endpoint: FcmEndpoint | None = None,
        *,
        clock: Clock | None = None,
    ) -> FcmProvider:
        """One firebase_admin App per app with FCM credentials; `endpoint` None is Google.

        `clock` is the one `WakeRequest.deadline` is read on. A malformed service account
        raises ValueError naming the app. No network I/O: the first send fetches a token.
        """
        provider = cls(clock or SystemClock())
        try:
            for app in apps:
                if app.fcm is not None:
                    await provider._add(app.app_id, app.fcm, endpoint)
        except BaseException:
            await provider.close()
            raise
        return provider

    async def _add(self, app_id: str, fcm: FcmCredentials, endpoint: FcmEndpoint | None) -> None:
        # Off the loop: each httpx transport loads the CA bundle (~20 ms, six of them).
        app, replaced = await asyncio.to_thread(_build, app_id, fcm, endpoint, self._clock)
        self._apps[app_id] = app
        await replaced.aclose()

    def serves(self, app_id: str) -> bool:
        return app_id in self._apps

    # ASYNC109: PushProvider names the parameter; asyncio.timeout below enforces it.
    async def send(self, request: WakeRequest, timeout: float) -> Outcome:  # noqa: ASYNC109
        app = self._apps.get(request.app_id)
        if app is None or request.service.family != self.family:
            return PermanentFailure("no FCM credentials for this app")
        remaining = request.deadline - self._clock.now()
        if remaining <= 0:
            return TemporaryFailure("deadline passed")
        try:
            async with asyncio.timeout(timeout):
                refused = await self._ensure_token(app)
                if refused is not None:
                    return refused
                batch = await messaging.send_each_async(
                    [self._message(request, remaining)], dry_run=False, app=app.firebase_app
                )
        except TimeoutError:
            return TemporaryFailure("timeout")
        except exceptions.FirebaseError as exc:  # raised for the batch as a whole
            return self._failed(app, exc)
        except ValueError:
            return PermanentFailure("invalid message")  # the SDK's own validation
        except Exception as exc:  # nothing of the library crosses this boundary
            log.warning("fcm.send_failed", extra={"fields": {"error": type(exc).__name__}})
            return PermanentFailure(f"unexpected {type(exc).__name__}")
        answer = batch.responses[0]
        if answer.success:
            return Delivered()
        return self._failed(app, answer.exception)

    async def close(self) -> None:
        apps, self._apps = self._apps, {}
        for app in apps.values():
            if app.client is not None:
                await app.client.aclose()
            if app.firebase_app is not None:
                # delete_app calls the messaging service's close(), which is
                # asyncio.run(client.aclose()): impossible inside a running loop, so it
                # runs in a thread, where it finds the client already closed.
                await asyncio.to_thread(firebase_admin.delete_app, app.firebase_app)
            app.transport.session.close()

    @staticmethod
    def _message(request: WakeRequest, remaining: float) -> Any:
        with warnings.catch_warnings():
            # 7.7 deprecates `token` in favour of Firebase installation ids (`fid`), but
            # phones register FCM registration tokens as pn-prid, which v1 takes as `token`.
            warnings.filterwarnings("ignore", "Message.token is deprecated", DeprecationWarning)
            # Data only, nothing personal: the app learns who calls when it re-registers.
            return messaging.Message(
                token=request.token,
                data={"reason": request.reason.value, "call_id": request.call_id},
                android=messaging.AndroidConfig(
                    priority="high",
                    # Whole seconds, rounded down: FCM must drop the push before the phone
                    # would answer too late. 0 means "now or never".
                    ttl=timedelta(seconds=math.floor(min(remaining, MAX_TTL))),
                ),
            )

    async def _ensure_token(self, app: _App) -> Outcome | None:
        """Renew the access token off the loop if it is missing or expires soon."""
        if app.token_fresh():
            return None
        async with app.lock:
            if app.token_fresh():
                return None
            try:
                await asyncio.to_thread(app.refresh_blocking)
            except google_exceptions.TransportError as exc:
                log.warning(
                    "fcm.token_unreachable", extra={"fields": {"error": type(exc).__name__}}
                )
                return TemporaryFailure("token endpoint unreachable")
            except google_exceptions.RefreshError as exc:
                error = _oauth_error(exc)
                log.warning("fcm.token_refused", extra={"fields": {"error": error}})
                if exc.retryable:
                    return TemporaryFailure(f"token endpoint: {error}")
                return PermanentFailure(f"token refused: {error}")
            except Exception as exc:
                log.warning("fcm.token_failed", extra={"fields": {"error": type(exc).__name__}})
                return PermanentFailure(f"token refresh failed: {type(exc).__name__}")
            log.debug("fcm.token_refreshed")
            return None

    def _failed(self, app: _App, error: Any) -> Outcome:
        """Translate the FirebaseError of one message (see the module docstring)."""
        if not isinstance(error, exceptions.FirebaseError):
            return PermanentFailure("unexpected send result")
        response = error.http_response if isinstance(error.http_response, httpx.Response) else None
        status = response.status_code if response is not None else None
        code = str(error.code)
        if isinstance(error, messaging.UnregisteredError):
            return TokenDead("UNREGISTERED")
        if isinstance(error, messaging.SenderIdMismatchError):
            return TokenDead("SENDER_ID_MISMATCH")
        if isinstance(error, messaging.QuotaExceededError):
            return TemporaryFailure("QUOTA_EXCEEDED", self._retry_after(response))
        if isinstance(error, messaging.ThirdPartyAuthError):
            return PermanentFailure("THIRD_PARTY_AUTH_ERROR")
        if code == exceptions.INVALID_ARGUMENT:
            if _names_the_token(response):
                return TokenDead("INVALID_ARGUMENT: not a valid registration token")
            return PermanentFailure("INVALID_ARGUMENT")
        if code == exceptions.UNAUTHENTICATED:
            app.stale = True  # the next send fetches a new token first
            return PermanentFailure("UNAUTHENTICATED")
        if code in _TEMPORARY_CODES or status == 429 or (status is not None and status >= 500):
            return TemporaryFailure(code, self._retry_after(response))
        if status is None and code == exceptions.UNKNOWN:
            return TemporaryFailure("connection error")  # an httpx transport error
        return PermanentFailure(code)

    def _retry_after(self, response: httpx.Response | None) -> float | None:
        value = response.headers.get("Retry-After", "").strip() if response is not None else ""
        if not value:
            return None
        if value.isdigit():
            return float(value)
        with contextlib.suppress(TypeError, ValueError):
            return max(0.0, parsedate_to_datetime(value).timestamp() - self._clock.now())
        return None


def _build(
    app_id: str, fcm: FcmCredentials, endpoint: FcmEndpoint | None, clock: Clock
) -> tuple[_App, Any]:
    """A firebase_admin App sending through our client; blocking (CA bundles, key parsing)."""
    try:
        certificate = credentials.Certificate(dict(fcm.service_account))
    except (ValueError, KeyError) as exc:
        raise ValueError(f"push app {app_id!r}: not a usable FCM service account") from exc
    app = _App(app_id, certificate.get_credential(), google_requests.Request(), clock)
    app.client = HttpxAsyncClient(
        retry_config=HttpxRetry(max_retries=0),  # one attempt: PushService retries
        timeout=HTTP_TIMEOUT,
    )
    app.client.async_client.auth = _BearerAuth(app)
    # Unique names: firebase_admin keeps its apps in a process-wide registry.
    app.firebase_app = firebase_admin.initialize_app(
        certificate,
        {"projectId": fcm.project_id, "httpTimeout": HTTP_TIMEOUT},
        name=f"softrelay-fcm-{app_id}-{uuid.uuid4().hex}",
    )
    try:
        replaced = install_fcm_client(app.firebase_app, app.client, endpoint)
    except BaseException:
        firebase_admin.delete_app(app.firebase_app)  # no loop in this thread: its close() works
        app.transport.session.close()
        raise
    return app, replaced


def _names_the_token(response: httpx.Response | None) -> bool:
    """Whether a 400 INVALID_ARGUMENT is Google's "not a valid FCM registration token".

    Google documents that answer as an FcmError detail with errorCode INVALID_ARGUMENT,
    while a problem with the message carries a google.rpc.BadRequest field violation
    (FCM docs, "REST error codes for the HTTP v1 API", examples 1 and 2).
    """
    if response is None:
        return False
    try:
        details = response.json()["error"]["details"]
        types = {d.get("@type"): d for d in details if isinstance(d, dict)}
    except (ValueError, KeyError, TypeError, AttributeError):
        return False
    fcm_error = types.get(FCM_ERROR)
    return (
        fcm_error is not None
        and fcm_error.get("errorCode") == "INVALID_ARGUMENT"
        and BAD_REQUEST not in types
    )


def _oauth_error(exc: google_exceptions.RefreshError) -> str:
    """The OAuth error code of a refused grant ("invalid_grant"), not its description."""
    data = exc.args[1] if len(exc.args) > 1 else None
    error = data.get("error") if isinstance(data, dict) else None
    return error if isinstance(error, str) and error.isidentifier() else "refused"
