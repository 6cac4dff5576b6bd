"""Sentry's ingest protocol: `POST /api/<project>/envelope/` and `/api/<project>/store/`.

A request is answered in this order, so nothing is decoded for a caller without a key:

    1. the project and its public key (X-Sentry-Auth, ?sentry_key=, Basic auth)  401/403
    2. the project's rate limit, and the requests in flight across projects
       (`max_in_flight`; Retry-After and X-Sentry-Rate-Limits)                   429
    3. the body, decoded (gzip, deflate, br) and capped on its decoded size      413/415
    4. the envelope and its items                                                400
    5. per event, in a worker off the event loop (`workers.Scrubbers`): its JSON
       (an object, else 400), opt-in and scrubbing (`scrubber.Chain`); then the
       store (the scrubbed JSON as the worker made it) and the forwarder; a report
       without opt-in, or over the CPU budget of scrubbing, is dropped unstored and
       counted                                                                   200
       (a scrubbing worker that died: 503, nothing stored)                      503
       (the store unreachable: StorageUnavailable, answered by the middleware as
       every API's, in Sentry's shape with Retry-After; nothing stored)         503

Every refusal is a `SentryRefusal` (webapi/errors.py), JSON `{"detail": reason}` as
Relay answers; the reason never quotes the body. Its `error` code is the outcome that
`softrelay_crash_requests` counts. What the envelope parser and the scrubbing workers
raise is mapped here, once:

    EnvelopeError          400 malformed
    MalformedEvent         400 malformed
    ScrubberUnavailable    503 unavailable
"""

from __future__ import annotations

import base64
import binascii
import re
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from crashreports.envelope import EnvelopeError, Item, parse_envelope
from crashreports.forward import Forwarder
from crashreports.settings import CrashSettings, Project
from crashreports.workers import MalformedEvent, Scrubbers, ScrubberUnavailable
from privacy.backend import StorageUnavailable
from privacy.batches import Batches
from privacy.clock import Clock
from privacy.store import JsonText, Store, Writable
from webapi.body import BodyTooLarge, read_capped
from webapi.errors import SentryRefusal
from webapi.openapi import JSON, RETRY_AFTER, OpenApi, json_response
from webapi.ratelimit import Limiters, RateLimit

CATEGORY = "crash_report"
# aiohttp decodes these itself, streaming, a bounded chunk at a time (with Brotli for br).
DECODED_BY_SERVER = frozenset({"", "identity", "gzip", "deflate", "br"})
IGNORED_ITEMS = frozenset({"session", "sessions", "client_report"})
ATTACHMENTS = frozenset({"attachment"})
_EVENT_ID = re.compile(r"^[0-9a-f]{32}$")
_AUTH_KEY = re.compile(r"sentry_key=([^,\s]+)")


def _rate_limited(retry_after: float, reason: str, outcome: str) -> SentryRefusal:
    refusal = SentryRefusal(429, outcome, reason, retry_after=retry_after)
    # Every category: the SDK holds back all its envelopes that long.
    refusal.headers["X-Sentry-Rate-Limits"] = (
        f"{refusal.headers['Retry-After']}::project:project_quota"
    )
    return refusal


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "softrelay_crash_requests",
            "Crash ingest requests by outcome",
            ["outcome"],
            registry=registry,
        )
        self.events = Counter(
            "softrelay_crash_events",
            "Crash report events by outcome (stored, no_opt_in, over_budget)",
            ["project", "outcome"],
            registry=registry,
        )
        self.items = Counter(
            "softrelay_crash_items_dropped",
            "Envelope items accepted and dropped unstored, by type",
            ["type"],
            registry=registry,
        )


