"""A local stand-in for Google's FCM HTTP v1 API and its OAuth 2.0 token endpoint.

The real clients talk to it: google-auth fetches an access token from `POST /token` with
a service account's signed JWT assertion (RFC 7523), and firebase-admin posts messages
to `POST /v1/projects/<project>/messages:send` with that token. Both are checked the way
Google checks them, and answered in Google's formats:

- the assertion must be RS256-signed by the key of a service account the stand-in was
  given (`new_service_account`, `trust`), short-lived and in time (injected clock), for
  an audience of Google's token endpoint (or this one) and a messaging scope;
- a send needs a live access token issued here for a service account of that project
  (401 UNAUTHENTICATED / 403 PERMISSION_DENIED otherwise), and a message with exactly
  one target, string-only data within 4096 bytes, a known Android priority, a TTL of
  at most 28 days, and no unknown field (400 INVALID_ARGUMENT with a field violation).

Answers per registration token are scripted with `push.fakes.script.Script`; every
accepted message is recorded in `Deliveries`. It serves plain HTTP on loopback: both
libraries accept an http:// URL, and TLS would test nothing of ours.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import secrets
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from privacy.clock import Clock, SystemClock
from push.apps import FcmEndpoint
from push.fakes.script import Deliveries, Delivery, Respond, Script

# google-auth always sends this `aud`, whatever the token_uri. (noqa: a URL, not a secret)
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"  # noqa: S105
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
MESSAGING_SCOPES = frozenset(
    {
        "https://www.googleapis.com/auth/firebase.messaging",
        "https://www.googleapis.com/auth/cloud-platform",
    }
)
MAX_BODY = 64 * 1024  # a v1 send is a few KiB at most; refuse anything larger
MAX_DATA_BYTES = 4096  # Google: keys and values of the data payload together
MAX_TTL_SECONDS = 28 * 24 * 3600  # Google: at most four weeks
MAX_ASSERTION_LIFETIME = 3600  # Google: "a short-lived token (60 minutes)"
CLOCK_SKEW = 300  # seconds an assertion's iat may lie ahead of our clock
MAX_ACCESS_TOKENS = 10_000
FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"

# The canonical status of each HTTP status FCM answers with.
_CANONICAL = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
# Messages Google sends with each FCM error code (as seen in its documentation).
_FCM_MESSAGES = {
    "INVALID_ARGUMENT": "The registration token is not a valid FCM registration token",
    "UNREGISTERED": "Requested entity was not found.",
    "SENDER_ID_MISMATCH": "SenderId mismatch",
    "QUOTA_EXCEEDED": "Quota exceeded for quota metric 'Messages sent'.",
    "UNAVAILABLE": "The service is currently unavailable.",
    "INTERNAL": "Internal error encountered.",
    "THIRD_PARTY_AUTH_ERROR": "Auth error from APNS or Web Push Service",
}
# v1 field names; Google's JSON parser takes the proto name and its lowerCamelCase form.
_REQUEST_FIELDS = {"message", "validate_only", "validateOnly"}
_MESSAGE_FIELDS = {
    "name",
    "data",
    "notification",
    "android",
    "webpush",
    "apns",
    "fcm_options",
    "fcmOptions",
    "token",
    "topic",
    "condition",
    "fid",
}
_TARGETS = ("token", "topic", "condition", "fid")
_ANDROID_FIELDS = {
    "collapse_key",
    "collapseKey",
    "priority",
    "ttl",
    "restricted_package_name",
    "restrictedPackageName",
    "data",
    "notification",
    "fcm_options",
    "fcmOptions",
    "direct_boot_ok",
    "directBootOk",
    "bandwidth_constrained_ok",
    "bandwidthConstrainedOk",
    "restricted_satellite_ok",
    "restrictedSatelliteOk",
}
_PRIORITIES = {"normal", "high", "NORMAL", "HIGH"}  # the SDK sends lower case, the enum upper
_TTL = re.compile(r"(\d+)(?:\.(\d{1,9}))?s")
_TOKEN_SHAPE = re.compile(r"[\x21-\x7e]{1,4096}")  # printable ASCII, no spaces
_RESERVED_DATA_KEYS = {"from", "message_type"}
_RESERVED_DATA_PREFIXES = ("google", "gcm")


@dataclass(frozen=True, slots=True)
class ServiceAccountKey:
    """What the stand-in knows of a service account: its identity and public key."""

    client_email: str
    project_id: str
    private_key_id: str
    public_key: rsa.RSAPublicKey


@dataclass(frozen=True, slots=True)
class Grant:
    """One request to the token endpoint and the verdict on it."""

    client_email: str  # the assertion's iss, "" when unreadable
    accepted: bool
    error: str = ""  # OAuth error: invalid_grant, invalid_scope, unsupported_grant_type…


@dataclass(frozen=True, slots=True)
class Attempt:
    """One request to messages:send and the HTTP status answered (None: left hanging)."""

    project: str
    token: str  # "" when the request never got as far as naming one
    status: int | None


def make_service_account(
    project_id: str,
    token_uri: str,
    *,
    client_email: str = "",
    private_key_id: str = "",
    key: rsa.RSAPrivateKey | None = None,
) -> dict[str, Any]:
    """A throwaway service-account JSON in the form Google issues, with a fresh RSA key.

    Pass `client_email` and `private_key_id` of another account to get the same
    identity with a different key (what a stale or foreign key file looks like).
    """
    key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    email = client_email or f"softrelay-{secrets.token_hex(4)}@{project_id}.iam.gserviceaccount.com"
    return {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": private_key_id or secrets.token_hex(20),
        "private_key": pem,
        "client_email": email,
        "client_id": str(secrets.randbelow(10**21)),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
    }


def service_account_key(info: Mapping[str, Any]) -> ServiceAccountKey:
    """The public part of a service-account JSON."""
    private = serialization.load_pem_private_key(str(info["private_key"]).encode(), None)
    if not isinstance(private, rsa.RSAPrivateKey):
        raise TypeError("service account key is not an RSA key")
    return ServiceAccountKey(
        client_email=str(info["client_email"]),
        project_id=str(info["project_id"]),
        private_key_id=str(info.get("private_key_id", "")),
        public_key=private.public_key(),
    )


class _GrantRefused(Exception):
    def __init__(self, error: str, description: str, client_email: str = "") -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.client_email = client_email


@dataclass(frozen=True, slots=True)
class _AccessToken:
    account: ServiceAccountKey
    expires_at: float


class FakeFcm:
    """FCM v1 and Google's token endpoint on 127.0.0.1, for the real firebase-admin client."""

    def __init__(
        self,
        clock: Clock,
        script: Script,
        deliveries: Deliveries,
        access_token_lifetime: int,
    ) -> None:
        self.clock = clock
        self.script = script
        self.deliveries = deliveries
        self.grants: deque[Grant] = deque(maxlen=10_000)
        self.attempts: deque[Attempt] = deque(maxlen=100_000)
        self._lifetime = access_token_lifetime
        self._accounts: dict[str, ServiceAccountKey] = {}
        self._access: dict[str, _AccessToken] = {}
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._base_url = ""
        self._messages = 0

    @classmethod
    async def start(
        cls,
        *,
        clock: Clock | None = None,
        script: Script | None = None,
        deliveries: Deliveries | None = None,
        access_token_lifetime: int = 3600,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> FakeFcm:
        fake = cls(
            clock or SystemClock(),
            script or Script(),
            deliveries or Deliveries(),
            access_token_lifetime,
        )
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/token", fake._token)
        app.router.add_post("/v1/projects/{project}/messages:send", fake._send)
        runner = web.AppRunner(app, access_log=None)  # access lines would not add anything
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        fake._runner = runner
        bound = runner.addresses[0]
        fake._base_url = f"http://{bound[0]}:{bound[1]}"
        return fake

    async def stop(self) -> None:
        self._stopping.set()  # releases the requests left hanging
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def base_url(self) -> str:
        return self._base_url

    @property
    def token_uri(self) -> str:
        return f"{self._base_url}/token"

    @property
    def endpoint(self) -> FcmEndpoint:
        return FcmEndpoint(self._base_url)

    def new_service_account(self, project_id: str) -> dict[str, Any]:
        """A throwaway service account of `project_id`, trusted here, its token_uri here.

        Makes a 2048-bit RSA key: about 0.1 s of CPU on the calling thread.
        """
        info = make_service_account(project_id, self.token_uri)
        self.trust(info)
        return info

    def trust(self, info: Mapping[str, Any]) -> None:
        """Accept assertions signed by this service account (its public key is kept)."""
        key = service_account_key(info)
        self._accounts[key.client_email] = key

    def sends_to(self, token: str) -> list[Attempt]:
        return [a for a in self.attempts if a.token == token]

    # --- the token endpoint ---------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        try:
            account = self._verify(form.get("grant_type"), form.get("assertion"))
        except _GrantRefused as refused:
            self.grants.append(Grant(refused.client_email, accepted=False, error=refused.error))
            return web.json_response(
                {"error": refused.error, "error_description": refused.description}, status=400
            )
        self.grants.append(Grant(account.client_email, accepted=True))
        token = "ya29.fake-" + secrets.token_urlsafe(32)
        self._remember(token, _AccessToken(account, self.clock.now() + self._lifetime))
        return web.json_response(
            {"access_token": token, "expires_in": self._lifetime, "token_type": "Bearer"}
        )

    def _verify(self, grant_type: object, assertion: object) -> ServiceAccountKey:
        """The service account whose key signed this assertion (RFC 7523), or refused."""
        if grant_type != JWT_BEARER:
            raise _GrantRefused("unsupported_grant_type", "Invalid grant_type.")
        if not isinstance(assertion, str):
            raise _GrantRefused("invalid_request", "Missing required parameter: assertion")
        try:
            head_b64, claims_b64, signature_b64 = assertion.split(".")
            header = json.loads(_b64url(head_b64))
            claims = json.loads(_b64url(claims_b64))
            signature = _b64url(signature_b64)
        except (ValueError, binascii.Error) as exc:
            raise _GrantRefused("invalid_grant", "Invalid JWT: malformed.") from exc
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise _GrantRefused("invalid_grant", "Invalid JWT: malformed.")
        email = str(claims.get("iss", ""))
        account = self._accounts.get(email)
        if account is None:
            raise _GrantRefused("invalid_grant", "Invalid grant: account not found", email)
        kid = header.get("kid")
        if header.get("alg") != "RS256" or (kid is not None and kid != account.private_key_id):
            raise _GrantRefused("invalid_grant", "Invalid JWT Signature.", email)
        try:
            account.public_key.verify(
                signature,
                f"{head_b64}.{claims_b64}".encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except InvalidSignature as exc:
            raise _GrantRefused("invalid_grant", "Invalid JWT Signature.", email) from exc
        if claims.get("aud") not in (GOOGLE_TOKEN_URI, self.token_uri):
            raise _GrantRefused("invalid_grant", "Invalid JWT: Failed audience check.", email)
        iat, exp, now = claims.get("iat"), claims.get("exp"), self.clock.now()
        if (
            not isinstance(iat, int)
            or not isinstance(exp, int)
            or not iat < exp <= iat + MAX_ASSERTION_LIFETIME
            or iat > now + CLOCK_SKEW
            or exp <= now
        ):
            raise _GrantRefused(
                "invalid_grant",
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a "
                "reasonable timeframe. Check your iat and exp values in the JWT claim.",
                email,
            )
        scopes = set(str(claims.get("scope", "")).split())
        if not scopes & MESSAGING_SCOPES:
            raise _GrantRefused("invalid_scope", "No messaging scope was requested.", email)
        return account

    def _remember(self, token: str, access: _AccessToken) -> None:
        now = self.clock.now()
        for stale in [t for t, a in self._access.items() if a.expires_at <= now]:
            del self._access[stale]
        while len(self._access) >= MAX_ACCESS_TOKENS:
            del self._access[next(iter(self._access))]  # oldest first
        self._access[token] = access

    # --- messages:send ----------------------------------------------------------------

    async def _send(self, request: web.Request) -> web.Response:
        project = request.match_info["project"]
        denied = self._authorise(request, project)
        if denied is not None:
            self.attempts.append(Attempt(project, "", denied.status))
            return denied
        try:
            body = json.loads(await request.read())
        except ValueError:
            return self._answer(project, "", _bad_request("", "Invalid JSON payload received."))
        violation = _violation(body)
        if violation is not None:
            token = _token_of(body)
            return self._answer(project, token, _bad_request(*violation))
        message: dict[str, Any] = body["message"]
        token = str(message.get("token", ""))
        scripted = self.script.next(token) if token else None
        if scripted is not None and scripted.hang:
            self.attempts.append(Attempt(project, token, None))
            await self._stopping.wait()
            return _error(503, "UNAVAILABLE", "The service is shutting down.")
        if scripted is not None and scripted.status != 200:
            return self._answer(project, token, _scripted(scripted))
        if token and not _TOKEN_SHAPE.fullmatch(token):
            return self._answer(project, token, _fcm_error(400, "INVALID_ARGUMENT"))
        self._messages += 1
        name = f"projects/{project}/messages/{self._messages}"
        if body.get("validate_only", body.get("validateOnly", False)):
            name = f"projects/{project}/messages/fake_message_id"  # dry run: nothing sent
        else:
            # Plain str keys (aiohttp's are `istr`): the delivery feed sends them as JSON.
            headers = {
                str(k): v for k, v in request.headers.items() if k.lower() != "authorization"
            }
            self.deliveries.add(Delivery("fcm", token, project, headers, message, self.clock.now()))
        return self._answer(project, token, web.json_response({"name": name}))

    def _answer(self, project: str, token: str, response: web.Response) -> web.Response:
        self.attempts.append(Attempt(project, token, response.status))
        return response

    def _authorise(self, request: web.Request, project: str) -> web.Response | None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return _error(
                401,
                "UNAUTHENTICATED",
                "Request is missing required authentication credential. Expected OAuth 2 "
                "access token, login cookie or other valid authentication credential.",
            )
        access = self._access.get(token)
        if access is None or access.expires_at <= self.clock.now():
            return _error(
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials. Expected OAuth 2 access "
                "token, login cookie or other valid authentication credential.",
            )
        if access.account.project_id != project:
            return _error(
                403,
                "PERMISSION_DENIED",
                f"Permission 'cloudmessaging.messages.create' denied on resource "
                f"'//cloudresourcemanager.googleapis.com/projects/{project}' "
                "(or it may not exist).",
            )
        return None


def _b64url(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _token_of(body: Any) -> str:
    message = body.get("message") if isinstance(body, dict) else None
    token = message.get("token") if isinstance(message, dict) else None
    return token if isinstance(token, str) else ""


def _violation(body: Any) -> tuple[str, str] | None:
    """The first thing Google would refuse in a send request: (field, description)."""
    if not isinstance(body, dict):
        return "", "Invalid JSON payload received. Expected an object."
    unknown = _unknown(body, _REQUEST_FIELDS, "")
    if unknown:
        return unknown
    message = body.get("message")
    if not isinstance(message, dict):
        return "message", "Message is required."
    unknown = _unknown(message, _MESSAGE_FIELDS, "message")
    if unknown:
        return unknown
    targets = [t for t in _TARGETS if message.get(t) not in (None, "")]
    if len(targets) != 1:
        return "message", "Exactly one of token, topic, condition or fid must be specified."
    for target in targets:
        if not isinstance(message[target], str):
            return f"message.{target}", f"Invalid value at 'message.{target}' (TYPE_STRING)"
    data_size = 0
    for path, data in (("message.data", message.get("data")), _android_data(message)):
        problem = _data_problem(path, data)
        if isinstance(problem, tuple):
            return problem
        data_size += problem
    if data_size > MAX_DATA_BYTES:
        return "message", "Message is too big"
    android = message.get("android")
    if android is not None:
        return _android_violation(android)
    return None


def _unknown(obj: dict[str, Any], known: set[str], path: str) -> tuple[str, str] | None:
    for name in obj:
        if name not in known:
            where = f"'{path}'" if path else "top level"
            return path, (
                f'Invalid JSON payload received. Unknown name "{name}" at {where}: '
                "Cannot find field."
            )
    return None


def _android_data(message: dict[str, Any]) -> tuple[str, Any]:
    android = message.get("android")
    return "message.android.data", android.get("data") if isinstance(android, dict) else None


def _data_problem(path: str, data: Any) -> tuple[str, str] | int:
    """A violation of a data map, or its size in bytes (keys and values)."""
    if data is None:
        return 0
    if not isinstance(data, dict):
        return path, f"Invalid value at '{path}' (type.googleapis.com/google.protobuf.Struct)"
    size = 0
    for index, (key, value) in enumerate(data.items()):
        if not isinstance(value, str):
            return (
                f"{path}[{index}].value",
                f"Invalid value at '{path}[{index}].value' (TYPE_STRING)",
            )
        if key in _RESERVED_DATA_KEYS or key.lower().startswith(_RESERVED_DATA_PREFIXES):
            return path, f"Invalid data payload key: {key}"
        size += len(key.encode()) + len(value.encode())
    return size


def _android_violation(android: Any) -> tuple[str, str] | None:
    if not isinstance(android, dict):
        return "message.android", "Invalid value at 'message.android'"
    unknown = _unknown(android, _ANDROID_FIELDS, "message.android")
    if unknown:
        return unknown
    priority = android.get("priority")
    if priority is not None and priority not in _PRIORITIES:
        return (
            "message.android.priority",
            f"Invalid value at 'message.android.priority' (type.googleapis.com/"
            f'google.firebase.fcm.v1.AndroidMessagePriority), "{priority}"',
        )
    ttl = android.get("ttl")
    if ttl is not None:
        match = _TTL.fullmatch(ttl) if isinstance(ttl, str) else None
        if match is None or int(match.group(1)) > MAX_TTL_SECONDS:
            return "message.android.ttl", "Invalid value at 'message.android.ttl' (Duration)"
    return None


def _error(
    status: int, canonical: str, message: str, details: list[Any] | None = None
) -> web.Response:
    error: dict[str, Any] = {"code": status, "message": message, "status": canonical}
    if details:
        error["details"] = details
    return web.json_response({"error": error}, status=status)


def _bad_request(field: str, description: str) -> web.Response:
    violation = {"field": field, "description": description}
    return _error(
        400,
        "INVALID_ARGUMENT",
        description,
        [{"@type": BAD_REQUEST, "fieldViolations": [violation]}],
    )


def _fcm_error(status: int, code: str, retry_after: int | None = None) -> web.Response:
    canonical = _CANONICAL.get(status, "UNKNOWN")
    message = _FCM_MESSAGES.get(code, code)
    response = _error(status, canonical, message, [{"@type": FCM_ERROR, "errorCode": code}])
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def _scripted(answer: Respond) -> web.Response:
    code = answer.reason or _CANONICAL.get(answer.status, "UNSPECIFIED_ERROR")
    return _fcm_error(answer.status, code, answer.retry_after)
