"""`POST /usage/v1/ping`: one app's report that it was used this month.

    Authorization: Bearer <tenant key>
    Content-Type: application/json
    {"tenant": "acme", "period": "2026-03", "pid": "<32 hex digits>",
     "platform": "ios", "app_version": "5.2.1"}

`202 {"status": "accepted"}` for a new id and for a repeat alike (idempotent). Every
refusal is a `Refusal` (webapi/errors.py), JSON `{"error": <code>, "detail": <sentence>}`
with its status, decided in `_accept` by what the caller must do next, and counted in
`softrelay_usage_pings` by its code:

    400 malformed_body, unknown_field, missing_field, bad_field, bad_period
        (a header that is not UTF-8: `bad_header`, from the middleware, uncounted)
    401 unauthorized              (no or wrong tenant key; WWW-Authenticate: Bearer)
    409 period_closed             (the ledger's PeriodClosed: the month is counted;
                                   do not retry)
    413 body_too_large
    415 unsupported_media_type
    429 rate_limited              (Retry-After)
    500 internal                  (not counted; retry later)
    503 storage_unavailable       (the store's StorageUnavailable, answered by the
                                   middleware: not counted; retry after Retry-After)
    503 cluster_unavailable       (a cluster's Redis is out, so the per-address limit
                                   cannot be counted: refused, by the middleware)

The route logs no IP address: the server runs without aiohttp's access log, and the
handler never lets an exception reach aiohttp, whose error log names the client's
address. `platform` and `app_version` are checked, then dropped: billing needs neither.
"""

from __future__ import annotations

import hmac
import logging
import re
from dataclasses import dataclass

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from cluster.redis import ClusterUnavailable
from privacy.backend import StorageUnavailable
from privacy.clock import Clock
from usage.ledger import Ledger, PeriodClosed
from usage.limits import CapWatch
from usage.period import end_of, parse_period, period_of, previous_period, start_of
from usage.settings import UsageSettings
from webapi.body import BodyTooLarge, read_capped
from webapi.errors import Refusal
from webapi.openapi import JSON, RETRY_AFTER, OpenApi, json_response, refusal
from webapi.ratelimit import Limiters, RateLimit

PING_PATH = "/usage/v1/ping"
FIELDS = ("tenant", "period", "pid", "platform", "app_version")
PLATFORMS = ("android", "ios", "linux", "macos", "web", "windows")
_FIELD_SET = frozenset(FIELDS)
_STRINGS = {str}
_PID = re.compile(r"^[0-9a-f]{32}$")
_VERSION = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,31}$")
_ACCEPTED = orjson.dumps({"status": "accepted"})

log = logging.getLogger("softrelay.usage")


@dataclass(frozen=True, slots=True)
class Ping:
    tenant: str
    period: str
    pid: bytes


class PingEndpoint:
    def __init__(
        self,
        settings: UsageSettings,
        ledger: Ledger,
        clock: Clock,
        registry: CollectorRegistry,
        limiters: Limiters,
    ) -> None:
        self._settings = settings
        self._ledger = ledger
        self._clock = clock
        self._tenants = {t.id: t for t in settings.tenants}
        # `ip_burst` pings per source address, refilled at that many per `ip_window`.
        self._limiter = limiters(
            "usage",
            RateLimit.per_window(settings.ip_burst, settings.ip_window, settings.max_tracked_ips),
        )
        self.caps = CapWatch(registry)
        self._pings = Counter(
            "softrelay_usage_pings",
            "Usage pings by outcome (accepted, repeat, or the refusal's error code)",
            ["outcome"],
            registry=registry,
        )
        # What every ping needs, looked up once here rather than per ping (bench/usage.py).
        self._accepted = self._pings.labels("accepted")
        self._repeats = self._pings.labels("repeat")
        self._keys = {t.id: t.key.encode() for t in settings.tenants}
        self._periods: _Periods | None = None

    async def handle(self, request: web.Request) -> web.Response:
        try:
            ping = await self._accept(request)
            try:
                distinct = await self._ledger.record(ping.tenant, ping.period, ping.pid)
            except PeriodClosed:
                raise Refusal(409, "period_closed", "this month is closed and counted") from None
        except Refusal as refusal:
            self._pings.labels(refusal.error).inc()
            raise
        except StorageUnavailable:
            # Not counted as stored: the middleware answers 503 with Retry-After.
            self._pings.labels("storage_unavailable").inc()
            raise
        except ClusterUnavailable:
            # The shared rate limit cannot be read (a cluster's Redis is out): refused,
            # 503 cluster_unavailable from the middleware, never let through unlimited.
            self._pings.labels("cluster_unavailable").inc()
            raise
        except Exception:
            # Answered by the middleware as a Refusal, never raised to aiohttp: its error
            # log names the client's IP. Ours keeps the exception's class only.
            log.exception("usage ping failed")
            self._pings.labels("error").inc()
            raise Refusal(500, "internal", "the ping was not counted; retry later") from None
        if distinct is None:
            self._repeats.inc()
        else:
            self._accepted.inc()
            tenant = self._tenants[ping.tenant]
            self.caps.check(tenant, ping.period, distinct)
        return web.Response(body=_ACCEPTED, status=202, headers={"Content-Type": JSON})

    async def _accept(self, request: web.Request) -> Ping:
        wait = await self._limiter.check(request.remote)
        if wait:
            raise Refusal(429, "rate_limited", "too many pings from this address", retry_after=wait)
        if request.content_type != "application/json":
            raise Refusal(415, "unsupported_media_type", "send Content-Type: application/json")
        limit = self._settings.max_body
        try:
            body = await read_capped(request.content, limit, request.content_length)
        except BodyTooLarge:
            raise Refusal(413, "body_too_large", f"a ping is at most {limit} bytes") from None
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise Refusal(400, "malformed_body", "the body is not valid JSON") from None
        # A well-formed ping passes one comparison of its keys and one type check per
        # field; anything else goes through `_shape`, which names what is wrong.
        if not (
            type(data) is dict
            and data.keys() == _FIELD_SET
            and set(map(type, data.values())) == _STRINGS
        ):
            _shape(data)
        tenant = self._authenticate(request, data["tenant"])
        period = self._check_period(data["period"])
        pid = data["pid"]
        if not _PID.match(pid):
            raise Refusal(400, "bad_field", "field 'pid' must be 32 lower-case hex digits")
        if data["platform"] not in PLATFORMS:
            raise Refusal(
                400, "bad_field", f"field 'platform' must be one of {', '.join(PLATFORMS)}"
            )
        if not _VERSION.match(data["app_version"]):
            raise Refusal(
                400, "bad_field", "field 'app_version' must be 1-32 of letters, digits, . + _ -"
            )
        return Ping(tenant, period, bytes.fromhex(pid))

    def _authenticate(self, request: web.Request, tenant_id: str) -> str:
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        expected = self._keys.get(tenant_id)
        # The same answer for an unknown tenant and a wrong key: tenants are not probed.
        if (
            scheme.lower() != "bearer"
            or expected is None
            or not hmac.compare_digest(key.strip().encode(), expected)
        ):
            raise Refusal(
                401,
                "unauthorized",
                "unknown tenant or wrong tenant key (Authorization: Bearer <key>)",
                {"WWW-Authenticate": 'Bearer realm="usage"'},
            )
        return tenant_id

    def _check_period(self, period: str) -> str:
        now = self._clock.now()
        periods = self._periods
        if periods is None or not periods.start <= now < periods.end:
            # Once a month (and whenever the clock moves out of the window).
            periods = self._periods = _Periods.at(now, self._settings.grace)
        if period == periods.current or (period == periods.previous and now < periods.grace_end):
            return period
        try:
            parse_period(period)
        except ValueError:
            raise Refusal(400, "bad_period", "field 'period' must be like '2026-03'") from None
        raise Refusal(
            400,
            "bad_period",
            f"field 'period' must be the current month {periods.current}"
            + (f" (or {periods.previous} during the grace window)" if self._settings.grace else ""),
        )