class Ingest:
    """The handlers of one app; `forwarder` is None without an upstream."""

    def __init__(
        self,
        settings: CrashSettings,
        store: Store,
        clock: Clock,
        registry: CollectorRegistry,
        scrubbers: Scrubbers,
        limiters: Limiters,
        forwarder: Forwarder | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.scrubbers = scrubbers
        # Concurrent events are committed together, each answered once its row is on disk.
        self.batches = Batches(store, CATEGORY)
        # A token bucket per project: `rate_limit` events a minute, bursts of as many.
        self.limiter = limiters("crash", RateLimit.per_window(settings.rate_limit, 60))
        # Each request in flight holds up to `max_body` bytes and a place in a scrubbing
        # worker's queue; a per-project rate allows bursts, this bounds them all together
        # (a flood of events that each spend their whole CPU budget queues no further).
        self.in_flight = 0
        self.metrics = Metrics(registry)
        self.forwarder = forwarder
        self.envelope_handler = self._handler(self.envelope)
        self.store_handler = self._handler(self.store_endpoint)

    def _handler(
        self, inner: Callable[[web.Request, Project], Awaitable[str | None]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                project = self._authenticate(request)
                await self._admit(project)
                self.in_flight += 1
                try:
                    event_id = await inner(request, project)
                finally:
                    self.in_flight -= 1
            except SentryRefusal as exc:
                self.metrics.requests.labels(exc.error).inc()
                raise
            except StorageUnavailable:
                # The batch's transaction wrote nothing: refused, 503 in Sentry's shape
                # with Retry-After (the middleware's mapping).
                self.metrics.requests.labels("storage_unavailable").inc()
                raise
            self.metrics.requests.labels("accepted").inc()
            return web.json_response({"id": event_id} if event_id else {})

        return handle

    # --- 1. who is calling, 2. whether there is room ------------------------------------

    async def _admit(self, project: Project) -> None:
        # The shared cap first: a refused request spends none of its project's rate.
        if self.in_flight >= self.settings.max_in_flight:
            raise _rate_limited(1, "too many crash reports in progress", "busy")
        wait = await self.limiter.take(project.id)
        if wait:
            raise _rate_limited(wait, "rate limit of the project reached", "rate_limited")

    def _authenticate(self, request: web.Request) -> Project:
        key = _public_key(request)
        if key is None:
            raise SentryRefusal(401, "no_key", "missing sentry_key (X-Sentry-Auth or query)")
        project = self.settings.project(request.match_info["project"])
        if project is None or project.key != key:
            raise SentryRefusal(403, "bad_key", "unknown project or key")
        return project

    # --- 3. the body --------------------------------------------------------------------

    async def _body(self, request: web.Request) -> bytes:
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in DECODED_BY_SERVER:
            raise SentryRefusal(415, "encoding", f"unsupported Content-Encoding {encoding[:20]!r}")
        cap = self.settings.max_body
        # A compressed body's Content-Length says nothing of its size once decoded.
        declared = None if encoding else request.content_length
        try:
            return await read_capped(request.content, cap, declared)
        except BodyTooLarge as exc:
            decoded = "" if exc.declared else " once decoded"
            raise SentryRefusal(
                413, "too_large", f"body larger than {cap} bytes{decoded}"
            ) from None
        except (ValueError, EOFError):  # BadBody, and aiohttp's ContentEncodingError
            raise SentryRefusal(400, "malformed", "body cannot be decoded") from None

    # --- 4. envelopes and the old store endpoint ----------------------------------------

    async def envelope(self, request: web.Request, project: Project) -> str | None:
        body = await self._body(request)
        try:
            envelope = parse_envelope(body)
        except EnvelopeError as exc:
            raise SentryRefusal(400, "malformed", f"malformed envelope: {exc}") from None
        events: list[Item] = []
        for item in envelope.items:
            if item.type in ATTACHMENTS and self.settings.attachments == "refuse":
                raise SentryRefusal(
                    400,
                    "attachment",
                    "attachments and minidumps are not accepted: they cannot be scrubbed",
                )
            if item.type == "event":
                events.append(item)
            else:
                label = item.type if item.type in IGNORED_ITEMS | ATTACHMENTS else "other"
                self.metrics.items.labels(label).inc()
        if len(events) > 1:
            raise SentryRefusal(400, "malformed", "malformed envelope: more than one event")
        if not events:
            return None
        return await self._event(project, events[0].payload, envelope.headers.get("event_id"))

    async def store_endpoint(self, request: web.Request, project: Project) -> str | None:
        body = await self._body(request)
        if body[:1] != b"{":
            body = _legacy_body(body, self.settings.max_body)
        return await self._event(project, body, None)

    # --- 5. one event --------------------------------------------------------------------

    async def _event(self, project: Project, payload: bytes, header_id: Any) -> str:
        try:
            result = await self.scrubbers.scrub(project.id, _header_id(header_id), payload)
        except MalformedEvent as exc:
            raise SentryRefusal(400, "malformed", f"malformed event: {exc}") from None
        except ScrubberUnavailable:
            raise SentryRefusal(
                503, "unavailable", "crash report scrubber restarting, retry"
            ) from None
        if result.event is None:
            self.metrics.events.labels(project.id, result.dropped).inc()
            return result.event_id
        row: dict[str, Writable] = {
            "project": project.id,
            "event_id": result.event_id,
            "event": JsonText(result.event),
        }
        await self.batches.write(row)
        self.metrics.events.labels(project.id, "stored").inc()
        if self.forwarder is not None:
            self.forwarder.offer(orjson.loads(result.event))
        return result.event_id


def _public_key(request: web.Request) -> str | None:
    auth = request.headers.get("X-Sentry-Auth", "")
    if match := _AUTH_KEY.search(auth):
        return match.group(1)
    if key := request.query.get("sentry_key"):
        return key
    basic = request.headers.get("Authorization", "")
    if basic[:6].lower() == "basic ":
        try:
            decoded = base64.b64decode(basic[6:].strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.split(":", 1)[0] or None
    return None


def _header_id(value: Any) -> str:
    """The envelope's event id for the worker, if it is one (else "": none)."""
    if isinstance(value, str):
        compact = value.replace("-", "").lower()
        if _EVENT_ID.match(compact):
            return compact
    return ""


def _legacy_body(body: bytes, cap: int) -> bytes:
    """Old SDKs post base64 of zlib-deflated JSON to /store/: inflate, capped on output."""
    try:
        raw = base64.b64decode(body, validate=False)
        inflater = zlib.decompressobj()
        out = inflater.decompress(raw, cap + 1)
    except (binascii.Error, zlib.error):
        raise SentryRefusal(
            400, "malformed", "malformed event: neither JSON nor base64 zlib"
        ) from None
    if len(out) > cap or inflater.unconsumed_tail:
        raise SentryRefusal(413, "too_large", f"body larger than {cap} bytes once decoded")
    return out


def describe(openapi: OpenApi) -> None:
    """The two ingest operations, with the refusals of steps 1-4 above."""
    openapi.security_scheme(
        "sentryAuth",
        {
            "type": "apiKey",
            "in": "header",
            "name": "X-Sentry-Auth",
            "description": "Sentry sentry_key=<project public key>, ...",
        },
    )
    openapi.security_scheme("sentryKey", {"type": "apiKey", "in": "query", "name": "sentry_key"})
    detail = openapi.schema(
        "CrashRefusal",
        {
            "type": "object",
            "required": ["detail"],
            "additionalProperties": False,
            "properties": {"detail": {"type": "string"}},
        },
    )
    accepted = json_response(
        "Accepted: stored scrubbed, or dropped unstored (no opt-in); `id` when there was an event",
        {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}},
    )
    rate_headers = RETRY_AFTER | {"X-Sentry-Rate-Limits": {"schema": {"type": "string"}}}
    responses = {
        "200": accepted,
        "400": json_response("Malformed envelope or event, or an attachment", detail),
        "401": json_response("No sentry_key", detail),
        "403": json_response("Unknown project or key", detail),
        "413": json_response("Body over the limit once decoded", detail),
        "415": json_response("Content-Encoding not supported", detail),
        "503": json_response(
            "The scrubbing worker died, or the store is unreachable; nothing was stored",
            detail,
        ),
        "429": json_response("The project's rate limit", detail) | {"headers": rate_headers},
    }
    project = {
        "name": "project",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": "the project id of the DSN",
    }
    security: list[dict[str, list[str]]] = [{"sentryAuth": []}, {"sentryKey": []}]
    binary = {"type": "string", "format": "binary"}
    # Header line, then per item a header line and its payload (develop.sentry.dev).
    envelope = (
        '{"event_id":"9ec79c33ec9942ab8353589fcb2e04dc"}\n'
        '{"type":"event"}\n'
        '{"message":"crash","tags":{"softrelay.opt_in":"yes"}}\n'
    )
    openapi.operation(
        "/api/{project}/envelope/",
        "post",
        {
            "summary": "Sentry envelope ingest (events scrubbed before they are stored)",
            "parameters": [project],
            "security": security,
            "requestBody": {
                "required": True,
                # Any Content-Type is read as an envelope; SDKs send the first. (The
                # example sits on the second: a fuzzer knows how to send that one.)
                "content": {
                    "application/x-sentry-envelope": {"schema": binary},
                    "application/octet-stream": {"schema": binary, "example": envelope},
                },
            },
            "responses": responses,
        },
    )
    openapi.operation(
        "/api/{project}/store/",
        "post",
        {
            "summary": "Sentry's older single-event ingest (JSON, or base64 of zlib JSON)",
            "parameters": [project],
            "security": security,
            "requestBody": {"required": True, "content": {JSON: {"schema": {"type": "object"}}}},
            "responses": responses,
        },
    )