@dataclass(frozen=True, slots=True)
class _Periods:
    """The months a ping may name while the clock is in [start, end): this month, and the
    previous one until `grace_end`."""

    current: str
    previous: str
    start: float
    end: float
    grace_end: float

    @classmethod
    def at(cls, now: float, grace: float) -> _Periods:
        current = period_of(now)
        start = start_of(current)
        return cls(current, previous_period(current), start, end_of(current), start + grace)


def _shape(data: object) -> None:
    """Raise the refusal naming what is wrong with a body that is not an object of the
    ping's five fields, each a string."""
    if not isinstance(data, dict):
        raise Refusal(400, "malformed_body", "the body must be a JSON object")
    unknown = sorted(set(data) - _FIELD_SET)
    if unknown:
        raise Refusal(400, "unknown_field", f"unknown field {unknown[0][:40]!r}")
    for name in FIELDS:
        if name not in data:
            raise Refusal(400, "missing_field", f"field {name!r} is missing")
        if not isinstance(data[name], str):
            raise Refusal(400, "bad_field", f"field {name!r} must be a string")


def describe(openapi: OpenApi) -> None:
    """The ping's OpenAPI operation: what `_accept` checks, and every refusal above."""
    openapi.security_scheme(
        "tenantKey", {"type": "http", "scheme": "bearer", "description": "the tenant's key"}
    )
    ping = openapi.schema(
        "UsagePing",
        {
            "type": "object",
            "required": list(FIELDS),
            "additionalProperties": False,
            "properties": {
                "tenant": {"type": "string", "description": "the tenant id"},
                "period": {"type": "string", "pattern": r"^[0-9]{4}-[0-9]{2}$"},
                "pid": {
                    "type": "string",
                    "pattern": _PID.pattern,
                    "description": "this month's pseudonymous install id",
                },
                "platform": {"enum": list(PLATFORMS)},
                "app_version": {"type": "string", "pattern": _VERSION.pattern},
            },
        },
    )
    openapi.operation(
        PING_PATH,
        "post",
        {
            "summary": "Report that an install was used this month (idempotent)",
            "security": [{"tenantKey": []}],
            "requestBody": {"required": True, "content": {JSON: {"schema": ping}}},
            "responses": {
                "202": json_response(
                    "Counted, or a repeat of a ping already counted",
                    {
                        "type": "object",
                        "required": ["status"],
                        "properties": {"status": {"const": "accepted"}},
                    },
                ),
                "400": refusal(
                    "malformed_body, unknown_field, missing_field, bad_field, bad_period"
                ),
                "401": refusal(
                    "unauthorized: unknown tenant or wrong key",
                    {"WWW-Authenticate": {"schema": {"type": "string"}}},
                ),
                "409": refusal("period_closed: the month is counted; do not retry"),
                "413": refusal("body_too_large"),
                "415": refusal("unsupported_media_type"),
                "429": refusal("rate_limited", RETRY_AFTER),
                "500": refusal("internal: not counted; retry later"),
                "503": refusal(
                    "storage_unavailable: the store is unreachable; not counted", RETRY_AFTER
                ),
            },
        },
    )
